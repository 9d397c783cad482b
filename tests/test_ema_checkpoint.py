"""EMA of the weights (ddpm/ema.py) and atomic, safely loaded training checkpoints (ddpm/checkpoint.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import ddpm.checkpoint as ckpt
from ddpm.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ddpm.ema import EMA
from ddpm.unet import UNet



# -- EMA ------------------------------------------------------------------------------------------------------------


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("stat", torch.zeros(2))


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.9999])
def test_ema_is_the_hand_computed_exponential_average(decay):
    torch.manual_seed(0)
    model = WithBuffer()
    ema = EMA(model, decay)
    hand = {k: v.double().clone() for k, v in model.state_dict().items()}  # theta_ema starts at theta_0
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        with torch.no_grad():
            for t in model.state_dict().values():
                t.copy_(torch.randn(t.shape, generator=g))
        ema.update(model)
        for k, v in model.state_dict().items():
            hand[k] = decay * hand[k] + (1 - decay) * v.double()  # every update, the first included
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v.double(), hand[k], rtol=1e-6, atol=1e-6, msg=k)


def test_ema_first_update_is_an_average_not_a_copy():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, 0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert ema.module.weight.item() == pytest.approx(0.1)
    ema.update(model)
    assert ema.module.weight.item() == pytest.approx(0.19)


def test_ema_with_an_optimizer_and_a_unet():
    torch.manual_seed(0)
    model = UNet(1, 8, 8, (1, 2), 1, (), 0.0, 4)
    ema = EMA(model, 0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hand = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        loss = model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).square().mean() + sum(
            p.square().sum() for p in model.parameters()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        hand = [0.8 * h + 0.2 * p.detach() for h, p in zip(hand, model.parameters())]
    for h, p in zip(hand, ema.module.parameters()):
        torch.testing.assert_close(p, h, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), ema.module.parameters()))


def test_ema_copy_is_independent_frozen_and_in_eval_mode():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    ema = EMA(model, 0.99)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert torch.equal(ema.module[0].weight, before)  # a copy, not a view of the live weights
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_ema_decay_validated(decay):
    with pytest.raises(ValueError, match="decay"):
        EMA(nn.Linear(1, 1), decay)


def test_ema_state_dict_round_trip_continues_the_same_average():
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    a = EMA(model, 0.7)
    for _ in range(2):
        with torch.no_grad():
            model.weight.add_(0.5)
        a.update(model)
    b = EMA(nn.Linear(3, 3), 0.7)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        model.weight.add_(0.5)
    a.update(model)
    b.update(model)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# -- checkpoints ------------------------------------------------------------------------------------------------------


def make_state(step: int = 7, seed: int = 0) -> tuple[dict, UNet, EMA, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = UNet(1, 8, 8, (1, 2), 1, (4,), 0.0, 4)
    ema = EMA(model, 0.9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model(torch.randn(2, 1, 8, 8), torch.tensor([3, 4])).square().mean() + model.conv_in.weight.sum()
    loss.backward()
    opt.step()
    ema.update(model)
    state = {
        "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "step": step,
        "rng": rng_state(),
        "config": {"model": model.config.to_dict(), "diffusion": {"schedule": "linear", "timesteps": 100},
                   "params": {"train": {"lr": 1e-3, "ema_decay": 0.9}}, "data_sha256": "ab" * 32},
    }
    return state, model, ema, opt


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_checkpoint_round_trip(tmp_path):
    state, model, ema, opt = make_state(step=1234)
    path = checkpoint_path(tmp_path, 1234)
    assert path.name == "ckpt_00001234.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert_same(state, loaded)
    assert loaded["step"] == 1234

    # Everything restores into fresh objects, and the rebuilt network is the saved one.
    m2 = UNet.from_config(loaded["config"]["model"])
    m2.load_state_dict(loaded["model"])
    e2 = EMA(m2, 0.9)
    e2.load_state_dict(loaded["ema"])
    o2 = torch.optim.Adam(m2.parameters(), lr=1e-3)
    o2.load_state_dict(loaded["optimizer"])
    assert_same(model.state_dict(), m2.state_dict())
    assert_same(ema.state_dict(), e2.state_dict())
    assert_same(opt.state_dict()["state"], o2.state_dict()["state"])
    # Adam moments, not an empty state (at init only conv_out gets a gradient: the branches before it start at zero).
    assert any(st["exp_avg"].abs().sum() > 0 for st in o2.state_dict()["state"].values())
    assert len(o2.state_dict()["state"]) == len(list(m2.parameters()))


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(99)
    torch.randn(5)
    state, *_ = make_state()
    state["rng"] = rng_state()
    expected = torch.randn(8)
    save_checkpoint(tmp_path / "ckpt_00000001.pt", state)
    torch.manual_seed(0)  # anything else
    set_rng_state(load_checkpoint(tmp_path / "ckpt_00000001.pt")["rng"])
    assert torch.equal(torch.randn(8), expected)


def test_load_uses_weights_only(tmp_path, monkeypatch):
    state, *_ = make_state()
    save_checkpoint(tmp_path / "ckpt_00000001.pt", state)
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(tmp_path / "ckpt_00000001.pt")
    assert seen.get("weights_only") is True


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return "pwned"


def test_pickled_code_is_refused_not_run(tmp_path):
    state, *_ = make_state()
    state["config"] = {"evil": _Payload()}
    path = tmp_path / "ckpt_00000001.pt"
    with open(path, "wb") as f:
        torch.save(state, f)
    _Payload.ran = False
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert not _Payload.ran
    assert exc.value.path == path and str(path) in str(exc.value)


def _no_temp_files(folder: Path) -> bool:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_crash_inside_torch_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_00000005.pt"
    old, *_ = make_state(step=5, seed=0)
    save_checkpoint(path, old)
    new, *_ = make_state(step=5, seed=1)
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        f.flush()
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, new)
    monkeypatch.setattr(torch, "save", real_save)
    assert_same(load_checkpoint(path), old)
    assert _no_temp_files(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_crash_at_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_00000005.pt"
    old, *_ = make_state(step=5, seed=0)
    save_checkpoint(path, old)
    new, *_ = make_state(step=5, seed=1)

    def crashing_replace(src, dst):
        raise KeyboardInterrupt  # killed between write and rename; BaseException must be cleaned up too

    monkeypatch.setattr(ckpt.os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, new)
    monkeypatch.undo()
    assert_same(load_checkpoint(path), old)
    assert _no_temp_files(tmp_path)


def test_atomic_write_bytes(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    atomic_write_bytes(target, lambda f: f.write(b"first"))
    assert target.read_bytes() == b"first"

    def half_then_fail(f):
        f.write(b"sec")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write_bytes(target, half_then_fail)
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]
    atomic_write_bytes(target, lambda f: f.write(b"second"))
    assert target.read_bytes() == b"second"


def test_save_refuses_an_incomplete_state(tmp_path):
    state, *_ = make_state()
    del state["optimizer"]
    with pytest.raises(ValueError, match="optimizer"):
        save_checkpoint(tmp_path / "ckpt_00000001.pt", state)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not_a_dict", "missing_keys"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    for step in (1, 2):
        state, *_ = make_state(step=step, seed=step)
        save_checkpoint(checkpoint_path(tmp_path, step), state)
    good, *_ = make_state(step=2, seed=2)
    bad = checkpoint_path(tmp_path, 3)
    save_checkpoint(bad, make_state(step=3, seed=3)[0])
    data = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x00\x01not a checkpoint" * 10)
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "not_a_dict":
        torch.save([1, 2, 3], bad)
    else:
        torch.save({"model": {}, "step": 3}, bad)

    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(bad)
    assert exc.value.path == bad
    assert str(bad) in str(exc.value)

    warnings: list[str] = []
    state = load_latest(tmp_path, warn=warnings.append)
    assert state is not None and state["step"] == 2
    assert_same(state["model"], good["model"])
    assert len(warnings) == 1 and bad.name in warnings[0]


def test_load_latest_edge_cases(tmp_path):
    assert load_latest(tmp_path / "missing") is None
    assert load_latest(tmp_path) is None
    for step in (1, 2):
        checkpoint_path(tmp_path, step).write_bytes(b"junk")
    warnings: list[str] = []
    assert load_latest(tmp_path, warn=warnings.append) is None
    assert len(warnings) == 2
    assert load_latest(tmp_path) is None  # no warn callback: still falls through quietly


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "ckpt_00000009.pt")
    assert "ckpt_00000009.pt" in str(exc.value)


def test_list_and_prune_checkpoints(tmp_path):
    steps = [3, 10, 200, 123_456_789]
    for s in steps:
        checkpoint_path(tmp_path, s).write_bytes(b"x")
    for name in ("ckpt_1.pt", ".ckpt_00000010.pt.abc.tmp", "notes.txt", "ckpt_00000004.pt.bak"):
        (tmp_path / name).write_bytes(b"x")
    assert [s for s, _ in list_checkpoints(tmp_path)] == steps
    assert list_checkpoints(tmp_path / "missing") == []

    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["ckpt_00000003.pt", "ckpt_00000010.pt"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [200, 123_456_789]
    assert (tmp_path / "notes.txt").exists()
    assert prune_checkpoints(tmp_path, keep=5) == []
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, keep=0)


def test_checkpoint_file_is_a_plain_torch_zip(tmp_path):
    """Readable by torch.load(weights_only=True) alone, without this package's help."""
    state, *_ = make_state()
    save_checkpoint(tmp_path / "c.pt", state)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["config"]["model"]["ch"] == 8


