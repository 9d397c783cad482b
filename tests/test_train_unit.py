"""Pieces of the train stage that need no Ray: the lr schedule, the resume key, the loss log."""

from __future__ import annotations

import pytest

from tasks.lib.runkey import run_key
from tasks.train import lr_at, make_scheduler, read_loss_log, write_loss_log


def test_lr_warmup_then_cosine_to_zero(tiny_config):
    cfg = tiny_config({"train.lr": 1e-3, "train.warmup_steps": 10, "train.steps": 110, "train.lr_schedule": "cosine"})
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5e-4)
    assert lr_at(110, cfg) == pytest.approx(0.0, abs=1e-12)
    const = tiny_config({"train.lr": 2e-4, "train.warmup_steps": 0})
    assert [lr_at(s, const) for s in (0, 5, 10_000)] == [2e-4] * 3


def test_torch_scheduler_follows_the_schedule_and_resumes_exactly_from_its_state(tiny_config, tmp_path):
    import torch

    from ddpm.checkpoint import load_checkpoint, save_checkpoint

    cfg = tiny_config({"train.lr": 1e-3, "train.warmup_steps": 4, "train.steps": 20, "train.lr_schedule": "cosine"})

    def fresh():
        w = torch.nn.Parameter(torch.zeros(3))
        opt = torch.optim.Adam([w], lr=cfg.train.lr)
        return w, opt, make_scheduler(opt, cfg)

    w, opt, sched = fresh()
    used = []
    for _ in range(20):  # the loop's order: read the lr, step the optimizer, step the scheduler
        used.append(opt.param_groups[0]["lr"])
        w.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert used == pytest.approx([lr_at(s, cfg) for s in range(20)], rel=1e-12)

    # Saved at step 7 (in a real checkpoint, read back with weights_only) and resumed: the same lrs follow.
    w, opt, sched = fresh()
    for _ in range(7):
        w.grad = torch.ones(3)
        opt.step()
        sched.step()
    save_checkpoint(tmp_path / "ckpt_00000007.pt", {"model": {}, "ema": {}, "optimizer": opt.state_dict(),
                                                     "scheduler": sched.state_dict(), "step": 7, "config": {}})
    state = load_checkpoint(tmp_path / "ckpt_00000007.pt")
    w2, opt2, sched2 = fresh()
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    resumed = []
    for _ in range(13):
        resumed.append(opt2.param_groups[0]["lr"])
        w2.grad = torch.ones(3)
        opt2.step()
        sched2.step()
    assert resumed == used[7:]


def test_more_steps_resume_only_under_a_constant_schedule(tiny_config):
    a = run_key(tiny_config({"train.steps": 100}), "sha")
    assert run_key(tiny_config({"train.steps": 200, "train.log_every": 7}), "sha") == a
    assert run_key(tiny_config({"train.lr": 5e-4}), "sha") != a
    assert run_key(tiny_config({"train.steps": 100}), "other-data") != a
    cos = run_key(tiny_config({"train.steps": 100, "train.lr_schedule": "cosine"}), "sha")
    # A cosine decay is laid over train.steps: a longer run is another curve, not a continuation.
    assert run_key(tiny_config({"train.steps": 200, "train.lr_schedule": "cosine"}), "sha") != cos


def test_loss_log_round_trip_is_cut_at_the_resumed_step(tmp_path):
    rows = [{"step": s, "loss": f"{1 / s:.6f}", "lr": "0.001", "grad_norm": "1.0", "images_per_s": "10.0"}
            for s in range(1, 6)]
    path = tmp_path / "loss.tsv"
    write_loss_log(path, rows)
    assert path.read_text().splitlines()[0] == "step\tloss\tlr\tgrad_norm\timages_per_s"
    back = read_loss_log(path, upto_step=3)
    assert [int(r["step"]) for r in back] == [1, 2, 3]
    assert back[1]["loss"] == "0.500000"
    assert read_loss_log(tmp_path / "missing.tsv", 3) == []


