"""Samplers (ddpm/samplers.py): Algorithm 2, DDIM, and one random seed per sample."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ACROSS_BATCHES_ATOL
from ddpm.diffusion import GaussianDiffusion
from ddpm.samplers import SeededNoise, ddim_sample, ddim_timesteps, ddpm_sample
from ddpm.schedules import make_betas
from ddpm.unet import UNet

SHAPE = (1, 4, 4)  # (C, H, W) for the cheap "networks"
UNET_SHAPE = (1, 8, 8)



class MixEps(torch.nn.Module):
    """A small fixed eps-"network": a per-pixel affine map of x_t plus a smooth function of t (row-wise, so each
    sample's output depends on its own input only)."""

    def __init__(self, shape=SHAPE, timesteps: int = 50):
        super().__init__()
        g = torch.Generator().manual_seed(42)
        n = math.prod(shape)
        self.register_buffer("w", torch.randn(n, generator=g) * 0.3 + 0.6)
        self.register_buffer("b", torch.randn(n, generator=g) * 0.2)
        self.timesteps = timesteps

    def forward(self, x, t):
        flat = x.flatten(1)
        s = (t.float() / self.timesteps)[:, None]
        return (torch.tanh(flat * self.w + self.b * s)).reshape(x.shape)


def xT(seeds, shape=SHAPE) -> torch.Tensor:
    """x_T as the samplers must draw it: the first draw of a CPU generator seeded with each seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


# -- helpers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "T,steps,expected",
    [(10, 10, list(range(10))), (10, 5, [0, 2, 4, 6, 8]), (1000, 4, [0, 250, 500, 750]), (10, 3, [0, 3, 6]),
     (10, 1, [0])],
)
def test_ddim_timesteps(T, steps, expected):
    assert ddim_timesteps(T, steps) == expected


@pytest.mark.parametrize("steps", [0, 11, -1])
def test_ddim_timesteps_rejects_bad_step_counts(steps):
    with pytest.raises(ValueError, match="between 1 and 10"):
        ddim_timesteps(10, steps)


def test_seeded_noise_rows_follow_their_own_generators():
    noise = SeededNoise([5, 7, 5], SHAPE)
    first, second = noise.draw(), noise.draw()
    g5, g7 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(7)
    assert torch.equal(first[0], torch.randn(SHAPE, generator=g5))
    assert torch.equal(first[1], torch.randn(SHAPE, generator=g7))
    assert torch.equal(first[2], first[0])  # same seed, same stream
    assert torch.equal(second[0], torch.randn(SHAPE, generator=g5))
    assert torch.equal(second[1], torch.randn(SHAPE, generator=g7))
    assert first.shape == (3, *SHAPE) and first.dtype == torch.float32


def test_empty_seeds_rejected():
    with pytest.raises(ValueError, match="seeds"):
        SeededNoise([], SHAPE)


# -- ancestral sampling (Algorithm 2) -----------------------------------------------------------------------------


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_sample_is_algorithm_2_with_per_sample_noise(variance, clip):
    """x_T is each generator's first draw, then one draw per step with t > 0, in order T-1, ..., 1."""
    T, seeds = 50, [3, 11, 12]
    d = GaussianDiffusion(make_betas("linear", T))
    model = MixEps(timesteps=T)
    out = ddpm_sample(model, d, seeds, SHAPE, variance=variance, clip_denoised=clip)

    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.stack([torch.randn(SHAPE, generator=g) for g in gens])
    for step in reversed(range(T)):
        t = torch.full((len(seeds),), step, dtype=torch.long)
        z = torch.stack([torch.randn(SHAPE, generator=g) for g in gens]) if step > 0 else torch.zeros_like(x)
        x = d.p_sample(model, x, t, z, variance, clip)
    assert torch.equal(out, x)
    if clip:
        assert float(out.abs().max()) <= 1.0


def test_ddpm_sample_pinned_slice():
    d = GaussianDiffusion(make_betas("linear", 50))
    out = ddpm_sample(MixEps(timesteps=50), d, [0, 1], SHAPE)
    expected = torch.tensor([[-0.53334, -0.04992, -0.09530, 0.14368], [-0.49264, -0.37218, 0.86735, -0.97035]])
    torch.testing.assert_close(out[:, 0, 0, :], expected, rtol=0, atol=1e-4)


def test_ddpm_callback_sees_every_step():
    T = 7
    d = GaussianDiffusion(make_betas("linear", T))
    seen = []
    out = ddpm_sample(MixEps(timesteps=T), d, [0, 1], SHAPE,
                      callback=lambda i, t, x, x0: seen.append((i, t, x.clone(), x0.shape)))
    assert [(i, t) for i, t, _, _ in seen] == [(i, T - 1 - i) for i in range(T)]
    assert all(s == (2, *SHAPE) for *_, s in seen)
    assert torch.equal(seen[-1][2], out)


# -- DDIM -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 5, 10, 50])
def test_ddim_eta_0_is_deterministic_given_x_T(steps):
    T, seeds = 50, [0, 1, 2, 3]
    d = GaussianDiffusion(make_betas("cosine", T))
    model = MixEps(timesteps=T)
    state = torch.get_rng_state()
    a = ddim_sample(model, d, seeds, SHAPE, steps=steps, eta=0.0)
    b = ddim_sample(model, d, seeds, SHAPE, steps=steps, eta=0.0)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state), "samplers must draw from the per-sample generators only"
    # Only x_T is random: the same deterministic chain from x_T, with the "noise" arguments set to garbage.
    x = xT(seeds)
    seq = ddim_timesteps(T, steps)
    for step, prev in zip(reversed(seq), reversed([-1] + seq[:-1])):
        t = torch.full((4,), step, dtype=torch.long)
        x = d.ddim_step(model, x, t, torch.full((4,), prev, dtype=torch.long), eta=0.0, noise=torch.randn_like(x) * 9)
    assert torch.equal(a, x)
    assert not torch.equal(a, ddim_sample(model, d, [4, 5, 6, 7], SHAPE, steps=steps))


