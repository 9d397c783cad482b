"""`make bench`: every maintained CPU benchmark, each in its own process, then `make report`'s rewrite.

What it runs (BENCHMARKS.md, "Results"):

  train           benchmarks/bench_train.py: a training step, ours vs diffusers, and the switch ablations
  sample          benchmarks/bench_sample.py: DDPM-1000 and DDIM-50 sampling, ours vs diffusers' pipelines
  sample_compile  the same DDIM-50 row with `sample.compile` on
  ray             benchmarks/bench_ray.py: Ray Train's overhead per step, 2 workers vs 1
  demo            benchmarks/bench_demo.py: `make demo` end to end (~10 min), only with --demo or BENCH_DEMO=1

The GPU scripts need a GPU and run apart: ``bash benchmarks/gpu.sh`` (the library's throughput) and
``bash benchmarks/gpu_pipeline.sh`` (the stages). Finished studies are listed in BENCHMARKS.md with the commit that
last held their scripts. The run's own walls go to benchmarks/results/run_all.json.

    python -m benchmarks.run_all [--demo] [--only train,sample,...] [--report-only]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from benchmarks import report
from benchmarks.common import REPO, write_result

BENCHES = {
    "train": ["-m", "benchmarks.bench_train"],
    "sample": ["-m", "benchmarks.bench_sample"],
    "sample_compile": ["-m", "benchmarks.bench_sample", "--compile", "--ddpm-batch", "0", "--cifar-batch", "0"],
    "ray": ["-m", "benchmarks.bench_ray"],
    "demo": ["-m", "benchmarks.bench_demo"],
}
DEFAULT = [n for n in BENCHES if n != "demo"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", action="store_true", default=os.environ.get("BENCH_DEMO") == "1",
                   help="also run benchmark 5 (the whole demo)")
    p.add_argument("--only", default=",".join(DEFAULT), help="comma-separated benchmarks to run")
    p.add_argument("--report-only", action="store_true", help="only `python -m benchmarks.report`")
    args = p.parse_args(argv)
    names = [] if args.report_only else [n for n in args.only.split(",") if n] + ["demo"] * args.demo
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise SystemExit(f"error: --only: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    failed, walls, start = [], {}, time.perf_counter()
    for name in dict.fromkeys(names):
        t0 = time.perf_counter()
        print(f"== benchmark {name}", flush=True)
        rc = subprocess.run([sys.executable, *BENCHES[name]], cwd=REPO).returncode
        walls[name] = {"wall_s": round(time.perf_counter() - t0, 1), "rc": rc}
        print(f"== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {walls[name]['wall_s']:.0f} s", flush=True)
        failed += [name] * bool(rc)
    if names:
        write_result("run_all", {"total_wall_s": round(time.perf_counter() - start, 1), "benchmarks": walls},
                     "python -m benchmarks.run_all" + (f" --only {args.only}" if args.only != ",".join(DEFAULT) else "")
                     + (" --demo" if args.demo else ""))
    report.main([])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
