"""diffusers' format (``UNet2DModel``, ``DDPMScheduler``) and this library's, translated both ways.

The paper's network is one ``UNet2DModel`` layout (google/ddpm-cifar10-32 and the 256x256 google/ddpm-ema-* models):
per level ``layers_per_block`` ResNet blocks, single-head attention at some resolutions and in the middle, a
stride-2 conv with TensorFlow's (0, 1) padding to go down, nearest x2 + conv to go up, and the time embedding
[sin, cos] with frequencies exp(-ln(10000) i / (half - 1)). This module maps that layout's config and every weight
onto :class:`ddpm.unet.UNet`, and a scheduler config onto :class:`ddpm.config.DiffusionConfig`; any other layout is
refused with :class:`UnsupportedLayout` naming the config key. Reading and writing folders is
:mod:`ddpm.pretrained`'s job.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .schedules import make_betas
from .unet import UNet, UNetConfig, UNetConfigError


class DiffusersFormatError(ValueError):
    """A diffusers folder or file this library cannot read; ``str(e)`` is one line naming the file."""

    def __init__(self, path: Any, message: str):
        super().__init__(f"{path}: {message}" if path is not None else message)
        self.path, self.message = path, message

    def __reduce__(self):  # rebuilt from its arguments, like the other errors of this library
        return type(self), (self.path, self.message)


class UnsupportedLayout(DiffusersFormatError):
    """A diffusers config our UNet or diffusion cannot express; ``key`` is the config key at fault."""

    def __init__(self, key: str, message: str, path: Any = None):
        super().__init__(path, f"{key}: {message}")
        self.key, self.reason = key, message

    def __reduce__(self):
        return type(self), (self.key, self.reason, self.path)


# -- the UNet ---------------------------------------------------------------------------------------------------------
# UNet2DModel settings our UNet has at one value only, with the reason (a missing key takes diffusers' default).
FIXED: dict[str, tuple[Any, str]] = {
    "center_input_sample": (False, "the network reads x_t in [-1, 1] as it is"),
    "time_embedding_type": ("positional", "the time embedding is the Transformer's sinusoids"),
    "flip_sin_to_cos": (False, "the time embedding is [sin, cos], in that order"),
    "freq_shift": (1, "the time embedding's frequencies are exp(-ln(10000) i / (half - 1))"),
    "mid_block_type": ("UNetMidBlock2D", "the middle is ResNet block, attention, ResNet block"),
    "mid_block_scale_factor": (1, "residual sums are not rescaled"),
    "downsample_padding": (0, "the stride-2 conv pads (0, 1) as TensorFlow's 'SAME'"),
    "downsample_type": ("conv", "a level goes down by a stride-2 conv"),
    "upsample_type": ("conv", "a level goes up by nearest x2 and a conv"),
    "act_fn": ("silu", "the activation is SiLU"),
    "add_attention": (True, "the middle block has attention"),
    "resnet_time_scale_shift": ("default", "the time embedding is added, not a scale-shift"),
    "class_embed_type": (None, "the model is unconditional"),
    "num_class_embeds": (None, "the model is unconditional"),
}
# Settings that carry a value into UNetConfig (or are checked against one), and one read only by layouts FIXED refuses.
VALUES = ("sample_size", "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
          "layers_per_block", "dropout", "attention_head_dim", "norm_num_groups", "attn_norm_num_groups", "norm_eps",
          "time_embedding_dim")
IGNORED = ("num_train_timesteps",)  # a "learned" time embedding's table size
DOWN, ATTN_DOWN, UP, ATTN_UP = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"


def _defaults(cls) -> dict[str, Any]:
    """A diffusers class's constructor defaults: what a key absent from its config.json means."""
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _refuse_fixed(cfg: Mapping[str, Any], path: Any) -> None:
    known = set(FIXED) | set(VALUES) | set(IGNORED)
    for key in cfg:
        if not key.startswith("_") and key not in known:
            raise UnsupportedLayout(key, f"unknown UNet2DModel setting {cfg[key]!r}; this importer reads "
                                         f"{', '.join(sorted(known))}", path)
    for key, (want, why) in FIXED.items():
        if cfg[key] != want:
            raise UnsupportedLayout(key, f"{cfg[key]!r} is not expressible: this project's UNet needs {want!r} "
                                         f"({why})", path)


