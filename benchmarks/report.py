"""`make report`: the measured blocks of README.md, BENCHMARKS.md and docs/*.md, rewritten from the committed records.

A block sits between ``<!-- report:NAME:begin -->`` and ``<!-- report:NAME:end -->``. Its text, tables and the few
numbers between them, is made here from benchmarks/results/*.json alone (no clock, no machine state) and ends by
naming the records it read; the prose around the blocks is the Markdown's own. A second run changes nothing.

    python -m benchmarks.report [--root ROOT]          # rewrite the blocks
    python -m benchmarks.report [--root ROOT] --check  # exit 1 naming the blocks the records would change

Figures we did not measure (the paper's TPU v3-8, the datasheet) come from benchmarks/reference.py with their source.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.reference import DATASHEET_SOURCE, PAPER_TPU_V3_8, datasheet_tflops
from ddpm.config import SAMPLER_TITLES

REPO = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"
BLOCK_RE = re.compile(r"<!-- report:(?P<name>[\w-]+):begin -->\n(?P<body>.*?)<!-- report:(?P=name):end -->", re.S)

# Goals the benchmarks were written against, not measurements: ours / diffusers, Ray's overhead per step, the cached
# evaluation's speed-up; the GPU run's images/s.
TRAIN_GOAL, SAMPLE_GOAL, RAY_OVERHEAD_GOAL, EVALUATE_GOAL = 1.2, 1.5, 0.10, 2.0
GPU_TRAIN_GOAL, GPU_DDPM_GOAL = 6000, 25
GOAL_RATIO = 1.15  # peak RSS at 10 N images / at N


class MissingRecord(LookupError):
    """A block's record is not in benchmarks/results/: the block then says so."""


