"""The train and sample stages on a two-node Ray cluster whose worker node shares no output folder with the driver
(tests/raycluster.py; docs/scaling.md section 8, "object storage only"), against the same stages on one machine.

The head has no CPUs, so every Ray Train worker and sampling actor runs on the second node, which sees the project's
folder (the dataset, the checkpoints, the samples) as an empty tmpfs. Ray Train's storage is a bucket of the local S3
server. What crosses between the nodes: the training split through Ray's object store (it is only on the driver's
disk), the checkpoints through Ray Train's storage (copied into ``checkpoints/`` by the driver), the weights and the
images through the object store (the driver writes the shards).

One cluster serves the module, and each stage runs once (module-scoped fixtures, in order): a training of 6 steps on
two workers; the same run continued to ``STEPS`` by a new driver, one of its workers killed (SIGKILL, its pid from the
cluster's actor table) once the first checkpoint of that run is in the bucket, so Ray Train restarts the worker group
from its newest checkpoint; then sampling. The reference is the same params on one machine (a local Ray, the dataset
and Ray Train's storage on disk), run before the cluster starts. The outputs agree bitwise: on one machine the
computations are the same (two DDP workers with one thread each, the same batches; the same sampling batches and
threads), docs/pipeline.md "Reproducibility".
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY
from ddpm.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from raycluster import RAY_CLUSTERS, Stage, gcs_tables, registered_steps, two_node_cluster
from tasks.lib.samples import load_samples, shard_paths

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(RAY_CLUSTERS)]

FIRST_STEPS = 6  # the first training; the second continues the same run (constant lr: train.steps is not in its key)
STEPS = 48  # long enough that the worker is killed mid-run: the kill waits for a checkpoint, not for a time
EVERY = 3
ALIVE = 2  # the GCS's actor state ALIVE (ray.core.generated.gcs_pb2.ActorTableData)
LOG_VALUES = ("step", "loss", "lr", "grad_norm")  # a loss log row without its speed column


def _params(steps: int, storage: str, keep: int) -> dict:
    p = json.loads(json.dumps(TINY))
    p["train"].update(steps=steps, checkpoint_every=EVERY, keep_checkpoints=keep, num_workers=2, log_every=1,
                      max_failures=2)
    p["sample"].update(num_workers=2)
    p["ray"].update(storage=storage, num_cpus=2)
    return p


def _write_params(folder: Path, params: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _train_args(params: Path, data: Path, out: Path) -> list[str]:
    return ["--params", str(params), "--data", str(data), "--checkpoints", str(out / "checkpoints"),
            "--log", str(out / "train_loss.tsv"), "--metrics", str(out / "train.json")]


def _sample_args(params: Path, out: Path) -> list[str]:
    return ["--params", str(params), "--checkpoints", str(out / "checkpoints"), "--out", str(out / "samples")]


def _ok(stage: Stage, log: Path) -> subprocess.CompletedProcess:
    """The stage's result once it exited 0; its output is kept in ``log`` (stdout, then stderr)."""
    r = stage.result()
    log.write_text(f"{r.stdout}\n---- stderr ----\n{r.stderr}")
    assert r.returncode == 0, f"tasks.{stage.name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _rows(path: Path) -> list[tuple[str, ...]]:
    import csv

    with open(path, newline="") as f:
        return [tuple(r[k] for k in LOG_VALUES) for r in csv.DictReader(f, delimiter="\t")]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    return {f"{part}.{k}": v for part in ("model", "ema") for k, v in state[part].items()}


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("isolated")


