"""The multistep solvers (ddpm/solvers.py): the diffusers adapter proven on DDIMScheduler, per-sample seeds, timestep
spacings, img2img and inpainting with a solver, and the noise of a FID (tasks/sampler_table.py)."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch

from conftest import ACROSS_BATCHES_ATOL
from ddpm.config import SamplerName, TimestepSpacing
from ddpm.diffusion import GaussianDiffusion
from ddpm.samplers import (
    SAMPLERS,
    SeededNoise,
    ddim_sample,
    ddim_timesteps,
    img2img_sample,
    inpaint_sample,
    network_evaluations,
    reverse_pairs,
    sample,
)
from ddpm.schedules import make_betas
from ddpm.solvers import SOLVERS, SPACINGS, drive, make_scheduler, solver_timesteps

SHAPE = (1, 8, 8)


def diffusion(schedule: str = "cosine", T: int = 1000, objective: str = "eps") -> GaussianDiffusion:
    return GaussianDiffusion(make_betas(schedule, T), objective)


def test_config_names_are_the_library_names():
    assert get_args(SamplerName) == SAMPLERS
    assert get_args(TimestepSpacing) == SPACINGS
    assert set(SOLVERS) == set(SAMPLERS) - {"ddpm", "ddim"}


@pytest.mark.parametrize("spacing,expected", [
    ("leading", [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]),
    ("trailing", [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]),
    ("linspace", [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]),
])
def test_ddim_spacings_follow_lin_et_al_table_2(spacing, expected):
    assert ddim_timesteps(1000, 10, spacing) == expected


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 3, 7, 999, 1000])
def test_ddim_spacings_are_distinct_and_in_range(spacing, steps):
    seq = ddim_timesteps(1000, steps, spacing)
    assert len(seq) == len(set(seq)) == steps and seq == sorted(seq) and 0 <= seq[0] and seq[-1] <= 999


def test_solver_grids():
    assert solver_timesteps("unipc", 1000, 10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert solver_timesteps("dpm++2m", 1000, 4, "linspace") == [999, 749, 500, 250]  # ends at sigma 0, not t = 0
    assert solver_timesteps("dpm++2m", 1000, 4, "leading") == [800, 600, 400, 200]  # T // (steps + 1) apart
    assert [t for t, _ in reverse_pairs("unipc", 1000, 10, spacing="trailing")] == list(range(999, 0, -100))
    assert network_evaluations("ddpm", 1000, 10) == 1000 and network_evaluations("unipc", 1000, 10) == 10
    with pytest.raises(ValueError, match="unknown timestep spacing 'middle'; known: leading, trailing, linspace"):
        make_scheduler("unipc", diffusion(), 10, spacing="middle")
    with pytest.raises(ValueError, match="steps must be between 1 and 1000, got 0"):
        make_scheduler("unipc", diffusion(), 0)
    with pytest.raises(ValueError, match="unknown sampler 'euler'; known: ddpm, ddim, dpm\\+\\+2m"):
        sample(None, diffusion(), [0], SHAPE, sampler="euler")


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_adapter_drives_diffusers_ddim_to_our_ddim(tiny_unet, schedule, spacing, eta):
    """diffusers' DDIMScheduler, built from our betas and driven by the adapter with our per-sample noise, lands on
    our DDIM within float32 round-off (diffusers keeps its schedule in float32, ours is float64): the adapter feeds
    the network, the timesteps, the clipping and the noise as our own sampler does."""
    from diffusers import DDIMScheduler

    d = diffusion(schedule)
    seeds = [3, 14, 15]
    ours = ddim_sample(tiny_unet, d, seeds, SHAPE, steps=10, eta=eta, spacing=spacing)
    sched = DDIMScheduler(num_train_timesteps=1000, trained_betas=d.betas.numpy(), clip_sample=True,
                          clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
                          timestep_spacing=spacing)
    sched.set_timesteps(10)
    assert [int(t) for t in sched.timesteps] == ddim_timesteps(1000, 10, spacing)[::-1]
    noise = SeededNoise(seeds, SHAPE)
    with torch.inference_mode():
        theirs = drive(tiny_unet, d, sched, noise.draw(), noise.draw if eta > 0 else None,
                       step_kwargs={"eta": eta, "use_clipped_model_output": True})
    assert (ours - theirs).abs().max().item() < 5e-5
    assert ours.std() > 0.1  # a real image-sized signal, not two zeros


def test_adapter_passes_the_objective(tiny_unet):
    """The same network read as x0- or v-prediction: the adapter must tell diffusers (prediction_type)."""
    from diffusers import DDIMScheduler

    for objective, prediction in (("x0", "sample"), ("v", "v_prediction")):
        d = diffusion("linear", objective=objective)
        ours = ddim_sample(tiny_unet, d, [1, 2], SHAPE, steps=8)
        sched = DDIMScheduler(num_train_timesteps=1000, trained_betas=d.betas.numpy(), clip_sample=True,
                              set_alpha_to_one=True, steps_offset=0, prediction_type=prediction)
        sched.set_timesteps(8)
        with torch.inference_mode():
            theirs = drive(tiny_unet, d, sched, SeededNoise([1, 2], SHAPE).draw(),
                           step_kwargs={"use_clipped_model_output": True})
        assert (ours - theirs).abs().max().item() < 5e-5, objective


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_solver_samples_depend_on_their_own_seed_only(tiny_unet, solver):
    """Per-sample seeds hold for every solver, the stochastic one included: a sample is the same alone, in a batch
    and in another batch order; the SDE solver draws fresh noise every step from each sample's generator."""
    d = diffusion()
    kw = dict(sampler=solver, steps=8, timestep_spacing="trailing")
    batch = sample(tiny_unet, d, [5, 6, 7], SHAPE, **kw)
    alone = sample(tiny_unet, d, [6], SHAPE, **kw)
    reordered = sample(tiny_unet, d, [7, 5], SHAPE, **kw)
    assert (batch[1:2] - alone).abs().max() < ACROSS_BATCHES_ATOL
    assert (batch[[2, 0]] - reordered).abs().max() < ACROSS_BATCHES_ATOL
    assert (batch[0] - batch[1]).abs().max() > 0.05
    assert torch.equal(sample(tiny_unet, d, [6], SHAPE, **kw), alone)  # repeatable
    if SOLVERS[solver].stochastic:  # same x_T as the deterministic solver, different path
        ode = sample(tiny_unet, d, [6], SHAPE, sampler="dpm++2m", steps=8)
        assert (ode - alone).abs().max() > 0.05


