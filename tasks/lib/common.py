"""What every stage shares: the command-line frame, user-facing errors, atomic file writes, the dataset
artifact format, devices and the Ray connection."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ddpm.checkpoint import CheckpointError, atomic_write_bytes
from tasks.lib.config import Config, ConfigError, load_config


class StageError(RuntimeError):
    """A problem the user can fix (missing file, bad input); its message is shown as one line, no traceback."""


class DataError(StageError):
    """A dataset file that is missing, unreadable or malformed; the message names the file."""


USER_ERRORS = (ConfigError, CheckpointError, StageError)


# -- command line -------------------------------------------------------------------------------------------------
DEBUG_ENV = "DDPM_DEBUG"  # set to 1 (or pass --debug) to see the traceback behind an error message


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (no usage block), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def stage_parser(description: str) -> argparse.ArgumentParser:
    p = _OneLineParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted key, e.g. --set train.steps=100 (repeatable)",
    )
    p.add_argument("--debug", action="store_true", help="on an error, print the full traceback too")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config of a command line built by :func:`stage_parser` (a stage's is
    :func:`tasks.lib.inputs.stage_config`, which also checks the run's external inputs under ``dvc repro``)."""
    return load_config(args.params, args.overrides)


def check_writable(*folders: os.PathLike | str) -> None:
    """Create each output folder if needed and check that a file can be written there, before any work is done
    (a stage that trains for an hour and then cannot save has lost the hour). Raises :class:`StageError`."""
    import tempfile

    for folder in folders:
        folder = Path(folder)
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise StageError(f"{folder}: cannot hold output, {blocker} is a file, not a folder")
        created = [p for p in [folder, *folder.parents] if not p.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise StageError(f"{folder}: not a writable folder ({e.strerror or e}); choose a folder you can "
                             "write to") from None
        finally:  # leave no trace: a stage that fails later must not leave empty output folders behind
            for p in created:
                try:
                    p.rmdir()
                except OSError:
                    pass


def _os_error_line(e: OSError) -> str:
    """An OSError as "path: what went wrong", with a hint for the common unwritable-output case."""
    where = e.filename if e.filename is not None else "file system"
    what = e.strerror or str(e) or type(e).__name__
    unwritable = "; choose a folder you can write to"
    hint = {1: unwritable, 13: unwritable, 30: "; choose a folder on a writable file system", 28: "; free some space",
            20: "; a path component is a file, not a folder"}.get(e.errno or 0, "")
    return f"{where}: {what}{hint}"


# Set by the train-eval flow for a stage's `dvc repro` (flows/workspace.py repro): the file this command creates when it
# starts, so the flow knows from the stage itself whether DVC ran it or restored its outputs from the run-cache.
STARTED_ENV = "DDPM_STAGE_STARTED"


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> None:
    """Run a stage's ``main``; turn user errors into one line on stderr and exit code 2.

    User errors are the project's own (:class:`ConfigError`, :class:`CheckpointError`, :class:`StageError`) and
    file-system errors (an output folder that is not writable, a full disk). ``--debug`` (or ``DDPM_DEBUG=1``)
    prints the traceback before the line; anything else is a bug and keeps Python's traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    started = os.environ.pop(STARTED_ENV, "")  # the train-eval flow learns that this command ran (not run-cached)
    if started:
        Path(started).touch()
    try:
        main(argv)
    except USER_ERRORS + (OSError,) as e:
        if debug:
            import traceback

            traceback.print_exc()
        line = _os_error_line(e) if isinstance(e, OSError) else str(e)
        print(f"error: {' '.join(line.split())}", file=sys.stderr)
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
# The fetch stage's folder: each split as Parquet shards plus a dataset.json manifest (tasks/lib/shards.py).
@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]; -1 where unknown


class DatasetMeta:
    """What a dataset's manifest (``meta``, its dataset.json) says of its images."""

    meta: dict[str, Any]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["shape"])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes") or 0)


@dataclass(frozen=True)
class DatasetArtifact(DatasetMeta):
    """A dataset read whole into memory: for the consumers that need it so and are small (the classifier)."""

    train: Split
    holdout: Split
    meta: dict[str, Any]


def to_model_range(images_uint8) -> "torch.Tensor":  # noqa: F821
    """uint8 [N, C, H, W] -> float32 in [-1, 1], the scale the paper trains on (Sec. 4)."""
    import torch

    return torch.as_tensor(images_uint8).float().div(127.5).sub(1.0)


def to_uint8(x) -> np.ndarray:
    """float [-1, 1] [N, C, H, W] tensor -> uint8 array, rounding to the nearest level."""
    import torch

    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(dtype=torch.uint8).cpu().numpy()