@pytest.fixture(scope="module")
def dataset(root) -> Path:
    r = subprocess.run([sys.executable, "-m", "tasks.fetch", "--params", str(_write_params(root / "fetch", TINY)),
                        "--out", str(root / "data")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "data"


@pytest.fixture(scope="module")
def reference(root, dataset) -> Path:
    """One machine: a local Ray, everything on disk; trained straight to STEPS (every checkpoint kept), sampled."""
    out = root / "reference"
    params = _write_params(out, _params(STEPS, str(out / "ray"), keep=STEPS // EVERY))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    _ok(Stage("train", _train_args(params, dataset, out), {**env, "RAY_USAGE_STATS_ENABLED": "0"}, REPO),
        root / "reference-train.log")
    _ok(Stage("sample", _sample_args(params, out), {**env, "RAY_USAGE_STATS_ENABLED": "0"}, REPO),
        root / "reference-sample.log")
    return out


@pytest.fixture(scope="module")
def cluster(root, reference, s3_server):
    """The two nodes (started after the reference ran: the machine has two cores) and a bucket for Ray Train's
    storage. Everything the stages write on the driver's side is under ``root/project``, which the node sees empty;
    the dataset is there too (a copy), so the node cannot read it either."""
    import shutil

    project = root / "project"
    shutil.copytree(root / "data", project / "data")
    bucket = s3_server.bucket("isolated")
    (root / "cluster").mkdir()  # the nodes' logs
    with two_node_cluster(root / "cluster", [project], node_cpus=2, extra_env=s3_server.env(), cwd=REPO) as nodes:
        yield nodes, project, bucket


@pytest.fixture(scope="module")
def first_training(cluster):
    nodes, project, bucket = cluster
    out = project / "run"
    params = _write_params(out, _params(FIRST_STEPS, f"{bucket.url}/ray", keep=2))
    stage = Stage("train", _train_args(params, project / "data", out), nodes.env, REPO)
    r = _ok(stage, nodes.head.folder / "first-train.log")
    return out, r, stage.pid, sorted(k for k in bucket.keys("ray/") if k.endswith(".pt"))


def _train_workers(nodes, driver_pid: int) -> list[dict]:
    tables = gcs_tables(nodes.address, nodes.env, REPO)
    job = {j["driver_pid"]: j["job_id"] for j in tables["jobs"]}.get(driver_pid)
    return [a for a in tables["actors"] if a["job_id"] == job and a["class_name"] == "RayTrainWorker"]


def _wait(predicate, stage: Stage, what: str, timeout: float = 240.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        assert stage.proc.poll() is None, f"tasks.{stage.name} exited while waiting for {what}"
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def resumed_training(cluster, first_training, s3_server):
    """The same run continued to STEPS by a new driver; one Ray Train worker killed once Ray Train registered this
    run's first checkpoint (uploaded to the bucket and recorded: a worker killed between the two would resume from
    the one before)."""
    nodes, project, bucket = cluster
    out = first_training[0]
    params = _write_params(out, _params(STEPS, f"{bucket.url}/ray", keep=2))
    stage = Stage("train", _train_args(params, project / "data", out), nodes.env, REPO)
    try:
        workers = _wait(lambda: [a for a in _train_workers(nodes, stage.pid) if a["state"] == ALIVE][:2] or None,
                        stage, "the Ray Train workers")
        with pytest.MonkeyPatch.context() as env:  # the bucket's endpoint and credentials, for this process's reads
            for name, value in s3_server.env().items():
                env.setenv(name, value)
            _wait(lambda: max(registered_steps(f"{bucket.url}/ray"), default=0) >= FIRST_STEPS + EVERY, stage,
                  f"Ray Train's record of the checkpoint of step {FIRST_STEPS + EVERY}")
        os.kill(workers[-1]["pid"], signal.SIGKILL)
    except BaseException:
        stage.proc.kill()
        stage.proc.communicate()
        raise
    return out, _ok(stage, nodes.head.folder / "resumed-train.log"), workers[-1]


def test_train_with_two_workers_on_a_node_without_the_project_folder(cluster, first_training, reference):
    nodes, project, bucket = cluster
    out, r, pid, kept = first_training
    workers = _train_workers(nodes, pid)
    assert len(workers) == 2 and {w["node_id"] for w in workers} == {nodes.node_id} != {nodes.head_id}
    # the dataset is only on the driver's disk: its training split went through the object store
    assert "do not see" in r.stdout and "object store" in r.stdout, r.stdout[-3000:]
    summary = json.loads((out / "train.json").read_text())
    assert summary["steps"] == FIRST_STEPS and summary["resumed_from_step"] == 0
    # Ray Train kept the checkpoints in the bucket; the driver copied them into checkpoints/
    assert [re.sub(r"^ray/train-[0-9a-f]{12}/", "", k) for k in kept] == [
        f"checkpoint_{s:08d}/ckpt_{s:08d}.pt" for s in (FIRST_STEPS - EVERY, FIRST_STEPS)], kept
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [FIRST_STEPS - EVERY, FIRST_STEPS]
    # ... each the bytes Ray Train holds, and the weights the one-machine run has at that step
    for s, path in list_checkpoints(out / "checkpoints"):
        key = next(k for k in kept if k.endswith(path.name))
        assert bucket.read(key) == path.read_bytes()
        assert _same_weights(path, checkpoint_path(reference / "checkpoints", s)), s
    # the loss log reached the driver in the checkpoint folder: the reference's first rows, value for value
    assert _rows(out / "train_loss.tsv") == _rows(reference / "train_loss.tsv")[:FIRST_STEPS]


def test_a_worker_killed_mid_run_is_restarted_from_the_newest_checkpoint(cluster, resumed_training, reference):
    nodes, project, bucket = cluster
    out, r, killed = resumed_training
    assert killed["node_id"] == nodes.node_id
    # Rank 0's lines (Ray forwards them to the driver's stdout, and its controller repeats some on stderr): the new
    # driver resumed from Ray Train's run in the bucket, then the restarted worker group from a checkpoint this run
    # made (Ray's newest when the worker died).
    resumed = [int(s) for s in re.findall(r"resuming from step (\d+) \(ckpt_\d+\.pt, kept by Ray Train\)", r.stdout)]
    assert len(resumed) == 2 and resumed[0] == FIRST_STEPS, \
        f"{resumed}: the stage's output is in {nodes.head.folder / 'resumed-train.log'}"
    assert FIRST_STEPS + EVERY <= resumed[1] < STEPS, resumed
    summary = json.loads((out / "train.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from_step"] == FIRST_STEPS
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [STEPS - EVERY, STEPS]
    for s, path in list_checkpoints(out / "checkpoints"):
        assert _same_weights(path, checkpoint_path(reference / "checkpoints", s)), s
    # every step once, no repeated or lost row, and the values of the uninterrupted run
    assert _rows(out / "train_loss.tsv") == _rows(reference / "train_loss.tsv")


def test_sample_on_a_node_without_the_checkpoints(cluster, resumed_training, reference):
    nodes, project, bucket = cluster
    out = resumed_training[0]
    stage = Stage("sample", _sample_args(out / "params.yaml", out), nodes.env, REPO)
    r = _ok(stage, nodes.head.folder / "sample.log")
    tables = gcs_tables(nodes.address, nodes.env, REPO)
    job = {j["driver_pid"]: j["job_id"] for j in tables["jobs"]}[stage.pid]
    actors = [a for a in tables["actors"] if a["job_id"] == job and a["class_name"] == "ShardSampler"]
    assert len(actors) == 2 and {a["node_id"] for a in actors} == {nodes.node_id}, actors
    summary = json.loads((out / "samples" / "samples.json").read_text())
    assert summary["count"] == 24 and summary["checkpoint_step"] == STEPS, r.stdout[-2000:]
    # the shards the driver wrote: the seeds and the image bytes of the one-machine run
    names = [p.name for p in shard_paths(out / "samples")]
    assert names == [p.name for p in shard_paths(reference / "samples")] and len(names) == 3
    images, seeds = load_samples(out / "samples")
    ref_images, ref_seeds = load_samples(reference / "samples")
    assert seeds.tolist() == ref_seeds.tolist() == list(range(24))
    assert images.std() > 20 and np.array_equal(images, ref_images)


def test_a_local_ray_storage_the_worker_node_cannot_see_is_one_line(cluster, dataset):
    """``ray.storage`` a local folder on a cluster without a shared file system: refused before training."""
    nodes, project, bucket = cluster
    out = project / "local-storage"
    params = _write_params(out, _params(FIRST_STEPS, str(project / "ray-results"), keep=2))
    r = Stage("train", _train_args(params, project / "data", out), nodes.env, REPO).result()
    assert r.returncode == 2, r.stderr[-3000:]
    ours = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    want = re.escape(f"error: ray.storage: {project / 'ray-results'}: a folder the Ray node(s) ") + \
        r"\S+ do not see \(no shared file system there\); set ray.storage to object storage .*"
    assert len(ours) == 1 and re.fullmatch(want, ours[0]), r.stderr[-3000:]
    assert not list_checkpoints(out / "checkpoints")
