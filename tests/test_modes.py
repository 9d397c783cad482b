"""Sampling modes beyond generation (ddpm/samplers.py, the sample stage's ``sample.mode``): img2img from a partially
diffused real image and inpainting with RePaint's replacement and resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ACROSS_BATCHES_ATOL
from ddpm.diffusion import GaussianDiffusion
from ddpm.samplers import (
    ChainRecorder,
    ddim_sample,
    ddim_timesteps,
    img2img_sample,
    inpaint_sample,
    region_mask,
    repaint_schedule,
    reverse_pairs,
    start_index,
    trace_steps,
)
from ddpm.schedules import make_betas

SHAPE = (1, 8, 8)


def images(n: int, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- schedules of the chain ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,strength,expected", [(1000, 0.0, -1), (1000, 1.0, 999), (1000, 0.75, 749), (100, 0.5, 49),
                                                 (1000, 0.0004, -1), (1000, 0.0006, 0)])
def test_start_index_is_the_papers_t_minus_one(T, strength, expected):
    assert start_index(T, strength) == expected


def test_start_index_rejects_strength_outside_0_1():
    with pytest.raises(ValueError, match="strength"):
        start_index(10, 1.5)


def test_reverse_pairs():
    assert reverse_pairs("ddpm", 5, 0, 2) == [(2, 1), (1, 0), (0, -1)]
    # Without a start: the plain DDIM chain, the same pairs ddim_sample visits.
    seq = ddim_timesteps(50, 10)
    assert reverse_pairs("ddim", 50, 10) == list(zip(reversed(seq), reversed([-1] + seq[:-1])))
    # From any t: one shorter jump onto the strided grid.
    assert reverse_pairs("ddim", 50, 10, 24) == [(24, 20), (20, 15), (15, 10), (10, 5), (5, 0), (0, -1)]
    assert reverse_pairs("ddim", 50, 10, -1) == []
    with pytest.raises(ValueError, match="sampler"):
        reverse_pairs("euler", 50, 10)


def test_repaint_schedule_goes_back_up_and_down_again():
    pairs = [(3, 2), (2, 1), (1, 0), (0, -1)]
    assert repaint_schedule(pairs) == [("down", *p) for p in pairs]
    moves = repaint_schedule(pairs, jump_length=2, jump_n_sample=2)
    assert moves == [("down", 3, 2), ("down", 2, 1), ("up", 1, 2), ("up", 2, 3), ("down", 3, 2), ("down", 2, 1),
                     ("down", 1, 0), ("down", 0, -1)]
    # Every move connects to the previous one: the chain is never discontinuous.
    moves = repaint_schedule(reverse_pairs("ddpm", 30, 0), jump_length=5, jump_n_sample=3)
    at = 29
    for kind, a, b in moves:
        assert a == at and (b == a - 1 if kind == "down" else b == a + 1)
        at = b
    assert at == -1 and sum(k == "up" for k, _, _ in moves) == 5 * 2 * 5  # 5 jumps (none near the end) x 2 x 5


def test_trace_steps_and_recorder():
    assert trace_steps(100, 10) == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert trace_steps(3, 10) == [0, 1, 2] and trace_steps(7, 1) == [6]
    d = GaussianDiffusion(make_betas("linear", 20))
    model = lambda x, t: torch.tanh(x)  # noqa: E731
    rec = ChainRecorder(trace_steps(10, 4))
    out = ddim_sample(model, d, [0, 1, 2], SHAPE, steps=10, callback=rec)
    assert rec.steps == [0, 3, 6, 9] and rec.timesteps == [18, 12, 6, 0]
    assert rec.x_t.shape == (4, 3, *SHAPE) and rec.x0.shape == (4, 3, *SHAPE)
    assert torch.equal(rec.x_t[-1], out)


# -- img2img ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_img2img_at_strength_0_returns_the_input(tiny_unet, sampler):
    x0 = images(3)
    out = img2img_sample(tiny_unet, GaussianDiffusion(make_betas("linear", 20)), x0, [0, 1, 2], 0.0,
                         sampler=sampler, steps=5)
    assert torch.equal(out, x0)


@pytest.mark.parametrize("sampler,kw", [("ddpm", {}), ("ddim", {"steps": 5, "eta": 1.0})])
def test_img2img_is_per_seed_and_keeps_more_of_the_image_at_low_strength(tiny_unet, sampler, kw):
    d = GaussianDiffusion(make_betas("linear", 20))
    x0, seeds = images(8), list(range(8))
    whole = img2img_sample(tiny_unet, d, x0, seeds, 0.5, sampler=sampler, **kw)
    assert torch.equal(whole, img2img_sample(tiny_unet, d, x0, seeds, 0.5, sampler=sampler, **kw))
    # Another batch split is another computation (oneDNN picks kernels per batch size): equal within round-off.
    split = torch.cat([img2img_sample(tiny_unet, d, x0[:3], seeds[:3], 0.5, sampler=sampler, **kw),
                       img2img_sample(tiny_unet, d, x0[3:], seeds[3:], 0.5, sampler=sampler, **kw)])
    torch.testing.assert_close(split, whole, rtol=0, atol=ACROSS_BATCHES_ATOL)
    assert not torch.equal(whole, img2img_sample(tiny_unet, d, x0, list(range(8, 16)), 0.5, sampler=sampler, **kw))
    low = img2img_sample(tiny_unet, d, x0, seeds, 0.1, sampler=sampler, **kw)
    high = img2img_sample(tiny_unet, d, x0, seeds, 1.0, sampler=sampler, **kw)
    assert (low - x0).abs().mean() < (high - x0).abs().mean()


def test_img2img_ddpm_is_q_sample_then_algorithm_2_from_t(tiny_unet):
    """The chain by hand: x_t = q_sample(x0, t, first draw), then p_sample with each later draw, t = 9 ... 0."""
    d = GaussianDiffusion(make_betas("linear", 20))
    x0, seeds = images(2), [5, 6]
    out = img2img_sample(tiny_unet, d, x0, seeds, 0.5)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    draw = lambda: torch.stack([torch.randn(SHAPE, generator=g) for g in gens])  # noqa: E731
    x = d.q_sample(x0, torch.full((2,), 9, dtype=torch.long), draw())
    with torch.no_grad():
        for step in range(9, -1, -1):
            z = draw() if step > 0 else torch.zeros_like(x)
            x = d.p_sample(tiny_unet, x, torch.full((2,), step, dtype=torch.long), z)
    assert torch.equal(out, x)


def test_img2img_rejects_a_batch_that_does_not_match_the_seeds(tiny_unet):
    with pytest.raises(ValueError, match="len\\(seeds\\)"):
        img2img_sample(tiny_unet, GaussianDiffusion(make_betas("linear", 10)), images(2), [0], 0.5)


# -- inpainting ------------------------------------------------------------------------------------------------------
def test_region_masks():
    m = region_mask("bottom-half", 8)
    assert m.shape == (1, 8, 8) and m[:, :4].eq(1).all() and m[:, 4:].eq(0).all()
    assert region_mask("top-half", 7)[:, :4].eq(0).all() and region_mask("top-half", 7)[:, 4:].eq(1).all()
    assert region_mask("left-half", 8)[..., :4].eq(0).all() and region_mask("right-half", 8)[..., 4:].eq(0).all()
    c = region_mask("center", 8)
    assert c.sum() == 64 - 16 and c[:, 2:6, 2:6].eq(0).all()
    with pytest.raises(ValueError, match="bottom-half"):
        region_mask("circle", 8)


@pytest.mark.parametrize("sampler,kw", [("ddpm", {}), ("ddpm", {"jump_length": 3, "jump_n_sample": 2}),
                                        ("ddim", {"steps": 5}), ("ddim", {"steps": 5, "eta": 1.0, "jump_length": 2,
                                                                          "jump_n_sample": 3})])
def test_inpainting_keeps_known_pixels_exactly_and_fills_the_rest(tiny_unet, sampler, kw):
    d = GaussianDiffusion(make_betas("cosine", 20))
    x0 = images(4)
    m = region_mask("bottom-half", 8)
    out = inpaint_sample(tiny_unet, d, x0, m, [0, 1, 2, 3], sampler=sampler, **kw)
    known = m.bool().expand_as(x0)
    assert torch.equal(out[known], x0[known])
    assert (out[~known] - x0[~known]).abs().mean() > 0.05  # the hole is redrawn, not copied
    again = inpaint_sample(tiny_unet, d, x0, m, [0, 1, 2, 3], sampler=sampler, **kw)
    assert torch.equal(out, again)
    # The known pixels steer the fill: other known pixels, another fill.
    other = x0.clone()
    other[known] = -other[known]
    assert not torch.equal(inpaint_sample(tiny_unet, d, other, m, [0, 1, 2, 3], sampler=sampler, **kw)[~known],
                           out[~known])


def test_inpainting_rejects_bad_masks(tiny_unet):
    d = GaussianDiffusion(make_betas("linear", 10))
    with pytest.raises(ValueError, match="only 0"):
        inpaint_sample(tiny_unet, d, images(1), torch.full((8, 8), 0.5), [0])
    with pytest.raises(ValueError, match="broadcast"):
        inpaint_sample(tiny_unet, d, images(1), torch.ones(5, 5), [0])


class EmpiricalDenoiser(torch.nn.Module):
    """The exact eps-prediction for a finite training set: E[x0 | x_t] is the softmax-weighted mean of the training
    images under q(x_t | x_0) (the optimum of L_simple for that data). A real diffusion model, no training needed."""

    def __init__(self, train: torch.Tensor, diffusion: GaussianDiffusion):
        super().__init__()
        self.train_flat = train.flatten(1)
        self.ab = diffusion.alphas_cumprod.float()

    def forward(self, x, t):
        ab = self.ab[t][:, None]
        flat = x.flatten(1)
        d2 = ((flat[:, None, :] - ab.sqrt()[:, None] * self.train_flat[None]) ** 2).sum(-1)  # [B, N]
        w = torch.softmax(-d2 / (2 * (1 - ab)), dim=1)
        x0 = w @ self.train_flat
        return ((flat - ab.sqrt() * x0) / (1 - ab).sqrt()).reshape(x.shape)


def test_inpainting_the_bottom_half_of_held_out_digits_keeps_their_class(digits_and_classifier):
    """Inpaint the bottom half of 50 held-out digits with the exact denoiser of the training digits: the project's
    classifier gives the original label far more often than chance (10%): the known top half steers the fill.
    (Measured: 60% here; 76% is the ceiling, the label of the training digit with the nearest top half.)"""
    from tasks.lib.classifier import load_classifier
    from tasks.lib.shards import load_dataset
    from tasks.lib.images import to_model_range

    ds = load_dataset(digits_and_classifier["data"])
    net, _ = load_classifier(digits_and_classifier["weights"])
    d = GaussianDiffusion(make_betas("cosine", 1000))
    model = EmpiricalDenoiser(to_model_range(ds.train.images), d)
    x0, labels = to_model_range(ds.holdout.images[:50]), torch.from_numpy(ds.holdout.labels[:50])
    m = region_mask("bottom-half", 8)
    kw = dict(sampler="ddim", steps=20, eta=1.0)
    out = inpaint_sample(model, d, x0, m, list(range(50)), **kw)
    known = m.bool().expand_as(x0)
    assert torch.equal(out[known], x0[known])
    with torch.no_grad():
        pred = net(out)[1].argmax(1)
        # The same fill without the known pixels' guidance: a blank top half gives ~chance-level labels.
        blind = inpaint_sample(model, d, torch.full_like(x0, -1.0), m, list(range(50)), **kw)
        blind_pred = net(blind)[1].argmax(1)
    match = (pred == labels).float().mean().item()
    blind_match = (blind_pred == labels).float().mean().item()
    assert match >= 0.4, match  # 4x chance
    assert match > blind_match + 0.2, (match, blind_match)


@pytest.fixture(scope="module")
def digits_and_classifier(tmp_path_factory):
    """The digits dataset artifact and a classifier trained on it (100 steps)."""
    from tasks.lib.config import load_config
    from tasks import fetch, train_classifier

    work = tmp_path_factory.mktemp("modes")
    cfg = load_config(None, {"tracking.enabled": False, "classifier.steps": 100})  # ~98% held-out accuracy
    fetch.run(cfg, work / "dataset")
    train_classifier.run(cfg, work / "dataset", work / "classifier.pt", work / "classifier.json")
    return {"data": work / "dataset", "weights": work / "classifier.pt"}


# -- the sample stage's modes ------------------------------------------------------------------------------------------
def _fake_checkpoint(tiny_config, path, tiny_unet) -> None:
    """A checkpoint file in the train stage's format holding the tiny UNet (as model and EMA weights)."""
    from ddpm.checkpoint import save_checkpoint

    cfg = tiny_config()
    sd = tiny_unet.state_dict()
    save_checkpoint(path, {"model": sd, "ema": {**{f"module.{k}": v for k, v in sd.items()},
                                                "n_averaged": torch.tensor(1)},
                           "optimizer": {}, "step": 6,
                           "config": {"model": cfg.unet_config().to_dict(), "diffusion": cfg.diffusion.model_dump(),
                                      "params": cfg.to_dict()}})


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_shard_sampler_modes(tiny_config, tmp_path, tiny_unet, mode):
    from tasks.lib.images import to_model_range
    from tasks.lib.sampling import ShardSampler

    ckpt = tmp_path / "ckpt_00000006.pt"
    _fake_checkpoint(tiny_config, ckpt, tiny_unet)
    inputs = ((images(5).numpy() + 1) * 127.5).round().astype(np.uint8)
    over = {"sample.mode": mode, "sample.strength": 0.0, "sample.batch_size": 2}
    s = ShardSampler(str(ckpt), tiny_config(over).sample, "cpu", 1)
    out = s.sample([0, 1, 2, 3, 4], inputs)
    assert out.dtype == np.uint8 and out.shape == (5, *SHAPE)
    if mode == "img2img":  # strength 0: the inputs themselves
        assert np.array_equal(out, inputs)
    else:  # the known top half is the input's, exactly
        assert np.array_equal(out[..., :4, :], inputs[..., :4, :]) and not np.array_equal(out, inputs)
    assert to_model_range(inputs).shape == (5, *SHAPE)
    with pytest.raises(ValueError, match="one input image per seed"):
        s.sample([0, 1], None)


