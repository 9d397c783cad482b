"""Files the stages read and write: atomic writes (a temporary file, then a rename: no partial files), JSON reads
whose errors name the file, content hashes, and the check that an output folder is writable before any work."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.checkpoint import atomic_write_bytes

from .errors import StageError


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


def absolute(path: os.PathLike | str) -> Path:
    """Absolute path: Ray workers change their working directory."""
    return Path(path).expanduser().resolve()


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
