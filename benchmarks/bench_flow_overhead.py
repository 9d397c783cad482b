"""What running every stage through ``dvc repro`` costs the demo: the train-eval flow of two revisions, each run
in a fresh clone, interleaved (old, new, old, new ...) on one machine: benchmarks/results/flow_overhead.json.

The demo's compute (training's fit, the sample stage's and the sampler table's sampling, as the stages record
them) varies by ±20% between runs on a shared 2-core machine, so besides each pair's total wall the record splits
every run into that compute and the rest (process and library start-up, DVC, Prefect, tracking): the rest is what
the flow's design decides.

    python -m benchmarks.bench_flow_overhead --old b84b7da --new HEAD --rounds 2
    python -m benchmarks.bench_flow_overhead --existing new:bc2004c:/tmp/timing/new3:272.6 ...   # finished runs
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, write_result

STAGE_RE = re.compile(r"(\w+) (ran|cached) \((\d+(?:\.\d+)?) s\)")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def measure(label: str, rev: str, root: Path, total_wall_s: float, log: str) -> dict[str, Any]:
    """One finished demo in ``root``: its total, stage walls (the flow's ``stages:`` line), compute and the rest."""
    stages_line = [line for line in log.splitlines() if line.startswith("stages:")][-1]
    stages = {m.group(1): float(m.group(3)) for m in STAGE_RE.finditer(stages_line)}
    train, samples = _read(root / "metrics/train.json"), _read(root / "samples/samples.json")
    table = _read(root / "metrics/sampler_table.json")
    table_sampling = sum(r.get("sampling_s", r["wall_s"]) for r in table.get("rows", []))
    compute = train["fit_wall_s"] + samples["sampling_s"] + table_sampling
    ev = _read(root / "metrics/eval.json")
    return {"label": label, "rev": rev, "total_wall_s": round(total_wall_s, 1), "stages_s": stages,
            "compute_s": {"train_fit": train["fit_wall_s"], "sample_sampling": samples["sampling_s"],
                          "sampler_table_sampling": round(table_sampling, 2), "total": round(compute, 1)},
            "rest_s": round(total_wall_s - compute, 1), "train_images_per_s": train.get("images_per_s"),
            "fid": ev.get("fid"), "floor_fid": ev.get("floor", {}).get("fid")}


def run_once(label: str, rev: str, root: Path) -> dict[str, Any]:
    subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True)
    subprocess.run(["git", "checkout", "-q", rev], cwd=root, check=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.train_eval"], cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{label} ({rev}) failed with exit {proc.returncode}:\n{proc.stderr[-2000:]}")
    return measure(label, rev, root, wall, proc.stdout + proc.stderr)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by = {lab: [r for r in runs if r["label"] == lab] for lab in ("old", "new")}
    med = {lab: {k: statistics.median(r[k] for r in rs) for k in ("total_wall_s", "rest_s")} for lab, rs in by.items()}
    pairs = [round(n["total_wall_s"] / o["total_wall_s"], 3) for o, n in zip(by["old"], by["new"])]
    speed = [round(n["train_images_per_s"] / o["train_images_per_s"], 3) for o, n in zip(by["old"], by["new"])
             if n.get("train_images_per_s") and o.get("train_images_per_s")]
    return {"median": med, "total_ratio_new_over_old_per_pair": pairs,
            "train_images_per_s_ratio_new_over_old_per_pair": speed,
            "rest_difference_s": round(med["new"]["rest_s"] - med["old"]["rest_s"], 1),
            "same_fid": len({round(r["fid"], 9) for r in runs if r.get("fid") is not None}) == 1}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", default="b84b7da", help="revision of the in-process flow (before dvc repro)")
    p.add_argument("--new", default="HEAD")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", default="/tmp/bench_flow_overhead", help="folder of the clones")
    p.add_argument("--existing", nargs="*", metavar="LABEL:REV:DIR:WALL_S",
                   help="finished runs (their stdout in DIR/demo_stdout.log or DIR.log) instead of new ones")
    p.add_argument("--results", help="write the record here instead of benchmarks/results/")
    p.add_argument("--name", default="flow_overhead", help="the record's name: benchmarks/results/<name>.json")
    args = p.parse_args(argv)
    runs = []
    if args.existing:
        for spec in args.existing:
            label, rev, folder, wall = spec.split(":")
            root = Path(folder)
            log = root / "demo_stdout.log" if (root / "demo_stdout.log").is_file() else Path(f"{folder}.log")
            runs.append(measure(label, rev, root, float(wall), log.read_text()))
        command = "python -m benchmarks.bench_flow_overhead --existing " + " ".join(args.existing)
    else:
        work = Path(args.work)
        for i in range(args.rounds):
            for label, rev in (("old", args.old), ("new", args.new)):
                runs.append(run_once(label, rev, work / f"{label}{i}"))
                print(json.dumps(runs[-1]), flush=True)
        command = f"python -m benchmarks.bench_flow_overhead --old {args.old} --new {args.new} --rounds {args.rounds}"
    if args.name != "flow_overhead":
        command += f" --name {args.name}"
    result = {"runs": runs, "summary": summarize(runs)}
    write_result(args.name, result, command, Path(args.results) if args.results else None)
    print(json.dumps(result["summary"], indent=2))
    return result


if __name__ == "__main__":
    main()
