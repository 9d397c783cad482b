"""Sharded sampling over Ray actors, shared by the ``sample`` stage and the ``sampler_table``.

Sample ``i`` uses seed ``sample.seed + i`` (see ddpm.samplers). Shards are planned from the seeds
(``sample.shard_size``) and each is sampled in batches of ``sample.batch_size``, with ``CPU_THREADS_PER_ACTOR``
intra-op threads on CPU, so the computation of every image is the same whatever the number of actors, and on one
machine the images are bitwise identical for any ``sample.num_workers`` (docs/pipeline.md "Reproducibility"). Another
``batch_size`` agrees within float round-off only: oneDNN picks kernels per batch size and thread count. A shard is
written atomically with its seeds and a key (:func:`sampling_key`) naming the checkpoint, the sampling code and the
sample section's result-defining settings.

Nothing crosses between the driver and the actors by path, so the actors may run on nodes that share no file system
with it (docs/scaling.md, section 8): the driver loads the checkpoint once and puts its weights in Ray's object store
(:class:`~ddpm.pretrained.Weights`), each actor builds its network from them, returns the images it sampled, and the
driver writes the shards. The actors (:class:`SamplerPool`, each a :class:`ShardSampler`) receive the frozen sample
settings themselves (Ray pickles them), and one pool serves several settings that share a network (the sampler
table's rows).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from ddpm.checkpoint import load_checkpoint, newest_checkpoint as _newest_checkpoint
from ddpm.perf import prepare_for_sampling
from ddpm.pretrained import Weights
from ddpm.samplers import img2img_sample, inpaint_sample, region_mask, sample as draw
from ddpm.solvers import SOLVERS
from tasks.lib.config import Config, SampleConfig, digest

from .cluster import ensure_ray
from .files import absolute, sha256_arrays, sha256_file, write_npz
from .images import to_model_range, to_uint8
from .samples import shard_file
from .workers import plan_workers

# Intra-op threads of each CPU actor, the same whatever the number of actors: oneDNN picks kernels by thread count
# too, and 1 vs 2 threads changed the last bits of the samples on an AMD EPYC (batch 8, DDIM-100: max abs diff
# 2.8e-6), so the former cores // actors made the images depend on sample.num_workers. More cores are used through
# more actors; 1 is what the 2-core default (2 actors) always had, and small networks gain little from threads.
CPU_THREADS_PER_ACTOR = 1
# The sample section's keys a ShardSampler's network is built with (the rest only say how it samples): actors of
# one SamplerPool can serve several sampling settings (the sampler table's rows) when these agree.
NETWORK_KEYS = ("use_ema", "precision", "channels_last", "compile")


def newest_checkpoint(ckpt_dir: os.PathLike | str) -> Path:
    """The newest readable checkpoint of a train-stage output folder (skipped corrupt ones are printed)."""
    return _newest_checkpoint(ckpt_dir, warn=print)


def checkpoint_step(ckpt: Path) -> int:
    """The training step of a checkpoint file (``ckpt_00001500.pt`` -> 1500)."""
    return int(ckpt.stem.split("_")[1])


def sampling_code_sha256() -> str:
    """Content hash of the code that turns a checkpoint and seeds into images: the library (ddpm/), this module and
    the image conversions it uses. An edited sampler step must not reuse shards drawn by the old one."""
    here = Path(__file__).resolve().parent
    files = sorted((here.parents[1] / "ddpm").glob("*.py")) + [here / "sampling.py", here / "images.py"]
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.parent.name}/{f.name}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def sampling_key(settings: SampleConfig, ckpt: Path, inputs_sha256: Optional[str] = None) -> str:
    """Identifies what a shard was sampled with: the checkpoint's content, the sampling code and the sample section's
    result-defining settings (their marks, :meth:`~ddpm.config.Section.identity`: not the counts nor the
    execution-only settings, and a mode's settings only in that mode); in the img2img and inpaint modes also the
    content of the input images, and for a diffusers solver the diffusers version (its update rule is their code)."""
    blob: dict[str, Any] = {"checkpoint_sha256": sha256_file(ckpt), "code_sha256": sampling_code_sha256(),
                            "sample": settings.identity()}
    if settings.mode != "generate":
        blob["inputs_sha256"] = inputs_sha256
    if settings.sampler in SOLVERS:
        blob["diffusers"] = importlib.metadata.version("diffusers")
    return digest(blob)


def plan_shards(num_samples: int, shard_size: int, base_seed: int) -> list[list[int]]:
    """Seeds of each shard: shard k holds samples k*shard_size ... (k+1)*shard_size - 1."""
    return [list(range(base_seed + lo, base_seed + min(lo + shard_size, num_samples)))
            for lo in range(0, num_samples, shard_size)]


def shard_inputs(inputs: Optional[np.ndarray], seeds: list[int], base_seed: int) -> Optional[np.ndarray]:
    """The input images of ``seeds`` (img2img, inpaint): sample ``seed`` starts from input ``(seed - base) mod N``."""
    if inputs is None:
        return None
    return inputs[[(seed - base_seed) % len(inputs) for seed in seeds]]


def check_same_network(built: SampleConfig, wanted: SampleConfig, what: str) -> None:
    """Refuse sample settings ``wanted`` that a network built for ``built`` cannot serve (a :data:`NETWORK_KEYS`
    differs); ``what`` names the holder in the message."""
    differ = [k for k in NETWORK_KEYS if getattr(wanted, k) != getattr(built, k)]
    if differ:
        raise ValueError(f"{what} built with other sample.{', sample.'.join(differ)}")


def sampling_weights(ckpt: os.PathLike | str, settings: SampleConfig) -> Weights:
    """The weights ``settings`` sample with (EMA or raw: ``sample.use_ema``) of checkpoint ``ckpt``, and its
    configs."""
    return Weights.from_state(load_checkpoint(ckpt), use_ema=settings.use_ema, source=str(ckpt))


class ShardSampler:
    """Holds one copy of the network; samples shards of seeds in batches. Used as a Ray actor or in-process.

    ``network``: the :class:`~ddpm.pretrained.Weights` to build it from (what a :class:`SamplerPool` hands its actors
    through the object store), or a checkpoint file (read here: in-process use). The network is built for
    ``settings`` (the sample section) once; :meth:`sample` and :meth:`sample_shard` take other settings (with the
    same :data:`NETWORK_KEYS`) to sample with them from the same copy."""

    def __init__(self, network: Weights | os.PathLike | str, settings: SampleConfig, device: str, threads: int):
        torch.set_num_threads(max(1, threads))
        self.settings = settings
        self.device = torch.device(device)
        weights = network if isinstance(network, Weights) else sampling_weights(network, settings)
        model, self.diffusion = weights.build()
        # speed switches (ddpm/perf.py): self.model is what the samplers call, possibly a compiled module
        self.model = prepare_for_sampling(model, self.device, precision=settings.precision,
                                          channels_last=settings.channels_last, compile=settings.compile)
        m = weights.model
        self.shape = (m["image_channels"], m["image_size"], m["image_size"])

    def ready(self) -> bool:
        """Called once by :class:`SamplerPool` to wait until the actor holds its network."""
        return True

    def sample(self, seeds: list[int], inputs: Optional[np.ndarray] = None,
               settings: Optional[SampleConfig] = None) -> np.ndarray:
        """uint8 [n, C, H, W] images for ``seeds``; ``inputs`` (uint8, one image per seed) in img2img/inpaint;
        ``settings``: sample with these instead of the ones the sampler was built with."""
        s = settings or self.settings
        check_same_network(self.settings, s, "this sampler's network was")
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

    def sample_shard(self, index: int, seeds: list[int], inputs: Optional[np.ndarray] = None,
                     settings: Optional[SampleConfig] = None) -> "SampledShard":
        """The images of one shard (``index`` in the plan, ``seeds``), with the seconds it took and the intra-op
        thread count it was sampled with (the images' last bits depend on it); the caller writes the file."""
        t0 = time.perf_counter()
        images = self.sample(seeds, inputs, settings)
        return SampledShard(index, images, np.asarray(seeds, dtype=np.int64), time.perf_counter() - t0,
                            torch.get_num_threads())


@dataclass(frozen=True)
class SampledShard:
    """What an actor returns for one shard: its index in the plan, uint8 images [n, C, H, W], int64 seeds [n], the
    seconds spent sampling and the intra-op threads used."""

    index: int
    images: np.ndarray
    seeds: np.ndarray
    seconds: float
    threads: int

    def write(self, out_dir: Path, key: str) -> tuple[str, str]:
        """Write the shard file (atomic) into ``out_dir`` with the sampling ``key``; returns its name and content
        hash."""
        path = write_npz(shard_file(out_dir, self.index), images=self.images, seeds=self.seeds, key=np.asarray(key))
        return path.name, sha256_arrays(self.images, self.seeds)


class SamplerPool:
    """Ray actors, each a :class:`ShardSampler` of checkpoint ``ckpt``: started once, used by one or several
    :meth:`write_shards` calls (the sampler table samples every row with the same actors), killed on close.

    The checkpoint is read here, once, and its weights put in Ray's object store: the actors build their networks
    from that one copy, wherever they run. ``jobs``: how many shards the first call has; never more actors than that,
    ``sample.num_workers``, or the cluster can place at once (an actor waiting for resources would hold its share of
    the shards forever)."""

    def __init__(self, cfg: Config, ckpt: Path, jobs: int):
        import ray

        s = cfg.sample
        self.settings, self.ckpt = s, absolute(ckpt)
        weights = sampling_weights(self.ckpt, s)  # before Ray starts: an unreadable checkpoint fails at once
        t0 = time.perf_counter()
        how = ensure_ray(cfg)
        self.ray_startup_s = time.perf_counter() - t0
        plan = plan_workers("sample", s.num_workers, s.use_gpu, ray.cluster_resources(),
                            threads=CPU_THREADS_PER_ACTOR, jobs=jobs)
        self.workers = plan.workers
        if plan.workers < s.num_workers and plan.workers < jobs:
            print(f"sample.num_workers: {s.num_workers} actors do not fit; using {plan.workers}")
        print(f"sampling actors: {plan.workers}, each "
              f"{'1 GPU' if plan.use_gpu else f'{plan.threads} CPU thread(s)'}; {how}", flush=True)
        Actor = ray.remote(num_cpus=plan.cpus, num_gpus=plan.gpus)(ShardSampler)
        network = ray.put(weights)  # one copy in the object store, whatever the number of actors
        self.actors = [Actor.remote(network, s, "cuda" if plan.use_gpu else "cpu", plan.threads)
                       for _ in range(plan.workers)]
        t1 = time.perf_counter()
        ray.get([a.ready.remote() for a in self.actors])  # a network that fails to build fails here, once
        self.actors_startup_s = time.perf_counter() - t1

    def check(self, settings: SampleConfig, ckpt: Path) -> None:
        """Refuse settings these actors cannot sample: another checkpoint or another network set-up."""
        if absolute(ckpt) != self.ckpt:
            raise ValueError(f"this sampler pool holds {self.ckpt}, not {absolute(ckpt)}")
        check_same_network(self.settings, settings, "this sampler pool's networks were")

    def write_shards(self, settings: SampleConfig, out_dir: Path, todo: list[tuple[int, list[int]]], key: str,
                     inputs: Optional[np.ndarray] = None) -> Iterator[tuple[str, str, float, int]]:
        """Sample the shards ``todo`` (index, seeds) with ``settings`` on the actors and write each into ``out_dir``
        here, as it comes back; yields (file name, content hash, seconds inside the actor, its intra-op threads), in
        the order the shards finish."""
        import ray

        self.check(settings, self.ckpt)
        pool = ray.util.ActorPool(self.actors)
        done = pool.map_unordered(
            lambda a, job: a.sample_shard.remote(job[0], job[1], shard_inputs(inputs, job[1], settings.seed),
                                                 settings), todo)
        return ((*shard.write(out_dir, key), shard.seconds, shard.threads) for shard in done)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self) -> "SamplerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
