"""Stage `sample`: many samples from a trained checkpoint, in fixed-size shards spread over Ray actors.

Sample ``i`` uses seed ``sample.seed + i``; shards are planned from the seeds and sampled in batches of
``sample.batch_size`` with one intra-op thread per CPU actor, so on one machine the images are bitwise identical
for any ``sample.num_workers`` (docs/pipeline.md "Reproducibility"; the actors are :mod:`tasks.lib.sampling`'s, shared with the
sampler table). A rerun keeps every finished shard whose key (checkpoint, sampling code, result-defining sample
settings) and content match and samples only the missing ones.

``sample.mode`` picks what a sample is: ``generate`` (from noise), ``img2img`` (held-out image ``i mod N`` noised
to t = ``sample.strength`` * T and denoised) or ``inpaint`` (the ``sample.mask`` region of that image redrawn,
its other pixels kept exactly; RePaint resampling with ``sample.jump_length``/``jump_n_sample``). The last two
read the held-out images of ``--data``. The command line reports the samples to the trackers
(tasks/lib/callbacks.py).

    python -m tasks.sample --params params.yaml --checkpoints checkpoints --out samples
    python -m tasks.sample --set sample.mode=inpaint --data data/dataset --out samples_inpaint
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ddpm.checkpoint import atomic_write_bytes
from ddpm.samplers import network_evaluations
from tasks.lib.config import Config, load_config, write_resolved

from .lib.callbacks import after_stage
from .lib.cli import run_cli, stage_parser
from .lib.errors import DataError, StageError
from .lib.files import absolute, check_writable, read_json, sha256_arrays, write_json
from .lib.images import grid_image
from .lib.inputs import check_for_dvc_stage
from .lib.samples import SampleShards, seed_positions, shard_file, shard_paths
from .lib.sampling import (
    SamplerPool,
    ShardSampler,
    checkpoint_step,
    newest_checkpoint,
    plan_shards,
    sampling_key,
    shard_inputs,
)
from .lib.workers import check_local_gpus, local_device


def input_images(cfg: Config, data_dir) -> tuple[Optional[np.ndarray], Optional[str]]:
    """The held-out images the img2img and inpaint modes start from, and their content hash; (None, None) when
    generating. Sample i (seed ``sample.seed + i``) starts from held-out image ``i mod N``."""
    if cfg.sample.mode == "generate":
        return None, None
    from .lib.shards import open_dataset

    if data_dir is None:
        raise StageError(f"sample.mode: {cfg.sample.mode} starts from held-out images; pass --data (the fetch "
                         "stage's dataset folder)")
    # The whole held-out split (sample i starts from image i mod N): the official test split or data.holdout_fraction
    # of the data, held as uint8.
    holdout = open_dataset(data_dir).holdout.read_all().images
    if len(holdout) == 0:
        raise DataError(f"{data_dir}: the held-out split is empty; sample.mode {cfg.sample.mode} needs images")
    if tuple(holdout.shape[1:]) != cfg.data.shape:
        raise DataError(f"{data_dir}: held-out images are {'x'.join(map(str, holdout.shape[1:]))}, the params' "
                        f"data shape is {'x'.join(map(str, cfg.data.shape))}")
    return holdout, sha256_arrays(holdout)


# -- which shards are done ------------------------------------------------------------------------------------------
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


def shards_to_sample(out_dir: Path, plan: list[list[int]], key: str,
                     manifest: dict[str, Any]) -> list[tuple[int, list[int]]]:
    """The shards of ``plan`` (index, seeds) not finished in ``out_dir``; shards beyond the plan (an earlier, larger
    num_samples) are removed, so that they cannot leak into the evaluation."""
    todo = [(i, seeds) for i, seeds in enumerate(plan)
            if not shard_is_complete(shard_file(out_dir, i), seeds, key, manifest)]
    wanted = {shard_file(out_dir, i).name for i in range(len(plan))}
    for p in shard_paths(out_dir):
        if p.name not in wanted:
            p.unlink()
    return todo


def _shard_sha(path: Path) -> str:
    with np.load(path, allow_pickle=False) as z:
        return sha256_arrays(z["images"], z["seeds"])


# -- sampling -------------------------------------------------------------------------------------------------------
def sample_missing(cfg: Config, ckpt: Path, out_dir: Path, todo: list[tuple[int, list[int]]], key: str,
                   inputs: Optional[np.ndarray], shas: dict[str, str]) -> dict[str, Any]:
    """Sample the shards ``todo`` over Ray actors (they return images; the shards are written here, atomically),
    updating the manifest after every shard (a killed run knows what it finished) and ``shas`` (name -> content
    hash); returns the timings and the actors' layout."""
    from tqdm.auto import tqdm

    stats: dict[str, Any] = {"ray_startup_s": 0.0, "workers": 0, "shard_seconds": [], "actor_threads": set()}
    if not todo:
        return stats
    with SamplerPool(cfg, ckpt, len(todo)) as pool:
        stats.update(ray_startup_s=pool.ray_startup_s, workers=pool.workers)
        jobs = pool.write_shards(cfg.sample, out_dir, todo, key, inputs)
        for name, sha, secs, n_threads in tqdm(jobs, total=len(todo), desc="sample", unit="shard"):
            shas[name] = sha
            stats["shard_seconds"].append(secs)  # time inside the actor: sampling without start-up
            stats["actor_threads"].add(n_threads)  # intra-op threads the actors sampled with, as they report them
            write_json(out_dir / "samples.json", {"key": key, "shards": shas, "complete": False})
    return stats


