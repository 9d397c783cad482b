"""The train stage reports through callbacks (tasks/lib/callbacks.py), the only way training reaches a tracker: which
hooks run, in what order, with what, on a fresh and a resumed training; a broken callback never stops training."""

from __future__ import annotations

import csv

import pytest

from tasks import fetch, train
from tasks.lib.callbacks import CallbackList, TrainCallback


class Recorder(TrainCallback):
    def __init__(self):
        self.calls = []

    def on_fit_start(self, cfg, dataset_sha256, fresh):
        self.calls.append(("fit_start", len(dataset_sha256), fresh))

    def on_train_start(self, cfg, step, rows):
        self.calls.append(("train_start", step, [int(r["step"]) for r in rows]))

    def on_log(self, row):
        self.calls.append(("log", int(row["step"]), float(row["loss"])))

    def on_step_end(self, step, ema_model, diffusion):
        self.calls.append(("step_end", step, type(ema_model).__name__, diffusion.num_timesteps))

    def on_train_end(self, step, ema_model):
        self.calls.append(("train_end", step))

    def on_fit_end(self, ok):
        self.calls.append(("fit_end", ok))


class Broken(TrainCallback):
    def on_log(self, row):
        raise RuntimeError("tracker down")


def _losses(path):
    with open(path) as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f, delimiter="\t")]


def test_callbacks_hear_a_fresh_and_a_resumed_training(tiny_config, tmp_path, capsys):
    cfg = tiny_config({"train.steps": 3, "train.checkpoint_every": 3})
    fetch.run(cfg, tmp_path / "data")
    rec = Recorder()
    train.run_local(cfg, tmp_path / "data", tmp_path / "ckpt", tmp_path / "loss.tsv", threads=1,
                    callbacks=[rec, Broken()])
    log = _losses(tmp_path / "loss.tsv")
    assert rec.calls == [
        ("fit_start", 64, True),
        ("train_start", 0, []),
        ("step_end", 0, "UNet", 100),  # the initial weights, before the first update
        ("log", 1, log[0][1]), ("step_end", 1, "UNet", 100),
        ("log", 2, log[1][1]), ("step_end", 2, "UNet", 100),
        ("log", 3, log[2][1]), ("step_end", 3, "UNet", 100),
        ("train_end", 3),
        ("fit_end", True),
    ]
    err = capsys.readouterr().err
    assert err.count("Broken.on_log failed") == 1 and "tracker down" in err  # reported once, then dropped

    # More steps: a resume from step 3, told the log so far; no step-0 report.
    rec = Recorder()
    more = tiny_config({"train.steps": 5, "train.checkpoint_every": 3})
    train.run_local(more, tmp_path / "data", tmp_path / "ckpt", tmp_path / "loss.tsv", threads=1, callbacks=[rec])
    log = _losses(tmp_path / "loss.tsv")
    assert [s for s, _ in log] == [1, 2, 3, 4, 5]
    assert rec.calls[:3] == [("fit_start", 64, False), ("train_start", 3, [1, 2, 3]), ("log", 4, log[3][1])]
    assert rec.calls[-3:] == [("step_end", 5, "UNet", 100), ("train_end", 5), ("fit_end", True)]


def test_a_failed_training_tells_the_driver_side(tiny_config, tmp_path):
    cfg = tiny_config({"train.steps": 3, "train.lr": 1e6, "train.grad_clip": 0.0})
    fetch.run(cfg, tmp_path / "data")
    rec = Recorder()
    with pytest.raises(train.NonFiniteLoss):
        train.run_local(cfg, tmp_path / "data", tmp_path / "ckpt", tmp_path / "loss.tsv", threads=1, callbacks=[rec])
    assert rec.calls[-1] == ("fit_end", False) and ("train_end", 3) not in rec.calls


def test_callback_list_calls_each_in_order():
    a, b = Recorder(), Recorder()
    cbs = CallbackList([a, b])
    cbs.on_fit_end(True)
    assert a.calls == b.calls == [("fit_end", True)]


def test_a_third_party_tracker_is_found_through_its_entry_point(tmp_path, repo_root):
    """README "Tracking": another installed package declares a tracker under ``ddpm_pipeline.trackers`` and the
    stages report to it, beside MLflow, without importing it. Here a package on PYTHONPATH with its own dist-info,
    in a fresh interpreter (entry points are read once per process)."""
    import json
    import subprocess
    import sys

    site = tmp_path / "site"
    (site / "csv_tracker-1.0.dist-info").mkdir(parents=True)
    (site / "csv_tracker-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: csv-tracker\n"
                                                                 "Version: 1.0\n")
    (site / "csv_tracker-1.0.dist-info" / "entry_points.txt").write_text(
        "[ddpm_pipeline.trackers]\ncsv = csv_tracker:TRACKER\n")
    (site / "csv_tracker.py").write_text(
        "import json\n"
        "class Tracker:\n"
        "    def train_callback(self, cfg):\n"
        "        return None\n"
        "    def after_stage(self, stage, cfg, root, paths):\n"
        "        rec = json.loads(paths['eval_metrics'].read_text())\n"
        "        (root / 'seen.json').write_text(json.dumps({'stage': stage, 'fid': rec['fid']}))\n"
        "TRACKER = Tracker()\n")
    (tmp_path / "eval.json").write_text(json.dumps({"fid": 2.5}))
    code = ("from tasks.lib.callbacks import after_stage, trackers\n"
            "from tasks.lib.config import from_dict\n"
            "cfg = from_dict({'tracking': {'enabled': True, 'uri': 'http://127.0.0.1:9'}})\n"
            "print(sorted(name for name, _ in trackers(cfg)))\n"
            "after_stage('evaluate', cfg, eval_metrics='eval.json')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{site}:{repo_root}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "2", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "['csv', 'mlflow']"
    assert json.loads((tmp_path / "seen.json").read_text()) == {"stage": "evaluate", "fid": 2.5}
    # MLflow's tracker, pointed at a dead server, warned and let the stage go on
    assert "unreachable" in r.stderr