def _attention_levels(cfg: Mapping[str, Any], n: int, path: Any) -> list[int]:
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    for key, types, allowed in (("down_block_types", down, (DOWN, ATTN_DOWN)), ("up_block_types", up, (UP, ATTN_UP))):
        if len(types) != n:
            raise UnsupportedLayout(key, f"{len(types)} blocks for {n} levels of block_out_channels", path)
        for i, t in enumerate(types):
            if t not in allowed:
                raise UnsupportedLayout(f"{key}[{i}]", f"{t!r} is not expressible; this project's UNet is built of "
                                                       f"{' and '.join(allowed)}", path)
    on_down = [i for i, t in enumerate(down) if t == ATTN_DOWN]
    on_up = sorted(n - 1 - j for j, t in enumerate(up) if t == ATTN_UP)  # up_blocks[0] is the deepest level
    if on_down != on_up:
        raise UnsupportedLayout("up_block_types", f"attention at levels {on_up} on the way up but {on_down} on the "
                                                  "way down; this project's UNet attends at the same resolutions "
                                                  "in both paths", path)
    return on_down


def _check_one_head(cfg: Mapping[str, Any], channels: list[int], levels: list[int], path: Any) -> None:
    head_dim = cfg["attention_head_dim"]
    if head_dim is None:
        return
    for c in [channels[i] for i in levels] + [channels[-1]]:  # the attention levels and the middle
        if head_dim != c:
            raise UnsupportedLayout("attention_head_dim", f"{head_dim} splits {c} channels into {c / head_dim:g} "
                                                          "heads; this project's attention has one head over all "
                                                          "channels (attention_head_dim: null)", path)


