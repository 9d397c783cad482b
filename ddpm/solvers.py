"""Fast multistep solvers (DPM-Solver++, UniPC) from diffusers' schedulers, driven by this library's network, betas
and per-sample seeds.

diffusers keeps the solvers' update rules; this module is the adapter that feeds them:

- the scheduler is built from the model's own ``diffusion.betas`` (``trained_betas``), its objective (``eps`` ->
  ``epsilon``, ``x0`` -> ``sample``, ``v`` -> ``v_prediction``) and ``clip_denoised`` (dynamic thresholding with
  ``sample_max_value=1``, which is exactly clipping the predicted x_0 to [-1, 1]: the threshold ``s`` is clamped to
  [1, 1]). Without it DPM-Solver++ and UniPC diverge on the cosine schedule, whose abar at t = T-1 is ~2e-9;
- x_T and every stochastic step's noise come from :class:`ddpm.samplers.SeededNoise` (``variance_noise=``), so sample
  ``i`` depends on ``seeds[i]`` only, as with Algorithm 2 and DDIM;
- the timestep grid is the scheduler's own ``timestep_spacing`` (``leading`` | ``trailing`` | ``linspace``; Lin et al.
  2024, Table 2, in the form where the last step lands on sigma = 0, i.e. on x_0).

A sampler named here costs one network evaluation per step (UniPC's corrector reuses the next step's evaluation).
:func:`drive` runs any diffusers scheduler, so a test can drive ``DDIMScheduler`` with our betas and compare it with
:func:`ddpm.samplers.ddim_sample`: that proves the adapter, not only the solver.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .diffusion import GaussianDiffusion, Model, Objective, StepCallback

SPACINGS = ("leading", "trailing", "linspace")

_PREDICTION_TYPE = {Objective.EPS: "epsilon", Objective.X0: "sample", Objective.V: "v_prediction"}


@dataclass(frozen=True)
class Solver:
    """A named diffusers scheduler configuration. ``stochastic`` solvers take per-step noise (``variance_noise``)."""

    name: str
    scheduler: str  # class name in diffusers
    options: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False
    title: str = ""


SOLVERS: dict[str, Solver] = {
    s.name: s
    for s in (
        Solver("dpm++2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
               title="DPM-Solver++(2M)"),
        Solver("dpm++3m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3},
               title="DPM-Solver++(3M)"),
        Solver("dpm++2m-sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
               stochastic=True, title="SDE-DPM-Solver++(2M)"),
        Solver("unipc", "UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2", "predict_x0": True},
               title="UniPC (bh2, order 2)"),
    )
}


def check_spacing(spacing: str) -> str:
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; known: {', '.join(SPACINGS)}")
    return spacing


def make_scheduler(name: str, diffusion: GaussianDiffusion, steps: int, *, spacing: str = "trailing",
                   clip_denoised: bool = True):
    """The diffusers scheduler of solver ``name`` for ``diffusion``'s betas, with its ``steps``-point grid set."""
    import diffusers

    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; known: {', '.join(SOLVERS)}")
    T = diffusion.num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"{name} steps must be between 1 and {T}, got {steps}")
    solver = SOLVERS[name]
    cls = getattr(diffusers, solver.scheduler)
    scheduler = cls(
        num_train_timesteps=T,
        trained_betas=diffusion.betas.numpy(),
        prediction_type=_PREDICTION_TYPE[diffusion.objective],
        thresholding=bool(clip_denoised),
        sample_max_value=1.0,  # with thresholding: s = clamp(quantile, 1, 1) = 1, i.e. clip x_0 to [-1, 1]
        timestep_spacing=check_spacing(spacing),
        steps_offset=0,
        lower_order_final=True,
        final_sigmas_type="zero",  # the last step lands on x_0
        **solver.options,
    )
    with warnings.catch_warnings():  # diffusers calls np.array on a torch tensor; numpy 2 warns, harmlessly
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        scheduler.set_timesteps(steps)
    return scheduler


def solver_timesteps(name: str, num_timesteps: int, steps: int, spacing: str = "trailing") -> list[int]:
    """The 0-indexed timesteps solver ``name`` evaluates the network at, from the first (highest) down."""
    from .schedules import make_betas  # any betas give the same grid; the grid depends on T, steps and spacing only

    d = GaussianDiffusion(make_betas("linear", num_timesteps))
    return [int(t) for t in make_scheduler(name, d, steps, spacing=spacing).timesteps]


def drive(
    model: Model,
    diffusion: GaussianDiffusion,
    scheduler,
    x: torch.Tensor,
    draw_noise: Optional[Callable[[], torch.Tensor]] = None,
    *,
    begin: int = 0,
    clip_denoised: bool = True,
    step_kwargs: Optional[dict[str, Any]] = None,
    callback: Optional[StepCallback] = None,
    progress=None,
) -> torch.Tensor:
    """Run ``scheduler`` (any diffusers scheduler with its timesteps set) from ``x`` at ``scheduler.timesteps[begin]``
    down to x_0 with the eps/x0/v-network ``model(x_t, t)``.

    ``draw_noise()`` supplies each step's ``variance_noise`` (a [B, C, H, W] tensor, one row per sample's own
    generator); None for deterministic schedulers. ``callback`` gets the x_0 that ``diffusion`` predicts from the same
    network output (clipped when ``clip_denoised``). Call inside ``torch.inference_mode()``. Returns [B, C, H, W].
    """
    timesteps = [int(t) for t in scheduler.timesteps][begin:]
    if not timesteps:
        raise ValueError(f"begin {begin} is past the scheduler's {len(scheduler.timesteps)} timesteps")
    if begin and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    kw = dict(step_kwargs or {})
    b = x.shape[0]
    steps = progress(timesteps) if progress is not None else timesteps
    for i, step in enumerate(steps):
        t = torch.full((b,), step, device=x.device, dtype=torch.long)
        out = model(scheduler.scale_model_input(x, step), t)
        if draw_noise is not None:
            kw["variance_noise"] = draw_noise()
        x_next = scheduler.step(out, step, x, **kw).prev_sample.to(x.dtype)
        if callback is not None:
            callback(i, step, x_next, diffusion.x0_from_output(out, x, t, clip_denoised))
        x = x_next
    return x
