"""A trained checkpoint as something to sample from: its model and diffusion rebuilt from the file alone.

Every checkpoint stores the resolved model and diffusion configs (``state["config"]``), so nothing else is needed:

    model, diffusion, state = load_model("checkpoints/ckpt_00001500.pt")   # EMA weights, eval mode
    images = sample(model, diffusion, seeds=range(16), shape=(1, 8, 8), sampler="ddim", steps=100)
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .config import DiffusionConfig
from .diffusion import GaussianDiffusion
from .schedules import make_betas
from .unet import UNet


def build_diffusion(diffusion_cfg: dict[str, Any]) -> GaussianDiffusion:
    """The diffusion process of a diffusion config dict (as stored in checkpoints)."""
    dc = DiffusionConfig(**diffusion_cfg)
    return GaussianDiffusion(make_betas(dc.schedule, dc.timesteps, **dc.schedule_kwargs()), dc.objective)


def load_model(path: os.PathLike | str, *, use_ema: bool = True,
               map_location: str | torch.device = "cpu") -> tuple[UNet, GaussianDiffusion, dict[str, Any]]:
    """Rebuild ``(model, diffusion, state)`` from a checkpoint file alone (its stored model and diffusion configs).

    ``use_ema`` loads the EMA weights (what samples are drawn from), else the raw training weights. The model is in
    eval mode on ``map_location``. Raises :class:`~ddpm.checkpoint.CheckpointError` for an unreadable file or
    weights that do not fit the stored config.
    """
    state = load_checkpoint(path, map_location=map_location)
    model = UNet.from_config(state["config"]["model"])
    if use_ema:
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    else:
        weights = state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(path, f"weights do not fit the stored model config ({str(e).splitlines()[0]})") from None
    return model.to(map_location).eval(), build_diffusion(state["config"]["diffusion"]), state
