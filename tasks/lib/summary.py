"""Print what a pipeline run produced: the numbers a user reads first and where the pictures are.

    python -m tasks.lib.summary [--metrics metrics] [--samples samples]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def summarize(metrics_dir: Path, samples_dir: Path) -> list[str]:
    train = _load(metrics_dir / "train.json")
    clf = _load(metrics_dir / "classifier.json")
    ev = _load(metrics_dir / "eval.json")
    samples = _load(samples_dir / "samples.json")
    lines = []
    if train:
        lines.append(f"train:      {train.get('steps')} steps, final loss {train.get('final_loss')}, "
                     f"{train.get('images_per_s')} images/s; Ray start-up {train.get('ray_startup_s')} s, "
                     f"fit {train.get('fit_wall_s')} s")
    if samples:
        lines.append(f"sample:     {samples.get('count')} images ({samples.get('sampler')}-{samples.get('steps')}) "
                     f"in {samples.get('wall_s')} s")
    if clf and clf.get("skipped"):
        lines.append(f"classifier: skipped, {clf.get('reason')}")
    elif clf:
        lines.append(f"classifier: held-out accuracy {clf.get('accuracy')}")
    if ev:
        floor = ev.get("floor", {})
        parts = [f"{k} {ev[k]:.4g}" for k in ("fid", "kid_mean", "isc_mean") if isinstance(ev.get(k), (int, float))]
        fl = [f"{k} {floor[k]:.4g}" for k in ("fid", "kid_mean") if isinstance(floor.get(k), (int, float))]
        lines.append(f"evaluate:   {', '.join(parts)} ({ev.get('feature_extractor')} features, "
                     f"n={ev.get('num_generated')})")
        if fl:
            ratio = ev.get("fid_ratio")
            lines.append(f"floor:      real-vs-real {', '.join(fl)}; FID / floor = "
                         f"{ratio:.2f}" if isinstance(ratio, (int, float)) else f"floor:      {', '.join(fl)}")
    if samples.get("grid"):
        lines.append(f"sample grid: {samples['grid']}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--metrics", default="metrics", type=Path)
    p.add_argument("--samples", default="samples", type=Path)
    args = p.parse_args(argv)
    lines = summarize(args.metrics, args.samples)
    print("\n".join(lines) if lines else "no pipeline outputs yet: run `make demo` or `dvc repro`")


if __name__ == "__main__":
    main()
