"""``ddpm import-diffusers`` and ``ddpm export-diffusers``: models in and out of diffusers' format (docs/diffusers.md).

    ddpm import-diffusers ddpm-cifar10-32 --out checkpoints/     # a DDPMPipeline folder -> checkpoints/ckpt_00000000.pt
    ddpm export-diffusers --checkpoint checkpoints --out digits-ddpm   # DDPMPipeline.from_pretrained("digits-ddpm")

The work is :mod:`ddpm.pretrained`'s; this layer turns its exceptions into one line and exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from .cli import _OneLineParser
from .errors import StageError
from .files import check_writable


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = _OneLineParser(prog=prog, description=description)
    p.add_argument("--debug", action="store_true", help="on an error, print the full traceback too")
    return p


def _quiet_diffusers() -> None:
    # diffusers' loading notices (accelerate missing, config keys it ignores) are not this command's output.
    from diffusers.utils import logging

    logging.set_verbosity_error()


def import_main(argv: Optional[Sequence[str]] = None) -> Path:
    p = _parser("ddpm import-diffusers", "Write a diffusers DDPMPipeline folder (or a UNet2DModel folder and its "
                                         "scheduler config) as a checkpoint every stage reads.")
    p.add_argument("folder", help="DDPMPipeline folder (model_index.json, unet/, scheduler/), a flat one (config.json "
                                  "+ scheduler_config.json) or a UNet2DModel folder with --scheduler")
    p.add_argument("--out", required=True, help="checkpoint folder to write ckpt_<step>.pt into (without checkpoints)")
    p.add_argument("--scheduler", help="the scheduler's config (scheduler_config.json or its folder), for a bare UNet")
    p.add_argument("--step", type=int, default=0, help="training step to record (file name ckpt_<step>.pt; default 0)")
    args = p.parse_args(argv)
    from ddpm.diffusers_io import DiffusersFormatError
    from ddpm.pretrained import import_diffusers

    if args.step < 0:
        raise StageError(f"--step: {args.step}; a training step is 0 or more")
    _quiet_diffusers()
    check_writable(args.out)
    try:
        path = import_diffusers(args.folder, args.out, scheduler=args.scheduler, step=args.step)
    except DiffusersFormatError as e:
        raise StageError(str(e)) from None
    _report_import(path)
    return path


def _report_import(path: Path) -> None:
    from ddpm.pretrained import load_model
    from ddpm.unet import count_parameters

    model, diffusion, state = load_model(path)
    c, d, hints = model.config, state["config"]["diffusion"], state["config"]["diffusers"]
    print(f"wrote {path}: UNet {count_parameters(model):,} parameters (ch {c.ch}, ch_mult {list(c.ch_mult)}, "
          f"attention at {list(c.attn_resolutions)}, norm_eps {c.norm_eps:g}) on {c.image_channels}x{c.image_size}x"
          f"{c.image_size}; diffusion {d['schedule']} T={d['timesteps']}, objective {d['objective']}")
    if hints.get("variance"):
        print(f"the scheduler samples with sample.variance: {hints['variance']}, "
              f"sample.clip_denoised: {str(hints['clip_denoised']).lower()}")


def export_main(argv: Optional[Sequence[str]] = None) -> Path:
    p = _parser("ddpm export-diffusers", "Write a checkpoint's EMA network as a folder diffusers' "
                                         "DDPMPipeline.from_pretrained loads, with a model card.")
    p.add_argument("--checkpoint", required=True, help="a ckpt_*.pt file, or a checkpoint folder (its newest)")
    p.add_argument("--out", required=True, help="folder to write (replaced only if it is a diffusers folder)")
    p.add_argument("--metrics", help="eval.json whose FID the model card reports (default: the checkpoint "
                                     "project's metrics/eval.json when present)")
    p.add_argument("--variance", choices=("fixedlarge", "fixedsmall"),
                   help="the scheduler's variance_type (default: the run's sample.variance)")
    args = p.parse_args(argv)
    from ddpm.checkpoint import newest_checkpoint
    from ddpm.pretrained import to_diffusers

    ckpt = Path(args.checkpoint)
    if ckpt.is_dir():
        ckpt = newest_checkpoint(ckpt, warn=print)
    _quiet_diffusers()
    check_writable(Path(args.out).absolute().parent)
    out = to_diffusers(ckpt, args.out, metrics=args.metrics, variance=args.variance)
    print(f"wrote {out} from {ckpt}: load it with diffusers.DDPMPipeline.from_pretrained({str(out)!r})")
    return out
