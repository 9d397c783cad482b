"""The speed switches (ddpm/perf.py) compute the same numbers as the plain eager path, within float32 round-off."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ddpm.perf import make_adam, prepare_model
from ddpm.unet import UNet

# Attention at 4x4 and a channel change, so every block type (and the channels_last attention path) is covered.
TINY_UNET = dict(image_channels=1, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                 dropout=0.0, num_groups=8)


def _nets():
    torch.manual_seed(0)
    ref = UNet(**TINY_UNET)
    # The output conv starts at zero (every block starts as the identity): perturb all weights, so the outputs
    # and gradients depend on every layer.
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref, copy.deepcopy(ref)


def _batch(b=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 1, 8, 8, generator=g), torch.randint(0, 1000, (b,), generator=g)


def test_channels_last_matches_eager_forward_and_gradients():
    ref, fast = _nets()
    net = prepare_model(fast, channels_last=True)
    assert net is fast and fast.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    assert not fast.conv_out.weight.is_contiguous()
    x, t = _batch()
    y_ref, y = ref(x, t), net(x, t)
    assert y.is_contiguous(memory_format=torch.channels_last)  # the layout carried through every layer
    assert y.abs().mean() > 0.01  # a network that computes something
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    (y_ref**2).mean().backward()
    (y**2).mean().backward()
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # state dicts load across layouts (a checkpoint from either setting resumes in the other)
    back = UNet(**TINY_UNET)
    back.load_state_dict(fast.state_dict())
    torch.testing.assert_close(back(x, t), y_ref, rtol=1e-4, atol=1e-5)


def test_compile_matches_eager_forward_and_gradients():
    # torch.compile's "aot_eager" backend runs the same Dynamo capture and AOT-autograd graphs as the default
    # Inductor, but with eager kernels: Inductor's C++ compilation of even a 1-level UNet takes 2-3 minutes cold
    # on this 2-core machine, past this file's time budget (the benchmarks measure Inductor itself).
    ref, fast = _nets()
    net = prepare_model(fast, compile=True, compile_backend="aot_eager")
    assert isinstance(net, torch._dynamo.eval_frame.OptimizedModule) and net._orig_mod is fast
    x, t = _batch()
    y_ref, y = ref(x, t), net(x, t)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    (y**2).mean().backward()
    (y_ref**2).mean().backward()
    for a, b in zip(ref.parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("impl", ["fused", "foreach", "loop", "auto"])
def test_adam_implementations_take_the_same_steps(impl):
    ref, fast = _nets()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3, foreach=False)
    # the fused kernel must also cope with NHWC weights whose moments were saved from NCHW ones (a resume)
    prepare_model(fast, channels_last=True)
    opt = make_adam(fast.parameters(), 1e-3, impl)
    x, t = _batch()
    for step in range(3):
        for net, o in ((ref, ref_opt), (fast, opt)):
            o.zero_grad(set_to_none=True)
            (net(x, t) ** 2).mean().backward()
            o.step()
        if step == 0:
            opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # NCHW moments into the NHWC model's optimizer
            with torch.no_grad():
                for a, b in zip(ref.parameters(), fast.parameters()):
                    b.copy_(a)
    with torch.no_grad():
        moved = max(float((a - b).abs().max()) for a, b in zip(ref.parameters(), _nets()[0].parameters()))
    assert moved > 1e-3  # the steps did change the weights
    for a, b in zip(ref.parameters(), fast.parameters()):
        # 3 steps of lr 1e-3; Adam's m/sqrt(v) magnifies the ~1e-6 gradient round-off where a gradient is ~0
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5)
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()


def test_unknown_adam_implementation_is_refused():
    with pytest.raises(ValueError, match="unknown Adam implementation 'apex'; known: auto, fused, foreach, loop"):
        make_adam(UNet(**TINY_UNET).parameters(), 1e-3, "apex")


def test_config_rejects_a_bad_switch_value(tiny_config):
    from tasks.lib.config import ConfigError

    with pytest.raises(ConfigError, match="train.adam_impl"):
        tiny_config({"train.adam_impl": "apex"})
    with pytest.raises(ConfigError, match="sample.channels_last"):
        tiny_config({"sample.channels_last": "yes"})


def _train(tmp_path, tiny_config, name, overrides):
    from tasks import fetch
    from tasks.train import run_local

    cfg = tiny_config({"train.steps": 4, "train.checkpoint_every": 4, **overrides})
    data = tmp_path / "data"
    if not data.exists():
        fetch.run(cfg, data)
    out = tmp_path / name
    run_local(cfg, data, out / "ckpt", out / "loss.tsv", threads=1)
    rows = (out / "loss.tsv").read_text().splitlines()[1:]
    return cfg, out / "ckpt", [float(r.split("\t")[1]) for r in rows]


def test_train_loop_and_shard_sampler_with_switches_match_the_default(tmp_path, tiny_config):
    """The real train loop and the sample stage's ShardSampler, switches on vs off: same losses, same images."""
    from tasks.lib.sampling import ShardSampler, newest_checkpoint

    plain = {"train.adam_impl": "loop", "train.channels_last": False}
    fast = {"train.adam_impl": "fused", "train.channels_last": True}
    cfg, ckpt_a, loss_a = _train(tmp_path, tiny_config, "plain", plain)
    _, ckpt_b, loss_b = _train(tmp_path, tiny_config, "fast", fast)
    assert len(loss_a) == 4 and all(np.isfinite(loss_a))
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-4)

    seeds = list(range(8))
    a = ShardSampler(str(newest_checkpoint(ckpt_a)), cfg.sample, "cpu", 1).sample(seeds)
    cl = tiny_config({"sample.channels_last": True}).sample
    b = ShardSampler(str(newest_checkpoint(ckpt_a)), cl, "cpu", 1).sample(seeds)
    assert a.shape == (8, 1, 8, 8) and a.dtype == np.uint8 and a.std() > 1
    # uint8 images: float round-off may move a pixel across a rounding boundary, by one level at most
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_switches_do_not_invalidate_checkpoints(tiny_config):
    """A run resumed with other speed switches continues the same training, so its checkpoints are kept."""
    from tasks.train import run_key

    base = run_key(tiny_config(), "sha")
    assert run_key(tiny_config({"train.channels_last": True, "train.compile": True, "train.adam_impl": "loop"}),
                   "sha") == base
    assert run_key(tiny_config({"train.lr": 5e-4}), "sha") != base


