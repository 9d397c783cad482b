"""Ancestral (Algorithm 2) and DDIM samplers with one random seed per sample.

Sample ``i`` draws all of its noise (x_T and every z) from its own generator seeded with ``seeds[i]``, so the
images do not depend on how a set of seeds is split into batches, shards or workers (EDM's convention).
Reproducibility holds per device type: CPU and CUDA generators give different streams for the same seed. Bit for
bit it also needs the network's kernels to be batch-size invariant; on CPU, oneDNN/MKL pick GEMM kernels by the
number of rows, so with some widths and batch sizes (e.g. 1-2 rows, or 8 vs 16 rows at ch=128) the network's
output differs by ~1e-6, and so do the samples. A fixed ``shard_size``/``batch_size`` gives identical files.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch

from .diffusion import GaussianDiffusion, Model, Variance, _enum

# callback(step_index, t, x_t, pred_x0): called after every reverse step, e.g. to record the chain.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


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


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The DDIM sub-sequence: ``steps`` evenly strided indices 0, k, 2k, ... with k = T // steps."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"DDIM steps must be between 1 and {num_timesteps}, got {steps}")
    stride = num_timesteps // steps
    return [i * stride for i in range(steps)]


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
    clip_denoised: bool = True,
    device: torch.device | str | None = None,
    callback: Optional[StepCallback] = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) over ``steps`` strided timesteps; ``eta=0`` is deterministic given x_T.

    Returns x_0 of shape [B, C, H, W].
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    device = _device_of(model, device)
    noise = SeededNoise(seeds, shape, device)
    x = noise.draw()
    seq = ddim_timesteps(diffusion.num_timesteps, steps)
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


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)