def test_interrupted_and_resumed_training_equals_the_uninterrupted_run(tiny_config, tmp_path):
    """3 steps, then a rerun to 6, against 6 straight: the same weights bit for bit and the same lr column (warm-up
    across the resume point, so the scheduler's state matters)."""
    import torch

    from ddpm.checkpoint import load_checkpoint
    from tasks import fetch
    from tasks.train import run_local

    over = {"train.warmup_steps": 5, "train.lr_schedule": "constant"}
    fetch.run(tiny_config(over), tmp_path / "data")
    run_local(tiny_config(over), tmp_path / "data", tmp_path / "straight", tmp_path / "straight.tsv", threads=1)
    run_local(tiny_config({**over, "train.steps": 3}), tmp_path / "data", tmp_path / "resumed", tmp_path / "r.tsv",
              threads=1)
    run_local(tiny_config(over), tmp_path / "data", tmp_path / "resumed", tmp_path / "r.tsv", threads=1)
    a = load_checkpoint(tmp_path / "straight" / "ckpt_00000006.pt")
    b = load_checkpoint(tmp_path / "resumed" / "ckpt_00000006.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    lrs = lambda p: [r["lr"] for r in read_loss_log(p, 6)]  # noqa: E731
    assert lrs(tmp_path / "straight.tsv") == lrs(tmp_path / "r.tsv") == [
        f"{lr_at(s, tiny_config(over)):.6g}" for s in range(6)]


def test_a_changed_learning_rate_sets_the_checkpoints_aside_and_trains_from_scratch(tiny_config, tiny_trained,
                                                                                      tmp_path, capsys):
    """A checkpoint folder of another run key (here train.lr) is emptied before training, which then starts at step
    0 and says why. Ray Train's run is named after the key too, so under Ray its record of the old run (in the same
    ray.storage) is not resumed either."""
    import shutil

    from ddpm.checkpoint import list_checkpoints, load_checkpoint
    from tasks.lib.files import read_json
    from tasks.lib.runkey import run_name
    from tasks.train import run_local

    ckpts = tmp_path / "ckpt"
    shutil.copytree(tiny_trained / "checkpoints", ckpts)  # 6 steps at train.lr 1e-3, with their run_key.json
    old_key = read_json(ckpts / "run_key.json")
    assert list_checkpoints(ckpts)[-1][0] == 6
    capsys.readouterr()
    run_local(tiny_config({"train.lr": 5e-4, "train.steps": 3}), tiny_trained / "dataset", ckpts, tmp_path / "l.tsv",
              threads=1)
    out = capsys.readouterr().out
    assert f"checkpoints in {ckpts} were made with other params (train differ); training from scratch" in out, out
    assert "resuming" not in out
    assert [s for s, _ in list_checkpoints(ckpts)] == [3]
    state = load_checkpoint(ckpts / "ckpt_00000003.pt")
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {3}  # three fresh Adam steps
    assert state["optimizer"]["param_groups"][0]["lr"] == 5e-4
    new_key = read_json(ckpts / "run_key.json")
    assert {k for k in new_key if new_key[k] != old_key[k]} == {"train"} and new_key["train"]["lr"] == 5e-4
    assert {k for k in new_key["train"] if new_key["train"][k] != old_key["train"].get(k)} == {"lr"}
    assert run_name(new_key) != run_name(old_key)


def test_nothing_left_to_train_starts_no_ray(tiny_config, tiny_trained, tmp_path, capsys, monkeypatch):
    """The train stage when its checkpoint already reaches train.steps (`dvc repro` after an edit of the library): the
    loop resumes and stops in the stage's own process, with no Ray started, and the trackers hear it as from a Ray
    worker: here the MLflow run it opens gets the loss curve of the training that made the checkpoint (trained with
    tracking off) and is ended FINISHED."""
    import json
    import shutil

    import ray
    import yaml
    from mlflow import MlflowClient

    from ddpm.checkpoint import list_checkpoints
    from tasks import train
    from tasks.lib.summary import train_row

    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    ckpts = tmp_path / "ckpt"
    shutil.copytree(tiny_trained / "checkpoints", ckpts)
    log = tmp_path / "loss.tsv"
    shutil.copy(tiny_trained / "train_loss.tsv", log)
    before = {p.name: p.stat().st_mtime_ns for _, p in list_checkpoints(ckpts)}
    db = tmp_path / "mlflow.db"
    cfg = tiny_config({"tracking.enabled": True, "tracking.uri": f"sqlite:///{db}", "tracking.experiment": "done",
                       "tracking.system_metrics": False, "tracking.grid_every": 0,
                       "ray.storage": str(tmp_path / "ray")})
    ray_before = ray.is_initialized()  # False unless a test run earlier in this process left one running
    capsys.readouterr()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.to_dict()))
    summary = train.main(["--params", str(params), "--data", str(tiny_trained / "dataset"),
                          "--checkpoints", str(ckpts), "--log", str(log), "--metrics", str(tmp_path / "train.json")])
    out = capsys.readouterr().out
    assert ray.is_initialized() == ray_before and not (tmp_path / "ray").exists()  # no Ray started, none joined
    assert "already trained: the checkpoint of step 6 reaches train.steps=6" in out
    assert f"nothing to train: step 6 reached before this run (loss {summary['final_loss']}); Ray not started" in out
    assert {p.name: p.stat().st_mtime_ns for _, p in list_checkpoints(ckpts)} == before  # nothing rewritten
    assert json.loads((tmp_path / "train.json").read_text()) == summary
    assert (summary["steps"], summary["resumed_from_step"], summary["num_workers"]) == (6, 6, 0)
    assert summary["already_trained"] is True and summary["ray"] == "not started: already trained"
    assert summary["ray_startup_s"] == summary["fit_wall_s"] == 0.0
    assert train_row(summary, tmp_path).text.startswith("6 steps, all trained before this run (Ray not started), "
                                                        f"final loss {summary['final_loss']:.4g}")

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("done").experiment_id])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [1, 2, 3, 4, 5, 6]
    assert not client.search_logged_models([run.info.experiment_id])  # no model: this run trained nothing


