"""Object storage as the pipeline's clients meet it: a real S3-compatible server on 127.0.0.1 (moto, tests/s3.py).

- pyarrow and boto3 read each other's objects (the server speaks S3, not a mock of one client).
- A dataset folder uploaded to a bucket reads back, by its ``s3://`` URL, exactly as from disk: the manifest, every
  row, each training worker's batches, and a training run from it (the same loss log and weights).
- ``ray.storage: s3://…`` passes the check before compute (its probe object deleted again), and the train stage
  keeps its checkpoints in the bucket through Ray Train and copies the kept ones into ``--checkpoints``.
- ``dvc push`` to an S3 remote on the same server from a temporary git clone, and ``dvc pull`` into a fresh clone,
  give back the same files.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import GIT_ENV, clone_project
from ddpm.checkpoint import list_checkpoints, load_checkpoint
from tasks import fetch
from tasks.lib import storage
from tasks.lib.shards import TrainStream, open_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_config_module) -> Path:
    """The fetch stage's output for the tiny params (digits: Parquet shards + manifest), on disk."""
    out = tmp_path_factory.mktemp("dataset") / "dataset"
    fetch.run(tiny_config_module, out)
    return out


@pytest.fixture(scope="module")
def tiny_config_module():
    import json

    from conftest import TINY
    from tasks.lib.config import from_dict

    return from_dict(json.loads(json.dumps(TINY)))


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_pyarrow_and_boto3_read_each_others_objects(s3_bucket):
    from pyarrow import fs

    # pyarrow finds the server through AWS_ENDPOINT_URL_S3 alone (what Ray Train and tasks/lib/shards.py rely on)
    filesystem, path = fs.FileSystem.from_uri(f"{s3_bucket.url}/a/written-by-pyarrow.bin")
    with filesystem.open_output_stream(path) as f:
        f.write(b"\x00pyarrow\xff")
    s3_bucket.server.client().put_object(Bucket=s3_bucket.name, Key="a/written-by-boto3.bin", Body=b"boto3")

    assert s3_bucket.keys("a/") == ["a/written-by-boto3.bin", "a/written-by-pyarrow.bin"]
    assert s3_bucket.read("a/written-by-pyarrow.bin") == b"\x00pyarrow\xff"
    with filesystem.open_input_stream(f"{s3_bucket.name}/a/written-by-boto3.bin") as f:
        assert f.read() == b"boto3"


def test_a_dataset_read_by_s3_url_equals_the_one_on_disk(s3_bucket, dataset):
    url = s3_bucket.upload(dataset, "datasets/digits")
    assert s3_bucket.keys("datasets/digits/") == sorted(f"datasets/digits/{k}" for k in tree_hashes(dataset))
    remote, local = open_dataset(url), open_dataset(dataset)

    assert remote.meta == local.meta and remote.train.root == f"{url}/train"
    for split in ("train", "holdout"):
        a, b = getattr(remote, split).read_all(), getattr(local, split).read_all()
        assert len(a.images) == local.meta["splits"][split]["count"] > 0
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    # Each of two training workers reads the same batches, in the same order, from either place.
    for rank in (0, 1):
        s, d = (TrainStream(x.train, batch=16, rank=rank, world=2, seed=3, buffer_rows=64) for x in (remote, local))
        for epoch in (0, 1):
            got, want = list(s.epoch(epoch)), list(d.epoch(epoch))
            assert len(got) == len(want) == d.steps_per_epoch > 0
            for x, y in zip(got, want):
                np.testing.assert_array_equal(x, y)


def test_training_from_an_s3_dataset_equals_training_from_disk(s3_bucket, dataset, tiny_config, tmp_path):
    """The train stage's loop (in this process, as tests/conftest.py's tiny_trained) on the dataset's URL."""
    from tasks.train import read_loss_log, run_local

    cfg = tiny_config({"train.steps": 4, "train.checkpoint_every": 2})
    url = s3_bucket.upload(dataset, "datasets/digits")
    for name, data in (("s3", url), ("disk", dataset)):
        run_local(cfg, data, tmp_path / name / "checkpoints", tmp_path / name / "loss.tsv", threads=1)

    rows = {name: read_loss_log(tmp_path / name / "loss.tsv", 4) for name in ("s3", "disk")}
    drop_speed = lambda rs: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rs]  # noqa: E731
    assert [int(r["step"]) for r in rows["s3"]] == [1, 2, 3, 4]
    assert drop_speed(rows["s3"]) == drop_speed(rows["disk"])
    ckpts = {name: list_checkpoints(tmp_path / name / "checkpoints") for name in ("s3", "disk")}
    assert [s for s, _ in ckpts["s3"]] == [s for s, _ in ckpts["disk"]] == [2, 4]
    a, b = load_checkpoint(ckpts["s3"][-1][1]), load_checkpoint(ckpts["disk"][-1][1])
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_ray_storage_check_on_s3_writes_and_deletes_its_probe(s3_bucket):
    s3_bucket.server.client().put_object(Bucket=s3_bucket.name, Key="ray/kept.txt", Body=b"a user's object")
    where = storage.check(f"{s3_bucket.url}/ray")
    assert where == s3_bucket.server.endpoint  # the endpoint pyarrow resolved from AWS_ENDPOINT_URL_S3
    # The probe object is gone; pyarrow keeps an empty directory marker ("ray/") for the prefix it deleted from,
    # as it does for every folder Ray Train creates there.
    assert set(s3_bucket.keys()) <= {"ray/", "ray/kept.txt"} and "ray/kept.txt" in s3_bucket.keys()
    assert storage.storage_path(f"{s3_bucket.url}/ray") == f"{s3_bucket.url}/ray"  # a URI goes to Ray as it is


