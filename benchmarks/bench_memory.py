"""Benchmark: peak memory of fetch, train and evaluate on image folders of N and 10 N images (flat in dataset size?).

For each N (default 20,000 and 200,000 images of 32x32), an image folder of N grayscale PNGs in 10 class subfolders
is generated (deterministic: a per-class pattern plus seeded noise), then each stage runs as a separate child
process whose peak RSS is read when it exits (``os.wait4``: ``ru_maxrss``, the high-water mark of the child itself,
or of its largest reaped descendant if that is larger). Nothing measured runs under Ray: Ray workers are not
children of the stage, and their memory would not be counted.

- ``fetch``: ``python -m tasks.fetch`` on the folder (grayscale, labels from the subfolders). Fetch decodes in a
  pool of ``data.ingest_workers`` processes: besides the main process's peak (``peak_rss_mib``), the whole process
  tree is sampled every ``--poll`` seconds from /proc (the stage runs in its own session): ``tree_peak_rss_mib``
  is the largest sampled sum of VmRSS (shared pages counted once per process), ``tree_peak_pss_mib`` the largest
  sampled sum of PSS (shared pages split between the processes that map them).
- ``train``: ``tasks.train.run_local`` (the training loop in the child, no Ray) for ``--train-steps`` steps.
- ``train_classifier``: the classifier the evaluate stage's feature extractor needs. It loads the dataset whole
  (by design: tasks/lib/shards.py ``load_dataset``), so it is recorded but is not part of the flatness goal.
- ``sample``: ``--samples`` images, DDIM with few steps; not measured (it starts Ray), only evaluate's input.
- ``evaluate``: ``python -m tasks.evaluate`` with the classifier extractor and a fresh ``--ref-dir``, so the
  training split's reference statistics are computed over all of its images.

The goal (the issue): the peak RSS of fetch, train and evaluate grows less than 15% from N to 10 N. Each measured
stage runs ``--repeats`` times per N (default 3; train_classifier and sample once): one run's peak can differ from the
next by a quarter at 200,000 images (glibc's per-thread malloc arenas keep what a long extraction freed), so the
results hold every run, the median and the range, and the ratios compare the medians.

Diagnostics (``diag_*``, skipped with ``--no-diagnostics``) say where growth comes from: the listing and split of
the folder alone (``plan_image_folder``), fetch with small shards (``data.shard_images``), train with a small
shuffle buffer (``train.shuffle_buffer_mb``), and the reference statistics alone (``reference_features``), with
the module's chunk and with a small one. Each of those buffers is bounded, but larger than a small dataset.
tests/test_memory_flat.py makes the same check at 4x on small folders, with the buffers made small.

    python -m benchmarks.bench_memory [--sizes 20000,200000] [--image-size 32] [--repeats 3] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GOAL_RATIO = 1.15  # peak RSS at 10 N / at N
FLAT_STAGES = ("fetch", "train", "evaluate")
CLASSES = 10
DIAG_SHARD_IMAGES = 1024  # data.shard_images of the small-shards fetch: 1 MiB at 32x32 gray
DIAG_SHUFFLE_MB = 4  # train.shuffle_buffer_mb of the small-buffer training
DIAG_CHUNK_BYTES = 4 << 20  # tasks.lib.scoring.REFERENCE_CHUNK_BYTES of the small-chunk reference statistics
DIAGNOSTICS = {
    "diag_fetch_plan": "diagnostic: tasks.lib.datasets.plan_image_folder alone (list and split the files)",
    "diag_fetch_small_shards": f"diagnostic: fetch with data.shard_images={DIAG_SHARD_IMAGES}",
    "diag_train_small_buffer": f"diagnostic: train with train.shuffle_buffer_mb={DIAG_SHUFFLE_MB}",
    "diag_reference": "diagnostic: tasks.lib.scoring.reference_features alone (the classifier extractor)",
    "diag_reference_small_chunk": f"diagnostic: reference_features with REFERENCE_CHUNK_BYTES={DIAG_CHUNK_BYTES}",
}
GEN_CHUNK = 1000  # images per generation task (and per noise draw: the pixels depend on it)

# The training loop in the child process, without Ray: argv = params, dataset, checkpoints, loss log, overrides...
TRAIN_CHILD = """\
import sys
from tasks.lib.config import load_config
from tasks.train import run_local
run_local(load_config(sys.argv[1], sys.argv[5:]), sys.argv[2], sys.argv[3], sys.argv[4])
"""

# The evaluate stage's reference statistics alone (tasks.lib.scoring.reference_features, the classifier extractor):
# argv = dataset, classifier weights, REFERENCE_CHUNK_BYTES (0: the module's), batch size.
REFERENCE_CHILD = """\
import sys
from tasks.lib import scoring
from tasks.lib.classifier import FEATURE_EXTRACTOR_NAME, ClassifierFeatureExtractor
from tasks.lib.shards import open_dataset
data, weights, chunk, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if chunk:
    scoring.REFERENCE_CHUNK_BYTES = chunk
