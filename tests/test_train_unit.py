"""Pieces of the train stage that need no Ray: the lr schedule, the resume key, the loss log."""

from __future__ import annotations

import pytest

from tasks.runkey import run_key
from tasks.train import lr_at, read_loss_log, write_loss_log


def test_lr_warmup_then_cosine_to_zero(tiny_config):
    cfg = tiny_config({"train.lr": 1e-3, "train.warmup_steps": 10, "train.steps": 110, "train.lr_schedule": "cosine"})
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5e-4)
    assert lr_at(110, cfg) == pytest.approx(0.0, abs=1e-12)
    const = tiny_config({"train.lr": 2e-4, "train.warmup_steps": 0})
    assert [lr_at(s, const) for s in (0, 5, 10_000)] == [2e-4] * 3


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
