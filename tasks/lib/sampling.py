"""Sharded sampling over Ray actors: the machinery of the ``sample`` stage, shared with ``sampler_table``.

Sample ``i`` uses seed ``sample.seed + i`` (see ddpm.samplers). Shards are planned from the seeds
(``sample.shard_size``) and each is sampled in batches of ``sample.batch_size``, with ``CPU_THREADS_PER_ACTOR``
intra-op threads on CPU, so the computation of every image is the same whatever the number of actors, and on one
machine the images are bitwise identical for any ``sample.num_workers`` (docs/pipeline.md "Reproducibility"). Another
``batch_size`` agrees within float round-off only: oneDNN picks kernels per batch size and thread count. A shard is
written atomically with its seeds and a key naming the checkpoint and sampler settings; a rerun keeps every finished
shard whose key and content match and samples only the missing ones.

``sample.mode`` picks what a sample is: ``generate`` (from noise), ``img2img`` (held-out image ``i mod N`` noised
to t = ``sample.strength`` * T and denoised) or ``inpaint`` (the ``sample.mask`` region of that image redrawn,
its other pixels kept exactly; RePaint resampling with ``sample.jump_length``/``jump_n_sample``). The last two
read the held-out images of ``--data``.

    python -m tasks.sample --params params.yaml --checkpoints checkpoints --out samples
    python -m tasks.sample --set sample.mode=inpaint --data data/dataset --out samples_inpaint
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ddpm.checkpoint import newest_checkpoint as _newest_checkpoint
from tasks.lib.config import Config, write_resolved
from ddpm.perf import prepare_for_sampling
from ddpm.pretrained import load_model
from ddpm.samplers import img2img_sample, inpaint_sample, network_evaluations, region_mask, sample as draw
from ddpm.solvers import SOLVERS

from .common import (
    DataError,
    StageError,
    absolute,
    check_local_gpus,
    check_writable,
    ensure_ray,
    read_json,
    seed_positions,
    sha256_arrays,
    sha256_file,
    shard_paths,
    to_uint8,
    write_json,
    write_npz,
)

SAMPLER_KEYS = ("sampler", "steps", "eta", "timestep_spacing", "variance", "clip_denoised", "use_ema", "seed")
# Keys that matter only in their mode (sample.mode); generate-mode keys stay as they were, so its shards are kept.
MODE_KEYS = {"generate": (), "img2img": ("mode", "strength"),
             "inpaint": ("mode", "mask", "jump_length", "jump_n_sample")}
# Intra-op threads of each CPU actor, the same whatever the number of actors: oneDNN picks kernels by thread count
# too, and 1 vs 2 threads changed the last bits of the samples on an AMD EPYC (batch 8, DDIM-100: max abs diff
# 2.8e-6), so the former cores // actors made the images depend on sample.num_workers. More cores are used through
# more actors; 1 is what the 2-core default (2 actors) always had, and small networks gain little from threads.
CPU_THREADS_PER_ACTOR = 1


def newest_checkpoint(ckpt_dir: os.PathLike | str) -> Path:
    """The newest readable checkpoint of a train-stage output folder (skipped corrupt ones are printed)."""
    return _newest_checkpoint(ckpt_dir, warn=print)


def sampling_code_sha256() -> str:
    """Content hash of the code that turns a checkpoint and seeds into images: the library (ddpm/), this stage and
    the shared helpers it converts images with. An edited sampler step must not reuse shards drawn by the old one."""
    here = Path(__file__).resolve().parent
    files = sorted((here.parents[1] / "ddpm").glob("*.py")) + [here / "sampling.py", here / "common.py"]
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.parent.name}/{f.name}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def sampling_key(cfg: Config, ckpt: Path, step: int, inputs_sha256: Optional[str] = None) -> str:
    """Identifies what a shard was sampled with: the checkpoint's content, every sampler setting and the sampling
    code (and, in the img2img and inpaint modes, the mode's settings and the content of the input images)."""
    s = cfg.sample.model_dump()
    blob = {"checkpoint_sha256": sha256_file(ckpt), "step": step, "code_sha256": sampling_code_sha256(),
            **{k: s[k] for k in SAMPLER_KEYS},
            "timesteps": cfg.diffusion.timesteps, **{k: s[k] for k in MODE_KEYS[s["mode"]]}}
    if s["mode"] != "generate":
        blob["inputs_sha256"] = inputs_sha256
    if s["precision"] != "fp32":  # (keys of fp32 shards stay as they were)
        blob["precision"] = s["precision"]
    if s["sampler"] in SOLVERS:  # the solver's update rule is diffusers' code
        blob["diffusers"] = importlib.metadata.version("diffusers")
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


# The sample section's keys a ShardSampler's network is built with (the rest only say how it samples): actors of
# one SamplerPool can serve several sampling settings (the sampler table's rows) when these agree.
NETWORK_KEYS = ("use_ema", "precision", "channels_last", "compile")


def check_same_network(built, wanted, what: str) -> None:
    """Refuse sample settings ``wanted`` that a network built for ``built`` cannot serve (a :data:`NETWORK_KEYS`
    differs); ``what`` names the holder in the message."""
    differ = [k for k in NETWORK_KEYS if getattr(wanted, k) != getattr(built, k)]
    if differ:
        raise ValueError(f"{what} built with other sample.{', sample.'.join(differ)}")


class ShardSampler:
    """Holds one copy of the network; samples shards of seeds in batches. Used as a Ray actor or in-process.

    The network is built from ``params`` once; :meth:`sample` and :meth:`write_shard` take other params (the
    same :data:`NETWORK_KEYS`) to sample with other settings from the same copy."""

    def __init__(self, ckpt_path: str, params: dict[str, Any], device: str, threads: int):
        from tasks.lib.config import from_dict

        torch.set_num_threads(max(1, threads))
        self.cfg = from_dict(params)
        s = self.cfg.sample
        self.device = torch.device(device)
        model, self.diffusion, state = load_model(ckpt_path, use_ema=s.use_ema)
        # speed switches (ddpm/perf.py): self.model is what the samplers call, possibly a compiled module
        self.model = prepare_for_sampling(model, self.device, precision=s.precision, channels_last=s.channels_last,
                                          compile=s.compile)
        m = state["config"]["model"]
        self.shape = (m["image_channels"], m["image_size"], m["image_size"])

    def ready(self) -> bool:
        """Called once by :class:`SamplerPool` to wait until the actor holds its network."""
        return True

    def _settings(self, params: Optional[dict[str, Any]]):
        if params is None:
            return self.cfg.sample
        from tasks.lib.config import from_dict

        s = from_dict(params).sample
        check_same_network(self.cfg.sample, s, "this sampler's network was")
        return s

    def sample(self, seeds: list[int], inputs: Optional[np.ndarray] = None,
               params: Optional[dict[str, Any]] = None) -> np.ndarray:
        """uint8 [n, C, H, W] images for ``seeds``; ``inputs`` (uint8, one image per seed) in img2img/inpaint;
        ``params``: sample with these settings instead of the ones the sampler was built with."""
        from .common import to_model_range

        s = self._settings(params)
        if s.mode != "generate" and (inputs is None or len(inputs) != len(seeds)):
            raise ValueError(f"sample.mode {s.mode} needs one input image per seed")
        kw = {**s.kwargs(), "device": self.device}
        out = []
        for lo in range(0, len(seeds), s.batch_size):
            batch = seeds[lo:lo + s.batch_size]
            if s.mode == "img2img":
                x0 = to_model_range(np.array(inputs[lo:lo + s.batch_size]))  # a copy: Ray's arrays are read-only
                x = img2img_sample(self.model, self.diffusion, x0, batch, s.strength, **kw)
            elif s.mode == "inpaint":
                x0 = to_model_range(np.array(inputs[lo:lo + s.batch_size]))
                x = inpaint_sample(self.model, self.diffusion, x0, region_mask(s.mask, self.shape[1:]), batch,
                                   jump_length=s.jump_length, jump_n_sample=s.jump_n_sample, **kw)
            else:
                x = draw(self.model, self.diffusion, batch, self.shape, **kw)
            out.append(to_uint8(x))
        return np.concatenate(out)

    def write_shard(self, path: str, seeds: list[int], key: str, inputs: Optional[np.ndarray] = None,
                    params: Optional[dict[str, Any]] = None) -> tuple[str, str, float, int]:
        """Sample ``seeds`` into the shard file ``path``; returns its name, content hash, seconds and the intra-op
        thread count it was sampled with (the images' last bits depend on it)."""
        t0 = time.perf_counter()
        images = self.sample(seeds, inputs, params)
        seeds_arr = np.asarray(seeds, dtype=np.int64)
        write_npz(path, images=images, seeds=seeds_arr, key=np.asarray(key))
        return Path(path).name, sha256_arrays(images, seeds_arr), time.perf_counter() - t0, torch.get_num_threads()


class SamplerPool:
    """Ray actors, each a :class:`ShardSampler` of checkpoint ``ckpt``: started once, used by one or several
    :func:`sample_shards` calls (the sampler table samples every row with the same actors), killed on close.

    ``jobs``: how many shards the first call has; never more actors than that, ``sample.num_workers``, or the
    cluster can place at once (an actor waiting for resources would hold its share of the shards forever)."""

    def __init__(self, cfg: Config, ckpt: Path, jobs: int):
        import ray

        s = cfg.sample
        self.cfg, self.ckpt = cfg, absolute(ckpt)
        t0 = time.perf_counter()
        how = ensure_ray(cfg)
        self.ray_startup_s = time.perf_counter() - t0
        use_gpu = s.use_gpu
        if use_gpu == "auto":
            use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        total_cpus = int(ray.cluster_resources().get("CPU", 1))
        slots = int(ray.cluster_resources().get("GPU", 0)) if use_gpu else total_cpus // CPU_THREADS_PER_ACTOR
        self.workers = max(1, min(s.num_workers, jobs, slots))
        if self.workers < s.num_workers and self.workers < jobs:
            print(f"sample.num_workers: {s.num_workers} actors do not fit; using {self.workers}")
        threads = 1 if use_gpu else CPU_THREADS_PER_ACTOR  # never derived from `workers` (see CPU_THREADS_PER_ACTOR)
        print(f"sampling actors: {self.workers}, each {'1 GPU' if use_gpu else f'{threads} CPU thread(s)'}; {how}",
              flush=True)
        Actor = ray.remote(num_cpus=threads, num_gpus=1 if use_gpu else 0)(ShardSampler)
        self.actors = [Actor.remote(str(self.ckpt), cfg.to_dict(), "cuda" if use_gpu else "cpu", threads)
                       for _ in range(self.workers)]
        t1 = time.perf_counter()
        ray.get([a.ready.remote() for a in self.actors])  # a network that fails to load fails here, once
        self.actors_startup_s = time.perf_counter() - t1

    def check(self, cfg: Config, ckpt: Path) -> None:
        """Refuse settings these actors cannot sample: another checkpoint or another network set-up."""
        if absolute(ckpt) != self.ckpt:
            raise ValueError(f"this sampler pool holds {self.ckpt}, not {absolute(ckpt)}")
        check_same_network(self.cfg.sample, cfg.sample, "this sampler pool's networks were")

    def write_shards(self, cfg: Config, out_dir: Path, todo: list[tuple[int, list[int]]], key: str,
                     inputs: Optional[np.ndarray]):
        """Write the shards ``todo`` (index, seeds) with ``cfg``'s settings; yields what each ``write_shard``
        returns, in the order they finish."""
        import ray

        params = cfg.to_dict()
        pool = ray.util.ActorPool(self.actors)
        return pool.map_unordered(
            lambda a, job: a.write_shard.remote(str(shard_file(out_dir, job[0])), job[1], key,
                                                _shard_inputs(inputs, job[1], cfg.sample.seed), params), todo)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self) -> "SamplerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_grid(images: np.ndarray, path: Path) -> Path:
    """The samples as one square-ish PNG grid (the same picture MLflow shows), written atomically."""
    from PIL import Image

    from .common import atomic_write_bytes, grid_image

    atomic_write_bytes(path, lambda f: Image.fromarray(grid_image(images, min_side=512)).save(f, format="png"))
    return path


