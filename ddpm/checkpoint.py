"""Single-file training checkpoints: model, EMA, optimizer, step, RNG states and the resolved config.

Written atomically (temporary file in the same folder, fsync, ``os.replace``) so a reader sees the old file or
the new one, never a partial one; read with ``torch.load(weights_only=True)`` so loading runs no pickled code.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

if TYPE_CHECKING:
    import torch

_UMASK = os.umask(0)
os.umask(_UMASK)
CHECKPOINT_RE = re.compile(r"^ckpt_(\d{8,})\.pt$")
_TMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # mkstemp's names in atomic_write_bytes


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or lacks required entries; ``path`` names it."""

    def __init__(self, path: os.PathLike | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason

    def __reduce__(self):  # rebuilt from both arguments: Ray pickles a worker's error to its driver
        return type(self), (self.path, self.reason)


def atomic_write_bytes(path: os.PathLike | str, write) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_folder(path: os.PathLike | str, fill, replace=lambda old: False) -> Path:
    """Call ``fill(tmp)`` on a new temporary folder beside ``path``, fsync its files, then rename it to ``path``.

    A reader sees no folder or the whole new one, never a partial one. An existing ``path`` is replaced only when
    ``replace(path)`` says so (it is moved aside, the new folder renamed in, the old one deleted); otherwise
    :class:`FileExistsError`. A failure removes the temporary folder and leaves ``path`` as it was."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace(path):
        raise FileExistsError(17, "exists; choose a new folder", str(path))
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        fill(tmp)
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; give the folder the mode a plain mkdir would
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():  # put the old folder back
            os.replace(old / path.name, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def remove_stale_temporaries(folder: os.PathLike | str) -> list[Path]:
    """Delete the temporary files (``.<name>.<random>.tmp``) that a writer killed mid-write left in ``folder``;
    return them. Call it only when no other process writes into ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(".*.tmp") if p.is_file() and _TMP_RE.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


REQUIRED = ("model", "ema", "optimizer", "step", "config")


def save_checkpoint(path: os.PathLike | str, state: dict[str, Any]) -> None:
    """Atomically save ``state``: it must hold model, ema, optimizer (state dicts), step and config (plain data).

    The config is the resolved model/diffusion config, so a sampler can rebuild the network from the file alone.
    """
    import torch

    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {', '.join(missing)}")
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_checkpoint(path: os.PathLike | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing pickled code; raise :class:`CheckpointError` naming a bad file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, wrong format: all mean "unreadable"
        raise CheckpointError(path, f"unreadable or corrupt checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        raise CheckpointError(path, f"not a training checkpoint (needs {', '.join(REQUIRED)})")
    return state


def checkpoint_path(folder: os.PathLike | str, step: int) -> Path:
    return Path(folder) / f"ckpt_{step:08d}.pt"


def list_checkpoints(folder: os.PathLike | str) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint file in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def load_latest(
    folder: os.PathLike | str, map_location: str | torch.device = "cpu", warn=None
) -> Optional[dict[str, Any]]:
    """The newest readable checkpoint in ``folder``, or None. Corrupt newer files are skipped and reported
    through ``warn(message)``, so a run resumes from the previous valid one."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return load_checkpoint(path, map_location)
        except CheckpointError as e:
            if warn is not None:
                warn(f"skipping {e}; falling back to the previous checkpoint")
    return None


def newest_checkpoint(folder: os.PathLike | str, warn=None) -> Path:
    """The newest readable checkpoint file in ``folder`` (corrupt newer ones are skipped and reported through
    ``warn``). Raises :class:`CheckpointError` when there is none."""
    ckpts = list_checkpoints(folder)
    if not ckpts:
        raise CheckpointError(folder, "no checkpoints (ckpt_*.pt); run the train stage first")
    state = load_latest(folder, warn=warn)
    if state is None:
        raise CheckpointError(folder, f"no readable checkpoint among {len(ckpts)} files")
    return next(p for s, p in reversed(ckpts) if s == int(state["step"]))


def prune_checkpoints(folder: os.PathLike | str, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; return the removed paths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    ckpts = list_checkpoints(folder)
    removed = [p for _, p in ckpts[:-keep]]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


