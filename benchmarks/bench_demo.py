"""Benchmark 5: `make demo` end to end (after install), its stages and what it measured: benchmarks/results/demo.json.

Runs the demo's command (``python -m flows.train_eval`` with params.yaml) once in a fresh clone of the repository
(its HEAD), so every stage runs rather than being up to date. The record holds the total wall, each stage's wall and
status (the flow's ``stages:`` line), FID/KID mean ± std with the per-repeat values, the real-vs-real floor,
fid_ratio, the classifier's held-out accuracy, the sampler table's rows and the machine; README.md's demo table and
docs/sampling.md's sampler table are generated from it (``make report``).

    python -m benchmarks.bench_demo                 # runs the demo once (~10 min on 2 cores)
    python -m benchmarks.bench_demo --records ROOT  # the same record from a demo this command ran into ROOT

A demo run by this command leaves ``demo_stdout.log`` and ``demo_wall.json`` in its output folder, so ``--records``
on that folder rebuilds the identical record (a ``make demo`` whose output was saved as ROOT/demo_stdout.log gives
the record without the total wall).
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
from typing import Any, Optional

from benchmarks.common import REPO, write_result

STAGE_RE = re.compile(r"(\w+) (\w+) \((\d+(?:\.\d+)?) s\)")
RUN_COMMAND = "python -m benchmarks.bench_demo"


def parse_stages(text: str) -> dict[str, dict]:
    """``stages: fetch ran (1.2 s), train ran (300.0 s), ...`` -> {stage: {status, wall_s}}."""
    lines = [ln for ln in text.splitlines() if ln.strip().startswith("stages:")]
    if not lines:
        raise SystemExit("error: no 'stages:' line in the demo's output: did the flow finish?")
    return {m.group(1): {"status": m.group(2), "wall_s": float(m.group(3))} for m in STAGE_RE.finditer(lines[-1])}


def _read(path: Path) -> Optional[dict]:
    try:
        d = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def _summary(ev: dict, metric: str) -> Optional[dict]:
    """A metric's {values, mean, std, min}: evaluate's per_repeat block, or the lone value of a run without one."""
    s = (ev.get("per_repeat") or {}).get(metric)
    if s:
        return {k: s.get(k) for k in ("values", "mean", "std", "min")}
    v = ev.get(metric)
    return {"values": [v], "mean": v, "std": None, "min": v} if isinstance(v, (int, float)) else None


def evaluation(ev: dict) -> dict[str, Any]:
    """What README's demo table quotes from metrics/eval.json."""
    out: dict[str, Any] = {k: ev.get(k) for k in ("feature_extractor", "num_generated", "num_reference")}
    out["repeats"] = ev.get("repeats", 1)
    for m in ("fid", "kid_mean", "isc_mean"):
        s = _summary(ev, m)
        if s:
            out[m] = s
    floor = ev.get("floor") or {}
    out["floor"] = {k: floor[k] for k in ("fid", "kid_mean", "isc_mean", "num_holdout", "num_reference") if k in floor}
    out["fid_ratio"] = ev.get("fid_ratio")
    if out.get("fid") and floor.get("fid"):
        out["fid_ratio_min"] = out["fid"]["min"] / floor["fid"]
    prov = ev.get("provenance") or {}
    out["provenance"] = {k: prov.get(k) for k in ("sampler", "steps", "eta", "seed_ranges", "checkpoint") if k in prov}
    return out


SAMPLE_KEYS = ("count", "sampler", "steps", "eta", "use_ema", "checkpoint_step", "wall_s", "ray_startup_s",
               "workers", "sampling_s", "images_per_s")
TRAIN_KEYS = ("steps", "final_loss", "fit_wall_s", "ray_startup_s", "images_per_s", "num_workers")


