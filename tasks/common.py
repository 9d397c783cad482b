"""What every stage shares: the command-line frame, user-facing errors, atomic file writes, the dataset
artifact format, devices and the Ray connection."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ddpm.checkpoint import CheckpointError, atomic_write_bytes
from ddpm.config import Config, ConfigError, load_config


class StageError(RuntimeError):
    """A problem the user can fix (missing file, bad input); its message is shown as one line, no traceback."""


class DataError(StageError):
    """A dataset file that is missing, unreadable or malformed; the message names the file."""


USER_ERRORS = (ConfigError, CheckpointError, StageError)


# -- command line -------------------------------------------------------------------------------------------------
def stage_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted key, e.g. --set train.steps=100 (repeatable)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.params, args.overrides)


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> None:
    """Run a stage's ``main``; turn user errors into one line on stderr and exit code 2."""
    try:
        main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# -- atomic writes --------------------------------------------------------------------------------------------------
def write_json(path: os.PathLike | str, obj: Any) -> Path:
    path = Path(path)
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"))
    return path


def write_npz(path: os.PathLike | str, **arrays: np.ndarray) -> Path:
    """``np.savez`` through a temporary file and rename (no partial files)."""
    path = Path(path)

    def write(f):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        f.write(buf.getvalue())

    atomic_write_bytes(path, write)
    return path


def read_json(path: os.PathLike | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{path}: not valid JSON ({e})") from None


def sha256_arrays(*arrays: np.ndarray) -> str:
    """Content hash of arrays (dtype, shape and bytes), independent of the file container."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def sha256_file(path: os.PathLike | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# -- the dataset artifact -------------------------------------------------------------------------------------------
# A folder holding train.npz and holdout.npz (images: uint8 [N, C, H, W]; labels: int64 [N], -1 when unlabeled)
# and dataset.json (count, shape, source, num_classes, content hash).
@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]; -1 where unknown


@dataclass(frozen=True)
class DatasetArtifact:
    train: Split
    holdout: Split
    meta: dict[str, Any]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["shape"])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes") or 0)


def _load_split(path: Path) -> Split:
    if not path.is_file():
        raise DataError(f"{path}: dataset split not found; run the fetch stage first")
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except Exception as e:
        raise DataError(f"{path}: unreadable dataset split ({type(e).__name__}: {e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (images.shape[0],):
        raise DataError(f"{path}: expected uint8 images [N, C, H, W] and labels [N], got {images.dtype} "
                        f"{images.shape} and {labels.shape}")
    return Split(images, labels.astype(np.int64))


def load_dataset(folder: os.PathLike | str) -> DatasetArtifact:
    folder = Path(folder)
    meta = read_json(folder / "dataset.json")
    return DatasetArtifact(_load_split(folder / "train.npz"), _load_split(folder / "holdout.npz"), meta)


def to_model_range(images_uint8) -> "torch.Tensor":  # noqa: F821
    """uint8 [N, C, H, W] -> float32 in [-1, 1], the scale the paper trains on (Sec. 4)."""
    import torch

    return torch.as_tensor(images_uint8).float().div(127.5).sub(1.0)


def to_uint8(x) -> np.ndarray:
    """float [-1, 1] [N, C, H, W] tensor -> uint8 array, rounding to the nearest level."""
    import torch

    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(dtype=torch.uint8).cpu().numpy()


def grid_image(images: np.ndarray, min_cell: int = 32) -> np.ndarray:
    """uint8 images [N, C, H, W] -> one uint8 [H', W', 3] grid (torchvision's make_grid), upscaled by nearest
    neighbour so that 8x8 digits stay legible."""
    import math

    import torch
    from torchvision.utils import make_grid

    x = torch.from_numpy(np.ascontiguousarray(images))
    scale = max(1, math.ceil(min_cell / x.shape[-1]))
    x = x.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    grid = make_grid(x, nrow=max(1, math.ceil(math.sqrt(len(x)))), padding=2, pad_value=255)
    return grid.permute(1, 2, 0).contiguous().numpy()


# -- devices and Ray ------------------------------------------------------------------------------------------------
def want_gpu(use_gpu: bool | str) -> bool:
    import torch

    if use_gpu == "auto":
        return torch.cuda.is_available()
    if use_gpu and not torch.cuda.is_available():
        raise StageError("use_gpu: true but no CUDA device is visible; set it to auto or false")
    return bool(use_gpu)


def ensure_ray(cfg: Config) -> str:
    """Connect to ``RAY_ADDRESS`` (or ``ray.address``) if set, else start a local Ray sized to this machine.

    Returns a short description. Safe to call when Ray is already initialised.
    """
    import ray

    if ray.is_initialized():
        return "ray already initialised"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS") or cfg.ray.address
    if address:
        ray.init(address=address, log_to_driver=True)
        return f"joined Ray cluster at {address}"
    ray.init(
        num_cpus=cfg.ray.num_cpus or os.cpu_count(),
        include_dashboard=False,
        object_store_memory=cfg.ray.object_store_mb * 1024 * 1024,
        log_to_driver=True,
        configure_logging=False,
        _node_ip_address="127.0.0.1",  # local Ray stays on loopback
    )
    return f"started local Ray with {ray.cluster_resources().get('CPU', 0):.0f} CPUs"


def absolute(path: os.PathLike | str) -> Path:
    """Absolute path: Ray workers change their working directory."""
    return Path(path).expanduser().resolve()


# -- the samples artifact -------------------------------------------------------------------------------------------
# A folder of shard_NNNNN.npz files (images: uint8 [n, C, H, W]; seeds: int64 [n], sample i has seed base + i),
# plus samples.json (count, shape, sampler, checkpoint) and grid.png.
def shard_paths(folder: os.PathLike | str) -> list[Path]:
    return sorted(Path(folder).glob("shard_*.npz"))


def load_samples(folder: os.PathLike | str) -> tuple[np.ndarray, np.ndarray]:
    """All samples of a sample-stage output, ordered by seed: (uint8 images [N, C, H, W], int64 seeds [N])."""
    folder = Path(folder)
    paths = shard_paths(folder)
    if not paths:
        raise DataError(f"{folder}: no sample shards (shard_*.npz); run the sample stage first")
    images, seeds = [], []
    for p in paths:
        try:
            with np.load(p, allow_pickle=False) as z:
                images.append(z["images"])
                seeds.append(z["seeds"])
        except Exception as e:
            raise DataError(f"{p}: unreadable sample shard ({type(e).__name__}: {e})") from None
    imgs, sds = np.concatenate(images), np.concatenate(seeds).astype(np.int64)
    order = np.argsort(sds, kind="stable")
    return imgs[order], sds[order]