def input_images(cfg: Config, data_dir) -> tuple[Optional[np.ndarray], Optional[str]]:
    """The held-out images the img2img and inpaint modes start from, and their content hash; (None, None) when
    generating. Sample i (seed ``sample.seed + i``) starts from held-out image ``i mod N``."""
    if cfg.sample.mode == "generate":
        return None, None
    from .shards import open_dataset

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


def grid_images(cfg: Config, images, seeds: np.ndarray, ckpt: Path,
                inputs: Optional[np.ndarray] = None) -> np.ndarray:
    """Images of seeds ``sample.grid_seed`` .. +``grid_size``-1, the training grids' seeds: taken from the samples
    (``images[i]`` has the i-th of the sorted ``seeds``; an array or a :class:`~tasks.lib.common.SampleShards`)
    when they hold them all, else sampled here with the same settings."""
    s = cfg.sample
    want = np.arange(s.grid_seed, s.grid_seed + s.grid_size)
    pos = seed_positions(seeds, want)
    if pos is not None:
        return np.stack([images[int(i)] for i in pos])
    device = "cuda" if s.use_gpu is not False and torch.cuda.is_available() else "cpu"
    sampler = ShardSampler(str(absolute(ckpt)), cfg.to_dict(), device, torch.get_num_threads())
    return sampler.sample(want.tolist(), _shard_inputs(inputs, want.tolist(), s.seed))


