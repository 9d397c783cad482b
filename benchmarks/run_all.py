"""`make bench`: run benchmarks 1-4 (each in its own process), then rewrite BENCHMARKS.md's results table.

Benchmark 5 (`make demo` end to end) runs the whole demo (~6-12 min here), so it runs only with ``--demo`` (or
``BENCH_DEMO=1 make bench``); otherwise it reports the walls the last `make demo`'s train and sample stages
recorded in this folder (metrics/train.json, samples/samples.json), with their dates. The sizes are chosen so the rest finishes in about 10 minutes on 2 shared cores.

    python -m benchmarks.run_all [--demo] [--only train,sample,ray,evaluate] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, RESULTS

BENCHES = {
    "train": ["-m", "benchmarks.bench_train"],
    "sample": ["-m", "benchmarks.bench_sample"],
    "ray": ["-m", "benchmarks.bench_ray"],
    "evaluate": ["-m", "benchmarks.bench_evaluate"],
    "demo": ["-m", "benchmarks.bench_demo"],
}
BEGIN, END = "<!-- bench:results:begin -->", "<!-- bench:results:end -->"


def _load(name: str):
    f = RESULTS / f"{name}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _x(v, goal=None) -> str:
    s = f"{v:.2f}x"
    return s if goal is None else f"{s} ({'meets' if v >= goal else 'below'} goal {goal}x)"


def table() -> str:
    """The results table (markdown) from benchmarks/results/*.json."""
    rows = ["| # | benchmark | configuration | ours | baseline | ratio (median of pairs) | command | date, machine |",
            "|---|---|---|---|---|---|---|---|"]

    def mach(r):
        m = r["machine"]
        return f"{m['date']}; {m['cores']} cores ({m['cpu']}), {m['torch_threads']} thread(s), load {m['load_average']}"

    r = _load("train")
    for run in (r or {}).get("runs", []):
        params = f"{run['params_ours']:,} params (diffusers {run['params_diffusers']:,})"
        rows.append(f"| 1 | training step, images/s | {run['config']}, batch {run['batch']}, fp32, {params} | "
                    f"{run['median']['ours']:.2f} | diffusers {run['median']['diffusers']:.2f} | "
                    f"{_x(run['ratios']['diffusers'], 1.2)}; {run['pairs']} pairs | `{r['command']}` | {mach(r)} |")
        for k, v in run["ratios"].items():
            if k != "diffusers":
                rows.append(f"| 1a | switch ablation | {run['config']}, batch {run['batch']} | "
                            f"{run['median']['ours']:.2f} | {k}: {run['median'][k]:.2f} | {_x(v)} | "
                            f"`{r['command']}` | {mach(r)} |")
    r = _load("sample")
    for run in (r or {}).get("runs", []):
        params = f"{run['params_ours']:,} params (diffusers {run['params_diffusers']:,})"
        rows.append(f"| 2 | sampling {run['sampler']}, images/s | {run['config']}, batch {run['batch']}, {params} | "
                    f"{run['median']['ours']:.3f} | diffusers {run['sampler'].split('-')[0]}Pipeline "
                    f"{run['median']['diffusers']:.3f} | {_x(run['ratios']['diffusers'], 1.5)}; {run['pairs']} pairs | "
                    f"`{r['command']}` | {mach(r)} |")
    r = _load("sample_compile")  # not run by make bench: python -m benchmarks.bench_sample --compile ...
    for run in (r or {}).get("runs", []):
        rows.append(f"| 2c | sampling {run['sampler']} with sample.compile, images/s | {run['config']}, batch "
                    f"{run['batch']}; first forward (compilation) {run['first_forward_s']} s | "
                    f"{run['median']['ours']:.3f} | diffusers {run['median']['diffusers']:.3f} | "
                    f"{_x(run['ratios']['diffusers'], 1.5)}; {run['pairs']} pairs | `{r['command']}` | {mach(r)} |")
    r = _load("ray")
    if r:
        plain = sorted(x["step_s"] for x in r["runs"]["plain"])
        ray1 = sorted(x["step_s"] for x in r["runs"]["ray_1_worker"])
        rows.append(f"| 3 | Ray Train (1 worker) vs plain loop, s/step | digits preset, batch {r['batch']}, "
                    f"{r['threads']} threads, {r['steps_per_run']} steps/run | Ray {ray1[len(ray1) // 2]:.3f} | "
                    f"plain {plain[len(plain) // 2]:.3f} | overhead {r['ray_overhead_per_step'] * 100:+.1f}% "
                    f"(goal <= +10%); ray.init {r['ray_init_s']} s, trainer start-up ~{r['trainer_startup_s_median']:.1f} s "
                    f"per fit | `{r['command']}` | {mach(r)} |")
        if "two_vs_one_worker_speedup" in r:
            two = sorted(x["step_s"] for x in r["runs"]["ray_2_workers"])
            rows.append(f"| 3b | Ray Train 2 workers vs 1, s/step | same, 2 workers x 1 thread | "
                        f"{two[len(two) // 2]:.3f} | 1 worker {ray1[len(ray1) // 2]:.3f} | "
                        f"{_x(r['two_vs_one_worker_speedup'])} (reported as is) | `{r['command']}` | {mach(r)} |")
    r = _load("evaluate")
    if r:
        f, c = sorted(r["first_s"]), sorted(r["cached_s"])
        rows.append(f"| 4 | evaluate: first vs cached reference stats, s | {r['feature_extractor']}, "
                    f"{r['num_generated']} samples vs {r['num_reference']} train images | cached {c[len(c) // 2]:.2f} | "
                    f"first {f[len(f) // 2]:.2f} | {_x(r['speedup'], 2)}; {len(f)} pairs | `{r['command']}` | "
                    f"{mach(r)} |")
    r = _load("demo")
    if r:
        parts = ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in r["stages"].items())
        total = f"total {r['total_wall_s']} s" if r.get("total_wall_s") else f"stages {r['sum_of_stages_s']} s"
        when = "; ".join(f"{k} recorded {v['recorded_at']}" for k, v in r.get("stage_details", {}).items()
                         if v.get("recorded_at"))
        rows.append(f"| 5 | `make demo` end to end, per stage | params.yaml (digits); {r['source']} | {total}: {parts} | "
                    f"- | - | `{r['command']}` | {when or mach(r)} |")
    return "\n".join(rows)


def write_report(path: Path = REPO / "BENCHMARKS.md") -> None:
    from ddpm.checkpoint import atomic_write_bytes

    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {path} lacks the {BEGIN} ... {END} markers of the results table")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{table()}\n{END}{tail}"
    atomic_write_bytes(path, lambda f: f.write(new.encode()))
    print(f"updated {path.relative_to(REPO)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", action="store_true", default=os.environ.get("BENCH_DEMO") == "1",
                   help="also run benchmark 5 (the whole demo)")
    p.add_argument("--only", default="train,sample,ray,evaluate", help="comma-separated benchmarks to run")
    p.add_argument("--report-only", action="store_true", help="only rewrite BENCHMARKS.md from the result files")
    args = p.parse_args(argv)
    names = [] if args.report_only else [n for n in args.only.split(",") if n]
    if args.demo and "demo" not in names:
        names.append("demo")
    elif not args.report_only and (REPO / "metrics/train.json").is_file():
        BENCHES["demo"] = ["-m", "benchmarks.bench_demo", "--records", str(REPO)]  # the last `make demo`'s records
        names.append("demo")
    failed = []
    for name in names:
        if name not in BENCHES:
            raise SystemExit(f"error: --only: unknown benchmark {name!r}; known: {', '.join(BENCHES)}")
        t0 = time.perf_counter()
        print(f"== benchmark {name}", flush=True)
        rc = subprocess.run([sys.executable, *BENCHES[name]], cwd=REPO).returncode
        print(f"== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    write_report()
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