# -- a checkpoint rebuilds its model alone --------------------------------------------------------------------------


def test_load_model_rebuilds_ema_or_raw_weights_and_the_diffusion(tmp_path):
    from ddpm.checkpoint import newest_checkpoint
    from ddpm.pretrained import load_model

    state, model, ema, _ = make_state(step=5)
    save_checkpoint(checkpoint_path(tmp_path, 5), state)
    (tmp_path / "ckpt_00000009.pt").write_bytes(b"cut short")  # a newer, corrupt file is skipped and reported
    warned = []
    path = newest_checkpoint(tmp_path, warn=warned.append)
    assert path.name == "ckpt_00000005.pt" and len(warned) == 1 and "ckpt_00000009.pt" in warned[0]

    net, diffusion, loaded = load_model(path)  # EMA weights by default
    assert not net.training and loaded["step"] == 5
    assert diffusion.num_timesteps == 100 and float(diffusion.betas[0]) == pytest.approx(1e-4)
    ema_weights = {k.removeprefix("module."): v for k, v in ema.state_dict().items() if k.startswith("module.")}
    assert_same(net.state_dict(), ema_weights)
    raw, _, _ = load_model(path, use_ema=False)
    assert_same(raw.state_dict(), model.state_dict())
    ema_sd, raw_sd = net.state_dict(), raw.state_dict()
    assert any(not torch.equal(ema_sd[k], raw_sd[k]) for k in raw_sd)  # EMA (decay 0.9, one update) != raw

    with pytest.raises(CheckpointError, match="no checkpoints"):
        newest_checkpoint(tmp_path / "empty")
    bad = dict(state, config={**state["config"], "model": {**state["config"]["model"], "ch": 16}})
    save_checkpoint(tmp_path / "other" / "ckpt_00000001.pt", bad)
    with pytest.raises(CheckpointError, match="weights do not fit the stored model config"):
        load_model(tmp_path / "other" / "ckpt_00000001.pt")
