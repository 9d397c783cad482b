"""Benchmark 5: `make demo` end to end (after install), broken down per stage.

Runs the demo's command (``python -m flows.train_eval`` with params.yaml) once into a fresh output folder, so
every stage runs rather than being served from cache, and reads the per-stage wall times the flow prints on
its ``stages:`` line; the training and sampling stages' own records (Ray start-up, fit wall, images/s) come
from the metrics files the run wrote. With ``--log`` it parses a saved demo output instead of running it.

    python -m benchmarks.bench_demo            # runs the demo once (~6-12 min on 2 busy cores)
    python -m benchmarks.bench_demo --log FILE # parse a saved `make demo` output
    python -m benchmarks.bench_demo --records ROOT  # only what a finished demo's stages recorded (no rerun)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, write_result

STAGE_RE = re.compile(r"(\w+) (ran|cached|\w+) \((\d+(?:\.\d+)?) s\)")


def parse_stages(text: str) -> dict[str, dict]:
    """``stages: fetch ran (1.2 s), train ran (300.0 s), ...`` -> {stage: {status, wall_s}}."""
    lines = [ln for ln in text.splitlines() if ln.strip().startswith("stages:")]
    if not lines:
        raise ValueError("no 'stages:' line in the demo output; did the flow finish?")
    return {m.group(1): {"status": m.group(2), "wall_s": float(m.group(3))} for m in STAGE_RE.finditer(lines[-1])}


def from_records(root: Path) -> dict:
    """The walls the train and sample stages record in their metrics files (the flow prints, but does not store,
    the other stages' walls; fetch, train_classifier and evaluate take seconds on the digits preset)."""
    stages, details = {}, {}
    for name, rel, wall_key in (("train", "metrics/train.json", "fit_wall_s"), ("sample", "samples/samples.json", "wall_s")):
        f = root / rel
        if not f.is_file():
            raise SystemExit(f"error: {f} missing; run `make demo` first (or pass another --records root)")
        d = json.loads(f.read_text())
        wall = float(d[wall_key]) + (float(d.get("ray_startup_s") or 0) if name == "train" else 0.0)
        stages[name] = {"status": "recorded", "wall_s": round(wall, 1)}
        details[name] = {k: d.get(k) for k in ("ray_startup_s", "fit_wall_s", "wall_s", "images_per_s", "steps")
                         if d.get(k) is not None}
        details[name]["recorded_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(f.stat().st_mtime))
    result = {"source": f"stage records of the finished demo in {root} (train: Ray start-up + fit; sample: wall "
                        "incl. Ray actors); fetch, train_classifier, evaluate are not recorded",
              "total_wall_s": None, "stages": stages, "stage_details": details,
              "sum_of_stages_s": round(sum(s["wall_s"] for s in stages.values()), 1)}
    write_result("demo", result, f"python -m benchmarks.bench_demo --records {root}")
    for name, s in stages.items():
        print(f"{name:16s} {s['wall_s']:8.1f} s  {details[name]}")
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", help="parse this saved demo output instead of running the demo")
    p.add_argument("--keep", help="run into this folder (default: a temporary one)")
    p.add_argument("--records", help="a finished demo's output root: report the walls its stages recorded")
    args = p.parse_args(argv)
    details: dict = {}
    if args.records:
        return from_records(Path(args.records))
    if args.log:
        text = Path(args.log).read_text()
        total = None
        command = f"python -m benchmarks.bench_demo --log {args.log}"
        source = f"parsed from {args.log}"
    else:
        out = Path(args.keep or tempfile.mkdtemp(prefix="bench_demo_")).resolve()
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "flows.train_eval", "--params", str(REPO / "params.yaml"), "--out", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        total = round(time.perf_counter() - t0, 1)
        text = proc.stdout + proc.stderr
        (Path(out) / "demo_stdout.log").write_text(text)
        if proc.returncode:
            print(text[-3000:], file=sys.stderr)
            raise SystemExit(f"the demo failed (exit {proc.returncode}); output in {out}/demo_stdout.log")
        command = "python -m benchmarks.bench_demo  (runs python -m flows.train_eval --out <fresh folder>)"
        source = "one fresh run of the demo's flow, every stage executed"
        for name, rel in (("train", "metrics/train.json"), ("sample", "samples/samples.json")):
            f = out / rel
            if f.is_file():
                d = json.loads(f.read_text())
                details[name] = {k: d.get(k) for k in ("ray_startup_s", "fit_wall_s", "wall_s", "images_per_s")
                                 if d.get(k) is not None}
    stages = parse_stages(text)
    result = {"source": source, "total_wall_s": total, "stages": stages, "stage_details": details,
              "sum_of_stages_s": round(sum(s["wall_s"] for s in stages.values()), 1)}
    write_result("demo", result, command)
    for name, s in stages.items():
        print(f"{name:16s} {s['status']:7s} {s['wall_s']:8.1f} s")
    print(f"total wall {total} s (stages {result['sum_of_stages_s']} s; the rest is Prefect/imports)")
    return result


if __name__ == "__main__":
    main()