def test_sampling_key_depends_on_the_mode_and_its_inputs(tiny_config, tmp_path, tiny_unet):
    from tasks.lib.sampling import sampling_key

    ckpt = tmp_path / "ckpt_00000006.pt"
    _fake_checkpoint(tiny_config, ckpt, tiny_unet)
    def key(over, inputs=None):
        return sampling_key(tiny_config(over).sample, ckpt, inputs)

    gen = key({})
    # generate ignores the other modes' settings: shards of earlier runs stay valid
    assert key({"sample.strength": 0.9, "sample.mask": "center"}) == gen
    a = key({"sample.mode": "img2img"}, "sha-a")
    assert len({gen, a, key({"sample.mode": "img2img"}, "sha-b"),
                key({"sample.mode": "img2img", "sample.strength": 0.3}, "sha-a"),
                key({"sample.mode": "inpaint"}, "sha-a")}) == 5


def test_sample_stage_modes_need_the_dataset(tiny_config, tmp_path):
    from tasks.lib.errors import StageError
    from tasks.sample import input_images

    assert input_images(tiny_config(), None) == (None, None)
    with pytest.raises(StageError, match="--data"):
        input_images(tiny_config({"sample.mode": "inpaint"}), None)


def test_mode_keys_are_validated(tiny_config):
    from tasks.lib.config import ConfigError

    with pytest.raises(ConfigError, match="sample.mode"):
        tiny_config({"sample.mode": "outpaint"})
    with pytest.raises(ConfigError, match="sample.strength"):
        tiny_config({"sample.strength": 1.5})
    with pytest.raises(ConfigError, match="sample.mask"):
        tiny_config({"sample.mask": "circle"})
