"""Stage ``fetch``: read the configured dataset once and write the dataset artifact every later stage reads.

Output folder (the layout is :mod:`tasks.lib.shards`'s):

- ``train/``, ``holdout/``: Parquet shards of ``image`` (the uint8 [C, H, W] pixels) and ``label`` (int64, -1 when
  unlabeled);
- ``dataset.json``, the manifest: ``format``, ``dataset``, ``source``, ``count`` {train, holdout}, ``shape``
  [C, H, W], ``num_classes`` (0 if unlabeled), ``classes``, ``holdout`` (how the holdout split was made),
  ``skipped`` (unreadable images left out with ``data.bad_images: skip``), ``splits`` (each split's shards, their
  rows and SHA-256) and ``sha256`` (content hash of pixels and labels, computed while writing);
- ``config.json``: the resolved config.

Image folders stream: their files are listed and split first, then decoded and resized by
``data.ingest_workers`` processes a chunk at a time and written shard by shard, so memory does not grow with the
folder. The other datasets are small enough to be read whole first. Everything is written into a staging folder
beside the output and moved into place at the end, ``dataset.json`` last: a failed fetch leaves the previous
outputs as they were.

    python -m tasks.fetch --params params.yaml --out data/dataset [--set data.dataset=mnist ...]
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from tasks.lib.config import Config, load_config, write_resolved

from .lib import datasets, shards
from .lib.cli import run_cli, stage_parser
from .lib.errors import DataError, StageError
from .lib.files import check_writable
from .lib.inputs import check_for_dvc_stage

WRITE_CHUNK = 4096  # images handed to a shard writer at a time when the source is in memory


def describe(cfg: Config, shape, classes, source: str, split: dict, written: dict[str, dict],
             skipped: Optional[dict] = None) -> dict[str, Any]:
    """The ``dataset.json`` manifest of a written dataset."""
    d = cfg.data
    return {
        "dataset": d.dataset,
        "source": source,
        "num_classes": len(classes),
        "classes": list(classes),
        "holdout": dict(split),
        "max_train": d.max_train,
        "skipped": skipped or {"count": 0, "files": []},
        **shards.manifest_fields(shape, written),
    }


def _write_prepared(cfg: Config, staging: Path) -> dict[str, Any]:
    data = datasets.prepare(cfg.data)
    written = {}
    for name in shards.SPLITS:
        split = getattr(data, name)
        w = shards.SplitWriter(staging / name, data.shape, cfg.data.shard_images)
        for i in range(0, len(split.labels), WRITE_CHUNK):
            w.add(split.images[i:i + WRITE_CHUNK], split.labels[i:i + WRITE_CHUNK])
        written[name] = w.close()
    return describe(cfg, data.shape, data.classes, data.source, data.split, written)


def _write_image_folder(cfg: Config, staging: Path) -> dict[str, Any]:
    d = cfg.data
    plan = datasets.plan_image_folder(d)
    c, size, _ = d.shape
    written, bad = {}, []
    with datasets.Decoder(plan, size, c, d.ingest_workers or os.cpu_count() or 1) as decoder:
        for name in shards.SPLITS:
            w = shards.SplitWriter(staging / name, d.shape, d.shard_images)
            bad += decoder.ingest(getattr(plan, name), w.add, desc=f"decode {name}")
            if bad and d.bad_images == "error":
                break  # the staging folder is discarded; nothing of the previous output was touched
            written[name] = w.close()
    if bad:
        what = datasets.unreadable(bad, plan.root)
        if d.bad_images == "error":
            raise DataError(f"image-folder: {what} (data.bad_images: skip leaves them out and counts them)")
        print(f"fetch: skipped {what} (data.bad_images: skip)", file=sys.stderr)
    for name in shards.SPLITS:
        if written[name]["count"] == 0:
            raise DataError(f"image-folder: no readable image left in the {name} split of {plan.root}")
    return describe(cfg, d.shape, plan.classes, str(plan.root), plan.split, written,
                    {"count": len(bad), "files": sorted(bad)[:100]})


def run(cfg: Config, out_dir: os.PathLike | str) -> dict[str, Any]:
    """Load ``cfg.data``'s dataset and write the dataset artifact into ``out_dir``; return ``dataset.json``.

    Raises :class:`~tasks.lib.errors.DataError` (missing or unreadable source files) with the previous outputs
    untouched.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise StageError(f"{out}: exists and is not a folder (--out must name a folder)")
    check_writable(out)
    for old in out.parent.glob(f".{out.name}.staging-*"):  # left by a fetch that was killed
        shutil.rmtree(old, ignore_errors=True)
    # Staged beside the output (same file system, so the final moves are renames); the output folder itself is
    # only touched once everything is written.
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    try:
        staging.mkdir(parents=True)
        write = _write_image_folder if cfg.data.dataset == "image-folder" else _write_prepared
        meta = write(cfg, staging)
        write_resolved(cfg, staging)
        out.mkdir(parents=True, exist_ok=True)
        shards.publish(staging, out, meta, extra=("config.json",))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = stage_parser("Fetch the configured dataset into train/holdout arrays (the dataset artifact).")
    parser.add_argument("--out", required=True, help="output folder, e.g. data/dataset")
    args = parser.parse_args(argv)
    cfg = load_config(args.params, args.overrides)
    check_for_dvc_stage(cfg)  # under `dvc repro`: the inputs of this stage and the later ones, before any compute
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
