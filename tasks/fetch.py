"""Stage ``fetch``: read the configured dataset once and write the dataset artifact every later stage reads.

Output folder (see :mod:`tasks.lib.common`, "the dataset artifact"):

- ``train.npz``, ``holdout.npz``: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N] (-1 when unlabeled);
- ``dataset.json``: ``dataset``, ``source``, ``count`` {train, holdout}, ``shape`` [C, H, W], ``num_classes``
  (0 if unlabeled), ``classes``, ``holdout`` (how the holdout split was made), ``sha256`` (content hash of the
  four arrays, independent of the npz container);
- ``config.json``: the resolved config.

``dataset.json`` is written last, so a folder with one is complete. Nothing in the folder is touched until the
new data has loaded, so a failed fetch leaves the previous outputs as they were.

    python -m tasks.fetch --params params.yaml --out data/dataset [--set data.dataset=mnist ...]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from tasks.lib.config import Config, write_resolved

from .lib import datasets
from .lib.common import (
    StageError,
    check_writable,
    run_cli,
    sha256_arrays,
    stage_parser,
    write_json,
    write_npz,
)
from .lib.inputs import stage_config

OWNED = ("dataset.json", "train.npz", "holdout.npz", "config.json")  # dataset.json first: it marks "complete"


def describe(cfg: Config, data: datasets.Prepared) -> dict[str, Any]:
    """The ``dataset.json`` record of a prepared dataset."""
    d = cfg.data
    return {
        "dataset": d.dataset,
        "source": data.source,
        "count": {"train": int(len(data.train.labels)), "holdout": int(len(data.holdout.labels))},
        "shape": list(data.shape),
        "num_classes": len(data.classes),
        "classes": list(data.classes),
        "holdout": dict(data.split),
        "max_train": d.max_train,
        "sha256": sha256_arrays(data.train.images, data.train.labels, data.holdout.images, data.holdout.labels),
    }


def run(cfg: Config, out_dir: os.PathLike | str) -> dict[str, Any]:
    """Load ``cfg.data``'s dataset and write the dataset artifact into ``out_dir``; return ``dataset.json``.

    Raises :class:`~tasks.lib.common.DataError` (missing or unreadable source files) before writing anything.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise StageError(f"{out}: exists and is not a folder (--out must name a folder)")
    check_writable(out)
    data = datasets.prepare(cfg.data)
    meta = describe(cfg, data)

    out.mkdir(parents=True, exist_ok=True)
    # Remove the previous run's files first so that an interruption below never leaves a mix of old and new.
    for name in OWNED:
        (out / name).unlink(missing_ok=True)
        for tmp in out.glob(f".{name}.*.tmp"):  # left by a writer that was killed mid-write
            tmp.unlink(missing_ok=True)
    write_npz(out / "train.npz", images=data.train.images, labels=data.train.labels)
    write_npz(out / "holdout.npz", images=data.holdout.images, labels=data.holdout.labels)
    write_resolved(cfg, out)
    write_json(out / "dataset.json", meta)
    return meta


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = stage_parser("Fetch the configured dataset into train/holdout arrays (the dataset artifact).")
    parser.add_argument("--out", required=True, help="output folder, e.g. data/dataset")
    args = parser.parse_args(argv)
    cfg = stage_config(args)
    meta = run(cfg, args.out)
    c, h, w = meta["shape"]
    classes = f"{meta['num_classes']} classes" if meta["num_classes"] else "unlabeled"
    print(
        f"fetch: {meta['dataset']} {meta['count']['train']} train + {meta['count']['holdout']} holdout images "
        f"[{c}, {h}, {w}], {classes} -> {args.out} (sha256 {meta['sha256'][:12]})",
        file=sys.stdout,
    )
    return meta


if __name__ == "__main__":
    run_cli(main)
