"""The samples artifact, the sample stage's output folder: ``shard_NNNNN.npz`` files (images: uint8 [n, C, H, W];
seeds: int64 [n], sample i has seed base + i; key: what they were sampled with), plus samples.json (count, shape,
sampler, checkpoint) and grid.png. Written by the sample stage; read here, one shard at a time, by the evaluate stage,
the sampler table and the tracking layer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import DataError


def shard_file(folder: os.PathLike | str, index: int) -> Path:
    return Path(folder) / f"shard_{index:05d}.npz"


def seed_positions(seeds: np.ndarray, want: np.ndarray) -> Optional[np.ndarray]:
    """Where the seeds ``want`` are in the ascending ``seeds`` (a :class:`SampleShards`'s), or None when one is
    missing."""
    if len(seeds) == 0:
        return None
    pos = np.minimum(np.searchsorted(seeds, want), len(seeds) - 1)
    return pos if (seeds[pos] == want).all() else None


def shard_paths(folder: os.PathLike | str) -> list[Path]:
    return sorted(Path(folder).glob("shard_*.npz"))


class SampleShards:
    """The samples of a sample-stage output, read one shard at a time: ``len()``, ``shape`` (C, H, W), ``seeds``
    (int64, ascending) and ``[i]``, the uint8 image [C, H, W] with the i-th smallest seed.

    Only the seeds (and the first shard, for the images' shape) are read up front. An image read loads its shard
    and keeps that one shard (the last one read), so reading in order loads each shard once and holds one shard's
    images at a time: memory is flat in the number of samples (:func:`load_samples` holds them all)."""

    def __init__(self, folder: os.PathLike | str):
        self.folder = Path(folder)
        self.paths = shard_paths(self.folder)
        if not self.paths:
            raise DataError(f"{self.folder}: no sample shards (shard_*.npz); run the sample stage first")
        seeds, where = [], []
        for k, p in enumerate(self.paths):
            s = self._load(k, "seeds").astype(np.int64)
            seeds.append(s)
            where.append(np.stack([np.full(len(s), k), np.arange(len(s))], axis=1))
        first = self._load(0, "images")
        self.shape = tuple(int(d) for d in first.shape[1:])
        self._cached: tuple[int, np.ndarray] = (0, first)
        all_seeds = np.concatenate(seeds)
        self._order = np.argsort(all_seeds, kind="stable")  # concatenated shard rows -> seed order
        self.seeds = all_seeds[self._order]
        self._where = np.concatenate(where)[self._order]  # [N, 2]: (shard index, row) of the i-th smallest seed
        self.loads = 0  # shard files read for images since construction (a reader in seed order: each once at most)

    def _load(self, k: int, member: str) -> np.ndarray:
        p = self.paths[k]
        try:
            with np.load(p, allow_pickle=False) as z:
                return z[member]
        except Exception as e:
            raise DataError(f"{p}: unreadable sample shard ({type(e).__name__}: {e})") from None

    def images_of(self, k: int) -> np.ndarray:
        """The images of shard ``k`` (in file order), checked against the first shard's dtype and shape."""
        if self._cached[0] == k:
            return self._cached[1]
        images = self._load(k, "images")
        if images.dtype != np.uint8 or tuple(images.shape[1:]) != self.shape:
            raise DataError(f"{self.paths[k]}: images are {images.dtype} {tuple(images.shape[1:])}, the other "
                            f"shards' are uint8 {self.shape}")
        return images

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, i: int) -> np.ndarray:
        k, row = (int(v) for v in self._where[i])
        if self._cached[0] != k:
            self._cached, self.loads = (k, self.images_of(k)), self.loads + 1
        return self._cached[1][row]

    def all(self) -> np.ndarray:
        """Every image at once, in seed order (what :func:`load_samples` returns)."""
        return np.concatenate([self.images_of(k) for k in range(len(self.paths))])[self._order]


def load_samples(folder: os.PathLike | str) -> tuple[np.ndarray, np.ndarray]:
    """All samples of a sample-stage output, ordered by seed: (uint8 images [N, C, H, W], int64 seeds [N])."""
    samples = SampleShards(folder)
    return samples.all(), samples.seeds
