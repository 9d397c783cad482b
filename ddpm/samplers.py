"""Ancestral (Algorithm 2), DDIM and the fast multistep solvers (:mod:`ddpm.solvers`) with one random seed per sample.

Sample ``i`` draws all of its noise (x_T and every z) from its own generator seeded with ``seeds[i]``, so its noise
does not depend on how a set of seeds is split into batches, shards or workers (EDM's convention), and neither do
its images beyond float round-off. Noise is per device type: CPU and CUDA generators give different streams for the
same seed. Bit for bit, the same seeds are guaranteed the same images only in one batch composition with one torch
build and thread count: oneDNN/MKL pick kernels by batch size, thread count and CPU, so another split of the seeds
moves the samples' last bits (1e-7 to 1e-5 on an AMD EPYC with AVX-512; docs/pipeline.md "Reproducibility").
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from .diffusion import GaussianDiffusion, Model, StepCallback, Variance, _enum
from .solvers import SOLVERS, SPACINGS, check_spacing, drive, make_scheduler, solver_timesteps


class SeededNoise:
    """Per-sample Gaussian noise: row ``i`` of every draw comes from the generator seeded with ``seeds[i]``."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"):
        if len(seeds) == 0:
            raise ValueError("seeds must not be empty")
        self.device = torch.device(device)
        self.shape = tuple(int(s) for s in shape)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def draw(self) -> torch.Tensor:
        """A [B, *shape] float32 tensor of standard normals."""
        return torch.stack(
            [torch.randn(self.shape, generator=g, device=self.device) for g in self.generators]
        )


@contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Sample with dropout off, then restore the caller's mode."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _device_of(model, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


SAMPLERS = ("ddpm", "ddim", *SOLVERS)  # Algorithm 2, DDIM, then diffusers' multistep solvers


def check_sampler(name: str) -> str:
    """``name`` if it is a known sampler; else ValueError listing the known ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    return name


def network_evaluations(sampler: str, num_timesteps: int, steps: int) -> int:
    """NFE of one sample: T for Algorithm 2, ``steps`` for DDIM and for every solver in :mod:`ddpm.solvers`."""
    return num_timesteps if check_sampler(sampler) == "ddpm" else int(steps)


def ddim_timesteps(num_timesteps: int, steps: int, spacing: str = "leading") -> list[int]:
    """The DDIM sub-sequence of ``steps`` 0-indexed timesteps, ascending (Lin et al. 2024, Table 2):

    - ``leading``: 0, k, 2k, ... with k = T // steps (the DDIM paper's; never visits T-1);
    - ``trailing``: round(T - i*T/steps) - 1, so the chain starts at T-1, where x_T is pure noise;
    - ``linspace``: round(linspace(0, T-1, steps)), both ends.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"DDIM steps must be between 1 and {num_timesteps}, got {steps}")
    check_spacing(spacing)
    T = num_timesteps
    if spacing == "leading":
        stride = T // steps
        return [i * stride for i in range(steps)]
    if spacing == "trailing":
        return sorted(int(round(T - i * T / steps)) - 1 for i in range(steps))
    if steps == 1:
        return [T - 1]
    return [int(round(i * (T - 1) / (steps - 1))) for i in range(steps)]