def sample_shards(cfg: Config, ckpt_dir, out_dir, data_dir=None, pool: Optional[SamplerPool] = None) -> dict[str, Any]:
    """Sample ``sample.num_samples`` x ``evaluate.repeats`` images into ``out_dir`` (shards, grid.png of the grid
    seeds, samples.json); returns the summary.

    ``data_dir`` (the fetch stage's dataset) is read only in the img2img and inpaint modes (``sample.mode``).
    ``pool``: actors started earlier for the same checkpoint (:class:`SamplerPool`), kept open; without it this call
    starts its own and kills them at the end."""
    from tqdm.auto import tqdm

    s = cfg.sample
    check_local_gpus(cfg, "sample")  # before anything is written or Ray starts
    out_dir = absolute(out_dir)
    check_writable(out_dir)
    ckpt = newest_checkpoint(ckpt_dir)
    if pool is not None:
        pool.check(cfg, ckpt)
    step = int(ckpt.stem.split("_")[1])
    inputs, inputs_sha = input_images(cfg, data_dir)
    key = sampling_key(cfg, ckpt, step, inputs_sha)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "samples.json"
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    # evaluate.repeats k: k disjoint seed ranges of num_samples each (seeds seed .. seed + k*num_samples - 1).
    total = s.num_samples * cfg.evaluate.repeats
    plan = plan_shards(total, s.shard_size, s.seed)
    todo = [(i, seeds) for i, seeds in enumerate(plan) if not shard_is_complete(shard_file(out_dir, i), seeds, key, manifest)]
    # Shards beyond the plan (an earlier, larger num_samples) would leak into the evaluation: remove them.
    wanted = {shard_file(out_dir, i).name for i in range(len(plan))}
    for p in shard_paths(out_dir):
        if p.name not in wanted:
            p.unlink()
    write_resolved(cfg, out_dir)
    kept = len(plan) - len(todo)
    print(f"sampling {total} images ({s.sampler}{'' if s.sampler == 'ddpm' else f'-{s.steps}'}"
          f"{'' if s.mode == 'generate' else f', {s.mode}'}) from "
          f"{ckpt.name}: {len(plan)} shards, {kept} already done")

    shas: dict[str, str] = {} if manifest.get("key") != key else dict(manifest.get("shards", {}))
    t0 = time.perf_counter()
    ray_startup = 0.0
    shard_seconds: list[float] = []  # time inside write_shard: sampling without actor start-up
    actor_threads: set[int] = set()  # intra-op threads the actors sampled with, as they report them
    workers = 0
    if todo:
        own = pool is None
        if own:
            pool = SamplerPool(cfg, ckpt, len(todo))
            ray_startup = pool.ray_startup_s
        workers = pool.workers
        try:
            jobs = pool.write_shards(cfg, out_dir, todo, key, inputs)
            for name, sha, secs, n_threads in tqdm(jobs, total=len(todo), desc="sample", unit="shard"):
                shas[name] = sha
                shard_seconds.append(secs)
                actor_threads.add(n_threads)
                # The manifest is updated after every shard, so a killed run knows what it finished.
                write_json(manifest_path, {"key": key, "shards": shas, "complete": False})
        finally:
            if own:
                pool.close()
    wall = time.perf_counter() - t0

    from .common import SampleShards

    samples = SampleShards(out_dir)  # the shards' seeds now, a shard's images when the grid needs them
    seeds = samples.seeds
    if len(samples) != total:
        raise StageError(f"{out_dir}: expected {total} samples, found {len(samples)}")
    grid = save_grid(grid_images(cfg, samples, seeds, ckpt, inputs), out_dir / "grid.png")
    new = sum(len(seeds) for _, seeds in todo)
    summary = {
        "key": key,
        "complete": True,
        "count": len(samples),
        "shape": list(samples.shape),
        "seeds": [int(seeds[0]), int(seeds[-1])],
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
        "checkpoint_step": step,
        "shards": {p.name: shas.get(p.name) or _shard_sha(p) for p in shard_paths(out_dir)},
        "shards_reused": kept,
        "wall_s": round(wall, 2),
        "ray_startup_s": round(ray_startup, 2),
        "workers": workers,
        "actor_threads": sorted(actor_threads),  # [] when every shard was reused
        "sampling_s": round(sum(shard_seconds) / workers, 2) if workers else 0.0,  # per actor, start-up excluded
        "images_per_s": round(new / max(wall - ray_startup, 1e-9), 2) if new else None,
        "grid": str(grid),
    }
    write_json(manifest_path, summary)
    return summary


def _shard_inputs(inputs: Optional[np.ndarray], seeds: list[int], base_seed: int) -> Optional[np.ndarray]:
    if inputs is None:
        return None
    return inputs[[(seed - base_seed) % len(inputs) for seed in seeds]]


def _shard_sha(path: Path) -> str:
    with np.load(path, allow_pickle=False) as z:
        return sha256_arrays(z["images"], z["seeds"])
