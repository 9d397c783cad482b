"""Which devices a stage's work runs on, and how many workers: ``use_gpu`` resolved (one rule for every stage) and
the Ray workers of training and sampling laid out over what the cluster has (:func:`plan_workers`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Union

from .errors import StageError

UseGpu = Union[bool, Literal["auto"]]


def resolve_gpu(setting: UseGpu, gpus: float, key: str, where: str) -> bool:
    """A ``use_gpu`` setting resolved against the ``gpus`` that ``where`` has: ``auto`` takes a GPU when there is
    one; ``true`` with none is refused (a worker would wait for it forever). ``key`` names the setting."""
    if setting == "auto":
        return gpus >= 1
    if setting and gpus <= 0:
        raise StageError(f"{key}: true but {where} has no GPU; set it to auto or false")
    return bool(setting)


def local_gpus() -> int:
    """CUDA devices this process sees."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_device(setting: UseGpu, key: str) -> "torch.device":  # noqa: F821
    """The device of work done in this process (no Ray): ``cuda`` or ``cpu`` by :func:`resolve_gpu`."""
    import torch

    gpu = resolve_gpu(setting, local_gpus(), key, "this machine")
    return torch.device("cuda" if gpu else "cpu")


def gpus_needed(workers: int, gpus_per_worker: float) -> int:
    """Whole GPUs for ``workers`` that each take a share ``gpus_per_worker`` (three of 0.3333 fit on one)."""
    return math.ceil(workers * gpus_per_worker - 1e-9)


def check_local_gpus(cfg, section: str, gpus_per_worker: float = 1.0) -> None:
    """Before a local Ray starts: ``<section>.use_gpu: true`` with more ``<section>.num_workers`` than this
    machine has GPUs would leave Ray waiting forever for GPUs that do not exist; say so instead.
    ``gpus_per_worker``: the share of a GPU each worker takes (``train.gpus_per_worker``; 0.5 fits two on one).

    A configured cluster (``RAY_ADDRESS`` or ``ray.address``) may have GPUs this machine lacks: not checked here.
    """
    sec = getattr(cfg, section)
    if sec.use_gpu is not True or os.environ.get("RAY_ADDRESS") or cfg.ray.address:
        return
    have = local_gpus()
    if gpus_needed(sec.num_workers, gpus_per_worker) > have:
        each = "" if gpus_per_worker == 1 else f" of {gpus_per_worker:g} GPU each"
        raise StageError(f"{section}.num_workers: {sec.num_workers} GPU workers{each} asked (use_gpu: true) but this "
                         f"machine has {have} CUDA device(s); lower {section}.num_workers or set "
                         f"{section}.use_gpu: auto")


@dataclass(frozen=True)
class WorkerPlan:
    """How a stage's Ray workers are laid out: how many, on which device, what each reserves, its threads."""

    workers: int
    use_gpu: bool
    cpus: float  # CPUs each worker reserves
    gpus: float  # the share of a GPU each worker takes (0 on the CPU)
    threads: int  # intra-op threads of each worker

    @property
    def resources(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.use_gpu else {})}

    def each(self) -> str:
        """What each worker holds, in words."""
        return f"{self.gpus:g} GPU" if self.use_gpu else f"{self.cpus:g} CPU(s)"


def plan_workers(section: str, num_workers: int, use_gpu: UseGpu, cluster: Mapping[str, float], *,
                 gpus_per_worker: float = 1.0, threads: Optional[int] = None, jobs: Optional[int] = None,
                 spare_cpu: bool = False) -> WorkerPlan:
    """Lay ``num_workers`` workers of the ``section`` (``train``, ``sample``) over the ``cluster``'s resources
    (``ray.cluster_resources()``).

    ``threads``: the intra-op threads (and CPUs) of each CPU worker, fixed (the samplers: the images' last bits
    depend on it); None shares the cluster's CPUs out (training). ``jobs``: the work comes in this many pieces, so
    fewer workers than asked are started when fewer fit or are needed (the samplers); without it, workers that do not
    fit are an error (training: the batch is split over exactly ``num_workers``). ``spare_cpu``: leave one CPU
    unreserved (Ray Data's read tasks need one the workers do not hold).
    """
    cpus, gpus = int(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    gpu = resolve_gpu(use_gpu, gpus, f"{section}.use_gpu", "the Ray cluster")
    share = gpus_per_worker if gpu else 0.0
    if jobs is not None:
        slots = int(gpus // gpus_per_worker) if gpu else cpus // (threads or 1)
        workers = max(1, min(num_workers, jobs, slots))
    else:
        workers = num_workers
        if not gpu and workers > cpus:
            raise StageError(f"{section}.num_workers: {workers} workers need {workers} CPUs, the Ray cluster has "
                             f"{cpus}")
        if gpu and gpus_needed(workers, share) > int(gpus):
            raise StageError(f"{section}.num_workers: {workers} GPU workers of {share:g} GPU each need "
                             f"{gpus_needed(workers, share)} GPUs, the Ray cluster has {int(gpus)}; lower "
                             f"{section}.num_workers or set {section}.use_gpu: auto")
    if gpu:
        per_worker: float = 1
    elif threads is not None:
        per_worker = threads
    elif spare_cpu:
        per_worker = max(1, cpus - 1) / workers if cpus > 1 else 0.5
    else:
        per_worker = max(1, cpus // workers)
    return WorkerPlan(workers, gpu, per_worker, share, 1 if gpu else threads or max(1, int(per_worker)))