def grid_images(cfg: Config, images, seeds: np.ndarray, ckpt: Path,
                inputs: Optional[np.ndarray] = None) -> np.ndarray:
    """Images of seeds ``sample.grid_seed`` .. +``grid_size``-1, the training grids' seeds: taken from the samples
    (``images[i]`` has the i-th of the sorted ``seeds``; an array or a :class:`~tasks.lib.samples.SampleShards`)
    when they hold them all, else sampled here with the same settings."""
    s = cfg.sample
    want = np.arange(s.grid_seed, s.grid_seed + s.grid_size)
    pos = seed_positions(seeds, want)
    if pos is not None:
        return np.stack([images[int(i)] for i in pos])
    device = local_device(s.use_gpu, "sample.use_gpu")
    sampler = ShardSampler(str(absolute(ckpt)), s, str(device), torch.get_num_threads())
    return sampler.sample(want.tolist(), shard_inputs(inputs, want.tolist(), s.seed))


def save_grid(images: np.ndarray, path: Path) -> Path:
    """The samples as one square-ish PNG grid (the same picture MLflow shows), written atomically."""
    from PIL import Image

    atomic_write_bytes(path, lambda f: Image.fromarray(grid_image(images, min_side=512)).save(f, format="png"))
    return path


def describe(cfg: Config, ckpt: Path, samples: SampleShards, shas: dict[str, str]) -> dict[str, Any]:
    """What samples.json says of the samples: count, seeds, the sampler and its settings, the checkpoint, shards."""
    s, out_dir = cfg.sample, samples.folder
    return {
        "complete": True,
        "count": len(samples),
        "shape": list(samples.shape),
        "seeds": [int(samples.seeds[0]), int(samples.seeds[-1])],
        "sampler": s.sampler,
        "mode": s.mode,
        **({"strength": s.strength} if s.mode == "img2img" else {}),
        **({"mask": s.mask, "jump_length": s.jump_length, "jump_n_sample": s.jump_n_sample}
           if s.mode == "inpaint" else {}),
        "steps": cfg.diffusion.timesteps if s.sampler == "ddpm" else s.steps,
        "eta": s.eta,
        "timestep_spacing": s.timestep_spacing,
        "network_evaluations": network_evaluations(s.sampler, cfg.diffusion.timesteps, s.steps),
        "use_ema": s.use_ema,
        "checkpoint": str(ckpt),
        "checkpoint_step": checkpoint_step(ckpt),
        "shards": {p.name: shas.get(p.name) or _shard_sha(p) for p in shard_paths(out_dir)},
    }


