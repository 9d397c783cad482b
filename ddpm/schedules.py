"""Variance schedules beta_1..beta_T, computed once in float64."""

from __future__ import annotations

import math
from typing import Callable

import torch


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The paper's schedule: betas linear from 1e-4 to 0.02 over T=1000 (Sec. 4).

    Other T keep the same endpoints, as in the paper's code; use ``beta_start``/``beta_end`` to rescale.
    """
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"linear schedule needs 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021), Eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), betas clipped."""
    if s < 0:
        raise ValueError(f"cosine schedule needs s >= 0, got {s}")
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"cosine schedule needs 0 < max_beta < 1, got {max_beta}")

    def alpha_bar(u: torch.Tensor) -> torch.Tensor:
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    ab = alpha_bar(steps)
    betas = 1.0 - ab[1:] / ab[:-1]
    return betas.clamp(max=max_beta)


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
}


def make_betas(name: str, timesteps: int, **kwargs) -> torch.Tensor:
    """Return betas of shape [T] in float64 for the named schedule.

    Raises ``ValueError`` naming the known schedules when ``name`` is unknown.
    """
    try:
        fn = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(sorted(SCHEDULES))}") from None
    if not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"timesteps must be a positive integer, got {timesteps!r}")
    return fn(timesteps, **kwargs)