class Records:
    """The record files under ``root``, read once. Remembers which ones a block asked for, found or not, and links
    them relative to the Markdown file being written (``prefix``)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._cache: dict[str, Any] = {}
        self.used: set[str] = set()
        self.prefix = ""

    def get(self, rel: str) -> Any:
        self.used.add(rel)
        if rel not in self._cache:
            path = self.root / rel
            self._cache[rel] = json.loads(path.read_text()) if path.is_file() else None
        return self._cache[rel]

    def optional(self, name: str) -> Any:
        return self.get(f"{RESULTS}/{name}.json")

    def result(self, name: str) -> Any:
        x = self.optional(name)
        if x is None:
            raise MissingRecord(f"{RESULTS}/{name}.json")
        return x

    def glob(self, pattern: str) -> list[tuple[str, Any]]:
        """(file, record) of every result file matching ``pattern``, in name order."""
        return [(f"{RESULTS}/{p.name}", self.get(f"{RESULTS}/{p.name}"))
                for p in sorted((self.root / RESULTS).glob(pattern))]

    def gpu_runs(self) -> list[tuple[str, list[dict]]]:
        """(file, rows) of every gpu.sh record (a list of rows; a run's second file sorts after it)."""
        runs = [(f, x) for f, x in self.glob("gpu_*.json") if isinstance(x, list)]
        if not runs:
            raise MissingRecord(f"{RESULTS}/gpu_*.json")
        return runs

    def link(self, rel: str, text: Optional[str] = None) -> str:
        return f"[{text or rel}]({self.prefix}{rel})"

    def src(self, name: str) -> str:
        """The record's link and where it ran, for a table's last column."""
        m = self.result(name)["machine"]
        return (f"{self.link(f'{RESULTS}/{name}.json', f'{name}.json')}: {m['date']}, {m['cpu']}, "
                f"{m['torch_threads']} thread(s), load {m['load_average'][0]}")


# -- formatting -------------------------------------------------------------------------------------------------------
def _n(v: float, d: int = 0) -> str:
    return f"{v:,.{d}f}"


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _pct(v: float, d: int = 1) -> str:
    return f"{v * 100:.{d}f}%"


def _dur(s: float) -> str:
    s = round(s)
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _spread(ratios: list[float]) -> str:
    return f"{len(ratios)}: {_x(min(ratios))}-{_x(max(ratios))}"


def _verdict(ratios: list[float], num: str, den: str) -> str:
    """What the per-pair ratios (``num``'s throughput / ``den``'s) say, without a test statistic."""
    lo, hi = min(ratios), max(ratios)
    if lo > 1:
        return f"{num} faster in all {len(ratios)} pairs"
    if hi < 1:
        return f"{den} faster in all {len(ratios)} pairs"
    return "pairs disagree: not distinguishable"


def _goal(v: float, goal: float, fmt: Callable[[float], str] = _x) -> str:
    return f">= {fmt(goal)}: {'met' if v >= goal else 'not met'}"


# -- BENCHMARKS.md ----------------------------------------------------------------------------------------------------
def _vs(num: str, what: str, config: str, run: dict, other: str, goal: Optional[float], src: str) -> list[str]:
    """A row of an A/B/A/B comparison: ours against ``other``, the medians, the pairs' median ratio and range."""
    pairs = [a / b for a, b in zip(run["values"]["ours"], run["values"][other])]
    return [num, what, config, f"{run['median']['ours']:.3g}", f"{other} {run['median'][other]:.3g}",
            _x(run["ratios"][other]), _spread(pairs), "-" if goal is None else _goal(run["ratios"][other], goal), src]


def block_results(r: Records) -> str:
    """The CPU benchmarks that `make bench` runs, one row per comparison."""
    rows = []
    if t := r.optional("train"):
        for run in t["runs"]:
            cfg = f"{run['config']}, batch {run['batch']}, fp32, {run['params_ours']:,} params"
            rows.append(_vs("1", "training step, images/s", cfg, run, "diffusers", TRAIN_GOAL, r.src("train")))
            rows += [_vs("1a", "switch ablation, images/s", cfg, run, k, None, r.src("train"))
                     for k in run["ratios"] if k != "diffusers"]
    for name, num in (("sample", "2"), ("sample_compile", "2c")):
        for run in (r.optional(name) or {}).get("runs", []):
            what = f"sampling {run['sampler']}" + (", `sample.compile`" if num == "2c" else "") + ", images/s"
            cfg = f"{run['config']}, batch {run['batch']}, first forward {run['first_forward_s']} s"
            rows.append(_vs(num, what, cfg, run, "diffusers", SAMPLE_GOAL, r.src(name)))
    if y := r.optional("ray"):
        plain, ray1 = ([x["step_s"] for x in y["runs"][k]] for k in ("plain", "ray_1_worker"))
        over = [a / b - 1 for a, b in zip(ray1, plain)]
        cfg = (f"digits preset, batch {y['batch']}, {y['threads']} threads, {y['steps_per_run']} steps/run; "
               f"`ray.init` {y['ray_init_s']} s, trainer start-up ~{y['trainer_startup_s_median']:.1f} s per fit")
        rows.append(["3", "Ray Train 1 worker vs the plain loop, s/step", cfg, f"{statistics.median(ray1):.3f}",
                     f"plain {statistics.median(plain):.3f}", f"{y['ray_overhead_per_step'] * 100:+.1f}%",
                     f"{len(over)}: {min(over) * 100:+.1f}% to {max(over) * 100:+.1f}%",
                     f"<= +{RAY_OVERHEAD_GOAL:.0%}: " + ("met" if y["ray_overhead_per_step"] <= RAY_OVERHEAD_GOAL
                                                        else "not met"), r.src("ray")])
        if two := [x["step_s"] for x in y["runs"]["ray_2_workers"]]:
            rows.append(["3b", "Ray Train 2 workers x 1 thread vs 1 worker, s/step", "the same",
                         f"{statistics.median(two):.3f}", f"1 worker {statistics.median(ray1):.3f}",
                         _x(y["two_vs_one_worker_speedup"]), f"{len(two)} run(s)", "-", r.src("ray")])
    if e := r.optional("evaluate"):
        pairs = [a / b for a, b in zip(e["first_s"], e["cached_s"])]
        rows.append(["4", "evaluate: cached vs first reference statistics, s",
                     f"{e['feature_extractor']}, {e['num_generated']} samples vs {e['num_reference']:,} images",
                     f"{statistics.median(e['cached_s']):.2f}", f"first {statistics.median(e['first_s']):.2f}",
                     _x(e["speedup"]), _spread(pairs), _goal(e["speedup"], EVALUATE_GOAL), r.src("evaluate")])
    if d := r.optional("demo"):
        rows.append(["5", "`make demo` end to end", "params.yaml (digits); stages in README.md",
                     _dur(d["total_wall_s"]), "-", "-", "-", "-", r.src("demo")])
    if b := r.optional("run_all"):
        parts = ", ".join(f"{k} {_dur(v['wall_s'])}" + ("" if v["rc"] == 0 else " (failed)")
                          for k, v in b["benchmarks"].items())
        rows.append(["", "`make bench` itself", parts, _dur(b["total_wall_s"]), "-", "-", "-", "-", r.src("run_all")])
    if not rows:
        raise MissingRecord(f"{RESULTS}/train.json")
    return _table(["#", "benchmark", "configuration", "ours", "other", "ours / other (median)", "pairs: range",
                   "goal", "record: date, CPU, threads, load"], rows)


def block_profile(r: Records) -> str:
    p = r.result("profile_digits")
    theirs = {op["op"]: op for op in p["diffusers"]["top_ops"]}
    rows = [[f"`{op['op']}`", f"{_pct(op['share'], 0)} ({op['calls']})",
             f"{_pct(theirs[op['op']]['share'], 0)} ({theirs[op['op']]['calls']})" if op["op"] in theirs else "-"]
            for op in p["ours"]["top_ops"]]
    return (_table(["operator", "ours: share of the self CPU time (calls)", "diffusers"], rows) + f"\n\n"
            f"`{p['command']}`: torch.profiler, one forward + backward at batch {p['batch']}; "
            f"{r.src('profile_digits')}.")


def block_switches(r: Records) -> str:
    """The training switches: the optimizer step alone (adam.json) and every combination on the whole step."""
    a, rows = r.result("adam"), []
    label = {"loop": "for-loop (`auto`, torch's CPU default)", "foreach": "foreach"}
    for run in a["runs"]:
        for other in run["ratios"]:
            pairs = [f / o for f, o in zip(run["values"]["fused"], run["values"][other])]
            rows.append([f"Adam step alone: fused vs {label.get(other, other)}", f"{run['config']}",
                         f"{run['ms_per_step']['fused']:.0f} vs {run['ms_per_step'][other]:.0f} ms",
                         _x(run["ratios"][other]), _verdict(pairs, "fused", other), r.src("adam")])
    for rel, x in r.glob("switches_*.json"):
        name = Path(rel).stem
        for k in x["ratios"]:
            pairs = [d / o for d, o in zip(x["values"][x["default"]], x["values"][k])]
            rows.append([f"whole training step: default (`{x['default']}`) vs `{k}`",
                         f"{x['config']}, batch {x['batch']}", "-", _x(x["ratios"][k]),
                         _verdict(pairs, "the default", "the other"), r.src(name)])
    return _table(["comparison", "network", "ms per step", "ratio (median of pairs)", "what the pairs say",
                   "record: date, CPU, threads, load"], rows)


def block_gpu(r: Records) -> str:
    """Every throughput row of every gpu.sh record, in the order measured, against its run's measured roof."""
    paper = PAPER_TPU_V3_8
    paper_ips = paper["train_steps_per_s"] * paper["train_batch"]
    runs, table = [], []
    for i, (rel, recs) in enumerate(r.gpu_runs(), 1):
        m, roof = (next(x for x in recs if x["name"].startswith(k)) for k in ("machine", "bf16_matmul_"))
        sheet = m.get("datasheet_dense_bf16_tflops") or datasheet_tflops(m["gpu"])
        log = rel.replace(".json", ".log")  # gpu.sh's output, with the nvidia-smi line, when it was kept
        if (r.root / log).is_file():
            r.used.add(log)
        runs.append(f"run {i} = {r.link(rel, Path(rel).name)}" + (f" ({r.link(log, 'log')})" if log in r.used else "")
                    + f": {m['gpu']}, torch {m['torch']}, CUDA {m['cuda']}, {m['date']}; measured roof, a bf16 "
                    f"8192³ matmul: {roof['tflops']} TFLOP/s")
        for x in recs:
            name, batch = x["name"], int((re.search(r"_b(\d+)$", x["name"]) or [0, 0])[1])
            if x.get("out_of_memory"):
                table.append([f"`{name}`", i, f"{batch:,}", "out of memory", "", "", "", "", ""])
            if "images_per_s" not in x:
                continue
            ips, tf = x["images_per_s"], x["achieved_tflops"]
            projected = "projected" in x.get("measured", "")
            train, ddpm = name.startswith("train_"), "ddpm1000" in name
            goal = GPU_TRAIN_GOAL if train else GPU_DDPM_GOAL if ddpm else None
            table.append([f"`{name}`", i, f"{x['batch']:,}", _n(ips, int(ips < 100)) + (
                f" ({x['measured'].split(' (')[0]})" if projected else ""), tf, _pct(tf / roof["tflops"]),
                _pct(tf / sheet) if sheet else "-", _x(ips / paper_ips) if train and x["batch"] == paper[
                    "train_batch"] else "-", _goal(ips, goal, _n) if goal else "-"])
    flops = next(x for x in r.gpu_runs()[0][1] if x["name"] == "flops")
    return "\n\n".join([
        "Runs: " + "; ".join(runs) + f". The paper's CIFAR-10 UNet; FLOPs per image (`torch.utils.flop_counter`): "
        f"{flops['forward_gflop_per_image']} GFLOP forward, {flops['train_gflop_per_image']} forward + backward. "
        f"Datasheet: {sheet} TFLOP/s ({DATASHEET_SOURCE}). The paper: {paper['train_steps_per_s']} steps/s × "
        f"{paper['train_batch']} = {paper_ips:,} images/s; a batch of {paper['sample_batch']} sampled in "
        f"{paper['sample_batch_s']} s ({paper['source']}).",
        _table(["measurement (bf16 autocast unless named)", "run", "batch", "images/s", "TFLOP/s",
                "of the measured roof", "of the datasheet", f"/ the paper's TPU v3-8 at batch {paper['train_batch']}",
                "goal, images/s"], table)])


def block_loader(r: Records) -> str:
    """What one loader worker delivers per format and image size, and the cores that feed a GPU."""
    x = r.result("loader")
    out = [f"Data: {x['data']}. Median of {x['settings']['epochs']} epochs; {x['cpu_model_name']}, 1-minute load "
           f"average before the run {x['load_average_before'][0]}; `{x['command']}`."]
    for size in x["sizes"]:
        c, h, w = size["shape"]
        rows = [[f"`{k}`", _n(f["images_per_s"]) + (f" (+{f['epoch_startup_s']:.1f} s per epoch)"
                                                           if "epoch_startup_s" in f else ""),
                 f"{f['cpu_s_per_1k_images']:.3g}", f"{f['of_raw_pixels']:.2f}", f"{f['first_batch_s']:.3g} s"]
                for k, f in size["formats"].items()]
        out += [f"**{h}x{w}x{c}**, {size['images']:,} images, batch {size['batch']}:", _table(
            ["format", "images/s", "CPU s per 1,000 images", "bytes on disk / raw pixels", "first batch of an epoch"],
            rows)]
    cn = x["cores_needed"]
    rows = [[k, _n(v["target_images_per_s"]), f"{v['formats']['parquet']['cores_by_cpu_time']:.2g}",
             f"{v['formats']['parquet-png']['cores_by_cpu_time']:.2g}"] for k, v in cn.items() if isinstance(v, dict)]
    out += [f"Cores of loading one GPU needs (32x32: the H200's rate; 256x256: {cn['gpu_rate_256_basis']}):",
            _table(["image size", "GPU images/s", "cores, ours", "cores, PNG"], rows)]
    return "\n\n".join(out)


def block_memory(r: Records) -> str:
    """Peak RSS of fetch, train and evaluate at N and 10N images."""
    x = r.result("memory")
    runs = {run["n"]: run["stages"] for run in x["runs"]}
    small, big = sorted(runs)[:2]
    rows = []
    measured = [(s, "peak_rss_mib") for s, v in runs[small].items() if "peak_rss_mib" in v]  # not sample: Ray's
    for stage, key in measured + [("fetch", "tree_peak_rss_mib")]:
        a, b = runs[small][stage][key], runs[big][stage][key]
        goal = "n/a" if stage == "train_classifier" else "met" if b / a < GOAL_RATIO else "**not met**"
        rows.append([stage + (" with its decode processes" if key.startswith("tree") else ""), f"{_n(a)} MiB",
                     f"{_n(b)} MiB", f"{b / a:.3f}", goal])
    return (_table(["stage", f"peak RSS at {small:,} images", f"at {big:,}", "ratio", f"goal < {GOAL_RATIO}"], rows) +
            f"\n\nImage folders of generated {x['image_size']}x{x['image_size']} PNGs in {x['classes']} class "
            f"folders, {x['channels']} channel; every stage a child process, its peak RSS from `os.wait4`, the median "
            f"of {x['repeats']} runs; {x['lscpu_model_name']}, {x['machine']['date']}, {x['total_wall_s']:.0f} s "
            f"in all; `{x['command']}`.")


def block_solver_study(r: Records) -> str:
    x = r.result("solver_study")
    rows, ref = x["rows"], x["reference_fid"]
    ddpm = next(t for t in rows if t["sampler"] == "ddpm")
    nfes = sorted({t["nfe"] for t in rows if t["sampler"] != "ddpm"})
    cells: dict[tuple, dict[int, dict]] = {}
    for t in rows:
        if t["sampler"] != "ddpm":
            cells.setdefault((t["sampler"], t["eta"], t["spacing"]), {})[t["nfe"]] = t
    cell = "{0[fid_mean]:.3f} ± {0[fid_std]:.2f} ({1:.2f}x)"
    table = [[SAMPLER_TITLES[s] + (f", η={eta:g}" if eta is not None else ""), sp]
             + [cell.format(by[n], by[n]["fid_mean"] / ref) if n in by else "–" for n in nfes]
             for (s, eta, sp), by in cells.items()]
    m = x["machine"]
    return "\n\n".join([
        _table(["sampler", "spacing"] + [f"NFE {n}" for n in nfes], table),
        f"DDPM-{ddpm['nfe']} (Algorithm 2, the reference): FID {ref:.3f} ± {ddpm['fid_std']:.3f}. A cell: mean ± std "
        f"over {x['draws']} disjoint draws of {x['samples_per_draw']:,} samples (seeds 0–"
        f"{x['draws'] * x['samples_per_draw'] - 1:,}) and the mean's ratio to DDPM's; {x['feature_extractor']} against "
        f"the {x['num_reference']:,} training images; checkpoint `{Path(x['checkpoint']).name}` of the demo (EMA).",
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores) by `{x['command']}`."])


def block_solvers(r: Records) -> str:
    x = r.result("solvers")
    q, med = x["quality"], x["timing"]["median"]
    ours, fast, pipe = list(q)
    label = {ours: "DDPM-1000, Algorithm 2 (ours)", pipe: "DDPM-1000, diffusers `DDPMPipeline`",
             fast: f"{SAMPLER_TITLES.get(x['solver'], x['solver'])}, {x['spacing']} spacing"}
    nfe = {ours: 1000, pipe: 1000, fast: x["nfe"]}
    rows = [[label[n], nfe[n], f"{q[n]['fid']:.3f} ± {q[n]['fid_std']:.2f}",
             "–" if n == ours else f"{q[n]['fid'] - q[ours]['fid']:+.3f} ± {q[n]['fid_delta_std']:.2f}",
             f"{med[n]:.2f}", "–" if n == fast else f"{med[fast] / med[n]:.1f}x"] for n in q]
    return "\n\n".join([
           _table(["sampler", "NFE", "FID ± σ", "− DDPM (ours) ± σ", "images/s", "the solver's speed-up"], rows),
           f"FID of {x['samples']:,} samples per row (seeds 0–{x['samples'] - 1:,}; the pipeline draws from one "
           f"generator seeded 0) against the {x['num_reference']:,} training images, {x['feature_extractor']}; "
           f"checkpoint `{Path(x['checkpoint']).name}` of the demo (EMA) in every row. images/s: median of "
           f"{x['timing']['pairs']} alternating runs of a batch of {x['batch']}, {x['threads']} threads. σ: std over "
           f"200 bootstrap resamplings (paired with ours for the solver, unpaired for the pipeline). "
           f"{x['machine']['cpu']}, {x['machine']['date']}, `{x['command']}`."])


# -- README.md and docs/ ----------------------------------------------------------------------------------------------
def block_demo(r: Records) -> str:
    d = r.result("demo")
    m, ev, det = d["machine"], d["evaluate"], d["stage_details"]
    smp, fid, floor = det["sample"], ev["fid"], ev["floor"]
    stages = []
    for name, s in d["stages"].items():
        extra = {"train": f" ({det['train']['steps']:,} steps)",
                 "sample": f" ({ev['repeats']} × {smp['count'] // ev['repeats']:,} images, "
                           f"{SAMPLER_TITLES.get(smp['sampler'], smp['sampler'])} at {smp['steps']} NFE)"}
        stages.append(f"{name} {s['wall_s']:.0f} s" + extra.get(name, ""))
    kid = ev["kid_mean"]
    rows = [["machine", f"{m['cores']} cores, {m['cpu']}, {'no GPU' if not m['gpu'] else m['gpu']}; {m['date']}"],
            ["`make demo` after install", f"**{_dur(d['total_wall_s'])}**"],
            ["each stage (its own process, through `dvc repro`)", ", ".join(stages)],
            [f"FID ({ev['feature_extractor']} features), mean ± std of {ev['repeats']} seed ranges of "
             f"{ev['num_generated']:,} images", f"**{fid['mean']:.3f}" + (f" ± {fid['std']:.3f}" if fid["std"] else "")
             + "** (" + ", ".join(f"{v:.3f}" for v in fid["values"]) + ")"],
            ["real-vs-real floor; FID / floor", f"{floor['fid']:.3f}; {ev['fid_ratio']:.2f}x on the mean, "
                                                f"{ev['fid_ratio_min']:.2f}x on the best range"],
            ["KID (floor)", f"{kid['mean']:.3f}" + (f" ± {kid['std']:.3f}" if kid["std"] else "")
             + f" ({floor['kid_mean']:.3f})"],
            ["the classifier's held-out accuracy", _pct(d["classifier"]["accuracy"])]]
    return _table(["measured by `" + d["command"] + "`", ""], rows)


def block_sampler_table(r: Records) -> str:
    from tasks.sampler_table import markdown_table

    d = r.result("demo")
    t = d["sampler_table"]
    evals = sum(x["steps"] for x in t["rows"])
    return (markdown_table(t).rstrip("\n") + f"\n\nMeasured {d['machine']['date']} by `{d['command']}`: the rows cost "
            f"{evals:,} network evaluations per seed, {evals * t['num_samples']:,} in all; the stage took "
            f"{_dur(d['stages']['sampler_table']['wall_s'])} in the demo.")


def block_inpaint(r: Records) -> str:
    x = r.result("inpaint")
    sampler = f"{x['sampler'].upper()}-{x['steps']}, η={x['eta']:g}"
    rows = [["held-out digits inpainted", f"{x['count']:,} ({x['distinct_originals']:,} distinct), mask "
                                          f"{x['mask']}, {sampler}, `{x['checkpoint']}`"],
            ["known pixels that differ from the input", f"{x['known_pixels_differing']:,} of {x['known_pixels']:,}"],
            ["inpainted digits the classifier gives the original's label", _pct(x["label_agreement"])],
            ["chance; the classifier on the originals", f"{_pct(x['chance'], 0)}; "
                                                        f"{_pct(x['classifier_accuracy_on_originals'])}"]]
    return _table(["measured by `" + x["command"].split(" --")[0] + "`", x["machine"]["date"]], rows)


def block_repro(r: Records) -> str:
    """How far the same seeds land when the batch split or the thread count changes."""
    x = r.result("repro")
    rows = [[row["what"], f"{row['eta']:g}", "yes" if row["bitwise_equal"] else "no", f"{row['max_abs_diff']:.1e}",
             f"{row['uint8_pixels_differing']:,} of {row['uint8_pixels']:,}", row["uint8_max_levels"]]
            for row in x["rows"]]
    return (_table(["samples compared", "η", "bitwise equal", "max abs difference ([-1, 1])", "uint8 pixels moved",
                    "by at most (levels)"], rows) +
            f"\n\n{x['sampler']} of `{x['checkpoint']}` ({x['network']}); {x['machine']['cpu']}, "
            f"{x['machine']['date']}; `{x['command'].split(' --')[0]}`.")


BLOCKS: dict[str, dict[str, Callable[[Records], str]]] = {
    "README.md": {"demo": block_demo},
    "BENCHMARKS.md": {"results": block_results, "profile": block_profile, "switches": block_switches,
                      "gpu": block_gpu, "loader": block_loader, "memory": block_memory,
                      "solver_study": block_solver_study, "solvers": block_solvers},
    "docs/pipeline.md": {"repro": block_repro},
    "docs/sampling.md": {"sampler_table": block_sampler_table, "inpaint": block_inpaint},
    "docs/scaling.md": {"memory": block_memory},
}


def _wrap(text: str, width: int = 118) -> str:
    """Paragraphs wrapped like the hand-written text around them; tables left alone."""
    return "\n".join(line if not line or line.startswith("|") or len(line) <= width else
                     textwrap.fill(line, width, break_long_words=False, break_on_hyphens=False)
                     for line in text.split("\n"))


def render(recs: Records, file: str, name: str) -> str:
    """A block's body: its text and, last, the record files it read (linked from ``file``, sorted)."""
    recs.used, recs.prefix = set(), os.path.relpath(recs.root, (recs.root / file).parent) + "/"
    recs.prefix = "" if recs.prefix == "./" else recs.prefix
    try:
        text = BLOCKS[file][name](recs)
    except MissingRecord as e:
        text = f"No record yet: {e} is missing (BENCHMARKS.md names the command that writes it)."
    found = sorted(u for u in recs.used if (recs.root / u).is_file())
    missing = sorted(u for u in recs.used if not (recs.root / u).is_file())
    cite = (f"<sub>Generated by `make report` from {', '.join(recs.link(u) for u in found) or 'no record'}"
            + (f" ({', '.join(missing)}: not recorded)" if missing else "")
            + "; edit the records, not this text.</sub>")
    return f"{_wrap(text)}\n\n{_wrap(cite)}\n"


def rewrite(text: str, file: str, recs: Records) -> tuple[str, list[str]]:
    """``text`` with every report block of ``file`` regenerated; also the names of the blocks that changed."""
    found = [m.group("name") for m in BLOCK_RE.finditer(text)]
    unknown, absent = sorted(set(found) - set(BLOCKS[file])), sorted(set(BLOCKS[file]) - set(found))
    if unknown or absent or len(found) != len(set(found)):
        problems = [f"unknown: {', '.join(unknown)}" * bool(unknown), f"missing: {', '.join(absent)}" * bool(absent),
                    "duplicated" * (len(found) != len(set(found)))]
        raise SystemExit(f"error: {file}: report blocks {'; '.join(p for p in problems if p)} "
                         f"(known: {', '.join(BLOCKS[file])})")
    changed: list[str] = []

    def sub(m: re.Match) -> str:
        name, body = m.group("name"), render(recs, file, m.group("name"))
        if body != m.group("body"):
            changed.append(name)
        return f"<!-- report:{name}:begin -->\n{body}<!-- report:{name}:end -->"

    return BLOCK_RE.sub(sub, text), changed


def run(root: Path = REPO, check: bool = False) -> list[str]:
    """Regenerate (or with ``check``, only compare) every block; returns ``file:block`` of the stale ones."""
    root, stale = Path(root), []
    recs = Records(root)
    for file in BLOCKS:
        path = root / file
        new, changed = rewrite(path.read_text(), file, recs)
        stale += [f"{file}:{name}" for name in changed]
        if changed and not check:
            tmp = path.with_name(f".{path.name}.report.tmp")
            tmp.write_text(new)
            os.replace(tmp, path)
    return stale


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(REPO), help="the checkout whose Markdown files and records to use")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 naming the blocks the records change")
    args = p.parse_args(argv)
    stale = run(Path(args.root), check=args.check)
    if args.check and stale:
        print(f"stale report blocks (run `make report`): {', '.join(stale)}", file=sys.stderr)
    else:
        print("report blocks match the records" if args.check else
              f"rewrote {', '.join(stale)}" if stale else "report blocks already match the records")
    return int(args.check and bool(stale))


if __name__ == "__main__":
    sys.exit(main())