def test_ddim_pinned_slice():
    d = GaussianDiffusion(make_betas("linear", 50))
    out = ddim_sample(MixEps(timesteps=50), d, [0, 1], SHAPE, steps=10)
    expected = torch.tensor([[-0.82391, -0.84039, -0.14607, -0.58234], [-1.0, -0.48974, -0.44494, -1.0]])
    torch.testing.assert_close(out[:, 0, 0, :], expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_eta_1_over_all_steps_is_ancestral_fixedsmall(clip, schedule):
    """Song et al. Eq. 16: with eta = 1 and every index visited, DDIM is Algorithm 2 with sigma^2 = beta-tilde, and
    both samplers draw the same per-sample noise in the same order."""
    T, seeds = 60, list(range(6))
    d = GaussianDiffusion(make_betas(schedule, T))
    model = MixEps(timesteps=T)
    a = ddim_sample(model, d, seeds, SHAPE, steps=T, eta=1.0, clip_denoised=clip)
    b = ddpm_sample(model, d, seeds, SHAPE, variance="fixedsmall", clip_denoised=clip)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # ... and not with the other variance, so the comparison can fail.
    c = ddpm_sample(model, d, seeds, SHAPE, variance="fixedlarge", clip_denoised=clip)
    assert (a - c).abs().max() > 1e-2


def test_ddim_eta_1_with_a_tiny_unet_is_ancestral_fixedsmall(tiny_unet):
    T, seeds = 20, [0, 1, 2, 3]
    d = GaussianDiffusion(make_betas("linear", T))
    a = ddim_sample(tiny_unet, d, seeds, UNET_SHAPE, steps=T, eta=1.0)
    b = ddpm_sample(tiny_unet, d, seeds, UNET_SHAPE, variance="fixedsmall")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ddim_callback_and_argument_checks():
    d = GaussianDiffusion(make_betas("linear", 20))
    seen = []
    ddim_sample(MixEps(timesteps=20), d, [0], SHAPE, steps=4, callback=lambda i, t, x, x0: seen.append((i, t)))
    assert seen == [(0, 15), (1, 10), (2, 5), (3, 0)]
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(MixEps(), d, [0], SHAPE, eta=-0.1)
    with pytest.raises(ValueError, match="between 1 and 20"):
        ddim_sample(MixEps(), d, [0], SHAPE, steps=21)
    with pytest.raises(ValueError, match="fixedsmall"):
        ddpm_sample(MixEps(), d, [0], SHAPE, variance="learned")


# -- one seed per sample: bit for bit in one batch composition, round-off across splits ---------------------------


@pytest.mark.parametrize(
    "sampler,kwargs",
    [("ddpm", {"variance": "fixedlarge"}), ("ddpm", {"variance": "fixedsmall"}), ("ddim", {"steps": 10, "eta": 0.0}),
     ("ddim", {"steps": 5, "eta": 1.0})],
)
def test_seed_per_sample_is_independent_of_batching(tiny_unet, sampler, kwargs):
    """README "Reproducibility": seeds 0-7 in one batch, sampled again, are bitwise the same; in other batch splits
    (4 + 4, 3 + 5, a shuffled batch) each seed gives its image within round-off, with a real UNet on CPU. The splits
    are other computations: oneDNN picks kernels per batch size (8 vs 3 + 5 differ in the last bits on an AMD EPYC)."""
    d = GaussianDiffusion(make_betas("linear", 10))
    fn = ddpm_sample if sampler == "ddpm" else ddim_sample

    def run(seeds):
        return fn(tiny_unet, d, seeds, UNET_SHAPE, **kwargs)

    whole = run(list(range(8)))
    assert torch.equal(whole, run(list(range(8))))  # the same composition: the same bits
    halves = torch.cat([run([0, 1, 2, 3]), run([4, 5, 6, 7])])
    uneven = torch.cat([run([0, 1, 2]), run([3, 4, 5, 6, 7])])
    shuffled = run([7, 2, 5, 0, 3, 6, 1, 4])
    torch.testing.assert_close(halves, whole, rtol=0, atol=ACROSS_BATCHES_ATOL)
    torch.testing.assert_close(uneven, whole, rtol=0, atol=ACROSS_BATCHES_ATOL)
    torch.testing.assert_close(shuffled, whole[[7, 2, 5, 0, 3, 6, 1, 4]], rtol=0, atol=ACROSS_BATCHES_ATOL)
    # The network matters and another seed is far beyond the tolerance: a row given the wrong seed would fail above.
    assert whole.std() > 0.1 and (whole[0] - whole[1]).abs().max() > 100 * ACROSS_BATCHES_ATOL


def test_sampling_uses_eval_mode_and_restores_train_mode():
    torch.manual_seed(0)
    model = UNet(1, 8, 8, (1, 2), 1, (), 0.5, 4)  # dropout 0.5: train-mode sampling would be random
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.train()
    d = GaussianDiffusion(make_betas("linear", 5))
    a = ddim_sample(model, d, [0, 1], UNET_SHAPE, steps=5)
    b = ddim_sample(model, d, [0, 1], UNET_SHAPE, steps=5)
    assert torch.equal(a, b)
    assert model.training


def test_ddpm_sample_leaves_the_global_rng_alone():
    d = GaussianDiffusion(make_betas("linear", 10))
    state = torch.get_rng_state()
    ddpm_sample(MixEps(timesteps=10), d, [0, 1], SHAPE)
    ddim_sample(MixEps(timesteps=10), d, [0, 1], SHAPE, steps=5, eta=1.0)
    assert torch.equal(torch.get_rng_state(), state)


def test_sample_is_the_one_selection_by_name():
    from ddpm.samplers import sample

    T = 20
    d = GaussianDiffusion(make_betas("linear", T))
    model = MixEps(timesteps=T)
    kw = dict(steps=5, eta=0.5, variance="fixedsmall", clip_denoised=True)
    assert torch.equal(sample(model, d, [1, 2], SHAPE, sampler="ddpm", **kw),
                       ddpm_sample(model, d, [1, 2], SHAPE, variance="fixedsmall"))
    assert torch.equal(sample(model, d, [1, 2], SHAPE, sampler="ddim", **kw),
                       ddim_sample(model, d, [1, 2], SHAPE, steps=5, eta=0.5))
    seen = []
    sample(model, d, [1], SHAPE, sampler="ddim", steps=4, callback=lambda i, t, x, x0: seen.append(t))
    assert seen == [15, 10, 5, 0]
    with pytest.raises(ValueError, match="unknown sampler 'euler'; known: ddpm, ddim"):
        sample(model, d, [1], SHAPE, sampler="euler")
