"""Benchmark 3: Ray Train overhead. The train stage's loop under Ray Train (1 worker) vs the same loop in this
process (``tasks.train.run_local``), and 2 workers vs 1, on the digits preset.

Per-step time comes from each run's loss log (images/s over every ``log_every`` steps, the first interval
dropped as warm-up), so Ray's start-up is not in it; Ray start-up (``ray.init``) and the trainer's own start-up
(fit wall minus the steps' time) are reported separately. Plain and Ray runs alternate (A B B A ...); the
overhead is the median over pairs of (Ray step time / plain step time - 1). Both use the same torch threads:
a lone Ray worker gets every CPU of the local Ray (``ray.num_cpus``), so the plain loop gets as many threads.

    python -m benchmarks.bench_ray [--steps 30] [--pairs 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, write_result


def step_times(log: Path, batch: int) -> list[float]:
    """Seconds per step of each logged interval after the first (warm-up), from images/s in the loss log."""
    from tasks.train import read_loss_log

    rows = read_loss_log(log, 10**9)[1:]
    return [batch / float(r["images_per_s"]) for r in rows]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="training steps per run (logged every 10)")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--two-workers", type=int, default=1, help="runs with 2 workers (0: skip)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from tasks.lib.config import load_config
    from tasks import fetch
    from tasks.lib.cluster import ensure_ray
    from tasks.train import run, run_local

    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    cpus = os.cpu_count() or 1
    base = {"train.steps": args.steps, "train.log_every": 10, "train.checkpoint_every": args.steps,
            "train.num_workers": 1, "train.use_gpu": False, "tracking.enabled": False,
            "ray.storage": str(work / "ray_results"), "ray.num_cpus": cpus}
    cfg = load_config(REPO / "params.yaml", base)
    batch = cfg.train.batch_size
    fetch.run(cfg, work / "data")

    t0 = time.perf_counter()
    how = ensure_ray(cfg)
    ray_init_s = time.perf_counter() - t0
    print(f"[ray] {how} in {ray_init_s:.1f} s; {args.steps} steps per run, batch {batch}, {cpus} threads", flush=True)

    runs: dict[str, list[dict]] = {"plain": [], "ray_1_worker": [], "ray_2_workers": []}
    n = 0

    def plain():
        nonlocal n
        n += 1
        d = work / f"plain_{n}"
        t = time.perf_counter()
        run_local(cfg, work / "data", d / "ckpt", d / "loss.tsv", threads=cpus)
        st = step_times(d / "loss.tsv", batch)
        runs["plain"].append({"wall_s": time.perf_counter() - t, "step_s": statistics.median(st)})
        print(f"  plain       {runs['plain'][-1]['step_s'] * 1000:8.1f} ms/step", flush=True)

    def with_ray(workers: int):
        nonlocal n
        n += 1
        d = work / f"ray{workers}_{n}"
        c = load_config(REPO / "params.yaml", {**base, "train.num_workers": workers})
        s = run(c, work / "data", d / "ckpt", d / "loss.tsv")
        st = step_times(d / "loss.tsv", batch)
        key = "ray_1_worker" if workers == 1 else "ray_2_workers"
        steps_s = statistics.median(st) * args.steps
        runs[key].append({"step_s": statistics.median(st), "fit_wall_s": s["fit_wall_s"],
                          "trainer_startup_s": round(s["fit_wall_s"] - steps_s, 2)})
        print(f"  ray x{workers}      {runs[key][-1]['step_s'] * 1000:8.1f} ms/step, fit {s['fit_wall_s']} s", flush=True)

    for i in range(args.pairs):
        order = [plain, lambda: with_ray(1)] if i % 2 == 0 else [lambda: with_ray(1), plain]
        for f in order:
            f()
    for _ in range(args.two_workers):
        with_ray(2)
    ray.shutdown()

    pairs = list(zip(runs["plain"], runs["ray_1_worker"]))
    overhead = statistics.median([r["step_s"] / p["step_s"] - 1 for p, r in pairs])
    result = {
        "steps_per_run": args.steps, "batch": batch, "threads": cpus, "ray_init_s": round(ray_init_s, 2),
        "runs": runs,
        "ray_overhead_per_step": round(overhead, 4),
        "goal": "Ray Train (1 worker) per-step time <= 1.10x the plain loop",
        "trainer_startup_s_median": statistics.median([r["trainer_startup_s"] for r in runs["ray_1_worker"]]),
    }
    if runs["ray_2_workers"]:
        one = statistics.median([r["step_s"] for r in runs["ray_1_worker"]])
        two = statistics.median([r["step_s"] for r in runs["ray_2_workers"]])
        result["two_vs_one_worker_speedup"] = round(one / two, 3)
    print(f"Ray per-step overhead {overhead * 100:+.1f}% (median of {len(pairs)} pairs); ray.init {ray_init_s:.1f} s; "
          f"trainer start-up ~{result['trainer_startup_s_median']:.1f} s per fit"
          + (f"; 2 workers vs 1: {result['two_vs_one_worker_speedup']}x" if runs["ray_2_workers"] else ""))
    command = "python -m benchmarks.bench_ray " + " ".join(sys.argv[1:] if argv is None else argv)
    write_result("ray", result, command.strip())
    return result


if __name__ == "__main__":
    main()