def test_solvers_converge_to_the_probability_flow_ode(tiny_unet):
    """DPM-Solver++ and UniPC solve the ODE DDIM eta=0 discretises: at 50 NFE they are far closer to 1000-step DDIM
    than 5-step DDIM is (clipping off, so the ODE is the unmodified one)."""
    d = diffusion("linear")
    seeds = [0, 1, 2, 3]
    exact = ddim_sample(tiny_unet, d, seeds, SHAPE, steps=1000, clip_denoised=False)
    coarse = (ddim_sample(tiny_unet, d, seeds, SHAPE, steps=5, clip_denoised=False) - exact).abs().mean().item()
    for solver in ("dpm++2m", "dpm++3m", "unipc"):
        err = (sample(tiny_unet, d, seeds, SHAPE, sampler=solver, steps=50, timestep_spacing="trailing",
                      clip_denoised=False) - exact).abs().mean().item()
        assert err < coarse / 5, (solver, err, coarse)


def test_img2img_with_a_solver(tiny_unet):
    d = diffusion()
    x0 = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kw = dict(sampler="dpm++2m-sde", steps=10, timestep_spacing="trailing")
    assert torch.equal(img2img_sample(tiny_unet, d, x0, [1, 2, 3], 0.0, **kw), x0)
    out = img2img_sample(tiny_unet, d, x0, [1, 2, 3], 0.5, **kw)
    alone = img2img_sample(tiny_unet, d, x0[1:2], [2], 0.5, **kw)
    assert (out[1:2] - alone).abs().max() < ACROSS_BATCHES_ATOL
    # strength 0.5 of T = 1000 is index 499: the solver starts from its grid point 499 (trailing), so the first
    # draw of each generator noises x0 to there, as q_sample would
    rec = []
    img2img_sample(tiny_unet, d, x0[:1], [1], 0.5, callback=lambda i, t, x, p: rec.append(t), **kw)
    assert rec == [499, 399, 299, 199, 99]
    weak = img2img_sample(tiny_unet, d, x0, [1, 2, 3], 0.3, **kw)
    assert (weak - x0).abs().mean() < (out - x0).abs().mean()  # less noise, closer to the input
    with pytest.raises(ValueError, match="below the dpm\\+\\+2m-sde grid's lowest timestep 100"):
        img2img_sample(tiny_unet, d, x0, [1, 2, 3], 0.05, **kw)


