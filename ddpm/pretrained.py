"""A trained model as something to sample from: a checkpoint of this project, or a diffusers folder, rebuilt into
``(model, diffusion)``; and a checkpoint written out as a diffusers folder.

Every checkpoint stores the resolved model and diffusion configs (``state["config"]``), so nothing else is needed:

    model, diffusion, state = load_model("checkpoints/ckpt_00001500.pt")   # EMA weights, eval mode
    images = sample(model, diffusion, seeds=range(16), shape=(1, 8, 8), sampler="ddim", steps=100)

diffusers' ``DDPMPipeline`` folders (google/ddpm-cifar10-32's layout; ddpm/diffusers_io.py maps it) go both ways:

    model, diffusion = from_diffusers("ddpm-cifar10-32")               # a published model, read locally
    import_diffusers("ddpm-cifar10-32", "checkpoints/")                 # ... as a checkpoint every stage reads
    to_diffusers("checkpoints/ckpt_00001500.pt", "digits-ddpm")         # DDPMPipeline.from_pretrained("digits-ddpm")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (CheckpointError, atomic_write_bytes, atomic_write_folder, checkpoint_path, list_checkpoints,
                         load_checkpoint, save_checkpoint)
from .config import DiffusionConfig
from .diffusers_io import (DiffusersFormatError, diffusers_unet_kwargs, diffusion_from_scheduler, locate, model_card,
                           read_json, scheduler_kwargs, state_dict_from_diffusers, state_dict_to_diffusers,
                           unet_config_from_diffusers)
from .diffusion import GaussianDiffusion
from .schedules import make_betas
from .unet import UNet


def build_diffusion(diffusion_cfg: dict[str, Any]) -> GaussianDiffusion:
    """The diffusion process of a diffusion config dict (as stored in checkpoints)."""
    dc = DiffusionConfig(**diffusion_cfg)
    return GaussianDiffusion(make_betas(dc.schedule, dc.timesteps, **dc.schedule_kwargs()), dc.objective)


@dataclass(frozen=True)
class Weights:
    """What sampling needs of a checkpoint: one set of weights (EMA or raw) and the model and diffusion configs.

    Small and plain (tensors and dicts), so it crosses to other processes as it is: the sample stage loads a
    checkpoint once and hands this to its Ray actors through the object store, and each builds the same network."""

    state_dict: dict[str, torch.Tensor]
    model: dict[str, Any]  # UNet config (``state["config"]["model"]``)
    diffusion: dict[str, Any]  # diffusion config (``state["config"]["diffusion"]``)
    source: str = ""  # where the weights came from, for messages

    @classmethod
    def from_state(cls, state: dict[str, Any], *, use_ema: bool = True, source: str = "") -> "Weights":
        """The EMA weights of a loaded checkpoint (``use_ema``; the averaged module's, ``module.``-prefixed keys),
        else the raw training weights."""
        if use_ema:
            weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
        else:
            weights = state["model"]
        return cls(weights, state["config"]["model"], state["config"]["diffusion"], source)

    def build(self, map_location: str | torch.device = "cpu") -> tuple[UNet, GaussianDiffusion]:
        """``(model, diffusion)``: the network in eval mode on ``map_location``. Raises
        :class:`~ddpm.checkpoint.CheckpointError` for weights that do not fit the model config."""
        model = UNet.from_config(self.model)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as e:
            raise CheckpointError(self.source or "weights",
                                  f"weights do not fit the stored model config ({str(e).splitlines()[0]})") from None
        return model.to(map_location).eval(), build_diffusion(self.diffusion)


def load_model(path: os.PathLike | str, *, use_ema: bool = True,
               map_location: str | torch.device = "cpu") -> tuple[UNet, GaussianDiffusion, dict[str, Any]]:
    """Rebuild ``(model, diffusion, state)`` from a checkpoint file alone (its stored model and diffusion configs).

    ``use_ema`` loads the EMA weights (what samples are drawn from), else the raw training weights. The model is in
    eval mode on ``map_location``. Raises :class:`~ddpm.checkpoint.CheckpointError` for an unreadable file or
    weights that do not fit the stored config.
    """
    state = load_checkpoint(path, map_location=map_location)
    model, diffusion = Weights.from_state(state, use_ema=use_ema, source=str(path)).build(map_location)
    return model, diffusion, state


# -- diffusers' format (ddpm/diffusers_io.py maps the layouts) -------------------------------------------------------
@dataclass(frozen=True)
class DiffusersModel:
    """A diffusers folder read into this library: the network (eval mode, CPU), its diffusion, the configs a
    checkpoint stores, and what the scheduler says about sampling (``hints``: ``variance``, ``clip_denoised``)."""

    model: UNet
    diffusion: GaussianDiffusion
    diffusion_config: dict[str, Any]
    hints: dict[str, Any]
    unet_folder: Path
    scheduler_config: Path


def read_diffusers(folder: os.PathLike | str, scheduler: os.PathLike | str | None = None) -> DiffusersModel:
    """Read a ``DDPMPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``), a flat one (config.json
    beside scheduler_config.json) or a bare ``UNet2DModel`` folder with its ``scheduler`` config given.

    Raises :class:`~ddpm.diffusers_io.UnsupportedLayout` naming the config key of a layout our UNet or diffusion
    cannot express, :class:`~ddpm.diffusers_io.DiffusersFormatError` for a missing or unreadable file."""
    from diffusers import UNet2DModel

    unet_dir, sched_path = locate(Path(folder), None if scheduler is None else Path(scheduler))
    cfg = unet_config_from_diffusers(read_json(unet_dir / "config.json"), unet_dir / "config.json")
    diffusion_cfg, hints = diffusion_from_scheduler(read_json(sched_path), sched_path)
    try:
        theirs = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False).state_dict()
    except (OSError, ValueError, RuntimeError) as e:  # no weights file, a truncated one, shapes off the config
        raise DiffusersFormatError(unet_dir, f"weights not loadable by diffusers ({str(e).strip().splitlines()[0]})")
    model = UNet.from_config(cfg)
    model.load_state_dict(state_dict_from_diffusers(theirs, cfg, unet_dir))
    return DiffusersModel(model.eval(), build_diffusion(diffusion_cfg), diffusion_cfg, hints, unet_dir, sched_path)


def from_diffusers(folder: os.PathLike | str,
                   scheduler: os.PathLike | str | None = None) -> tuple[UNet, GaussianDiffusion]:
    """``(model, diffusion)`` of a diffusers folder (see :func:`read_diffusers`): the model in eval mode on CPU.

        model, diffusion = from_diffusers("ddpm-cifar10-32")    # a local copy of google/ddpm-cifar10-32
        images = sample(model, diffusion, seeds=range(16), shape=(3, 32, 32), sampler="ddpm")
    """
    read = read_diffusers(folder, scheduler)
    return read.model, read.diffusion


def import_diffusers(folder: os.PathLike | str, out_dir: os.PathLike | str, *,
                     scheduler: os.PathLike | str | None = None, step: int = 0) -> Path:
    """Write a diffusers folder as a checkpoint of this project, ``out_dir/ckpt_<step>.pt`` (atomically, weights
    only, with its model and diffusion configs), so :func:`load_model` and every stage read it. The published
    weights are both the raw and the EMA weights (stored once). ``out_dir`` must hold no checkpoint yet, or the
    newest one would not be this. Returns the file."""
    out_dir = Path(out_dir)
    if list_checkpoints(out_dir):
        raise FileExistsError(17, "holds checkpoints already; import into a folder without ckpt_*.pt", str(out_dir))
    read = read_diffusers(folder, scheduler)
    weights = read.model.state_dict()
    state = {
        "model": weights,
        "ema": {**{f"module.{k}": v for k, v in weights.items()}, "n_averaged": torch.tensor(1)},  # same tensors
        "optimizer": {}, "step": int(step),
        "config": {"model": read.model.config.to_dict(), "diffusion": read.diffusion_config,
                   "diffusers": {"source": str(Path(folder).resolve()), "scheduler_config": str(read.scheduler_config),
                                 **read.hints}},
    }
    path = checkpoint_path(out_dir, int(step))
    save_checkpoint(path, state)
    return path


def write_diffusers(model: UNet, diffusion_config: dict[str, Any], folder: os.PathLike | str, *,
                    variance: str = "fixedlarge", clip_denoised: bool = True, card: str = "") -> Path:
    """Write ``model`` as a folder ``DDPMPipeline.from_pretrained(folder)`` loads: ``unet/`` (a ``UNet2DModel``,
    safetensors), ``scheduler/`` (a ``DDPMScheduler`` holding the diffusion's exact betas as ``trained_betas``,
    the objective as ``prediction_type``, ``variance`` as ``variance_type``), ``model_index.json`` and ``card`` as
    README.md. Atomic: a temporary folder beside ``folder`` renamed into place. An existing ``folder`` is replaced
    only when it is a diffusers pipeline folder (or empty)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    folder = Path(folder)
    if folder.exists() and not (folder.is_dir() and ((folder / "model_index.json").is_file()
                                                     or not any(folder.iterdir()))):
        raise FileExistsError(17, "exists and is not a diffusers pipeline folder; choose a new folder", str(folder))
    unet = UNet2DModel(**diffusers_unet_kwargs(model.config))
    shapes = {k: v.shape for k, v in unet.state_dict().items()}
    unet.load_state_dict(state_dict_to_diffusers(model.state_dict(), shapes), strict=True)
    betas = build_diffusion(diffusion_config).betas
    scheduler = DDPMScheduler(**scheduler_kwargs(diffusion_config, betas, variance, clip_denoised))
    pipe = DDPMPipeline(unet=unet.eval(), scheduler=scheduler)

    def fill(tmp: Path) -> None:
        pipe.save_pretrained(tmp)
        atomic_write_bytes(tmp / "README.md", lambda f: f.write(card.encode()))

    return atomic_write_folder(folder, fill, replace=lambda old: True)


