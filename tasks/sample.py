"""Stage `sample`: many samples from a trained checkpoint, in fixed-size shards spread over Ray actors.

Sample ``i`` uses seed ``sample.seed + i`` (see ddpm.samplers), so the images do not depend on how shards are
spread over workers, nor on each worker's batch size. A shard is written atomically with its seeds and a key
naming the checkpoint and sampler settings; a rerun keeps every finished shard whose key and content match and
samples only the missing ones.

    python -m tasks.sample --params params.yaml --checkpoints checkpoints --out samples
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ddpm.checkpoint import list_checkpoints, load_checkpoint, load_latest
from ddpm.config import Config, write_resolved
from ddpm.samplers import ddim_sample, ddpm_sample
from ddpm.unet import UNet

from . import tracking
from .common import (
    DataError,
    StageError,
    absolute,
    config_from_args,
    ensure_ray,
    read_json,
    run_cli,
    sha256_arrays,
    sha256_file,
    shard_paths,
    stage_parser,
    to_uint8,
    write_json,
    write_npz,
)
from .train import build_diffusion

SAMPLER_KEYS = ("sampler", "steps", "eta", "variance", "clip_denoised", "use_ema", "seed")


def newest_checkpoint(ckpt_dir: os.PathLike | str) -> Path:
    """The newest readable checkpoint file in a train-stage output folder."""
    ckpts = list_checkpoints(ckpt_dir)
    if not ckpts:
        raise DataError(f"{ckpt_dir}: no checkpoints (ckpt_*.pt); run the train stage first")
    state = load_latest(ckpt_dir, warn=print)
    if state is None:
        raise DataError(f"{ckpt_dir}: no readable checkpoint among {len(ckpts)} files")
    return next(p for s, p in reversed(ckpts) if s == int(state["step"]))


def sampling_key(cfg: Config, ckpt: Path, step: int) -> str:
    """Identifies what a shard was sampled with: the checkpoint's content and every sampler setting."""
    s = cfg.sample.model_dump()
    blob = {"checkpoint_sha256": sha256_file(ckpt), "step": step, **{k: s[k] for k in SAMPLER_KEYS},
            "timesteps": cfg.diffusion.timesteps}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def plan_shards(num_samples: int, shard_size: int, base_seed: int) -> list[list[int]]:
    """Seeds of each shard: shard k holds samples k*shard_size ... (k+1)*shard_size - 1."""
    return [list(range(base_seed + lo, base_seed + min(lo + shard_size, num_samples)))
            for lo in range(0, num_samples, shard_size)]


def shard_file(out_dir: Path, index: int) -> Path:
    return out_dir / f"shard_{index:05d}.npz"


def shard_is_complete(path: Path, seeds: list[int], key: str, manifest: dict[str, Any]) -> bool:
    """A finished shard: readable, same seeds and sampling key, and content matching the manifest's hash."""
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            images, got_seeds, got_key = z["images"], z["seeds"], str(z["key"])
    except Exception:
        return False
    if got_key != key or got_seeds.tolist() != seeds:
        return False
    want = manifest.get("shards", {}).get(path.name)
    return want is None or want == sha256_arrays(images, got_seeds)


class ShardSampler:
    """Holds one copy of the network; samples shards of seeds in batches. Used as a Ray actor or in-process."""

    def __init__(self, ckpt_path: str, params: dict[str, Any], device: str, threads: int):
        from ddpm.config import from_dict

        torch.set_num_threads(max(1, threads))
        self.cfg = from_dict(params)
        self.device = torch.device(device)
        state = load_checkpoint(ckpt_path, map_location="cpu")
        self.model = UNet.from_config(state["config"]["model"])
        if self.cfg.sample.use_ema:
            ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
            self.model.load_state_dict(ema)
        else:
            self.model.load_state_dict(state["model"])
        self.model.to(self.device).eval()
        self.diffusion = build_diffusion(state["config"]["diffusion"])
        m = state["config"]["model"]
        self.shape = (m["image_channels"], m["image_size"], m["image_size"])

    def sample(self, seeds: list[int]) -> np.ndarray:
        s = self.cfg.sample
        out = []
        for lo in range(0, len(seeds), s.batch_size):
            batch = seeds[lo:lo + s.batch_size]
            if s.sampler == "ddpm":
                x = ddpm_sample(self.model, self.diffusion, batch, self.shape, variance=s.variance,
                                clip_denoised=s.clip_denoised, device=self.device)
            else:
                x = ddim_sample(self.model, self.diffusion, batch, self.shape, steps=s.steps, eta=s.eta,
                                clip_denoised=s.clip_denoised, device=self.device)
            out.append(to_uint8(x))
        return np.concatenate(out)

    def write_shard(self, path: str, seeds: list[int], key: str) -> tuple[str, str, float]:
        t0 = time.perf_counter()
        images = self.sample(seeds)
        seeds_arr = np.asarray(seeds, dtype=np.int64)
        write_npz(path, images=images, seeds=seeds_arr, key=np.asarray(key))
        return Path(path).name, sha256_arrays(images, seeds_arr), time.perf_counter() - t0