def test_inpaint_refuses_a_solver_and_keeps_ddim_spacing(tiny_unet):
    d = diffusion()
    x0 = torch.zeros(1, *SHAPE)
    mask = torch.ones(SHAPE)
    with pytest.raises(ValueError, match="inpainting needs a single-step sampler \\(ddpm or ddim\\), not the "
                                         "multistep solver unipc"):
        inpaint_sample(tiny_unet, d, x0, mask, [0], sampler="unipc", steps=10)
    steps = []
    inpaint_sample(tiny_unet, d, x0, mask * 0, [0], sampler="ddim", steps=4, timestep_spacing="trailing",
                   callback=lambda i, t, x, p: steps.append(t))
    assert steps == [999, 749, 499, 249]


def test_frechet_distance_matches_torch_fidelity_and_the_bootstrap_is_paired():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    from tasks.sampler_table import FrechetDistance, paired_bootstrap

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    a = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.9
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    want = fid_statistics_to_metric({"mu": a.mean(0), "sigma": np.cov(a, rowvar=False)}, {"mu": mu, "sigma": sigma},
                                    False)["frechet_inception_distance"]
    assert FrechetDistance(mu, sigma)(a) == pytest.approx(want, rel=1e-6)
    b = a + rng.normal(size=a.shape) * 0.05  # a row nearly equal to a, sample by sample
    boot = paired_bootstrap({"a": a, "b": b}, mu, sigma, 50, seed=1)
    assert boot["a"].shape == (50,) and boot["a"].std() > 0
    # pairing: the difference of two nearly equal rows is far less noisy than either row
    assert (boot["a"] - boot["b"]).std() < boot["a"].std() / 5
    assert np.array_equal(paired_bootstrap({"a": a, "b": b}, mu, sigma, 50, seed=1)["b"], boot["b"])
    with pytest.raises(ValueError, match="same number of samples"):
        paired_bootstrap({"a": a, "b": b[:10]}, mu, sigma, 5)


def test_diffusers_ddpm_scheduler_is_our_algorithm_2_given_the_same_noise(tiny_unet, monkeypatch):
    """The benchmark's DDPMPipeline baseline runs our update rule: DDPMScheduler (fixed_large, clipped), fed our
    per-sample noise in place of its own draws, lands on ddpm_sample within float32 round-off."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_scheduler
    from diffusers import DDPMScheduler

    from ddpm.samplers import ddpm_sample

    d = diffusion("cosine", T=200)
    seeds = [1, 2, 3]
    ours = ddpm_sample(tiny_unet, d, seeds, SHAPE)
    sched = DDPMScheduler(num_train_timesteps=200, trained_betas=d.betas.numpy(), variance_type="fixed_large",
                          clip_sample=True, prediction_type="epsilon")
    sched.set_timesteps(200)
    noise = SeededNoise(seeds, SHAPE)
    monkeypatch.setattr(ddpm_scheduler, "randn_tensor", lambda *a, **k: noise.draw())
    with torch.inference_mode():
        theirs = drive(tiny_unet, d, sched, noise.draw())
    assert (ours - theirs).abs().max().item() < 1e-4