def collect(root: Path, log_text: str, total_wall_s: Optional[float]) -> dict[str, Any]:
    """The demo record from a finished demo's output root (``metrics/``, ``samples/``), its printed output (the
    stage walls) and its total wall. Raises SystemExit when the root holds no demo outputs."""
    root = Path(root)
    train = _read(root / "metrics/train.json")
    if train is None:
        raise SystemExit(f"error: {root / 'metrics/train.json'} missing; run `make demo` first (or pass another "
                         "--records root)")
    samples = _read(root / "samples/samples.json") or {}
    stages = parse_stages(log_text)
    result: dict[str, Any] = {
        "total_wall_s": total_wall_s,
        "stages": stages,
        "sum_of_stages_s": round(sum(s["wall_s"] for s in stages.values()), 1),
        "stage_details": {"train": {k: train[k] for k in TRAIN_KEYS if train.get(k) is not None},
                          "sample": {k: samples[k] for k in SAMPLE_KEYS if samples.get(k) is not None}},
    }
    ev = _read(root / "metrics/eval.json")
    if ev:
        result["evaluate"] = evaluation(ev)
    clf = _read(root / "metrics/classifier.json")
    if clf:
        result["classifier"] = {k: clf.get(k) for k in ("accuracy", "num_holdout", "num_train", "steps")}
    table = _read(root / "metrics/sampler_table.json")
    if table and table.get("rows"):
        result["sampler_table"] = {k: table[k] for k in ("rows", "answer", "floor", "num_samples", "seeds",
                                                         "bootstrap", "timestep_spacing", "checkpoint",
                                                         "checkpoint_step", "use_ema", "device", "note",
                                                         "feature_extractor", "num_reference") if k in table}
    return result


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run_demo(out: Path) -> tuple[str, float]:
    """``make demo``'s flow once in ``out``, a fresh ``git clone`` of this repository's HEAD (what a user has);
    returns (its printed output, total wall in s). Leaves the output and the wall in ``out`` (demo_stdout.log,
    demo_wall.json) so ``--records out`` rebuilds the same record."""
    subprocess.run(["git", "clone", "-q", str(REPO), str(out)], check=True)
    cmd = [sys.executable, "-m", "flows.train_eval"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
    total = round(time.perf_counter() - t0, 1)
    text = proc.stdout + proc.stderr
    (out / "demo_stdout.log").write_text(text)
    if proc.returncode:
        print(text[-3000:], file=sys.stderr)
        raise SystemExit(f"the demo failed (exit {proc.returncode}); output in {out}/demo_stdout.log")
    (out / "demo_wall.json").write_text(json.dumps({"total_wall_s": total, "command": " ".join(cmd[1:]),
                                                    "git_commit": _git_commit()}) + "\n")
    return text, total


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", help="a finished demo's output root: build the record from its outputs (no rerun)")
    p.add_argument("--keep", help="run the demo into this folder (default: a new temporary one)")
    p.add_argument("--results", help="write demo.json here instead of benchmarks/results/")
    args = p.parse_args(argv)
    if args.records:
        root = Path(args.records).resolve()
        if not (root / "demo_stdout.log").is_file():
            raise SystemExit(f"error: {root / 'demo_stdout.log'} missing: --records reads the stage walls from the "
                             "demo's output (a folder that `python -m benchmarks.bench_demo --keep DIR` ran into)")
        wall = _read(root / "demo_wall.json") or {}
        result = collect(root, (root / "demo_stdout.log").read_text(), wall.get("total_wall_s"))
        commit = wall.get("git_commit")
        command = RUN_COMMAND if wall else f"python -m benchmarks.bench_demo --records {args.records}"
    else:
        root = Path(args.keep or tempfile.mkdtemp(prefix="bench_demo_")).resolve()
        print(f"running the demo into {root} (~10 min)", flush=True)
        text, total = run_demo(root)
        result = collect(root, text, total)
        command = RUN_COMMAND
        commit = (_read(root / "demo_wall.json") or {}).get("git_commit")
    result["output_root"] = str(root)
    result["git_commit"] = commit or _git_commit()
    write_result("demo", result, command, Path(args.results) if args.results else None)
    for name, s in result["stages"].items():
        print(f"{name:16s} {s['status']:8s} {s['wall_s']:8.1f} s")
    print(f"total wall {result['total_wall_s']} s (stages {result['sum_of_stages_s']} s)")
    return result


if __name__ == "__main__":
    main()