def _dvc(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_dvc_push_to_an_s3_remote_and_pull_into_a_fresh_clone(s3_bucket, s3_server, tmp_path, tiny_params):
    env = {**s3_server.subprocess_env(), **GIT_ENV, "DVC_NO_ANALYTICS": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    first = clone_project(tmp_path / "first", tiny_params)
    _dvc(first, env, "repro", "fetch")
    remote = f"{s3_bucket.url}/dvc"
    _dvc(first, env, "remote", "add", "-d", "objects", remote)
    _dvc(first, env, "remote", "modify", "objects", "endpointurl", s3_server.endpoint)
    for args in (["add", "-A"], ["commit", "-qm", "fetch, and the S3 remote"]):
        subprocess.run(["git", *args], cwd=first, env=env, check=True)
    pushed = _dvc(first, env, "push")
    dataset = tree_hashes(first / "data" / "dataset")
    assert "dataset.json" in dataset and any(k.endswith(".parquet") for k in dataset)
    # The remote holds content-addressed objects: one per file of the dataset, plus the folder's listing (.dir).
    objects = s3_bucket.keys("dvc/")
    assert objects and all(k.startswith("dvc/files/md5/") for k in objects), objects
    assert len(objects) == len(dataset) + 1, (objects, pushed.stdout)

    second = tmp_path / "second"
    subprocess.run(["git", "clone", "-q", str(first), str(second)], env=env, check=True)
    assert not (second / "data" / "dataset").exists()
    _dvc(second, env, "pull", "fetch")
    assert tree_hashes(second / "data" / "dataset") == dataset
    config = yaml.safe_load((second / "dvc.lock").read_text())
    assert "fetch" in config["stages"]


@pytest.mark.slow
def test_the_train_stage_keeps_its_checkpoints_in_an_s3_bucket(s3_bucket, s3_server, tmp_path, tiny_params):
    """``ray.storage: s3://…`` reaches Ray Train: the stage (a subprocess with a local Ray, which inherits its AWS
    variables) checks the bucket and trains; rank 0 reports each checkpoint (the checkpoint file and the loss log so
    far) and Ray Train keeps it in the bucket under the run's folder (``train-<run key digest>``), nothing on disk;
    at the end the driver copies the kept checkpoints into ``--checkpoints`` and the newest loss log to ``--log``."""
    import json
    import re

    tiny_params["train"]["steps"] = 4  # checkpoints at steps 3 and 4 (checkpoint_every 3, and the last step)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    env = {**s3_server.subprocess_env(), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    p = ["--params", str(tmp_path / "params.yaml")]
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=600)
    r = run("tasks.fetch", *p, "--out", "data")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("tasks.train", *p, "--data", "data", "--checkpoints", "checkpoints", "--log", "loss.tsv",
            "--metrics", "train.json", "--set", f"ray.storage={s3_bucket.url}/ray")
    assert r.returncode == 0, r.stderr[-3000:]

    assert json.loads((tmp_path / "train.json").read_text())["steps"] == 4
    runs = {k.split("/")[1] for k in s3_bucket.keys("ray/") if k.count("/") >= 2}
    assert len(runs) == 1 and re.fullmatch(r"train-[0-9a-f]{12}", next(iter(runs))), s3_bucket.keys()
    run_dir = f"ray/{runs.pop()}"
    kept = [k for k in s3_bucket.keys(run_dir) if "/checkpoint_0" in k and not k.endswith("/")]  # not folder markers
    assert kept == [f"{run_dir}/checkpoint_{s:08d}/{name}" for s in (3, 4)
                    for name in (f"ckpt_{s:08d}.pt", "train_loss.tsv")], kept
    assert not (tmp_path / ".ray_results").exists()  # the default local folder was not used
    # the driver's copies: the same bytes; the loss log of the newest checkpoint, rows 1..4
    local = list_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in local] == [3, 4]
    for s, path in local:
        assert path.read_bytes() == s3_bucket.read(f"{run_dir}/checkpoint_{s:08d}/{path.name}")
    log = (tmp_path / "loss.tsv").read_bytes()
    assert log == s3_bucket.read(f"{run_dir}/checkpoint_00000004/train_loss.tsv")
    assert [line.split(b"\t")[0] for line in log.splitlines()] == [b"step", b"1", b"2", b"3", b"4"]
    assert load_checkpoint(local[-1][1])["step"] == 4
