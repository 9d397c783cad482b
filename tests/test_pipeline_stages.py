"""The train and sample stages on a tiny config, with real Ray (local, 127.0.0.1)."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from ddpm.checkpoint import list_checkpoints, load_checkpoint
from tasks import fetch, sample, train
from tasks.common import load_samples

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module (started by the first stage that needs it), shut down at the end."""
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


def _cfg(tiny_config, tmp_path, **extra):
    return tiny_config({"ray.storage": str(tmp_path / "ray"), **extra})


def test_train_two_workers_resume_and_sample_shards(tiny_config, tmp_path, ray_local):
    cfg = _cfg(tiny_config, tmp_path, **{"train.num_workers": 2, "train.steps": 6, "train.checkpoint_every": 3,
                                         "train.keep_checkpoints": 2})
    data = tmp_path / "data"
    fetch.run(cfg, data)
    ckpts, log = tmp_path / "ckpt", tmp_path / "loss.tsv"

    summary = train.run(cfg, data, ckpts, log, tmp_path / "train.json")
    assert summary["steps"] == 6
    assert [s for s, _ in list_checkpoints(ckpts)] == [3, 6]  # keep_checkpoints=2
    with open(log) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    state = load_checkpoint(ckpts / "ckpt_00000006.pt")
    assert state["step"] == 6 and state["config"]["model"]["image_size"] == 8

    # More steps: the rerun resumes at 6 and continues the same log rather than restarting it.
    cfg9 = _cfg(tiny_config, tmp_path, **{"train.num_workers": 2, "train.steps": 9, "train.checkpoint_every": 3,
                                          "train.keep_checkpoints": 2})
    train.run(cfg9, data, ckpts, log)
    with open(log) as f:
        rows9 = list(csv.DictReader(f, delimiter="\t"))
    assert [int(r["step"]) for r in rows9] == list(range(1, 10))
    assert rows9[:6] == rows  # the first six rows are the first run's, untouched
    assert [s for s, _ in list_checkpoints(ckpts)] == [6, 9]

    # A changed learning rate is a different run: old checkpoints are set aside, training restarts.
    cfg_lr = _cfg(tiny_config, tmp_path, **{"train.num_workers": 1, "train.steps": 3, "train.lr": 5e-4})
    train.run(cfg_lr, data, ckpts, log)
    assert [s for s, _ in list_checkpoints(ckpts)][-1] == 3

    # Sampling over 2 actors gives the same images as 1 actor with another batch size (seed per sample).
    # 4 workers asked on 2 CPUs: capped to the 2 actors that fit, instead of waiting on the other two forever.
    out2 = tmp_path / "samples2"
    s2 = sample.run(_cfg(tiny_config, tmp_path, **{"sample.num_workers": 4}), ckpts, out2)
    assert s2["count"] == 24 and s2["shards_reused"] == 0
    assert (out2 / "grid.png").stat().st_size > 0
    out1 = tmp_path / "samples1"
    sample.run(_cfg(tiny_config, tmp_path, **{"sample.num_workers": 1, "sample.batch_size": 5}), ckpts, out1)
    a, seeds_a = load_samples(out2)
    b, seeds_b = load_samples(out1)
    assert a.dtype == np.uint8 and a.shape == (24, 1, 8, 8)
    assert seeds_a.tolist() == list(range(24)) == seeds_b.tolist()
    assert np.array_equal(a, b)

    # A rerun keeps every finished shard; a deleted shard is the only one sampled again.
    (out2 / "shard_00001.npz").unlink()
    again = sample.run(_cfg(tiny_config, tmp_path, **{"sample.num_workers": 2}), ckpts, out2)
    assert again["shards_reused"] == 2
    assert np.array_equal(load_samples(out2)[0], a)


def test_train_cli_bad_input_is_one_line(tmp_path, repo_root):
    params = tmp_path / "p.yaml"
    params.write_text("train:\n  lr: -1\n")
    r = subprocess.run([sys.executable, "-m", "tasks.train", "--params", str(params), "--data", str(tmp_path / "d"),
                        "--checkpoints", str(tmp_path / "c")], cwd=repo_root, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: train.lr: input should be greater than 0, got -1"
    assert not (tmp_path / "c").exists()
