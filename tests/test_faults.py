"""The faults the pipeline survives (docs/reliability.md), each injected for real: processes killed by pid with
SIGKILL, files truncated on disk, a learning rate that really overflows, two pipelines racing on one MLflow store.

The Ray-backed faults run the stages as real subprocesses (``python -m tasks.<stage>``) on a local Ray."""

from __future__ import annotations

import ast
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from ddpm.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from raycluster import registered_steps
from tasks.lib.config import from_dict
from tasks import fetch, train
from tasks.lib.errors import StageError
from tasks.lib.samples import load_samples, shard_paths
from tasks.lib.files import sha256_arrays, sha256_file
from tasks.lib.storage import run_checkpoints

REPO = Path(__file__).resolve().parents[1]


# -- helpers ---------------------------------------------------------------------------------------------------------
def _params(tmp_path: Path, tiny_params: dict, name: str, **sections) -> Path:
    p = json.loads(json.dumps(tiny_params))
    # One CPU per local Ray: one torch thread per worker or actor. Two spinning OpenMP threads on a busy 2-core
    # machine slow every op many times over, and the two-pipeline test runs two of these Rays at once.
    p["ray"].update(storage=str(tmp_path / "ray"), num_cpus=1)
    for section, values in sections.items():
        p.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(p))
    return path


