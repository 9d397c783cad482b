"""Variance schedules (ddpm/schedules.py): the paper's linear betas and Nichol & Dhariwal's cosine betas."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm.schedules import SCHEDULES, cosine_betas, linear_betas, make_betas


def test_linear_matches_the_paper_at_T_1000():
    betas = make_betas("linear", 1000)
    assert betas.dtype == torch.float64
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    # Evenly spaced: constant increment (0.02 - 1e-4) / 999.
    steps = betas.diff()
    torch.testing.assert_close(steps, torch.full_like(steps, (0.02 - 1e-4) / 999), rtol=0, atol=1e-15)
    # Pinned slice: the 0-indexed betas at 0, 1, 499, 999.
    expected = torch.tensor([1e-4, 1e-4 + 1.99e-2 / 999, 1e-4 + 499 * 1.99e-2 / 999, 0.02], dtype=torch.float64)
    torch.testing.assert_close(betas[[0, 1, 499, 999]], expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [1, 10, 100, 1000, 4000])
def test_schedules_are_float64_in_range_and_monotonic(name, timesteps):
    betas = make_betas(name, timesteps)
    assert betas.dtype == torch.float64
    assert betas.shape == (timesteps,)
    assert bool(((betas > 0) & (betas < 1)).all())
    assert bool((betas.diff() >= 0).all()), "betas must not decrease"
    abar = torch.cumprod(1 - betas, 0)
    assert bool((abar.diff() < 0).all()), "alpha_bar must strictly decrease"


@pytest.mark.parametrize("timesteps", [10, 50, 1000])
def test_linear_keeps_its_endpoints_for_any_T(timesteps):
    betas = linear_betas(timesteps, beta_start=1e-4, beta_end=0.02)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)


@pytest.mark.parametrize("timesteps", [10, 100, 1000])
@pytest.mark.parametrize("s", [0.0, 0.008, 0.05])
def test_cosine_matches_nichol_dhariwal_alpha_bar(timesteps, s):
    """Eq. 17: alpha_bar_t = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)."""
    betas = cosine_betas(timesteps, s=s)
    f = [math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2 for t in range(timesteps + 1)]
    expected = torch.tensor([f[t] / f[0] for t in range(1, timesteps + 1)], dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    # The last beta is clipped to max_beta (alpha_bar_T = 0 would make it 1); all others are exact.
    torch.testing.assert_close(abar[:-1], expected[:-1], rtol=1e-10, atol=1e-14)
    assert betas[-1].item() == pytest.approx(0.999)
    assert float(betas.max()) <= 0.999


def test_cosine_pinned_values():
    betas = cosine_betas(1000)
    # beta_1 = 1 - f(1)/f(0) computed by hand in float64 for s = 0.008.
    f0 = math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    f1 = math.cos((0.001 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert betas[0].item() == pytest.approx(1 - f1 / f0, rel=1e-12)
    assert betas[0].item() == pytest.approx(4.1284225e-05, rel=1e-6)
    abar_half = torch.cumprod(1 - betas, 0)[499].item()
    fh = math.cos((0.5 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert abar_half == pytest.approx(fh / f0, rel=1e-10)


@pytest.mark.parametrize("max_beta", [0.5, 0.9])
def test_cosine_clips_betas_at_max_beta(max_beta):
    betas = cosine_betas(100, max_beta=max_beta)
    assert float(betas.max()) == pytest.approx(max_beta)
    unclipped = cosine_betas(100, max_beta=0.999)
    torch.testing.assert_close(betas, unclipped.clamp(max=max_beta), rtol=0, atol=0)


def test_unknown_schedule_names_the_known_ones():
    with pytest.raises(ValueError) as exc:
        make_betas("quadratic", 100)
    msg = str(exc.value)
    assert "quadratic" in msg
    for known in SCHEDULES:
        assert known in msg


@pytest.mark.parametrize("timesteps", [0, -5, 10.0, "100"])
def test_bad_timesteps_rejected(timesteps):
    with pytest.raises(ValueError, match="timesteps"):
        make_betas("linear", timesteps)


@pytest.mark.parametrize(
    "kwargs", [{"beta_start": 0.0}, {"beta_start": 0.03, "beta_end": 0.02}, {"beta_end": 1.0}, {"beta_start": -1e-4}]
)
def test_bad_linear_endpoints_rejected(kwargs):
    with pytest.raises(ValueError, match="beta_start"):
        make_betas("linear", 100, **kwargs)


@pytest.mark.parametrize("kwargs", [{"s": -0.1}, {"max_beta": 0.0}, {"max_beta": 1.0}])
def test_bad_cosine_arguments_rejected(kwargs):
    with pytest.raises(ValueError):
        make_betas("cosine", 100, **kwargs)


def test_make_betas_forwards_keyword_arguments():
    torch.testing.assert_close(
        make_betas("linear", 10, beta_start=1e-3, beta_end=0.05),
        torch.linspace(1e-3, 0.05, 10, dtype=torch.float64),
        rtol=0,
        atol=0,
    )