def ddpm_sample(
    model: Model,
    diffusion: GaussianDiffusion,
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    variance: str | Variance = Variance.FIXED_LARGE,
    clip_denoised: bool = True,
    device: torch.device | str | None = None,
    callback: Optional[StepCallback] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Algorithm 2: start from x_T ~ N(0, I) and apply T ancestral steps.

    Args:
        model: eps-network ``model(x_t, t)``; put in eval mode while sampling.
        seeds: one seed per sample; the batch size is ``len(seeds)``.
        shape: image shape ``(C, H, W)``.
    Returns:
        x_0 of shape [B, C, H, W], in [-1, 1] when ``clip_denoised``.
    """
    variance = _enum(Variance, variance, "variance")
    device = _device_of(model, device)
    noise = SeededNoise(seeds, shape, device)
    x = noise.draw()
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    with _eval_mode(model), torch.inference_mode():
        for i, step in enumerate(_progress(steps, progress, "DDPM")):
            t = torch.full((x.shape[0],), step, device=device, dtype=torch.long)
            # Zeros, not None, at the last step: p_sample would otherwise draw (unused) noise from the global RNG.
            z = noise.draw() if step > 0 else torch.zeros_like(x)
            x, x0 = diffusion.p_sample(model, x, t, z, variance, clip_denoised, return_x0=True)
            if callback is not None:
                callback(i, step, x, x0)
    return x


def ddim_sample(
    model: Model,
    diffusion: GaussianDiffusion,
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "leading",
    clip_denoised: bool = True,
    device: torch.device | str | None = None,
    callback: Optional[StepCallback] = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) over the ``steps`` timesteps of :func:`ddim_timesteps` (``spacing``); ``eta=0`` is
    deterministic given x_T.

    Returns x_0 of shape [B, C, H, W].
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    device = _device_of(model, device)
    noise = SeededNoise(seeds, shape, device)
    x = noise.draw()
    seq = ddim_timesteps(diffusion.num_timesteps, steps, spacing)
    pairs = list(zip(reversed(seq), reversed([-1] + seq[:-1])))
    with _eval_mode(model), torch.inference_mode():
        for i, (step, prev) in enumerate(_progress(pairs, progress, f"DDIM-{steps}")):
            b = x.shape[0]
            t = torch.full((b,), step, device=device, dtype=torch.long)
            t_prev = torch.full((b,), prev, device=device, dtype=torch.long)
            z = noise.draw() if eta > 0 and prev >= 0 else torch.zeros_like(x)
            x, x0 = diffusion.ddim_step(model, x, t, t_prev, eta, z, clip_denoised, return_x0=True)
            if callback is not None:
                callback(i, step, x, x0)
    return x


def solver_sample(
    model: Model,
    diffusion: GaussianDiffusion,
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    solver: str = "dpm++2m",
    steps: int = 20,
    spacing: str = "trailing",
    clip_denoised: bool = True,
    device: torch.device | str | None = None,
    callback: Optional[StepCallback] = None,
    progress: bool = False,
) -> torch.Tensor:
    """A multistep solver of :mod:`ddpm.solvers` (diffusers' scheduler) over ``steps`` network evaluations.

    x_T and, for stochastic solvers, every step's noise come from the per-sample generators. Returns [B, C, H, W].
    """
    device = _device_of(model, device)
    scheduler = make_scheduler(solver, diffusion, steps, spacing=spacing, clip_denoised=clip_denoised)
    noise = SeededNoise(seeds, shape, device)
    x = noise.draw() * scheduler.init_noise_sigma
    draw = noise.draw if SOLVERS[solver].stochastic else None
    bar = (lambda it: _progress(it, True, f"{solver}-{steps}")) if progress else None
    with _eval_mode(model), torch.inference_mode():
        return drive(model, diffusion, scheduler, x, draw, clip_denoised=clip_denoised, callback=callback,
                     progress=bar)


def sample(
    model: Model,
    diffusion: GaussianDiffusion,
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    timestep_spacing: str = "leading",
    variance: str | Variance = Variance.FIXED_LARGE,
    clip_denoised: bool = True,
    device: torch.device | str | None = None,
    callback: Optional[StepCallback] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Images for ``seeds`` from noise with the named sampler: the one place a sampler is chosen by name.

    ``sampler`` is ``"ddpm"`` (Algorithm 2 over all T steps with ``variance``; ``steps``, ``eta`` and
    ``timestep_spacing`` unused), ``"ddim"`` (``steps`` timesteps of ``timestep_spacing`` with ``eta``) or a solver
    of :data:`ddpm.solvers.SOLVERS` (``steps`` network evaluations on its ``timestep_spacing`` grid; ``eta`` and
    ``variance`` unused). Returns x_0 [B, C, H, W].
    """
    if check_sampler(sampler) == "ddpm":
        return ddpm_sample(model, diffusion, seeds, shape, variance=variance, clip_denoised=clip_denoised,
                           device=device, callback=callback, progress=progress)
    if sampler == "ddim":
        return ddim_sample(model, diffusion, seeds, shape, steps=steps, eta=eta, spacing=timestep_spacing,
                           clip_denoised=clip_denoised, device=device, callback=callback, progress=progress)
    return solver_sample(model, diffusion, seeds, shape, solver=sampler, steps=steps, spacing=timestep_spacing,
                         clip_denoised=clip_denoised, device=device, callback=callback, progress=progress)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


# -- starting from a real image: img2img and inpainting ------------------------------------------------------------
def start_index(num_timesteps: int, strength: float) -> int:
    """The 0-indexed timestep an image is diffused to for ``strength`` in [0, 1]: the paper's t = round(strength*T),
    i.e. index t - 1; -1 means not diffused at all (strength 0, or below half a step)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return int(round(strength * num_timesteps)) - 1


def reverse_pairs(sampler: str, num_timesteps: int, steps: int, t_start: Optional[int] = None,
                  spacing: str = "leading") -> list[tuple[int, int]]:
    """The reverse chain as (t, t_prev) index pairs from ``t_start`` down to -1 (x_0).

    ``"ddpm"`` visits every index; ``"ddim"`` the sub-sequence of :func:`ddim_timesteps` (``spacing``) below
    ``t_start``, entered by one (shorter) jump from ``t_start`` itself, so a chain can start at any timestep. Without
    ``t_start`` it is the plain samplers' chain (DDIM from its top index, as :func:`ddim_sample`). A solver visits
    its own grid (:func:`ddpm.solvers.solver_timesteps`), from its first point at or below ``t_start``.
    """
    full = t_start is None  # the plain sampler's chain: DDIM then starts at its own top index
    t_start = num_timesteps - 1 if t_start is None else int(t_start)
    if not -1 <= t_start < num_timesteps:
        raise ValueError(f"t_start must be between -1 and {num_timesteps - 1}, got {t_start}")
    if check_sampler(sampler) == "ddpm":
        seq = list(range(t_start + 1))
    elif sampler in SOLVERS:
        seq = [s for s in sorted(solver_timesteps(sampler, num_timesteps, steps, spacing)) if s <= t_start]
    elif full:
        seq = ddim_timesteps(num_timesteps, steps, spacing)
    else:
        seq = [s for s in ddim_timesteps(num_timesteps, steps, spacing) if s < t_start] + (
            [t_start] if t_start >= 0 else [])
    return list(zip(reversed(seq), reversed([-1] + seq[:-1])))


class _Stepper:
    """One reverse step t -> t_prev for either sampler, drawing its noise from the per-sample generators."""

    def __init__(self, diffusion: GaussianDiffusion, sampler: str, eta: float, variance, clip_denoised: bool):
        if check_sampler(sampler) in SOLVERS:
            raise ValueError(f"{sampler} is a multistep solver: it does not take single steps between any two "
                             "timesteps; use ddpm or ddim")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.d, self.sampler, self.eta = diffusion, sampler, eta
        self.variance = _enum(Variance, variance, "variance")
        self.clip = clip_denoised

    def __call__(self, model, x: torch.Tensor, step: int, prev: int, noise: SeededNoise):
        b = x.shape[0]
        t = torch.full((b,), step, device=x.device, dtype=torch.long)
        if self.sampler == "ddpm":
            if prev != step - 1:
                raise ValueError(f"the ancestral sampler steps one index at a time, got {step} -> {prev}")
            z = noise.draw() if step > 0 else torch.zeros_like(x)
            return self.d.p_sample(model, x, t, z, self.variance, self.clip, return_x0=True)
        t_prev = torch.full((b,), prev, device=x.device, dtype=torch.long)
        z = noise.draw() if self.eta > 0 and prev >= 0 else torch.zeros_like(x)
        return self.d.ddim_step(model, x, t, t_prev, self.eta, z, self.clip, return_x0=True)


def _check_images(x0: torch.Tensor, seeds: Sequence[int], what: str = "x0") -> None:
    if x0.ndim != 4 or x0.shape[0] != len(seeds):
        raise ValueError(f"{what} must be [B, C, H, W] with B = len(seeds) = {len(seeds)}, got {tuple(x0.shape)}")


def img2img_sample(
    model: Model,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    seeds: Sequence[int],
    strength: float,
    *,
    sampler: str = "ddpm",
    steps: int = 50,
    eta: float = 0.0,
    timestep_spacing: str = "leading",
    variance: str | Variance = Variance.FIXED_LARGE,
    clip_denoised: bool = True,
    device: torch.device | str | None = None,
    callback: Optional[StepCallback] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Partial diffusion then denoising (SDEdit; the paper's Fig. 7 reconstructions): draw
    x_t ~ q(x_t | x_0) (Eq. 4) at t = round(strength * T) and run the reverse chain from there.

    Args:
        x0: real images [B, C, H, W] in [-1, 1], one per seed.
        strength: 0 returns ``x0`` unchanged; 1 starts from (almost) pure noise, a fresh sample.
        sampler: ``"ddpm"`` (Algorithm 2 from t), ``"ddim"`` (the ``steps``-point chain below t), or a solver of
            :mod:`ddpm.solvers`: it starts at the first point of its own ``steps``-point grid at or below t (a grid
            point is where its multistep history begins), so it diffuses to that point, not to t itself.
    Sample i draws its q_sample noise first, then every step's noise, from the generator seeded with ``seeds[i]``.
    Returns [B, C, H, W].
    """
    _check_images(x0, seeds)
    device = _device_of(model, device)
    t_start = start_index(diffusion.num_timesteps, strength)
    x0 = x0.to(device=device, dtype=torch.float32)
    if t_start < 0:
        return x0.clone()
    noise = SeededNoise(seeds, x0.shape[1:], device)
    if check_sampler(sampler) in SOLVERS:
        scheduler = make_scheduler(sampler, diffusion, steps, spacing=timestep_spacing, clip_denoised=clip_denoised)
        grid = [int(t) for t in scheduler.timesteps]
        begin = next((i for i, t in enumerate(grid) if t <= t_start), None)
        if begin is None:
            raise ValueError(f"strength {strength} diffuses to t = {t_start + 1}, below the {sampler} grid's lowest "
                             f"timestep {grid[-1] + 1} at {steps} steps; raise the strength or the steps, or use ddim")
        t = torch.full((x0.shape[0],), grid[begin], device=device, dtype=torch.long)
        x = diffusion.q_sample(x0, t, noise.draw())
        draw = noise.draw if SOLVERS[sampler].stochastic else None
        bar = (lambda it: _progress(it, True, f"img2img-{sampler}")) if progress else None
        with _eval_mode(model), torch.inference_mode():
            return drive(model, diffusion, scheduler, x, draw, begin=begin, clip_denoised=clip_denoised,
                         callback=callback, progress=bar)
    step_fn = _Stepper(diffusion, sampler, eta, variance, clip_denoised)
    pairs = reverse_pairs(sampler, diffusion.num_timesteps, steps, t_start, timestep_spacing)
    x = diffusion.q_sample(x0, torch.full((x0.shape[0],), t_start, device=device, dtype=torch.long), noise.draw())
    with _eval_mode(model), torch.inference_mode():
        for i, (step, prev) in enumerate(_progress(pairs, progress, f"img2img-{sampler}")):
            x, pred_x0 = step_fn(model, x, step, prev, noise)
            if callback is not None:
                callback(i, step, x, pred_x0)
    return x


def repaint_schedule(pairs: Sequence[tuple[int, int]], jump_length: int = 1,
                     jump_n_sample: int = 1) -> list[tuple[str, int, int]]:
    """The visiting order of RePaint (Lugmayr et al. 2022) over a reverse chain's (t, t_prev) pairs.

    Returns moves ``("down", t, t_prev)`` (a reverse step) and ``("up", t_prev, t)`` (re-noise with q). After every
    ``jump_length``-th reverse step (except near the end) the chain goes back up ``jump_length`` steps and down again,
    ``jump_n_sample - 1`` times; ``jump_n_sample=1`` is plain replacement, no resampling.
    """
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"jump_length and jump_n_sample must be >= 1, got {jump_length} and {jump_n_sample}")
    moves: list[tuple[str, int, int]] = []
    pairs = list(pairs)
    for k in range(len(pairs)):
        moves.append(("down", *pairs[k]))
        done = k + 1
        if jump_n_sample > 1 and done % jump_length == 0 and done + jump_length <= len(pairs):
            back = pairs[done - jump_length:done]
            for _ in range(jump_n_sample - 1):
                moves += [("up", prev, t) for t, prev in reversed(back)]
                moves += [("down", t, prev) for t, prev in back]
    return moves


def q_sample_from(diffusion: GaussianDiffusion, x_a: torch.Tensor, a: int, b: int, noise: torch.Tensor) -> torch.Tensor:
    """Forward-diffuse from index ``a`` to a later index ``b`` (a = -1: from x_0): q(x_b | x_a) =
    N(sqrt(abar_b / abar_a) x_a, (1 - abar_b / abar_a) I), Eq. 4's Markov chain composed."""
    ab_b = float(diffusion.alphas_cumprod[b])
    ab_a = 1.0 if a < 0 else float(diffusion.alphas_cumprod[a])
    ratio = ab_b / ab_a
    return ratio**0.5 * x_a + (1.0 - ratio) ** 0.5 * noise


def inpaint_sample(
    model: Model,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    mask: torch.Tensor,
    seeds: Sequence[int],
    *,
    sampler: str = "ddpm",
    steps: int = 50,
    eta: float = 0.0,
    timestep_spacing: str = "leading",
    variance: str | Variance = Variance.FIXED_LARGE,
    clip_denoised: bool = True,
    jump_length: int = 1,
    jump_n_sample: int = 1,
    device: torch.device | str | None = None,
    callback: Optional[StepCallback] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Fill the unknown pixels of ``x0`` by the reverse process, re-imposing the known ones at every step
    (RePaint's replacement): x_{t-1} = m * q_sample(x0, t-1) + (1 - m) * p_theta-step(x_t).

    Args:
        x0: images [B, C, H, W] in [-1, 1]; only their known pixels are read.
        mask: 1 where a pixel is known, 0 where it is to be filled; broadcastable to ``x0`` ([H, W], [1, H, W],
            [B, 1, H, W], ...).
        jump_length, jump_n_sample: RePaint's resampling (see :func:`repaint_schedule`); 1, 1 turns it off.
        sampler: ``"ddpm"`` or ``"ddim"``. The multistep solvers are refused: re-imposing the known pixels after
            every step would invalidate the model outputs their multistep history holds.
    The known pixels of the result equal ``x0`` exactly. Returns [B, C, H, W].
    """
    _check_images(x0, seeds)
    if check_sampler(sampler) in SOLVERS:
        raise ValueError(f"inpainting needs a single-step sampler (ddpm or ddim), not the multistep solver {sampler}")
    device = _device_of(model, device)
    x0 = x0.to(device=device, dtype=torch.float32)
    m = torch.as_tensor(mask, dtype=torch.float32, device=device)
    try:
        m = torch.broadcast_to(m, x0.shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the images "
                         f"{tuple(x0.shape)}") from None
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("mask must hold only 0 (fill) and 1 (known)")
    step_fn = _Stepper(diffusion, sampler, eta, variance, clip_denoised)
    pairs = reverse_pairs(sampler, diffusion.num_timesteps, steps, spacing=timestep_spacing)
    moves = repaint_schedule(pairs, jump_length, jump_n_sample)
    noise = SeededNoise(seeds, x0.shape[1:], device)
    b = x0.shape[0]
    top = pairs[0][0]
    x = noise.draw()
    x = m * diffusion.q_sample(x0, torch.full((b,), top, device=device, dtype=torch.long), noise.draw()) + (1 - m) * x
    with _eval_mode(model), torch.inference_mode():
        for i, (kind, a, c) in enumerate(_progress(moves, progress, f"inpaint-{sampler}")):
            if kind == "up":
                x = q_sample_from(diffusion, x, a, c, noise.draw())
                continue
            x, pred_x0 = step_fn(model, x, a, c, noise)
            known = x0 if c < 0 else diffusion.q_sample(x0, torch.full((b,), c, device=device, dtype=torch.long),
                                                         noise.draw())
            x = torch.where(m.bool(), known, x)
            if callback is not None:
                callback(i, a, x, pred_x0)
    return x


# -- recording the chain -------------------------------------------------------------------------------------------
def trace_steps(num_steps: int, count: int) -> list[int]:
    """``count`` evenly spaced step indices of a chain of ``num_steps`` reverse steps, first and last included."""
    if count < 1 or num_steps < 1:
        raise ValueError(f"need at least one step and one frame, got {num_steps} steps and {count} frames")
    count = min(count, num_steps)
    if count == 1:
        return [num_steps - 1]
    return sorted({round(k * (num_steps - 1) / (count - 1)) for k in range(count)})


class ChainRecorder:
    """A :data:`StepCallback` keeping x_t and the predicted x_0 at chosen step indices (clones on the CPU).

    After sampling: ``steps`` (the indices kept), ``timesteps`` (their t), ``x_t`` and ``x0`` ([K, B, C, H, W]).
    """

    def __init__(self, keep: Sequence[int]):
        self.keep = set(int(k) for k in keep)
        self.steps: list[int] = []
        self.timesteps: list[int] = []
        self._xt: list[torch.Tensor] = []
        self._x0: list[torch.Tensor] = []

    def __call__(self, i: int, t: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if i in self.keep:
            self.steps.append(i)
            self.timesteps.append(t)
            self._xt.append(x_t.detach().float().cpu().clone())
            self._x0.append(x0.detach().float().cpu().clone())

    @property
    def x_t(self) -> torch.Tensor:
        return torch.stack(self._xt)

    @property
    def x0(self) -> torch.Tensor:
        return torch.stack(self._x0)


MASKS = ("bottom-half", "top-half", "left-half", "right-half", "center")


def region_mask(name: str, size: int | tuple[int, int]) -> torch.Tensor:
    """A named inpainting mask, [1, H, W] float: 1 where pixels are KNOWN, 0 over the region ``name`` to fill
    (``"center"``: the middle square of half the side)."""
    h, w = (size, size) if isinstance(size, int) else size
    m = torch.ones(1, h, w)
    if name == "bottom-half":
        m[:, h // 2:, :] = 0
    elif name == "top-half":
        m[:, : h - h // 2, :] = 0
    elif name == "left-half":
        m[:, :, : w - w // 2] = 0
    elif name == "right-half":
        m[:, :, w // 2:] = 0
    elif name == "center":
        m[:, h // 4: h - h // 4, w // 4: w - w // 4] = 0
    else:
        raise ValueError(f"unknown mask {name!r}; known: {', '.join(repr(k) for k in MASKS)}")
    return m