def grid_image(images: np.ndarray, min_cell: int = 32, min_side: int = 0, aspect: float = 1.0) -> np.ndarray:
    """uint8 images [N, C, H, W] -> one uint8 [H', W', 3] grid (torchvision's make_grid), upscaled by nearest
    neighbour so that each cell is at least ``min_cell`` px and the grid at least ``min_side`` px wide (8x8 digits
    stay legible; MLflow shows its images at their size), with a white gutter that grows with the scale.

    ``aspect`` is the grid's width over its height in cells: 1 is square-ish (ceil(sqrt(N)) columns), 4 a strip
    (16 images: 2 rows of 8), the shape that fits under the run name in MLflow's image cards."""
    import math

    import torch
    from torchvision.utils import make_grid

    x = torch.from_numpy(np.ascontiguousarray(images))
    if aspect == 1.0:
        ncol = max(1, math.ceil(math.sqrt(len(x))))
    else:
        nrow = max(1, round(math.sqrt(len(x) / aspect)))
        ncol = max(1, math.ceil(len(x) / nrow))
    w = x.shape[-1]
    scale = max(1, math.ceil(min_cell / w), math.ceil(min_side / (ncol * w)) if min_side else 1)
    x = x.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    pad = max(2, scale // 2) if min_side else 2
    grid = make_grid(x, nrow=ncol, padding=pad, pad_value=255)
    return grid.permute(1, 2, 0).contiguous().numpy()


# -- devices and Ray ------------------------------------------------------------------------------------------------
def want_gpu(use_gpu: bool | str) -> bool:
    import torch

    if use_gpu == "auto":
        return torch.cuda.is_available()
    if use_gpu and not torch.cuda.is_available():
        raise StageError("use_gpu: true but no CUDA device is visible; set it to auto or false")
    return bool(use_gpu)


def gpus_needed(workers: int, gpus_per_worker: float) -> int:
    """Whole GPUs for ``workers`` that each take a share ``gpus_per_worker`` (three of 0.3333 fit on one)."""
    return math.ceil(workers * gpus_per_worker - 1e-9)


def check_local_gpus(cfg: Config, section: str, gpus_per_worker: float = 1.0) -> None:
    """Before a local Ray starts: ``<section>.use_gpu: true`` with more ``<section>.num_workers`` than this
    machine has GPUs would leave Ray waiting forever for GPUs that do not exist; say so instead.
    ``gpus_per_worker``: the share of a GPU each worker takes (``train.gpus_per_worker``; 0.5 fits two on one).

    A configured cluster (``RAY_ADDRESS`` or ``ray.address``) may have GPUs this machine lacks: not checked here.
    """
    sec = getattr(cfg, section)
    if sec.use_gpu is not True or os.environ.get("RAY_ADDRESS") or cfg.ray.address:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus_needed(sec.num_workers, gpus_per_worker) > have:
        each = "" if gpus_per_worker == 1 else f" of {gpus_per_worker:g} GPU each"
        raise StageError(f"{section}.num_workers: {sec.num_workers} GPU workers{each} asked (use_gpu: true) but this "
                         f"machine has {have} CUDA device(s); lower {section}.num_workers or set "
                         f"{section}.use_gpu: auto")


def ensure_ray(cfg: Config) -> str:
    """Connect to ``RAY_ADDRESS`` (or ``ray.address``) if set, else start a local Ray sized to this machine.

    Returns a short description. Safe to call when Ray is already initialised.
    """
    import ray

    if ray.is_initialized():
        return f"Ray already initialised in this process (at {ray.get_runtime_context().gcs_address})"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS") or cfg.ray.address
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:
            source = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "ray.address"
            raise StageError(_join_error(f"{source} {address}", e)) from None
        return f"joined Ray cluster at {address}"
    ray.init(
        num_cpus=cfg.ray.num_cpus or os.cpu_count(),
        include_dashboard=False,
        object_store_memory=cfg.ray.object_store_mb * 1024 * 1024,
        log_to_driver=True,
        configure_logging=False,
        # Ray 2.60 still advertises the machine's address and binds its internal gRPC ports on all interfaces
        # (protected by its token authentication, on by default); the dashboard is off. docs/reliability.md.
        _node_ip_address="127.0.0.1",
    )
    return (f"started a local Ray with {ray.cluster_resources().get('CPU', 0):.0f} CPUs at "
            f"{ray.get_runtime_context().gcs_address}")


def _join_error(where: str, e: BaseException) -> str:
    """One line for a failed ``ray.init(address=…)``. ``ray start`` (Ray 2.60) turns on token authentication when
    ``RAY_AUTH_MODE=token`` or a token exists (a local ``ray.init()`` writes ``~/.ray/auth_token``), and a driver
    given an explicit address sends its token only under ``RAY_AUTH_MODE=token`` (docs/scaling.md)."""
    from ray.exceptions import AuthenticationError

    cur: Optional[BaseException] = e
    for _ in range(10):  # ray.init's ConnectionError is caused by an AuthenticationError, or by a RuntimeError
        if cur is None:  # whose text holds the AuthenticationError's traceback
            break
        if isinstance(cur, AuthenticationError) or "AuthenticationError" in str(cur):
            return (f"{where}: the Ray cluster refused to let this process join (token authentication); export "
                    "RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN (or in ~/.ray/auth_token)")
        cur = cur.__cause__ or cur.__context__
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{where}: cannot join the Ray cluster ({text}); start it (`ray start --head`) or unset the address"


def absolute(path: os.PathLike | str) -> Path:
    """Absolute path: Ray workers change their working directory."""
    return Path(path).expanduser().resolve()


# -- the samples artifact -------------------------------------------------------------------------------------------
# A folder of shard_NNNNN.npz files (images: uint8 [n, C, H, W]; seeds: int64 [n], sample i has seed base + i),
# plus samples.json (count, shape, sampler, checkpoint) and grid.png.
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