def to_diffusers(checkpoint: os.PathLike | str, folder: os.PathLike | str, *,
                 metrics: os.PathLike | str | None = None, variance: str | None = None) -> Path:
    """Write a checkpoint's EMA network as a diffusers ``DDPMPipeline`` folder (:func:`write_diffusers`) with a model
    card of its params, dataset and FID.

    ``metrics``: the evaluate stage's eval.json; by default ``metrics/eval.json`` of the checkpoint's project
    (``<project>/checkpoints/ckpt_*.pt``), when present. ``variance``: the reverse-process variance the scheduler
    samples with ("fixedlarge"/"fixedsmall"); by default the run's ``sample.variance``."""
    checkpoint = Path(checkpoint)
    if metrics is not None and not Path(metrics).is_file():
        raise FileNotFoundError(2, "no such metrics file (the evaluate stage's eval.json)", str(metrics))
    model, _, state = load_model(checkpoint)
    # the configs as resolved (a stored config may leave defaults out)
    state["config"] = {**state["config"], "model": model.config.to_dict(),
                       "diffusion": DiffusionConfig(**state["config"]["diffusion"]).model_dump()}
    params = state["config"].get("params") or {}
    sampler = {**(state["config"].get("diffusers") or {}), **(params.get("sample") or {})}
    variance = variance or sampler.get("variance") or "fixedlarge"
    if variance not in ("fixedlarge", "fixedsmall"):
        raise ValueError(f"variance: {variance!r}; known: 'fixedlarge', 'fixedsmall'")
    clip = sampler.get("clip_denoised", True)
    metrics = Path(metrics) if metrics is not None else checkpoint.resolve().parent.parent / "metrics" / "eval.json"
    card = model_card(state, f"`{checkpoint.name}`", metrics if metrics.is_file() else None, variance)
    return write_diffusers(model, state["config"]["diffusion"], folder, variance=variance, clip_denoised=clip,
                           card=card)
