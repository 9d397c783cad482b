"""Stage `figures`: the study's pictures of one trained model, as files beside the metrics.

1. ``progressive.png``: the reverse chain of ``figures.seeds`` samples at ``figures.frames`` evenly spaced steps
   from t=T to 0; per seed one row of x_t and, below it, one row of the predicted x_0 (the paper's Fig. 6/Fig. 14).
2. ``reconstruction_t<t>.png`` for each t = fraction*T of ``figures.recon_fractions``: held-out images diffused to
   t by q(x_t | x_0) and denoised ``figures.recon_seeds`` times with different seeds; per image one row: the
   original, its diffused input (first seed) and the reconstructions (the paper's Fig. 7 on CelebA-HQ).
3. ``denoising.gif``: a grid of ``figures.gif_samples`` samples from noise to images.
4. ``loss.png``: the training loss curve of ``metrics/train_loss.tsv`` (matplotlib), beside DVC's plot; with
   ``train.pretrained`` (nothing trained) a note saying so.

Every chain uses the sample section's sampler (``sample.sampler``, ``steps``, ``eta``, ``variance``) and weights
(``sample.use_ema``): with the demo's DDIM-100 the figures take seconds instead of the minutes 1,000 ancestral
steps would. ``figures.json`` lists the files, their panel layout, the timesteps shown and the sampler.

    python -m tasks.figures --params params.yaml --checkpoints checkpoints --data data/dataset \
        --loss-log metrics/train_loss.tsv --out figures
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ddpm.checkpoint import atomic_write_bytes, newest_checkpoint
from ddpm.perf import prepare_for_sampling
from ddpm.pretrained import load_model
from ddpm.samplers import (
    ChainRecorder,
    SeededNoise,
    img2img_sample,
    reverse_pairs,
    sample,
    start_index,
    trace_steps,
)
from tasks.lib.config import Config, load_config, write_resolved

from .lib.callbacks import after_stage
from .lib.cli import run_cli, stage_parser
from .lib.errors import DataError, StageError
from .lib.files import write_json
from .lib.images import grid_image, to_model_range, to_uint8
from .lib.inputs import check_for_dvc_stage
from .lib.shards import open_dataset
from .lib.workers import local_device

PAD = 2  # pixels between panels: grid_image's gutter (tasks/lib/images.py)
MIN_CELL = 32  # small images are upscaled (nearest) to at least this side so that 8x8 digits stay legible


# -- panels -------------------------------------------------------------------------------------------------------
def cell_size(side: int) -> int:
    """Side in pixels of one panel for images of side ``side``."""
    return side * max(1, math.ceil(MIN_CELL / side))


def panel_grid(images: np.ndarray, ncol: int) -> np.ndarray:
    """uint8 images [N, C, H, W] -> uint8 [H', W', 3], row-major with ``ncol`` panels per row, white padding.

    The size is exact: ``rows * (cell + PAD) + PAD`` by ``ncol * (cell + PAD) + PAD`` with cell = :func:`cell_size`.
    """
    return grid_image(images, min_cell=MIN_CELL, ncol=ncol)  # its gutter without min_side: PAD


def grid_shape(rows: int, cols: int, side: int) -> tuple[int, int]:
    """(height, width) in pixels of a :func:`panel_grid` of ``rows`` x ``cols`` panels of images of side ``side``."""
    c = cell_size(side)
    return rows * (c + PAD) + PAD, cols * (c + PAD) + PAD


def save_png(array: np.ndarray, path: Path) -> Path:
    from PIL import Image

    atomic_write_bytes(path, lambda f: Image.fromarray(array).save(f, format="png"))
    return path


# -- the model -------------------------------------------------------------------------------------------------------
class _Threads:
    """Sampling with this process's thread count, which is given back afterwards even if a caller (a test, a
    benchmark) changed it meanwhile."""

    def __enter__(self):
        self.previous = torch.get_num_threads()
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)


@dataclass(frozen=True)
class Loaded:
    """The network to call (with the sample section's speed switches), its diffusion, image shape and device."""

    model: torch.nn.Module
    diffusion: Any
    shape: tuple[int, int, int]
    device: torch.device


def load_sampler(cfg: Config, ckpt_dir, threads: int = 1) -> tuple[Loaded, Path]:
    """The newest checkpoint's network (EMA or raw weights per ``sample.use_ema``) ready to sample, and its path."""
    s = cfg.sample
    ckpt = newest_checkpoint(ckpt_dir, warn=print)
    device = local_device(s.use_gpu, "sample.use_gpu")
    # One thread: the figures' batches are small, and two threads on a busy 2-core machine run 10-100x slower.
    torch.set_num_threads(max(1, threads))
    model, diffusion, state = load_model(ckpt, use_ema=s.use_ema)
    m = state["config"]["model"]
    holder = Loaded(prepare_for_sampling(model, device, precision=s.precision, channels_last=s.channels_last,
                                         compile=s.compile), diffusion,
                    (m["image_channels"], m["image_size"], m["image_size"]), device)
    if tuple(holder.shape) != cfg.data.shape:
        raise StageError(f"{ckpt}: the model makes {'x'.join(map(str, holder.shape))} images, the params' data "
                         f"shape is {'x'.join(map(str, cfg.data.shape))}")
    return holder, ckpt


def sampler_name(cfg: Config) -> str:
    s = cfg.sample
    if s.sampler == "ddpm":
        return f"ddpm-{cfg.diffusion.timesteps} ({s.variance})"
    if s.sampler == "ddim":
        return f"ddim-{s.steps} (eta {s.eta:g}, {s.timestep_spacing})"
    return f"{s.sampler}-{s.steps} ({s.timestep_spacing})"


def _kw(cfg: Config) -> dict[str, Any]:
    return cfg.sample.kwargs()


def _chain(holder, cfg: Config, seeds: list[int], frames: int) -> ChainRecorder:
    """Sample ``seeds`` from noise with the sample stage's sampler, keeping ``frames`` evenly spaced steps."""
    s = cfg.sample
    pairs = reverse_pairs(s.sampler, holder.diffusion.num_timesteps, s.steps, spacing=s.timestep_spacing)
    rec = ChainRecorder(trace_steps(len(pairs), frames))
    sample(holder.model, holder.diffusion, seeds, holder.shape, device=holder.device, callback=rec, **_kw(cfg))
    return rec


# -- the four figures -------------------------------------------------------------------------------------------------
def progressive(holder, cfg: Config, out_dir: Path) -> dict[str, Any]:
    f = cfg.figures
    seeds = list(range(f.seed, f.seed + f.seeds))
    rec = _chain(holder, cfg, seeds, f.frames)
    xt, x0 = to_uint8(rec.x_t), to_uint8(rec.x0)  # [K, B, C, H, W]
    k = xt.shape[0]
    rows = []
    for b in range(len(seeds)):
        rows += [xt[:, b], x0[:, b]]
    path = save_png(panel_grid(np.concatenate(rows), ncol=k), out_dir / "progressive.png")
    return {"file": path.name, "rows": 2 * len(seeds), "cols": k, "seeds": seeds,
            "timesteps": [t + 1 for t in rec.timesteps],  # the paper's t (index + 1) of each column
            "layout": "per seed: a row of x_t, then a row of the predicted x_0; columns t = T ... 1"}


def reconstructions(holder, cfg: Config, holdout: np.ndarray, out_dir: Path) -> list[dict[str, Any]]:
    f = cfg.figures
    T = holder.diffusion.num_timesteps
    originals = holdout[: f.recon_images]
    x0 = to_model_range(originals).to(holder.device)
    n = f.recon_images
    out = []
    for frac in f.recon_fractions:
        t_index = start_index(T, frac)
        recon = []
        for r in range(f.recon_seeds):
            seeds = [f.seed + 1000 * (r + 1) + i for i in range(n)]  # distinct from the progressive figure's seeds
            recon.append(to_uint8(img2img_sample(holder.model, holder.diffusion, x0, seeds, frac,
                                                 device=holder.device, **_kw(cfg))))
        if t_index >= 0:  # the diffused input of the first seed: its first draw is exactly img2img's q_sample noise
            seeds = [f.seed + 1000 + i for i in range(n)]
            eps = SeededNoise(seeds, holder.shape, holder.device).draw()
            diffused = to_uint8(holder.diffusion.q_sample(
                x0, torch.full((n,), t_index, dtype=torch.long, device=holder.device), eps))
        else:
            diffused = originals
        panels = np.stack([originals, diffused, *recon], axis=1)  # [n, 2 + seeds, C, H, W]
        cols = panels.shape[1]
        t = t_index + 1
        path = save_png(panel_grid(panels.reshape(-1, *panels.shape[2:]), ncol=cols),
                        out_dir / f"reconstruction_t{t:04d}.png")
        out.append({"file": path.name, "t": t, "fraction": frac, "rows": n, "cols": cols,
                    "layout": "per held-out image: original, diffused input x_t (first seed), "
                              f"{f.recon_seeds} reconstructions"})
    return out


def animation(holder, cfg: Config, out_dir: Path) -> dict[str, Any]:
    from PIL import Image

    f = cfg.figures
    seeds = list(range(f.seed, f.seed + f.gif_samples))
    rec = _chain(holder, cfg, seeds, f.gif_frames)
    frames = to_uint8(rec.x_t)  # [K, B, C, H, W]
    ncol = max(1, math.ceil(math.sqrt(len(seeds))))
    pictures = [Image.fromarray(panel_grid(fr, ncol)) for fr in frames]
    durations = [120] * (len(pictures) - 1) + [1500]  # hold the samples

    def write(fh):
        pictures[0].save(fh, format="gif", save_all=True, append_images=pictures[1:], duration=durations, loop=0)

    path = out_dir / "denoising.gif"
    atomic_write_bytes(path, write)
    return {"file": path.name, "frames": len(pictures), "samples": len(seeds), "cols": ncol,
            "rows": math.ceil(len(seeds) / ncol), "timesteps": [t + 1 for t in rec.timesteps]}


def read_loss(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) of the train stage's loss log (a TSV with ``step`` and ``loss`` columns)."""
    if not path.is_file():
        raise DataError(f"{path}: loss log not found; run the train stage first")
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        steps = np.array([int(r["step"]) for r in rows])
        losses = np.array([float(r["loss"]) for r in rows])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a loss log with step and loss columns ({type(e).__name__}: {e})") from None
    if len(steps) == 0:
        raise DataError(f"{path}: the loss log has no rows")
    return steps, losses


def loss_curve(log_path: Path, out_dir: Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    steps, losses = read_loss(log_path)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss (every logged step)")
    if len(losses) >= 10:
        w = max(2, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.8, label=f"moving average ({w} rows)")
    ax.set_xlabel("training step")
    ax.set_ylabel("L_simple (MSE of eps)")
    if losses.min() > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = out_dir / "loss.png"
    atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))
    return {"file": path.name, "points": int(len(steps)), "first_step": int(steps[0]), "last_step": int(steps[-1]),
            "final_loss": float(losses[-1])}


