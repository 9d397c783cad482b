"""Benchmark 4: the evaluate stage, first run (training-set reference statistics computed) vs second (cached).

Runs ``tasks.evaluate.run`` on a finished pipeline's outputs (``make demo``'s, by default this folder's: the
dataset, the samples, the classifier), first with an empty reference-statistics folder, then again with the
statistics the first run cached there. Pairs (first, cached) repeat with a fresh folder each time; the speed-up
is the median over pairs of first / cached wall time, MLflow tracking off. Uses the params the samples were drawn with
(samples/config.json), so the samples match them.

    python -m benchmarks.bench_evaluate [--root .] [--pairs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, write_result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(REPO), help="a pipeline output root (make demo's layout)")
    p.add_argument("--pairs", type=int, default=5)
    args = p.parse_args(argv)
    from tasks.lib.config import apply_overrides, from_dict
    from tasks.evaluate import run

    root = Path(args.root).resolve()
    need = [root / "data/dataset", root / "samples/config.json", root / "models/classifier.pt"]
    missing = [str(x) for x in need if not x.exists()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} missing; run `make demo` first (or pass --root)")
    # tracking off: the benchmark must not add runs to the project's MLflow store (nor time MLflow's logging)
    cfg = from_dict(apply_overrides(json.loads((root / "samples/config.json").read_text()),
                                    {"tracking.enabled": False}))
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    firsts, cached = [], []
    # a discarded run first: the imports and the feature extractor's first load are not the cache's doing
    run(cfg, root / "data/dataset", root / "samples", root / "models/classifier.pt", work / "warmup",
        work / "warmup.json", root / "metrics/classifier.json")
    for i in range(args.pairs):
        ref = work / f"ref_{i}"
        for bucket in (firsts, cached):
            t0 = time.perf_counter()
            out = run(cfg, root / "data/dataset", root / "samples", root / "models/classifier.pt", ref,
                      work / f"eval_{i}_{len(bucket)}.json", root / "metrics/classifier.json")
            bucket.append(time.perf_counter() - t0)
        print(f"  pair {i + 1}: first {firsts[-1]:.2f} s, cached {cached[-1]:.2f} s (FID {out.get('fid'):.4g})",
              flush=True)
    speedup = statistics.median([a / b for a, b in zip(firsts, cached)])
    print(f"evaluate: first / cached = {speedup:.2f}x (median of {args.pairs} pairs); goal >= 2x")
    result = {"root": str(root), "feature_extractor": out.get("feature_extractor"),
              "num_generated": out.get("num_generated"), "num_reference": out.get("num_reference"),
              "first_s": firsts, "cached_s": cached, "speedup": round(speedup, 3), "goal": "first / cached >= 2x"}
    command = "python -m benchmarks.bench_evaluate " + " ".join(sys.argv[1:] if argv is None else argv)
    write_result("evaluate", result, command.strip())
    return result


if __name__ == "__main__":
    main()