def _stage(stage: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"tasks.{stage}", *args]


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _ray_train_workers(driver: int) -> list[psutil.Process]:
    out = []
    for p in _descendants(driver):
        try:
            if p.name().startswith("ray::RayTrainWorker"):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _sigkill_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGKILL the driver, then wait for the Ray processes it started to go (Ray reaps them when the driver
    dies); any still alive after ``grace`` seconds are ours to kill, so that nothing writes after the kill."""
    tree = _descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)


def _loss_steps(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f, delimiter="\t")]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from conftest import TINY

    out = tmp_path_factory.mktemp("digits") / "data"
    fetch.run(from_dict(TINY), out)
    return out


# -- 1 + 2: a Ray Train worker killed, then the whole driver killed --------------------------------------------------
@pytest.mark.slow
def test_worker_kill_then_driver_kill_resume_without_losing_steps(tmp_path, tiny_params, digits):
    db = tmp_path / "mlflow.db"
    # The first run is asked for far more steps than it can take before its driver is killed (on any CPU: the
    # kill waits for progress, not for a time); the rerun asks for a few steps past the newest checkpoint, which
    # under the constant lr schedule continues the same run (train.steps is then a resumable key).
    never = 100_000
    sections = dict(tracking={"enabled": True, "uri": f"sqlite:///{db}", "experiment": "faults", "grid_every": 0,
                              "system_metrics": False})
    train_keys = {"checkpoint_every": 3, "keep_checkpoints": 2, "max_failures": 2, "num_workers": 1, "log_every": 1,
                  "lr_schedule": "constant"}
    params = _params(tmp_path, tiny_params, "p.yaml", train={**train_keys, "steps": never}, **sections)
    ckpts, log, metrics = tmp_path / "ckpt", tmp_path / "loss.tsv", tmp_path / "train.json"
    args = _stage("train", "--params", str(params), "--data", str(digits), "--checkpoints", str(ckpts),
                  "--log", str(log), "--metrics", str(metrics))
    out1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(args, cwd=REPO, stdout=out1, stderr=subprocess.STDOUT)
    try:
        # Fault 1: the Ray Train worker process, killed by pid once Ray Train has registered the first checkpoint (an
        # upload it has not registered yet is not resumed from: the new worker would start again from step 0).
        _wait(lambda: registered_steps(str(tmp_path / "ray")), 240, "Ray Train's record of the first checkpoint", proc)
        worker = _wait(lambda: _ray_train_workers(proc.pid), 30, "the Ray Train worker", proc)[0]
        steps_at_kill = max(registered_steps(str(tmp_path / "ray")))
        worker.kill()

        # Security: the Ray dashboard's HTTP server, if this stage's Ray runs one at all, is on loopback only.
        # (Ray's internal gRPC ports bind every interface, behind its token auth: see docs/reliability.md.)
        for p in _descendants(proc.pid):
            try:
                if any(a.endswith(os.path.join("dashboard", "dashboard.py")) for a in p.cmdline()):
                    assert "--host=127.0.0.1" in p.cmdline()
                    listening = [c.laddr.ip for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
                    assert all(ip == "127.0.0.1" for ip in listening), listening
            except psutil.NoSuchProcess:
                pass

        # Ray restarts the worker group; the new worker resumes and writes checkpoints again.
        _wait(lambda: [w for w in _ray_train_workers(proc.pid) if w.pid != worker.pid], 120, "a new worker", proc)
        # Registered, not only uploaded: on a busy machine Ray's record of the run lags its uploads by a few
        # checkpoints, and the rerun resumes from the record.
        _wait(lambda: max(registered_steps(str(tmp_path / "ray")), default=0) >= steps_at_kill + 6, 240,
              "Ray Train's record of progress after the restart", proc)

        # Fault 2: SIGKILL the driver mid-run.
        _sigkill_tree(proc)
    finally:
        if proc.poll() is None:
            _sigkill_tree(proc)
        out1.close()
    text1 = (tmp_path / "run1.log").read_text()
    assert f"resuming from step {steps_at_kill}" in text1 or any(
        f"resuming from step {s}" in text1 for s in range(steps_at_kill, steps_at_kill + 4)), text1[-3000:]
    # During the run the checkpoints live in Ray Train's storage only; the driver, killed, copied none. Ray's record
    # of the run (an upload the kill left unregistered is not in it) says where the rerun resumes.
    assert list_checkpoints(ckpts) == []
    kept = run_checkpoints(str(tmp_path / "ray"), next((tmp_path / "ray").glob("train-*")).name)
    newest = kept[-1].step
    assert steps_at_kill + 6 <= newest < never  # killed mid-run, after progress past the worker's restart
    assert len(kept) <= 2  # keep_checkpoints=2
    # each checkpoint carries the loss log up to its step: it never runs ahead of the checkpoint
    rows = list(csv.DictReader(kept[-1].read_text(train.LOSS_LOG).splitlines(), delimiter="\t"))
    assert [int(r["step"]) for r in rows] == list(range(1, newest + 1))

    # The rerun resumes from the newest checkpoint: at most one checkpoint interval (3 steps) is recomputed.
    steps = newest + 6
    _params(tmp_path, tiny_params, "p.yaml", train={**train_keys, "steps": steps}, **sections)
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from step {newest}" in r.stdout + r.stderr
    assert "continuing MLflow run" in r.stdout + r.stderr
    summary = json.loads(metrics.read_text())
    assert summary["steps"] == steps
    assert [s for s, _ in list_checkpoints(ckpts)] == [steps - 3, steps]
    assert load_checkpoint(checkpoint_path(ckpts, steps))["step"] == steps
    assert _loss_steps(log) == list(range(1, steps + 1))  # continued, no restarted or repeated rows

    # One MLflow run holds the whole curve, each step once, and it finished.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("faults")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    logged = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert logged == list(range(1, steps + 1))
    assert runs[0].info.status == "FINISHED"


# -- 4: a truncated newest checkpoint ------------------------------------------------------------------------------
def test_truncated_newest_checkpoint_is_named_and_skipped(tmp_path, tiny_config, digits, capsys):
    cfg = tiny_config({"train.steps": 6, "train.checkpoint_every": 3})
    ckpts, log = tmp_path / "ckpt", tmp_path / "loss.tsv"
    train.run_local(cfg, digits, ckpts, log, threads=1)
    newest = checkpoint_path(ckpts, 6)
    good = sha256_file(checkpoint_path(ckpts, 3))
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as by a full disk
    capsys.readouterr()

    train.run_local(tiny_config({"train.steps": 9, "train.checkpoint_every": 3}), digits, ckpts, log, threads=1)
    out = capsys.readouterr().out
    assert f"skipping {newest}: unreadable or corrupt checkpoint" in out
    assert "resuming from step 3" in out
    assert sha256_file(checkpoint_path(ckpts, 3)) == good
    assert load_checkpoint(newest)["step"] == 6  # recomputed and rewritten whole
    assert [s for s, _ in list_checkpoints(ckpts)] == [3, 6, 9]
    assert _loss_steps(log) == list(range(1, 10))


# -- 5: the loss becomes infinite -----------------------------------------------------------------------------------
def test_exploding_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config, digits):
    # A real cause: lr = 1e30 makes the first Adam step ~1e30 per weight; the next forward pass overflows.
    cfg = tiny_config({"train.steps": 1, "train.checkpoint_every": 1, "train.lr": 1e30, "train.grad_clip": 0})
    ckpts, log = tmp_path / "ckpt", tmp_path / "loss.tsv"
    train.run_local(cfg, digits, ckpts, log, threads=1)  # step 1 is finite and checkpointed
    first = checkpoint_path(ckpts, 1)
    before = (sha256_file(first), first.stat().st_mtime_ns, first.stat().st_ino, log.read_bytes())

    longer = tiny_config({"train.steps": 5, "train.checkpoint_every": 1, "train.lr": 1e30, "train.grad_clip": 0})
    with pytest.raises(train.NonFiniteLoss) as e:
        train.run_local(longer, digits, ckpts, log, threads=1)
    msg = str(e.value)
    assert "at step 2" in msg and ("inf" in msg or "nan" in msg)
    assert str(first) in msg and "train.lr" in msg
    assert [s for s, _ in list_checkpoints(ckpts)] == [1]  # nothing written from the bad state
    assert (sha256_file(first), first.stat().st_mtime_ns, first.stat().st_ino, log.read_bytes()) == before
    assert isinstance(e.value, StageError)  # one line through run_cli, exit 2


@pytest.mark.slow
def test_exploding_loss_under_ray_is_one_line_and_not_retried(tmp_path, tiny_params, digits):
    """Under Ray a NaN is not a worker death: no restart (train.max_failures is 3 here), one line, exit 2."""
    params = _params(tmp_path, tiny_params, "p.yaml",
                     train={"steps": 5, "checkpoint_every": 1, "lr": 1e30, "grad_clip": 0, "max_failures": 3})
    ckpts = tmp_path / "ckpt"
    r = subprocess.run(_stage("train", "--params", str(params), "--data", str(digits), "--checkpoints", str(ckpts),
                              "--log", str(tmp_path / "loss.tsv"), "--metrics", str(tmp_path / "train.json")),
                       cwd=REPO, capture_output=True, text=True, timeout=400)
    assert r.returncode == 2, r.stderr[-3000:]
    # The stage's own line (Ray's forwarded logs and shutdown notes may surround it on stderr).
    ours = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1, r.stderr[-3000:]
    last = ours[0]
    assert last.startswith("error: loss became") and "at step 2" in last, last
    assert str(checkpoint_path(ckpts, 1)) in last
    # No traceback from the stage (Ray's own forwarded actor logs, prefixed "(... pid=N)", may carry theirs).
    assert not [line for line in r.stderr.splitlines() if "Traceback" in line and "pid=" not in line]
    assert "resuming from step" not in r.stdout + r.stderr  # Ray did not retry a deterministic failure
    assert [s for s, _ in list_checkpoints(ckpts)] == [1]
    assert not (tmp_path / "train.json").exists()


# -- 6: every output is written atomically -------------------------------------------------------------------------
_WRITER = """
import sys, time
from tasks.lib.files import write_json, write_npz
from ddpm.checkpoint import atomic_write_bytes
path = sys.argv[1]
def slow(f):
    for i in range(10_000):
        f.write(b"n" * (1 << 16))
        if i == 5:
            f.flush()
            print("writing", flush=True)
        time.sleep(0.001)