def run(cfg: Config, ckpt_dir, out_dir, data_dir=None) -> dict[str, Any]:
    """Sample ``sample.num_samples`` x ``evaluate.repeats`` images into ``out_dir`` (shards, grid.png of the grid
    seeds, samples.json); returns samples.json's content. ``data_dir`` (the fetch stage's dataset) is read only in
    the img2img and inpaint modes (``sample.mode``)."""
    s = cfg.sample
    check_local_gpus(cfg, "sample")  # before anything is written or Ray starts
    out_dir = absolute(out_dir)
    check_writable(out_dir)
    ckpt = newest_checkpoint(ckpt_dir)
    inputs, inputs_sha = input_images(cfg, data_dir)
    key = sampling_key(s, ckpt, inputs_sha)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_json(out_dir / "samples.json") if (out_dir / "samples.json").is_file() else {}
    # evaluate.repeats k: k disjoint seed ranges of num_samples each (seeds seed .. seed + k*num_samples - 1).
    total = s.num_samples * cfg.evaluate.repeats
    plan = plan_shards(total, s.shard_size, s.seed)
    todo = shards_to_sample(out_dir, plan, key, manifest)
    write_resolved(cfg, out_dir)
    print(f"sampling {total} images ({s.sampler}{'' if s.sampler == 'ddpm' else f'-{s.steps}'}"
          f"{'' if s.mode == 'generate' else f', {s.mode}'}) from "
          f"{ckpt.name}: {len(plan)} shards, {len(plan) - len(todo)} already done")

    shas: dict[str, str] = {} if manifest.get("key") != key else dict(manifest.get("shards", {}))
    t0 = time.perf_counter()
    stats = sample_missing(cfg, ckpt, out_dir, todo, key, inputs, shas)
    wall = time.perf_counter() - t0

    samples = SampleShards(out_dir)  # the shards' seeds now, a shard's images when the grid needs them
    if len(samples) != total:
        raise StageError(f"{out_dir}: expected {total} samples, found {len(samples)}")
    grid = save_grid(grid_images(cfg, samples, samples.seeds, ckpt, inputs), out_dir / "grid.png")
    new, workers = sum(len(seeds) for _, seeds in todo), stats["workers"]
    summary = {
        "key": key,
        **describe(cfg, ckpt, samples, shas),
        "shards_reused": len(plan) - len(todo),
        "wall_s": round(wall, 2),
        "ray_startup_s": round(stats["ray_startup_s"], 2),
        "workers": workers,
        "actor_threads": sorted(stats["actor_threads"]),  # [] when every shard was reused
        # per actor, start-up excluded
        "sampling_s": round(sum(stats["shard_seconds"]) / workers, 2) if workers else 0.0,
        "images_per_s": round(new / max(wall - stats["ray_startup_s"], 1e-9), 2) if new else None,
        "grid": str(grid),
    }
    write_json(out_dir / "samples.json", summary)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = stage_parser("Sample images from the newest checkpoint over Ray actors (Algorithm 2, DDIM or a solver).")
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint folder from the train stage")
    p.add_argument("--out", default="samples", help="output folder (shards, grid.png, samples.json)")
    p.add_argument("--data", default=None,
                   help="dataset folder (fetch output) whose held-out images sample.mode img2img/inpaint start from")
    args = p.parse_args(argv)
    cfg = load_config(args.params, args.overrides)
    check_for_dvc_stage(cfg)  # under `dvc repro`: the inputs of this stage and the later ones, before any compute
    summary = run(cfg, args.checkpoints, args.out, args.data)
    after_stage("sample", cfg, samples=args.out, samples_record=Path(args.out) / "samples.json")
    print(f"{summary['count']} samples in {args.out} ({summary['shards_reused']} shards reused); grid: {summary['grid']}")
    return summary


if __name__ == "__main__":
    run_cli(main)
