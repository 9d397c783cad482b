"""Inpainting with the demo's model: are the known pixels kept, and does the filled digit keep its label?

Runs the sample stage in ``inpaint`` mode (README, "Sampling modes") on every held-out digit of a finished demo's
outputs, once each (``evaluate.repeats=1``, ``sample.num_samples`` = the held-out count, tracking off), then scores
the result with the demo's own classifier: the share of inpainted digits given their original's label, the same
classifier's accuracy on the originals, and how many known pixels differ from the input (0 expected). Writes
benchmarks/results/inpaint.json; README's sentence is generated from it (``make report``).

    python -m benchmarks.inpaint_agreement [--root ROOT] [--mask bottom-half] [--params params.yaml]

ROOT is a finished demo's output root (default: this checkout, i.e. what `make demo` wrote): it must hold
``checkpoints/``, ``data/dataset`` and ``models/classifier.pt``. `python -m benchmarks.bench_demo` runs this on its
fresh demo folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.common import REPO, write_result


def score(images: np.ndarray, seeds: np.ndarray, base_seed: int, holdout_images: np.ndarray,
          holdout_labels: np.ndarray, known: np.ndarray, classify: Callable[[np.ndarray], np.ndarray]) -> dict:
    """Score inpainted ``images`` (uint8 [N, C, H, W]; sample ``seed`` started from held-out image
    ``(seed - base_seed) mod len(holdout)``, the sample stage's rule) against their originals.

    ``known``: bool [1 or C, H, W], True where pixels were given; ``classify``: uint8 images -> labels [N].
    """
    src = (np.asarray(seeds, dtype=np.int64) - base_seed) % len(holdout_images)
    originals, labels = holdout_images[src], holdout_labels[src]
    known_all = np.broadcast_to(known, images.shape)
    pred, pred_orig = classify(images), classify(holdout_images)
    return {
        "count": int(len(images)),
        "distinct_originals": int(len(np.unique(src))),
        "known_pixels": int(known_all.sum()),
        "known_pixels_differing": int((images[known_all] != originals[known_all]).sum()),
        "label_agreement": float((pred == labels).mean()),
        "classifier_accuracy_on_originals": float((pred_orig == holdout_labels).mean()),
        "num_classes": int(len(np.unique(holdout_labels))),
    }


def classifier_fn(weights: Path) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    from tasks.lib.classifier import load_classifier
    from tasks.lib.images import to_model_range

    net, _ = load_classifier(weights)

    def classify(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(to_model_range(images))[1].argmax(1).numpy()

    return classify


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(REPO), help="a finished demo's output root (default: this checkout)")
    p.add_argument("--params", default=str(REPO / "params.yaml"), help="the demo's params file")
    p.add_argument("--mask", default="bottom-half", help="sample.mask (default: bottom-half)")
    p.add_argument("--out", help="folder for the inpainted samples (default: a new temporary one)")
    p.add_argument("--results", help="write inpaint.json here instead of benchmarks/results/")
    args = p.parse_args(argv)

    from tasks.lib.config import load_config
    from ddpm.samplers import region_mask
    from tasks.lib.shards import load_dataset
    from tasks.lib.samples import load_samples

    root = Path(args.root).resolve()
    data, ckpts, weights = root / "data/dataset", root / "checkpoints", root / "models/classifier.pt"
    missing = [str(x) for x in (data, ckpts, weights) if not x.exists()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} missing: --root must be a finished demo's outputs "
                         "(run `make demo` or `python -m benchmarks.bench_demo`)")
    holdout = load_dataset(data).holdout
    overrides = {"sample.mode": "inpaint", "sample.mask": args.mask, "evaluate.repeats": 1,
                 "sample.num_samples": len(holdout.images), "tracking.enabled": False}
    cfg = load_config(args.params, overrides)
    out = Path(args.out or tempfile.mkdtemp(prefix="inpaint_")).resolve()
    cmd = [sys.executable, "-m", "tasks.sample", "--params", args.params,
           *[a for k, v in overrides.items() for a in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")],
           "--checkpoints", str(ckpts), "--data", str(data), "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = round(time.perf_counter() - t0, 1)

    images, seeds = load_samples(out)
    known = region_mask(args.mask, tuple(images.shape[2:])).bool().numpy()
    result = score(images, seeds, cfg.sample.seed, holdout.images, holdout.labels, known, classifier_fn(weights))
    manifest = json.loads((out / "samples.json").read_text())
    result.update({
        "mask": args.mask,
        "sampler": manifest.get("sampler"), "steps": manifest.get("steps"), "eta": manifest.get("eta"),
        "use_ema": manifest.get("use_ema"), "checkpoint": Path(manifest.get("checkpoint", "")).name,
        "checkpoint_step": manifest.get("checkpoint_step"),
        "chance": 1 / result["num_classes"],
        "sample_wall_s": wall,
        "demo_root": str(root),
    })
    command = "python -m benchmarks.inpaint_agreement" + ("" if root == REPO else f" --root {root}") + (
        "" if args.mask == "bottom-half" else f" --mask {args.mask}") + (
        "" if Path(args.params).resolve() == REPO / "params.yaml" else f" --params {args.params}")
    write_result("inpaint", result, command, Path(args.results) if args.results else None)
    print(f"{result['count']} inpainted ({args.mask}): {result['known_pixels_differing']} known pixels differ; "
          f"label agreement {result['label_agreement']:.1%} (originals {result['classifier_accuracy_on_originals']:.1%})")
    return result


if __name__ == "__main__":
    main()
