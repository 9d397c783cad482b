"""Content hashes of the files and folders a stage reads, for the flow's cache keys.

A file's fingerprint is the SHA-256 of its bytes; a folder's covers every file's relative name and bytes, so
moving a project or renaming its output root does not change a key while an edited byte does. Hashes are
remembered per (path, size, mtime, inode) within a process: the checkpoints the train stage wrote are hashed
once, though they are both train's output and sample's input.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ABSENT = "absent"
# Not content: bytecode caches, and the half-written temporaries of atomic writers (".name.XXXX.tmp").
_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".tmp")

_memo: dict[tuple[str, int, int, int], str] = {}


def _file_sha(path: Path) -> str:
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo_key not in _memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _memo[memo_key] = h.hexdigest()
    return _memo[memo_key]


def fingerprint(path: os.PathLike | str) -> str:
    """SHA-256 of a file, or of a folder's (relative name, file hash) pairs in name order; ``"absent"`` if missing."""
    path = Path(path)
    if path.is_file():
        return _file_sha(path)
    if not path.is_dir():
        return ABSENT
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(_SKIP_SUFFIXES):
                continue
            f = Path(dirpath, name)
            h.update(f.relative_to(path).as_posix().encode() + b"\0" + _file_sha(f).encode() + b"\n")
    return h.hexdigest()