atomic_write_bytes(path, slow)
"""


def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text('{"old": true}\n')
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    partial = _wait(lambda: [p for p in tmp_path.glob(".metrics.json.*.tmp") if p.stat().st_size > 0], 30,
                    "the temporary file")
    proc.kill()
    proc.wait(timeout=30)
    assert target.read_text() == '{"old": true}\n'  # the reader sees the old file, whole
    assert partial[0].exists()  # the partial bytes went to a temporary name only
    # The train stage removes such leftovers from its checkpoint folder before it starts.
    from ddpm.checkpoint import remove_stale_temporaries

    assert remove_stale_temporaries(tmp_path) == partial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


_WRITE_CALLS = {"save", "savez", "savez_compressed", "write_text", "write_bytes", "save_image", "imwrite", "dump"}


def test_every_stage_writes_through_the_atomic_helpers():
    """No module of the pipeline writes a file in place: every torch.save/np.savez/PIL save/json.dump/open(w)
    goes to the file object of atomic_write_bytes (a parameter named ``f``) or a BytesIO buffer."""
    offenders = []
    files = [*sorted((REPO / "tasks").rglob("*.py")), *sorted((REPO / "ddpm").glob("*.py")),
             *sorted((REPO / "flows").glob("*.py"))]
    ours = {p.stem for p in files}
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            target = ast.unparse(node.args[0]) if node.args else ""
            if name == "open" and isinstance(fn, ast.Name):
                mode = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "mode"), None)
                if isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+"):
                    offenders.append(f"{path.name}:{node.lineno}: open({target}, {mode.value!r})")
            elif name in ("write_text", "write_bytes"):
                offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}")
            elif name in _WRITE_CALLS and isinstance(fn, ast.Attribute) and ast.unparse(fn.value) in ours:
                continue  # a function of this project (refstats.save): its own body is scanned here too
            elif name in _WRITE_CALLS and isinstance(fn, ast.Name) and name == "save":
                continue  # a local helper named save (the train loop's)
            elif name in _WRITE_CALLS:
                dest = ast.unparse(node.args[1]) if name in ("save", "dump") and len(node.args) > 1 else target
                if name == "save" and isinstance(fn, ast.Attribute) and ast.unparse(fn.value) not in ("torch",):
                    dest = target  # PIL's im.save(fp, ...)
                if dest not in ("f", "buf", "fh") and not dest.startswith(("io.BytesIO", "buf")):
                    offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}")
    # Writers that are not ours: torch-fidelity's feature cache (see docs/reliability.md) and the staging copy of
    # gzipped IDX files in a private temporary folder; and the MLflow store's lock file, opened to be locked, never
    # written.
    allowed = {"datasets.py": ("open(staged / n, 'wb')",), "tracking.py": ("open(f'{db}.lock', 'a')",)}
    offenders = [o for o in offenders if not any(a in o for a in allowed.get(o.split(":")[0], ()))]
    assert offenders == []


# -- 3 + 7: two pipelines at once, then a sampler killed mid-way -------------------------------------------------------
@pytest.fixture(scope="module")
def two_pipelines(tmp_path_factory, digits):
    """Two train -> sample pipelines started together (different folders and seeds, one MLflow SQLite store)."""
    from conftest import TINY

    root = tmp_path_factory.mktemp("two")
    db = root / "mlflow.db"
    # The store does not exist yet: both pipelines create it at the same moment (tracking/run.py runs MLflow's
    # schema migrations under a file lock; without it one of them failed with alembic's CommandError).
    assert not db.exists()
    runs = {}
    for name, seed in (("a", 0), ("b", 1)):
        folder = root / name
        folder.mkdir()
        params = _params(folder, TINY, "params.yaml",
                         train={"steps": 6, "checkpoint_every": 3, "seed": seed},
                         sample={"num_samples": 48, "shard_size": 4, "batch_size": 4, "sampler": "ddpm",
                                 "num_workers": 1},
                         tracking={"enabled": True, "uri": f"sqlite:///{db}", "experiment": "two",
                                   "grid_every": 0, "system_metrics": False})
        runs[name] = {"folder": folder, "params": params, "rc": [], "out": folder / "pipeline.log"}

    def pipeline(run):
        f, p = run["folder"], str(run["params"])
        with open(run["out"], "w") as out:
            for cmd in (_stage("train", "--params", p, "--data", str(digits), "--checkpoints", str(f / "ckpt"),
                               "--log", str(f / "loss.tsv"), "--metrics", str(f / "train.json")),
                        _stage("sample", "--params", p, "--checkpoints", str(f / "ckpt"), "--out", str(f / "samples"))):
                rc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=500).returncode
                run["rc"].append(rc)
                if rc:
                    return

    threads = [threading.Thread(target=pipeline, args=(r,)) for r in runs.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return root, db, runs


@pytest.mark.slow
def test_two_pipelines_at_once_both_complete_and_share_a_readable_store(two_pipelines):
    root, db, runs = two_pipelines
    for name, run in runs.items():
        assert run["rc"] == [0, 0], run["out"].read_text()[-3000:]
        assert json.loads((run["folder"] / "train.json").read_text())["steps"] == 6
        images, seeds = load_samples(run["folder"] / "samples")
        assert images.shape == (48, 1, 8, 8) and seeds.tolist() == list(range(48))
    a, _ = load_samples(runs["a"]["folder"] / "samples")
    b, _ = load_samples(runs["b"]["folder"] / "samples")
    assert not np.array_equal(a, b)  # two models (train.seed 0 and 1), not one run's output twice

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("two")
    found = client.search_runs([exp.experiment_id])
    assert len(found) == 2
    for r in found:
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "train/loss")) == list(range(1, 7))
        assert r.data.tags["sample.count"] == "48", r.data.tags
    assert {r.data.tags["config.train.seed"] for r in found} == {"0", "1"}  # a result key kept as a tag


@pytest.mark.slow
def test_sampler_killed_mid_way_keeps_finished_shards_and_matches_an_uninterrupted_run(two_pipelines, tmp_path):
    root, _, runs = two_pipelines
    a = runs["a"]
    reference, ref_seeds = load_samples(a["folder"] / "samples")
    out = tmp_path / "samples"
    args = _stage("sample", "--params", str(a["params"]), "--checkpoints", str(a["folder"] / "ckpt"),
                  "--out", str(out), "--set", "tracking.enabled=false")
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: len(shard_paths(out)) >= 2, 300, "two finished shards", proc)
        _sigkill_tree(proc)
    finally:
        if proc.poll() is None:
            _sigkill_tree(proc)
    kept = {p.name: (sha256_file(p), p.stat().st_ino, p.stat().st_mtime_ns) for p in shard_paths(out)}
    assert 2 <= len(kept) < 12, kept  # killed mid-way

    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(kept)} already done" in r.stdout
    for p in shard_paths(out):
        if p.name in kept:  # not rewritten: same bytes, same inode, same mtime
            assert (sha256_file(p), p.stat().st_ino, p.stat().st_mtime_ns) == kept[p.name]
    assert len(shard_paths(out)) == 12
    images, seeds = load_samples(out)
    assert seeds.tolist() == ref_seeds.tolist()
    assert np.array_equal(images, reference)  # identical to the uninterrupted pipeline's samples
    for p in shard_paths(out):
        ref = a["folder"] / "samples" / p.name
        with np.load(p) as x, np.load(ref) as y:
            assert sha256_arrays(x["images"], x["seeds"]) == sha256_arrays(y["images"], y["seeds"])