def save_grid(images: np.ndarray, path: Path) -> Path:
    """The samples as one square-ish PNG grid (the same picture MLflow shows), written atomically."""
    from PIL import Image

    from .common import atomic_write_bytes, grid_image

    atomic_write_bytes(path, lambda f: Image.fromarray(grid_image(images)).save(f, format="png"))
    return path


def run(cfg: Config, ckpt_dir, out_dir) -> dict[str, Any]:
    """Sample ``sample.num_samples`` images into ``out_dir`` (shards, grid.png, samples.json); returns the summary."""
    import ray
    from tqdm.auto import tqdm

    s = cfg.sample
    out_dir = absolute(out_dir)
    ckpt = newest_checkpoint(ckpt_dir)
    step = int(ckpt.stem.split("_")[1])
    key = sampling_key(cfg, ckpt, step)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "samples.json"
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    plan = plan_shards(s.num_samples, s.shard_size, s.seed)
    todo = [(i, seeds) for i, seeds in enumerate(plan) if not shard_is_complete(shard_file(out_dir, i), seeds, key, manifest)]
    # Shards beyond the plan (an earlier, larger num_samples) would leak into the evaluation: remove them.
    wanted = {shard_file(out_dir, i).name for i in range(len(plan))}
    for p in shard_paths(out_dir):
        if p.name not in wanted:
            p.unlink()
    write_resolved(cfg, out_dir)
    kept = len(plan) - len(todo)
    print(f"sampling {s.num_samples} images ({s.sampler}{'' if s.sampler == 'ddpm' else f'-{s.steps}'}) from "
          f"{ckpt.name}: {len(plan)} shards, {kept} already done")

    shas: dict[str, str] = {} if manifest.get("key") != key else dict(manifest.get("shards", {}))
    t0 = time.perf_counter()
    ray_startup = 0.0
    if todo:
        tr = time.perf_counter()
        ensure_ray(cfg)
        ray_startup = time.perf_counter() - tr
        use_gpu = s.use_gpu
        if use_gpu == "auto":
            use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        total_cpus = int(ray.cluster_resources().get("CPU", 1))
        # Never ask for more actors than the cluster can place at once: an actor waiting for resources would
        # hold its share of the shards forever.
        slots = int(ray.cluster_resources().get("GPU", 0)) if use_gpu else total_cpus
        workers = max(1, min(s.num_workers, len(todo), slots))
        if workers < s.num_workers and workers < len(todo):
            print(f"sample.num_workers: {s.num_workers} actors do not fit; using {workers}")
        threads = 1 if use_gpu else max(1, total_cpus // workers)
        Actor = ray.remote(num_cpus=threads if not use_gpu else 1, num_gpus=1 if use_gpu else 0)(ShardSampler)
        actors = [Actor.remote(str(ckpt), cfg.to_dict(), "cuda" if use_gpu else "cpu", threads)
                  for _ in range(workers)]
        pool = ray.util.ActorPool(actors)
        jobs = pool.map_unordered(
            lambda a, job: a.write_shard.remote(str(shard_file(out_dir, job[0])), job[1], key), todo)
        for name, sha, _ in tqdm(jobs, total=len(todo), desc="sample", unit="shard"):
            shas[name] = sha
            # The manifest is updated after every shard, so a killed run knows what it finished.
            write_json(manifest_path, {"key": key, "shards": shas, "complete": False})
        for a in actors:
            ray.kill(a)
    wall = time.perf_counter() - t0

    from .common import load_samples

    images, seeds = load_samples(out_dir)
    if len(images) != s.num_samples:
        raise StageError(f"{out_dir}: expected {s.num_samples} samples, found {len(images)}")
    grid = save_grid(images[: s.grid_size], out_dir / "grid.png")
    new = sum(len(seeds) for _, seeds in todo)
    summary = {
        "key": key,
        "complete": True,
        "count": int(len(images)),
        "shape": list(images.shape[1:]),
        "seeds": [int(seeds[0]), int(seeds[-1])],
        "sampler": s.sampler,
        "steps": cfg.diffusion.timesteps if s.sampler == "ddpm" else s.steps,
        "eta": s.eta,
        "use_ema": s.use_ema,
        "checkpoint": str(ckpt),
        "checkpoint_step": step,
        "shards": {p.name: shas.get(p.name) or _shard_sha(p) for p in shard_paths(out_dir)},
        "shards_reused": kept,
        "wall_s": round(wall, 2),
        "ray_startup_s": round(ray_startup, 2),
        "images_per_s": round(new / max(wall - ray_startup, 1e-9), 2) if new else None,
        "grid": str(grid),
    }
    write_json(manifest_path, summary)
    tracking.log_samples(cfg, summary, out_dir)
    return summary


def _shard_sha(path: Path) -> str:
    with np.load(path, allow_pickle=False) as z:
        return sha256_arrays(z["images"], z["seeds"])


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = stage_parser("Sample images from the newest checkpoint over Ray actors (Algorithm 2 or DDIM).")
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint folder from the train stage")
    p.add_argument("--out", default="samples", help="output folder (shards, grid.png, samples.json)")
    args = p.parse_args(argv)
    summary = run(config_from_args(args), args.checkpoints, args.out)
    print(f"{summary['count']} samples in {args.out} ({summary['shards_reused']} shards reused); grid: {summary['grid']}")
    return summary


if __name__ == "__main__":
    run_cli(main)