def test_training_progress_without_a_terminal_is_periodic_lines_not_one_per_update(tiny_config, tiny_trained,
                                                                                   tmp_path, capfd):
    """In a Ray worker stderr is no terminal and every redraw of the bar is forwarded as a line: the bar then
    redraws every PROGRESS_LINE_S seconds, and the loss in its postfix waits for that redraw (it used to force one
    at every log step: 216 forwarded lines in one demo)."""
    import time

    from tasks import train

    cfg = tiny_config({"train.steps": 40, "train.log_every": 1, "train.checkpoint_every": 40})
    capfd.readouterr()
    t0 = time.perf_counter()
    train.run_local(cfg, tiny_trained / "dataset", tmp_path / "ck", tmp_path / "loss.tsv", threads=1)
    wall = time.perf_counter() - t0
    err = capfd.readouterr().err
    lines = [line for line in err.split("\n") if "train:" in line]
    # whole lines, no carriage returns (Ray forwarded each "\r" as an empty line of its own)
    assert "\r" not in err and all(line.startswith("train: ") for line in lines), err[-500:]
    assert len(lines) <= 2 + wall / train.PROGRESS_LINE_S, (len(lines), wall, err[-500:])  # first, periodic, last
    assert "40/40" in err and "loss=" in err  # the final line still has the count and the loss
    assert len(read_loss_log(tmp_path / "loss.tsv", 40)) == 40  # every step logged to the file all the same


def test_callbacks_that_would_start_idle_actors_are_left_out():
    """The placement-group cleaner goes without a State API, the datasets callback (its dataset-manager actor)
    without Ray Datasets; every other default callback stays."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from tasks.train import trainer_class

    def kinds(cls) -> set[type]:
        return {type(c) for c in cls(lambda: None, scaling_config=ScalingConfig(num_workers=1))
                ._create_default_callbacks()}

    assert trainer_class(True, True) is TorchTrainer
    full = kinds(TorchTrainer)
    assert {PlacementGroupCleanerCallback, DatasetsCallback} < full
    for state_api, datasets in ((False, True), (True, False), (False, False)):
        cls = trainer_class(state_api, datasets)
        assert issubclass(cls, TorchTrainer)
        gone = {kind for kind, kept in ((PlacementGroupCleanerCallback, state_api), (DatasetsCallback, datasets))
                if not kept}
        assert kinds(cls) == full - gone, (state_api, datasets)


def test_a_ray_train_record_cut_short_is_one_line_naming_the_folder_to_remove(tmp_path):
    """Ray Train rewrites its record of a run in place at every checkpoint: a kill mid-write leaves it empty or cut
    short, and Ray Train can neither read it nor start the run again. The stage says so in one line."""
    from tasks.lib.storage import StorageError, run_checkpoints

    run = tmp_path / "ray" / "train-0123456789ab"
    run.mkdir(parents=True)
    assert run_checkpoints(str(tmp_path / "ray"), run.name) == []  # no record yet: nothing kept, train from scratch
    for cut in ("", '{"ray_version": "2.'):
        (run / "checkpoint_manager_snapshot.json").write_text(cut)
        with pytest.raises(StorageError) as e:
            run_checkpoints(str(tmp_path / "ray"), run.name)
        msg = str(e.value)
        assert msg.startswith(f"ray.storage: {tmp_path / 'ray'}: Ray Train's record of the run {run.name} cannot be "
                              "read (") and "\n" not in msg, msg
        assert msg.endswith(f"remove {run} to resume from the newest checkpoint in --checkpoints instead (or to "
                            "train from scratch)"), msg


def test_each_process_resumes_from_its_own_download_of_a_checkpoint_in_a_bucket(tmp_path):
    """The ranks of a restarted worker group on one node resume from the same checkpoint at the same time. Ray's
    ``as_directory()`` shares one download folder between them and downloads again over a file another rank reads;
    ``checkpoint_folder`` gives each its own download, left intact while another one is made, and removed after."""
    import pyarrow.fs
    from ray.train import Checkpoint

    from tasks.lib.storage import checkpoint_folder

    (tmp_path / "bucket" / "checkpoint_00000012").mkdir(parents=True)
    data = bytes(range(256)) * 4096
    (tmp_path / "bucket" / "checkpoint_00000012" / "ckpt_00000012.pt").write_bytes(data)
    bucket = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())  # not a local path
    reported = Checkpoint("checkpoint_00000012", filesystem=bucket)
    with checkpoint_folder(reported) as first:
        file = first / "ckpt_00000012.pt"
        before = file.stat()
        with checkpoint_folder(reported) as second:
            assert second != first and (second / "ckpt_00000012.pt").read_bytes() == data
        after = file.stat()
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, len(data))
        assert file.read_bytes() == data and not second.exists()
    assert not first.exists()
    # a checkpoint on a local or shared file system is read where it is: no copy, nothing removed
    local = Checkpoint.from_directory(str(tmp_path / "bucket" / "checkpoint_00000012"))
    with checkpoint_folder(local) as folder:
        assert folder == tmp_path / "bucket" / "checkpoint_00000012"
    assert (folder / "ckpt_00000012.pt").read_bytes() == data