def test_autocast_wrapper_returns_float32_close_to_the_fp32_network():
    from ddpm.perf import Autocast

    ref, fast = _nets()
    x, t = _batch()
    with torch.no_grad():
        want = ref(x, t)
        got = Autocast(fast, "cpu", torch.bfloat16)(x, t)  # bf16 autocast exists on the CPU too
        also_bf16_weights = fast.to(torch.bfloat16)(x, t)  # the UNet casts x_t to its weights' dtype
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert not torch.equal(got, want)  # bf16 really ran
    assert torch.allclose(got, want, atol=0.05 * want.abs().max().item())  # within bf16 round-off
    assert also_bf16_weights.dtype == torch.bfloat16
    assert torch.allclose(also_bf16_weights.float(), want, atol=0.05 * want.abs().max().item())


def test_sample_precision_is_part_of_the_shards_key(tmp_path, tiny_config):
    from tasks.lib.sampling import sampling_key

    ckpt = tmp_path / "ckpt_00000001.pt"
    ckpt.write_bytes(b"weights")
    fp32 = sampling_key(tiny_config().sample, ckpt)
    assert sampling_key(tiny_config({"sample.precision": "fp32"}).sample, ckpt) == fp32
    assert sampling_key(tiny_config({"sample.precision": "bf16"}).sample, ckpt) != fp32