def no_loss_curve(pretrained: str, out_dir: Path) -> dict[str, Any]:
    """``loss.png`` of a run that trained nothing (``train.pretrained``): it says so, in place of an earlier run's
    curve."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    note = f"no training: the published model {Path(pretrained).name} was imported (train.pretrained)"
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.text(0.5, 0.5, note.replace(": ", ":\n", 1), ha="center", va="center", wrap=True)
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = out_dir / "loss.png"
    atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))
    return {"file": path.name, "points": 0, "note": note}


# -- the stage ---------------------------------------------------------------------------------------------------------
def run(cfg: Config, ckpt_dir, data_dir, loss_log, out_dir) -> dict[str, Any]:
    """Write the four figures and ``figures.json`` into ``out_dir``; returns what ``figures.json`` holds.

    With ``figures.enabled: false`` only ``figures.json`` (``{"enabled": false}``) is written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.figures.enabled:
        for old in [*out_dir.glob("*.png"), *out_dir.glob("*.gif")]:  # stale figures of an earlier run
            old.unlink()
        summary: dict[str, Any] = {"enabled": False}
        write_json(out_dir / "figures.json", summary)
        print("figures.enabled is false: no figures")
        return summary
    t0 = time.perf_counter()
    held_out = open_dataset(data_dir).holdout  # only the first recon_images are read
    if len(held_out) < cfg.figures.recon_images:
        raise DataError(f"figures.recon_images: {cfg.figures.recon_images} images asked, the held-out split of "
                        f"{data_dir} has {len(held_out)}")
    holdout = held_out.head(cfg.figures.recon_images).images
    if not cfg.train.pretrained:  # a published model has no loss log rows (the train stage trained nothing)
        read_loss(Path(loss_log))  # a missing or broken loss log fails before any sampling
    with _Threads():
        holder, ckpt = load_sampler(cfg, ckpt_dir)
        with torch.inference_mode():
            prog = progressive(holder, cfg, out_dir)
            recon = reconstructions(holder, cfg, holdout, out_dir)
            gif = animation(holder, cfg, out_dir)
    loss = no_loss_curve(cfg.train.pretrained, out_dir) if cfg.train.pretrained else loss_curve(Path(loss_log), out_dir)
    for old in out_dir.glob("reconstruction_t*.png"):  # t values of an earlier recon_fractions
        if old.name not in {r["file"] for r in recon}:
            old.unlink()
    summary = {"enabled": True, "checkpoint": str(ckpt), "checkpoint_step": int(ckpt.stem.split("_")[1]),
               "sampler": sampler_name(cfg), "use_ema": cfg.sample.use_ema, "progressive": prog,
               "reconstruction": recon, "animation": gif, "loss": loss, "wall_s": round(time.perf_counter() - t0, 2)}
    write_json(out_dir / "figures.json", summary)
    write_resolved(cfg, out_dir)
    files = [prog["file"], *(r["file"] for r in recon), gif["file"], loss["file"]]
    print(f"{len(files)} figures ({summary['sampler']}) in {out_dir} in {summary['wall_s']:.1f} s: {', '.join(files)}")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = stage_parser("Figures of a trained model: progressive generation, reconstructions from partial diffusion, "
                     "a denoising GIF and the loss curve.")
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint folder from the train stage")
    p.add_argument("--data", default="data/dataset", help="dataset folder (held-out images to reconstruct)")
    p.add_argument("--loss-log", default="metrics/train_loss.tsv", help="the train stage's loss log")
    p.add_argument("--out", default="figures", help="output folder")
    args = p.parse_args(argv)
    cfg = load_config(args.params, args.overrides)
    check_for_dvc_stage(cfg)  # under `dvc repro`: the inputs of this stage and the later ones, before any compute
    summary = run(cfg, args.checkpoints, args.data, args.loss_log, args.out)
    after_stage("figures", cfg, figures=args.out, figures_record=Path(args.out) / "figures.json")
    return summary


if __name__ == "__main__":
    run_cli(main)