layer = ClassifierFeatureExtractor.get_default_feature_layer_for_metric("fid")
fe = scoring.build_extractor(FEATURE_EXTRACTOR_NAME, weights, [layer], False, "")
split = open_dataset(data).train
feats, (mu, sigma) = scoring.reference_features(fe, split, layer, batch, False)
assert mu.shape == (feats.shape[1],) and len(feats) == min(len(split), 50_000), (feats.shape, len(split))
print(f"reference features of {len(split)} images: kept {feats.shape}")
"""

# The fetch stage's listing and split of an image folder alone (tasks.lib.datasets.plan_image_folder): argv = params.
PLAN_CHILD = """\
import sys
from tasks.lib.config import load_config
from tasks.lib.datasets import plan_image_folder
plan = plan_image_folder(load_config(sys.argv[1]).data)
print(f"{len(plan.paths)} files: {len(plan.train)} train, {len(plan.holdout)} holdout")
"""


# -- the image folder -------------------------------------------------------------------------------------------------
def _class_patterns(size: int) -> np.ndarray:
    """One float pattern [CLASSES, size, size] in 0..255 per class: stripes of a class-dependent frequency and angle,
    so that a classifier has something to learn."""
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for k in range(CLASSES):
        angle = np.pi * k / CLASSES
        freq = 1 + k % 5
        out.append(127.5 + 100 * np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle))))
    return np.stack(out)


def _write_chunk(root: str, start: int, stop: int, size: int) -> int:
    from PIL import Image

    patterns = _class_patterns(size)
    rng = np.random.default_rng([0xB17, start])
    noise = rng.normal(0, 40, size=(stop - start, size, size))
    for j, i in enumerate(range(start, stop)):
        k = i % CLASSES
        img = np.clip(patterns[k] + noise[j], 0, 255).astype(np.uint8)
        Image.fromarray(img, mode="L").save(Path(root) / f"class_{k}" / f"{i:07d}.png", compress_level=1)
    return stop - start


def make_image_folder(root: os.PathLike | str, n: int, size: int, workers: Optional[int] = None) -> dict[str, Any]:
    """``n`` grayscale PNGs of ``size``x``size`` in ``CLASSES`` subfolders of ``root`` (image i in class i % 10),
    written by ``workers`` processes; the same files for the same (n, size). Returns count, bytes and seconds."""
    root = Path(root)
    for k in range(CLASSES):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [(str(root), a, min(n, a + GEN_CHUNK), size) for a in range(0, n, GEN_CHUNK)]
    workers = workers or os.cpu_count() or 1
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            done = sum(pool.map(_write_chunk, *zip(*jobs)))
    else:
        done = sum(_write_chunk(*j) for j in jobs)
    nbytes = sum(p.stat().st_size for p in root.rglob("*.png"))
    return {"images": done, "bytes": nbytes, "seconds": round(time.perf_counter() - t0, 1)}


# -- the params -------------------------------------------------------------------------------------------------------
def params(root: os.PathLike | str, image_size: int, train_steps: int = 20, classifier_steps: int = 50,
           num_samples: int = 200, extra: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Any]:
    """A params mapping for a grayscale labeled image folder: a tiny UNet, MLflow off, the classifier extractor."""
    p: dict[str, Any] = {
        "data": {"dataset": "image-folder", "root": str(root), "image_size": image_size, "channels": 1,
                 "holdout_fraction": 0.2, "seed": 0},
        "model": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
                  "num_groups": 8},
        "diffusion": {"timesteps": 100},
        "train": {"steps": train_steps, "batch_size": 64, "lr": 1e-3, "checkpoint_every": train_steps,
                  "log_every": 10, "num_workers": 1, "use_gpu": False, "ema_decay": 0.9},
        "sample": {"num_samples": num_samples, "shard_size": 100, "batch_size": 100, "sampler": "ddim", "steps": 5,
                   "num_workers": 1, "use_gpu": False, "grid_size": 16},
        "classifier": {"steps": classifier_steps},
        "evaluate": {"feature_extractor": "classifier", "kid_subset_size": min(100, num_samples), "repeats": 1},
        "ray": {"num_cpus": 2, "object_store_mb": 100},
        "tracking": {"enabled": False},
        "figures": {"enabled": False},
        "sampler_table": {"enabled": False},
    }
    for section, values in (extra or {}).items():
        p.setdefault(section, {}).update(values)
    return p


def write_params(path: os.PathLike | str, p: dict[str, Any]) -> Path:
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


# -- measuring a child ------------------------------------------------------------------------------------------------
def _session_pids(sid: int) -> list[int]:
    """The processes of session ``sid`` (the stage and everything it started, Ray's daemons included)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after "(comm)": state ppid pgrp session ...
            out.append(int(d))
    return out


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("TQDM_DISABLE", "1")
    return env


def run_measured(cmd: Sequence[str], log: os.PathLike | str, cwd: os.PathLike | str, poll: float = 0.1,
                 tree: bool = True, env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Run ``cmd`` as a child in its own session; return its exit code, wall time and peak RSS (MiB): the child's
    (``peak_rss_mib``, from ``os.wait4``) and, with ``tree``, the sampled peak sums over its session's processes
    (``tree_peak_rss_mib``, ``tree_peak_pss_mib``). Output goes to ``log``."""
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env or child_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    sid = proc.pid
    peak_rss = peak_pss = 0
    processes = set()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if tree:
            pids = _session_pids(sid)
            processes.update(pids)
            peak_rss = max(peak_rss, sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids))
            peak_pss = max(peak_pss, sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids))
        time.sleep(poll)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    wall = time.perf_counter() - t0
    # Whatever the stage left behind in its session (none expected; Ray's daemons exit with their driver).
    deadline = time.time() + 20
    while (left := [p for p in _session_pids(sid) if p != proc.pid]) and time.time() < deadline:
        time.sleep(0.5)
    if left:
        try:
            os.killpg(sid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    r: dict[str, Any] = {"rc": proc.returncode, "wall_s": round(wall, 2),
                         "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}  # KiB on Linux
    if tree:
        r.update(tree_peak_rss_mib=round(peak_rss / 1024, 1), tree_peak_pss_mib=round(peak_pss / 1024, 1),
                 tree_processes=len(processes))
    return r


def check_ok(stage: str, r: dict[str, Any], log: Path) -> None:
    if r["rc"] != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise SystemExit(f"error: {stage} failed (exit {r['rc']}); {log}:\n" + "\n".join(tail))


# -- the benchmark ----------------------------------------------------------------------------------------------------
KEYS = ("peak_rss_mib", "tree_peak_rss_mib", "tree_peak_pss_mib")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A stage's repeats: each key's median (the value compared) with its min and max, and every run."""
    out: dict[str, Any] = {}
    for key in KEYS:
        if key in runs[0]:
            vals = [r[key] for r in runs]
            out[key] = round(float(np.median(vals)), 1)
            out[key.replace("_mib", "_min_mib")], out[key.replace("_mib", "_max_mib")] = min(vals), max(vals)
    out["wall_s"] = round(float(np.median([r["wall_s"] for r in runs])), 2)
    out["runs"] = runs
    return out


def measure_n(n: int, work: Path, args, extra: dict[str, dict[str, Any]]) -> dict[str, Any]:
    py = sys.executable
    d = work / f"n{n}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    folder = d / "images"
    print(f"[N={n}] generating {n} PNGs of {args.image_size}x{args.image_size} ...", flush=True)
    gen = make_image_folder(folder, n, args.image_size, args.gen_workers)
    print(f"[N={n}]   {gen['images']} files, {gen['bytes'] / 2**20:.0f} MiB, {gen['seconds']} s", flush=True)
    prm = write_params(d / "params.yaml", params(folder, args.image_size, args.train_steps, args.classifier_steps,
                                                 args.samples, extra))
    ds, ckpt, models = d / "dataset", d / "checkpoints", d / "models"
    # name: (command, sample the process tree, repeats, paths removed before each run so that nothing is reused:
    # a train with checkpoints would resume, an evaluate with cached reference statistics would not compute them)
    k = args.repeats
    stages = {
        "fetch": ([py, "-m", "tasks.fetch", "--params", prm, "--out", ds], True, k, []),
        "train": ([py, "-c", TRAIN_CHILD, prm, ds, ckpt, d / "train_loss.tsv"], False, k, [ckpt]),
        "train_classifier": ([py, "-m", "tasks.train_classifier", "--params", prm, "--data", ds, "--out",
                              models / "classifier.pt", "--metrics", d / "classifier.json"], False, 1, []),
        "sample": ([py, "-m", "tasks.sample", "--params", prm, "--checkpoints", ckpt, "--out", d / "samples"],
                   False, 1, []),
        "evaluate": ([py, "-m", "tasks.evaluate", "--params", prm, "--data", ds, "--samples", d / "samples",
                      "--classifier", models / "classifier.pt", "--classifier-metrics", d / "classifier.json",
                      "--ref-dir", d / "ref_stats", "--out", d / "eval.json"], False, k, [d / "ref_stats"]),
    }
    if args.diagnostics:
        # Where growth comes from, if any: each measured beside the stage with its bounded buffer made small.
        stages["diag_fetch_plan"] = ([py, "-c", PLAN_CHILD, prm], False, k, [])
        stages["diag_fetch_small_shards"] = ([py, "-m", "tasks.fetch", "--params", prm, "--out", d / "dataset_small",
                                             "--set", f"data.shard_images={DIAG_SHARD_IMAGES}"], True, k, [])
        stages["diag_train_small_buffer"] = ([py, "-c", TRAIN_CHILD, prm, ds, d / "checkpoints_small",
                                              d / "train_loss_small.tsv", f"train.shuffle_buffer_mb={DIAG_SHUFFLE_MB}"],
                                             False, k, [d / "checkpoints_small"])
        stages["diag_reference"] = ([py, "-c", REFERENCE_CHILD, ds, models / "classifier.pt", 0, 250], False, k, [])
        stages["diag_reference_small_chunk"] = ([py, "-c", REFERENCE_CHILD, ds, models / "classifier.pt",
                                                 DIAG_CHUNK_BYTES, 250], False, k, [])
    out: dict[str, Any] = {"n": n, "generate": gen, "stages": {}}
    for name, (cmd, tree, repeats, reset) in stages.items():
        runs = []
        for i in range(repeats):
            for path in reset:
                shutil.rmtree(path, ignore_errors=True)
            log = d / f"{name}.{i}.log"
            r = run_measured([str(c) for c in cmd], log, cwd=d, poll=args.poll, tree=tree)
            check_ok(name, r, log)
            if name == "evaluate" and "recomputing the reference statistics" not in log.read_text(errors="replace"):
                raise SystemExit(f"error: evaluate did not compute the reference statistics; see {log}")
            runs.append(r)
            shown = f"peak RSS {r['peak_rss_mib']:.0f} MiB" if name != "sample" else "(not measured)"
            if "tree_peak_rss_mib" in r:
                shown += (f", tree {r['tree_peak_rss_mib']:.0f} MiB RSS / {r['tree_peak_pss_mib']:.0f} MiB PSS "
                          f"({r['tree_processes']} processes)")
            print(f"[N={n}] {name:26s} {r['wall_s']:7.1f} s  {shown}", flush=True)
        if name == "sample":
            r = {"wall_s": runs[0]["wall_s"], "note": "not measured (Ray): the evaluate stage's input"}
        else:
            r = summarize(runs)
            if name == "train_classifier":
                r["note"] = "loads the dataset whole by design; not part of the flatness goal"
            elif name in DIAGNOSTICS:
                r["note"] = DIAGNOSTICS[name]
        out["stages"][name] = r
    meta = json.loads((ds / "dataset.json").read_text())
    ev = json.loads((d / "eval.json").read_text())
    out["dataset"] = {"train": meta["count"]["train"], "holdout": meta["count"]["holdout"],
                      "shape": meta["shape"], "num_classes": meta["num_classes"],
                      "train_shards": len(meta["splits"]["train"]["shards"]),
                      "bytes": sum(p.stat().st_size for p in ds.rglob("*.parquet"))}
    out["evaluate_result"] = {"num_reference": ev.get("num_reference"), "fid": ev.get("fid"),
                              "floor_fid": ev.get("floor", {}).get("fid"),
                              "feature_extractor": ev.get("feature_extractor")}
    if ev.get("num_reference") != meta["count"]["train"]:
        raise SystemExit(f"error: evaluate used {ev.get('num_reference')} reference images, the train split has "
                         f"{meta['count']['train']}")
    return out


def git_commit() -> dict[str, Any]:
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def lscpu_model() -> Optional[str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), None)


def parse_sets(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    from tasks.lib.config import parse_override

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, value = parse_override(item)
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


def table(runs: list[dict[str, Any]], ratios: dict[str, dict[str, float]]) -> str:
    """Median peak (min-max over the repeats) per N, and the ratio of the medians (its range: the worst and best
    pairing of repeats)."""
    rows = [("fetch (main)", "fetch", "peak_rss_mib"), ("fetch (tree, RSS sum)", "fetch", "tree_peak_rss_mib"),
            ("fetch (tree, PSS sum)", "fetch", "tree_peak_pss_mib"), ("train", "train", "peak_rss_mib"),
            ("evaluate", "evaluate", "peak_rss_mib"), ("train_classifier*", "train_classifier", "peak_rss_mib")]
    rows += [(stage, stage, "peak_rss_mib") for stage in DIAGNOSTICS if stage in runs[0]["stages"]]
    head = f"{'peak RSS, MiB':28s}" + "".join(f"{'N=' + format(r['n'], ','):>18s}" for r in runs) \
        + f"{'ratio':>8s}  {'range':13s}"
    lines = [head, "-" * len(head)]
    for label, stage, key in rows:
        vals = ""
        for r in runs:
            st = r["stages"][stage]
            lo, hi = st[key.replace("_mib", "_min_mib")], st[key.replace("_mib", "_max_mib")]
            vals += f"{st[key]:7.0f}" + (f" ({lo:4.0f}-{hi:4.0f})" if hi > lo else " " * 12)
        q = ratios[f"{stage}:{key}"]
        lines.append(f"{label:28s}{vals}{q['median']:8.3f}  {q['min']:.3f}-{q['max']:.3f}")
    lines.append("* loads the dataset whole by design; not part of the goal")
    return "\n".join(lines)


def goal_checks(ratios: dict[str, dict[str, float]]) -> tuple[dict[str, bool], dict[str, bool]]:
    """Whether each stage's ratio is below the goal: of the medians, and in every pairing of single runs. For fetch's
    tree, both sums are checked; the sampled PSS sum is the noisier one (a sum read process by process while the
    decode workers start and stop)."""
    keys = {s: f"{s}:peak_rss_mib" for s in FLAT_STAGES}
    keys.update(fetch_tree_rss="fetch:tree_peak_rss_mib", fetch_tree_pss="fetch:tree_peak_pss_mib")
    return ({s: ratios[k]["median"] < GOAL_RATIO for s, k in keys.items()},
            {s: ratios[k]["max"] < GOAL_RATIO for s, k in keys.items()})


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20000,200000", help="comma-separated image counts N (first: the base)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--classifier-steps", type=int, default=50)
    p.add_argument("--samples", type=int, default=200, help="images sampled for evaluate (DDIM-5)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each measured stage per N (the peak of one run varies by up to ~30%%)")
    p.add_argument("--poll", type=float, default=0.1, help="seconds between samples of fetch's process tree")
    p.add_argument("--gen-workers", type=int, default=None, help="processes writing the PNGs (default: all cores)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key for every stage, e.g. --set train.shuffle_buffer_mb=16")
    p.add_argument("--no-diagnostics", dest="diagnostics", action="store_false",
                   help="skip the diagnostic children (each stage alone or with its bounded buffer made small)")
    p.add_argument("--work", default=None, help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--name", default="memory", help="results file name (benchmarks/results/<name>.json)")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    extra = parse_sets(args.sets)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        runs = [measure_n(n, work, args, extra) for n in sizes]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t0
    base, big = runs[0], runs[-1]
    # median: of the medians; min / max: the best and worst pairing of single runs (noise, not only growth)
    ratios: dict[str, dict[str, float]] = {}
    for stage in ("fetch", "train", "evaluate", "train_classifier", *(DIAGNOSTICS if args.diagnostics else ())):
        for key in KEYS:
            a, b = base["stages"][stage], big["stages"][stage]
            if key in a:
                lo, hi = key.replace("_mib", "_min_mib"), key.replace("_mib", "_max_mib")
                ratios[f"{stage}:{key}"] = {"median": round(b[key] / a[key], 3), "min": round(b[lo] / a[hi], 3),
                                            "max": round(b[hi] / a[lo], 3)}
    met, met_every_pairing = goal_checks(ratios)
    print(table(runs, ratios))
    print(f"goal: peak RSS at N={big['n']:,} < {GOAL_RATIO} x at N={base['n']:,} for {', '.join(FLAT_STAGES)} "
          f"(medians of {args.repeats}): " + ", ".join(
              f"{k} {'met' if v else 'NOT met'}{'' if met_every_pairing[k] else ' (not in every pairing of runs)'}"
              for k, v in met.items()) + f"; {total / 60:.1f} min in all")
    from benchmarks.common import write_result

    result = {
        "goal": f"peak RSS of fetch, train ({args.train_steps} steps) and evaluate at {big['n']:,} images "
                f"< {GOAL_RATIO} x at {base['n']:,}",
        "measured": "peak_rss_mib: the stage process's ru_maxrss from os.wait4 (KiB / 1024); fetch also "
                    f"tree_peak_rss_mib / tree_peak_pss_mib: the largest sum over its process tree (the decode "
                    f"pool), sampled every {args.poll} s from /proc. Each stage runs --repeats times (train_classifier "
                    "and sample once): the value is the median, with min and max; ratios: median of the medians, "
                    "min / max: the best / worst pairing of single runs",
        "sizes": sizes, "image_size": args.image_size, "channels": 1, "classes": CLASSES,
        "train_steps": args.train_steps, "classifier_steps": args.classifier_steps, "samples": args.samples,
        "params_overrides": extra,
        "params": params("<folder>", args.image_size, args.train_steps, args.classifier_steps, args.samples, extra),
        "repeats": args.repeats, "runs": runs, "ratios": ratios, "met": met, "met_every_pairing": met_every_pairing,
        "total_wall_s": round(total, 1),
        "git": git_commit(), "lscpu_model_name": lscpu_model(),
    }
    command = "python -m benchmarks.bench_memory " + " ".join(sys.argv[1:] if argv is None else argv)
    write_result(args.name, result, command.strip(), Path(args.results_dir) if args.results_dir else None)
    return result


if __name__ == "__main__":
    main()