def unet_config_from_diffusers(config: Mapping[str, Any], path: Any = None) -> UNetConfig:
    """The :class:`UNetConfig` of a ``UNet2DModel`` config (its config.json as a dict; ``path`` names it in errors).

    Raises :class:`UnsupportedLayout` naming the first key our UNet cannot express."""
    from diffusers import UNet2DModel

    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise UnsupportedLayout("_class_name", f"{name!r}; this importer reads a UNet2DModel", path)
    cfg = {**_defaults(UNet2DModel), **config}
    _refuse_fixed(cfg, path)
    channels = [int(c) for c in cfg["block_out_channels"]]
    ch = channels[0]
    if any(c % ch for c in channels):
        raise UnsupportedLayout("block_out_channels", f"{channels} are not multiples of the first level's {ch} "
                                                      "(this project's UNet has ch x ch_mult channels)", path)
    levels = _attention_levels(cfg, len(channels), path)
    _check_one_head(cfg, channels, levels, path)
    if cfg["time_embedding_dim"] not in (None, 4 * ch):
        raise UnsupportedLayout("time_embedding_dim", f"{cfg['time_embedding_dim']}; this project's UNet embeds "
                                                      f"time in 4 x {ch} = {4 * ch} channels (null)", path)
    groups = cfg["norm_num_groups"]
    if cfg["attn_norm_num_groups"] not in (None, groups):
        raise UnsupportedLayout("attn_norm_num_groups", f"{cfg['attn_norm_num_groups']}; the attention's GroupNorm "
                                                        f"uses norm_num_groups {groups} here (null)", path)
    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise UnsupportedLayout("sample_size", f"{list(size)}; this project's images are square", path)
        size = size[0]
    if size is None:
        raise UnsupportedLayout("sample_size", "null; the image side length is needed to place the attention", path)
    if cfg["in_channels"] != cfg["out_channels"]:
        raise UnsupportedLayout("out_channels", f"{cfg['out_channels']} differs from in_channels "
                                                f"{cfg['in_channels']}; the network predicts an image-shaped eps", path)
    try:
        return UNetConfig(image_channels=cfg["in_channels"], image_size=size, ch=ch,
                          ch_mult=tuple(c // ch for c in channels), num_res_blocks=cfg["layers_per_block"],
                          attn_resolutions=tuple(size // 2**i for i in levels), dropout=float(cfg["dropout"]),
                          num_groups=groups, norm_eps=float(cfg["norm_eps"]))
    except UNetConfigError as e:
        keys = {"image_channels": "in_channels", "image_size": "sample_size", "ch": "block_out_channels",
                "ch_mult": "block_out_channels", "num_res_blocks": "layers_per_block", "num_groups": "norm_num_groups",
                "attn_resolutions": "down_block_types", "norm_eps": "norm_eps", "dropout": "dropout"}
        raise UnsupportedLayout(keys.get(e.field, e.field), str(e).split(": ", 1)[1], path) from None


def diffusers_unet_kwargs(cfg: UNetConfig) -> dict[str, Any]:
    """``UNet2DModel(**kwargs)`` with our UNet's structure: the inverse of :func:`unet_config_from_diffusers`."""
    res = cfg.resolutions
    kwargs = {key: want for key, (want, _) in FIXED.items()}
    kwargs.update(
        sample_size=cfg.image_size, in_channels=cfg.image_channels, out_channels=cfg.image_channels,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple(ATTN_DOWN if r in cfg.attn_resolutions else DOWN for r in res),
        up_block_types=tuple(ATTN_UP if r in cfg.attn_resolutions else UP for r in reversed(res)),
        dropout=cfg.dropout, attention_head_dim=None,  # one head over all channels, as in the paper
        norm_num_groups=cfg.num_groups, attn_norm_num_groups=None, norm_eps=cfg.norm_eps, time_embedding_dim=None,
    )
    return kwargs


# -- the weights ------------------------------------------------------------------------------------------------------
# Our parameter names -> diffusers', applied in order. The attention's fused 1x1 qkv conv is their three Linear
# to_q/to_k/to_v (stacked on dim 0, in that order); 1x1 convs and Linears hold the same numbers ([C, C, 1, 1] vs
# [C, C]).
_RENAMES = [
    (r"^temb\.0\.", "time_embedding.linear_1."),
    (r"^temb\.2\.", "time_embedding.linear_2."),
    (r"^(down|up)\.(\d+)\.res\.(\d+)\.", r"\1_blocks.\2.resnets.\3."),
    (r"^(down|up)\.(\d+)\.attn\.(\d+)\.", r"\1_blocks.\2.attentions.\3."),
    (r"^down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0."),
    (r"^up\.(\d+)\.upsample\.", r"up_blocks.\1.upsamplers.0."),
    (r"^mid\.0\.", "mid_block.resnets.0."),
    (r"^mid\.1\.", "mid_block.attentions.0."),
    (r"^mid\.2\.", "mid_block.resnets.1."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"\.temb_proj\.", ".time_emb_proj."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"\.norm\.", ".group_norm."),  # the attention's; the ResNet blocks' are norm1/norm2 in both
    (r"\.proj_out\.", ".to_out.0."),
]


def diffusers_names(name: str) -> list[str]:
    """diffusers' parameter name(s) of our parameter ``name`` (three for the attention's qkv)."""
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    head, sep, leaf = name.rpartition(".qkv.")
    return [f"{head}.{p}.{leaf}" for p in ("to_q", "to_k", "to_v")] if sep else [name]


def state_dict_from_diffusers(theirs: Mapping[str, torch.Tensor], cfg: UNetConfig,
                              path: Any = None) -> dict[str, torch.Tensor]:
    """Our UNet's state dict (float32) from a ``UNet2DModel``'s of the layout ``cfg``; every tensor is used exactly
    once. Raises :class:`DiffusersFormatError` naming a missing, extra or misshapen weight."""
    with torch.device("meta"):
        ref = UNet.from_config(cfg).state_dict()
    ours, used = {}, set()
    for name, want in ref.items():
        names = diffusers_names(name)
        missing = [n for n in names if n not in theirs]
        if missing:
            raise DiffusersFormatError(path, f"no weight {missing[0]} (needed for {name} of {cfg})")
        w = torch.cat([theirs[n].detach().to("cpu", torch.float32) for n in names])
        if tuple(w.shape) not in (tuple(want.shape), tuple(want.shape[:2])):
            raise DiffusersFormatError(path, f"{'/'.join(names)} has shape {list(w.shape)}, {name} needs "
                                             f"{list(want.shape)}")
        ours[name] = w.reshape(want.shape).contiguous()
        used.update(names)
    extra = sorted(set(theirs) - used)
    if extra:
        raise DiffusersFormatError(path, f"weight {extra[0]} (and {len(extra) - 1} more) has no place in {cfg}")
    return ours


def state_dict_to_diffusers(ours: Mapping[str, torch.Tensor],
                            shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """A ``UNet2DModel``'s state dict from our UNet's; ``shapes`` are the target model's (its ``state_dict()``)."""
    theirs = {}
    for name, w in ours.items():
        names = diffusers_names(name)
        for n, part in zip(names, w.detach().to("cpu").chunk(len(names), dim=0)):
            theirs[n] = part.reshape(shapes[n]).contiguous()
    return theirs


# -- the diffusion ----------------------------------------------------------------------------------------------------
OBJECTIVES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}  # diffusers' prediction_type -> our objective
VARIANCES = {"fixed_small": "fixedsmall", "fixed_small_log": "fixedsmall",  # the same sigma_t^2 in the log domain
             "fixed_large": "fixedlarge", "fixed_large_log": "fixedlarge"}
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")  # both hold the training betas under the same keys
# diffusers keeps betas in float32, we compute them in float64: a schedule is ours when the two agree to a few
# float32 round-offs (torch.linspace in float32 and in float64 differ by up to 1 ulp, 6e-8 relative).
BETA_RTOL = 1e-6


def _f32(x: float) -> float:
    """The shortest decimal of float32 ``x`` (9.9999997e-05 -> 0.0001): a trained_betas endpoint as it was typed."""
    import numpy as np

    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float(((ours.to(torch.float32).double() - theirs.double()).abs() / theirs.double()).max())


def _cosine_s(beta_1: float, steps: int) -> tuple[float, float]:
    """The offset s of the cosine schedule (Nichol & Dhariwal 2021, Eq. 17) whose first beta is ``beta_1``: to 6
    digits (0.008, as typed, not 0.00800000037 from float32 betas), then as found.

    beta_1 = 1 - abar(1/T) / abar(0) grows with s, so bisection finds it (60 halvings: float64 resolution); the
    caller compares every beta, so a ``beta_1`` of no cosine schedule is refused there."""
    import math

    def first_beta(s: float) -> float:
        abar = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return 1.0 - abar(1.0 / steps) / abar(0.0)

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if first_beta(mid) < beta_1 else (lo, mid)
    found = (lo + hi) / 2
    return float(f"{found:.6g}"), found


def _schedule_of(betas: torch.Tensor, candidates: list[dict[str, Any]], key: str, path: Any) -> dict[str, Any]:
    """The first of our schedules (diffusion-config fields) whose betas equal diffusers' ``betas`` [T] float32."""
    t = betas.numel()
    diffs = []
    for c in candidates:
        kwargs = ({"beta_start": c["beta_start"], "beta_end": c["beta_end"]} if c["schedule"] == "linear"
                  else {"s": c["cosine_s"]})
        try:
            d = _rel_diff(make_betas(c["schedule"], t, **kwargs), betas)
        except ValueError:
            continue
        if d <= BETA_RTOL:
            return c
        if not any(x.startswith(c["schedule"]) for x in diffs):
            diffs.append(f"{c['schedule']} by {d:.2g}")
    raise UnsupportedLayout(key, f"these {t} betas are none of this project's schedules (they differ from "
                                 f"{', '.join(diffs) or 'linear and cosine'}, relative; at most {BETA_RTOL:g} is the "
                                 "same schedule)", path)


def diffusion_from_scheduler(config: Mapping[str, Any], path: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(diffusion config, sampling hints)`` of a scheduler config (its scheduler_config.json as a dict).

    The diffusion config has :class:`ddpm.config.DiffusionConfig`'s fields; the hints are what the scheduler says
    about sampling, in our names: ``variance`` ("fixedlarge"/"fixedsmall", None when it does not say) and
    ``clip_denoised``. Raises :class:`UnsupportedLayout` naming the key our diffusion cannot express."""
    import diffusers

    name = config.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        raise UnsupportedLayout("_class_name", f"{name!r}; this importer reads the training schedule of "
                                               f"{' or '.join(SCHEDULERS)}", path)
    cls = getattr(diffusers, name)
    cfg = {**_defaults(cls), **config}
    prediction = cfg["prediction_type"]
    if prediction not in OBJECTIVES:
        raise UnsupportedLayout("prediction_type", f"{prediction!r}; known: {', '.join(OBJECTIVES)}", path)
    if cfg.get("rescale_betas_zero_snr"):
        raise UnsupportedLayout("rescale_betas_zero_snr", "true rescales the betas to zero terminal SNR, which this "
                                                          "project's schedules do not", path)
    variance = cfg.get("variance_type")  # DDIM's config has none
    if variance is not None and variance not in VARIANCES:
        raise UnsupportedLayout("variance_type", f"{variance!r}: a learned variance needs a network with twice the "
                                                 f"output channels; known: {', '.join(VARIANCES)}", path)
    steps = int(cfg["num_train_timesteps"])
    if steps < 2:
        raise UnsupportedLayout("num_train_timesteps", f"{steps}; at least 2", path)
    trained, schedule = cfg["trained_betas"], cfg["beta_schedule"]
    if trained is None and schedule not in ("linear", "squaredcos_cap_v2"):
        raise UnsupportedLayout("beta_schedule", f"{schedule!r} is not among this project's schedules "
                                                 "(linear; squaredcos_cap_v2, our cosine with s = 0.008)", path)
    try:  # diffusers' own betas of this config: the reference ours must match
        betas = cls(num_train_timesteps=steps, beta_start=cfg["beta_start"], beta_end=cfg["beta_end"],
                    beta_schedule=schedule, trained_betas=trained).betas
    except (ValueError, NotImplementedError, TypeError) as e:
        raise UnsupportedLayout("trained_betas" if trained is not None else "beta_schedule", str(e), path) from None
    if trained is not None:
        key, candidates = "trained_betas", [
            {"schedule": "linear", "beta_start": _f32(float(betas[0])), "beta_end": _f32(float(betas[-1]))},
            *({"schedule": "cosine", "cosine_s": s} for s in _cosine_s(float(betas[0]), steps))]
    elif schedule == "linear":
        key, candidates = "beta_schedule", [
            {"schedule": "linear", "beta_start": float(cfg["beta_start"]), "beta_end": float(cfg["beta_end"])}]
    else:
        key, candidates = "beta_schedule", [{"schedule": "cosine", "cosine_s": 0.008}]
    diffusion = {"schedule": "linear", "timesteps": steps, "beta_start": 1e-4, "beta_end": 0.02, "cosine_s": 0.008,
                 **_schedule_of(betas, candidates, key, path), "objective": OBJECTIVES[prediction]}
    hints = {"variance": VARIANCES.get(variance), "clip_denoised": bool(cfg.get("clip_sample", True))}
    return diffusion, hints


def scheduler_kwargs(diffusion: Mapping[str, Any], betas: torch.Tensor, variance: str,
                     clip_denoised: bool) -> dict[str, Any]:
    """``DDPMScheduler(**kwargs)`` holding our betas [T] exactly (``trained_betas``), the objective as its
    ``prediction_type`` and ``variance`` ("fixedlarge"/"fixedsmall") as its ``variance_type``."""
    prediction = {v: k for k, v in OBJECTIVES.items()}[diffusion["objective"]]
    kwargs: dict[str, Any] = {"num_train_timesteps": int(betas.numel()), "trained_betas": betas.tolist(),
                              "variance_type": {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}[variance],
                              "clip_sample": bool(clip_denoised), "prediction_type": prediction}
    # For a reader of the config: the named schedule the betas are (diffusers uses trained_betas when given).
    if diffusion["schedule"] == "linear":
        kwargs.update(beta_schedule="linear", beta_start=diffusion["beta_start"], beta_end=diffusion["beta_end"])
    elif diffusion["schedule"] == "cosine" and diffusion["cosine_s"] == 0.008:
        kwargs.update(beta_schedule="squaredcos_cap_v2")
    return kwargs


# -- folders ----------------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DiffusersFormatError(path, "not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffusersFormatError(path, f"not a readable JSON config ({e})") from None
    if not isinstance(data, dict):
        raise DiffusersFormatError(path, f"expected a JSON object, got {type(data).__name__}")
    return data


def locate(folder: Path, scheduler: Optional[Path] = None) -> tuple[Path, Path]:
    """``(unet folder, scheduler config file)`` of a diffusers folder: a pipeline (``model_index.json``, ``unet/``,
    ``scheduler/``), a flat one (the UNet's config.json beside scheduler_config.json, as google/ddpm-cifar10-32 is
    published) or a bare UNet folder with ``scheduler`` given (a scheduler_config.json or the folder holding it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DiffusersFormatError(folder, "not a folder; give a diffusers DDPMPipeline folder (model_index.json, "
                                           "unet/, scheduler/) or a UNet2DModel folder")
    if (folder / "model_index.json").is_file():
        index = read_json(folder / "model_index.json")
        if index.get("_class_name") not in (None, "DDPMPipeline", "DDIMPipeline"):
            raise UnsupportedLayout("_class_name", f"{index['_class_name']!r}; this importer reads a DDPMPipeline "
                                                   "(or DDIMPipeline) folder", folder / "model_index.json")
    unet = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (unet / "config.json").is_file():
        raise DiffusersFormatError(folder, "no UNet config (unet/config.json or config.json)")
    if scheduler is None:
        found = [p for p in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json")
                 if p.is_file()]
        if not found:
            raise DiffusersFormatError(folder, "no scheduler config (scheduler/scheduler_config.json or "
                                               "scheduler_config.json); pass the scheduler's config for a bare "
                                               "UNet (--scheduler)")
        scheduler = found[0]
    scheduler = Path(scheduler)
    if scheduler.is_dir():
        scheduler = scheduler / "scheduler_config.json"
    if not scheduler.is_file():
        raise DiffusersFormatError(scheduler, "no such scheduler config")
    return unet, scheduler


# -- the model card ---------------------------------------------------------------------------------------------------
def _fid_lines(metrics: Optional[Path], step: int) -> list[str]:
    if metrics is None:
        return ["Not evaluated: no `metrics/eval.json` beside this checkpoint's run."]
    m = read_json(metrics)
    if "fid" not in m:
        return [f"`{metrics.name}` holds no FID."]
    prov = m.get("provenance") or {}
    rep = (m.get("per_repeat") or {}).get("fid") or {}
    fid = f"**FID {m['fid']:.4g}**" + (f" (mean of {m['repeats']} disjoint seed ranges, std {rep['std']:.2g})"
                                       if rep.get("std") is not None else "")
    lines = [f"{fid}, {m.get('num_generated', '?')} samples against the {m.get('reference', '?')} split's "
             f"{m.get('num_reference', '?')} images, features of `{m.get('feature_extractor', '?')}`."]
    floor = (m.get("floor") or {}).get("fid")
    if floor is not None:
        lines.append(f"The real-vs-real floor (held-out images against the same reference) is FID {floor:.4g}.")
    if prov.get("sampler"):
        lines.append(f"Sampled with {prov['sampler']}, {prov.get('steps')} steps.")
    measured = (prov.get("checkpoint") or {}).get("step")
    if measured is not None and int(measured) != step:
        lines.append(f"Note: these metrics were measured at training step {measured}, not this checkpoint's {step}.")
    lines.append(f"Source: `{metrics}`.")
    return lines


def model_card(state: Mapping[str, Any], source: str, metrics: Optional[Path], variance: str) -> str:
    """README.md of an exported folder: what the model is (params, dataset), how it samples, and its FID.

    ``state``: a checkpoint's (its ``config`` and ``step``); ``source``: where the weights come from, in words."""
    cfg, step = state["config"], int(state["step"])
    m, d = cfg["model"], cfg["diffusion"]
    params = cfg.get("params") or {}
    data, train = params.get("data") or {}, params.get("train") or {}
    dataset = data.get("dataset")
    shape = f"{m['image_channels']}x{m['image_size']}x{m['image_size']}"
    imported = (cfg.get("diffusers") or {}).get("source")
    origin = ("trained with the ddpm-pipeline project" if params else
              f"imported by the ddpm-pipeline project from the diffusers folder `{imported}`" if imported else
              "written by the ddpm-pipeline project")
    prediction = {v: k for k, v in OBJECTIVES.items()}[d["objective"]]
    schedule = (f"linear, beta {d['beta_start']:g} to {d['beta_end']:g}" if d["schedule"] == "linear"
                else f"cosine, s = {d['cosine_s']:g}")
    lines = [
        "---", "library_name: diffusers", "tags:", "- unconditional-image-generation", "- ddpm",
        "- diffusers:DDPMPipeline", "---", "",
        f"# DDPM on {dataset} ({shape})" if dataset else f"# DDPM ({shape})", "",
        f"A denoising diffusion probabilistic model (Ho, Jain and Abbeel 2020, arXiv:2006.11239) {origin}, exported "
        f"from {source} (training step {step}, EMA weights).", "",
        "```python", "from diffusers import DDPMPipeline", "",
        'pipe = DDPMPipeline.from_pretrained("path/to/this/folder")',
        f"images = pipe(batch_size=16, num_inference_steps={d['timesteps']}).images  # Algorithm 2, all T steps",
        "```", "",
        "## Model", "",
        f"- UNet2DModel in the paper's layout: ch {m['ch']}, ch_mult {list(m['ch_mult'])}, "
        f"{m['num_res_blocks']} ResNet blocks per level, single-head attention at {list(m['attn_resolutions'])}, "
        f"GroupNorm {m['num_groups']} groups, eps {m.get('norm_eps', 1e-5):g}, dropout {m['dropout']:g}",
        f"- diffusion: T = {d['timesteps']}, {schedule} (the scheduler holds the exact betas as `trained_betas`)",
        f"- prediction_type `{prediction}` (objective `{d['objective']}`), variance_type "
        f"`{'fixed_large' if variance == 'fixedlarge' else 'fixed_small'}`", "",
    ]
    if dataset:
        lines += ["## Training", "", f"- dataset: `{dataset}`"]
    if train:
        lines.append(f"- {step} of {train.get('steps')} steps, batch {train.get('batch_size')}, lr {train.get('lr')}"
                     f" ({train.get('lr_schedule')}), EMA decay {train.get('ema_decay')}, seed {train.get('seed')}")
    if params:
        lines += ["", "<details><summary>All params</summary>", "", "```json", json.dumps(params, indent=1),
                  "```", "", "</details>"]
    lines += ["", "## Evaluation", "", *_fid_lines(metrics, step), ""]
    return "\n".join(lines)
