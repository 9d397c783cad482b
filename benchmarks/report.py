"""`make report`: rewrite every measured block of README.md and BENCHMARKS.md from the committed records.

A measured block sits between ``<!-- report:NAME:begin -->`` and ``<!-- report:NAME:end -->``; its text is made here
from benchmarks/results/*.json alone (no clock, no machine state), ends by naming the record files it read, and
says "no record yet" where a record is missing, so prose cannot drift from data and a second run changes nothing.

    python -m benchmarks.report [--root ROOT]          # rewrite the blocks
    python -m benchmarks.report [--root ROOT] --check  # exit 1 naming the blocks the records would change

Figures we did not measure (the paper's TPU v3-8, the datasheet) come from benchmarks/reference.py with their source.
Only the standard library: a report must not need torch or diffusers.
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

from ddpm.config import SAMPLER_TITLES
from benchmarks.reference import DATASHEET_SOURCE, PAPER_TPU_V3_8, datasheet_tflops

REPO = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"
BLOCK_RE = re.compile(r"<!-- report:(?P<name>[\w-]+):begin -->\n(?P<body>.*?)<!-- report:(?P=name):end -->", re.S)

# The goals the CPU benchmarks were written against (ours / diffusers, Ray's overhead, the cache's speed-up) and the
# GPU run's goals. Goals, not measurements.
TRAIN_GOAL, SAMPLE_GOAL, RAY_OVERHEAD_GOAL, EVALUATE_GOAL = 1.2, 1.5, 0.10, 2.0
GPU_TRAIN_GOAL, GPU_DDPM_GOAL = 6000, 25


# -- records ------------------------------------------------------------------------------------------------------------
class Records:
    """The record files under ``root``, read once; remembers which ones a block asked for (found or not)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._cache: dict[str, Any] = {}
        self.used: set[str] = set()

    def get(self, rel: str) -> Any:
        self.used.add(rel)
        if rel not in self._cache:
            path = self.root / rel
            self._cache[rel] = json.loads(path.read_text()) if path.is_file() else None
        return self._cache[rel]

    def result(self, name: str) -> Optional[dict]:
        return self.get(f"{RESULTS}/{name}.json")

    def glob(self, pattern: str) -> list[tuple[str, Any]]:
        """(file, record) of every result file matching ``pattern``, in name order."""
        return [(f"{RESULTS}/{path.name}", self.get(f"{RESULTS}/{path.name}"))
                for path in sorted((self.root / RESULTS).glob(pattern))]

    def gpu_runs(self) -> list[tuple[str, list[dict]]]:
        """(file, rows) of every gpu_*.json, in name order (a run's second file sorts after it)."""
        return self.glob("gpu_*.json")

    def text(self, rel: str) -> Optional[str]:
        self.used.add(rel)
        path = self.root / rel
        return path.read_text() if path.is_file() else None


# -- formatting ---------------------------------------------------------------------------------------------------------
def _n(v: float, d: int = 0) -> str:
    return f"{v:,.{d}f}"


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _pct(v: float, d: int = 1) -> str:
    return f"{v * 100:.{d}f}%"


def _g(v: float, sig: int = 4) -> str:
    return f"{v:.{sig}g}"


def _dur(s: float) -> str:
    s = round(s)
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def _goal(v: float, goal: float) -> str:
    return f"{_x(v)} ({'meets' if v >= goal else 'below'} goal {goal:g}x)"


def _mach(r: dict) -> str:
    m = r["machine"]
    return f"{m['date']}; {m['cores']} cores ({m['cpu']}), {m['torch_threads']} thread(s), load {m['load_average']}"


def _load1(r: dict) -> Optional[float]:
    la = (r.get("machine") or {}).get("load_average")
    return la[0] if la else None


def _pair_ratios(run: dict, other: str, base: str = "ours") -> list[float]:
    return [a / b for a, b in zip(run["values"][base], run["values"][other])]


def _verdict(ratios: list[float], num: str, den: str) -> str:
    """What the per-pair ratios (``num``'s throughput / ``den``'s) say, without a test statistic."""
    lo, hi = min(ratios), max(ratios)
    if lo > 1:
        return f"{num} faster in all {len(ratios)} pairs ({_x(lo)}-{_x(hi)})"
    if hi < 1:
        return f"{den} faster in all {len(ratios)} pairs ({_x(1 / hi)}-{_x(1 / lo)})"
    return f"pairs disagree ({_x(lo)}-{_x(hi)}): not distinguishable"


def _link(rel: str) -> str:
    return f"[{rel}]({rel})"


# -- BENCHMARKS.md ------------------------------------------------------------------------------------------------------
def block_results(r: Records) -> str:
    """The CPU results table (benchmarks 1-5)."""
    rows = ["| # | benchmark | configuration | ours | baseline | ratio (median of pairs) | command | date, machine |",
            "|---|---|---|---|---|---|---|---|"]
    t = r.result("train")
    for run in (t or {}).get("runs", []):
        params = f"{run['params_ours']:,} params (diffusers {run['params_diffusers']:,})"
        rows.append(f"| 1 | training step, images/s | {run['config']}, batch {run['batch']}, fp32, {params} | "
                    f"{run['median']['ours']:.2f} | diffusers {run['median']['diffusers']:.2f} | "
                    f"{_goal(run['ratios']['diffusers'], TRAIN_GOAL)}; {run['pairs']} pairs | `{t['command']}` | "
                    f"{_mach(t)} |")
        for k, v in run["ratios"].items():
            if k != "diffusers":
                rows.append(f"| 1a | switch ablation | {run['config']}, batch {run['batch']} | "
                            f"{run['median']['ours']:.2f} | {k}: {run['median'][k]:.2f} | {_x(v)} | "
                            f"`{t['command']}` | {_mach(t)} |")
    s = r.result("sample")
    for run in (s or {}).get("runs", []):
        params = f"{run['params_ours']:,} params (diffusers {run['params_diffusers']:,})"
        rows.append(f"| 2 | sampling {run['sampler']}, images/s | {run['config']}, batch {run['batch']}, {params} | "
                    f"{run['median']['ours']:.3f} | diffusers {run['sampler'].split('-')[0]}Pipeline "
                    f"{run['median']['diffusers']:.3f} | {_goal(run['ratios']['diffusers'], SAMPLE_GOAL)}; "
                    f"{run['pairs']} pairs | `{s['command']}` | {_mach(s)} |")
    c = r.result("sample_compile")  # not run by make bench: python -m benchmarks.bench_sample --compile ...
    for run in (c or {}).get("runs", []):
        rows.append(f"| 2c | sampling {run['sampler']} with sample.compile, images/s | {run['config']}, batch "
                    f"{run['batch']}; first forward (compilation) {run['first_forward_s']} s | "
                    f"{run['median']['ours']:.3f} | diffusers {run['median']['diffusers']:.3f} | "
                    f"{_goal(run['ratios']['diffusers'], SAMPLE_GOAL)}; {run['pairs']} pairs | `{c['command']}` | "
                    f"{_mach(c)} |")
    y = r.result("ray")
    if y:
        plain = statistics.median(x["step_s"] for x in y["runs"]["plain"])
        ray1 = statistics.median(x["step_s"] for x in y["runs"]["ray_1_worker"])
        rows.append(f"| 3 | Ray Train (1 worker) vs plain loop, s/step | digits preset, batch {y['batch']}, "
                    f"{y['threads']} threads, {y['steps_per_run']} steps/run | Ray {ray1:.3f} | plain {plain:.3f} | "
                    f"overhead {y['ray_overhead_per_step'] * 100:+.1f}% (goal <= +{RAY_OVERHEAD_GOAL:.0%}); "
                    f"ray.init {y['ray_init_s']} s, trainer start-up ~{y['trainer_startup_s_median']:.1f} s per fit | "
                    f"`{y['command']}` | {_mach(y)} |")
        if "two_vs_one_worker_speedup" in y:
            two = statistics.median(x["step_s"] for x in y["runs"]["ray_2_workers"])
            rows.append(f"| 3b | Ray Train 2 workers vs 1, s/step | same, 2 workers x 1 thread | {two:.3f} | "
                        f"1 worker {ray1:.3f} | {_x(y['two_vs_one_worker_speedup'])} (reported as is) | "
                        f"`{y['command']}` | {_mach(y)} |")
    e = r.result("evaluate")
    if e:
        rows.append(f"| 4 | evaluate: first vs cached reference stats, s | {e['feature_extractor']}, "
                    f"{e['num_generated']} samples vs {e['num_reference']} train images | "
                    f"cached {statistics.median(e['cached_s']):.2f} | first {statistics.median(e['first_s']):.2f} | "
                    f"{_goal(e['speedup'], EVALUATE_GOAL)}; {len(e['first_s'])} pairs | `{e['command']}` | "
                    f"{_mach(e)} |")
    d = r.result("demo")
    if d:
        parts = ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in d["stages"].items())
        total = f"total {_dur(d['total_wall_s'])}" if d.get("total_wall_s") else f"stages {d['sum_of_stages_s']} s"
        rows.append(f"| 5 | `make demo` end to end, per stage | params.yaml (digits); {d['source']} | {total}: "
                    f"{parts} | - | - | `{d['command']}` | {_mach(d)} |")
    return "\n".join(rows)


def block_noise(r: Records) -> str:
    """How large the noise of the table's ratios is, from the pairs themselves."""
    spreads: list[tuple[float, str, list[float]]] = []
    loads: list[float] = []
    for name, row in (("train", "1"), ("sample", "2"), ("sample_compile", "2c")):
        rec = r.result(name)
        if not rec:
            continue
        loads.append(_load1(rec))
        for run in rec["runs"]:
            for other in run["ratios"]:
                rs = _pair_ratios(run, other)
                med = statistics.median(rs)
                what = (f"row {row if other == 'diffusers' else '1a'}, {run['config']}, batch {run['batch']}"
                        f"{'' if other == 'diffusers' else f', {other}'}")
                spreads.append((max(abs(x / med - 1) for x in rs), what, rs))
    for name in ("ray", "evaluate", "demo"):
        rec = r.result(name)
        if rec:
            loads.append(_load1(rec))
    if not spreads:
        return "No record yet: `make bench` writes benchmarks/results/{train,sample}.json."
    worst = max(spreads, key=lambda s: s[0])
    loads = [x for x in loads if x is not None]
    return (f"In the records behind the table the 1-minute load average was {min(loads)}-{max(loads)} (per row in its "
            f"last column). The per-pair ratios of one comparison lie up to {_pct(worst[0], 0)} from their median "
            f"({worst[1]}: pairs {', '.join(_x(x) for x in worst[2])}), so a ratio within about "
            f"±{_pct(worst[0], 0)} of 1.0 cannot be told from 1.0 with these records.")


def block_profile(r: Records) -> str:
    p = r.result("profile_digits")
    if not p:
        return "No record yet: `python -m benchmarks.profile_unet --config digits --batch 32` writes it."

    def share(side: str, test: Callable[[str], bool]) -> float:
        return sum(op["share"] for op in p[side]["top_ops"] if test(op["op"]))

    def calls(side: str, op: str) -> int:
        return next((o["calls"] for o in p[side]["top_ops"] if o["op"] == op), 0)

    conv = lambda op: op in ("aten::convolution_backward", "aten::mkldnn_convolution")  # noqa: E731
    groups = [("GroupNorm", lambda op: "group_norm" in op), ("SiLU", lambda op: "silu" in op),
              ("element-wise adds", lambda op: op in ("aten::add", "aten::add_"))]
    rest = ", ".join(f"{label} ({_pct(share('ours', f), 0)} / {_pct(share('diffusers', f), 0)})" for label, f in groups)
    return (f"Profile (`{p['command']}`, torch.profiler, one forward+backward at batch {p['batch']}, "
            f"load {p['machine']['load_average']}): oneDNN convolution (`mkldnn_convolution` + `convolution_backward`) "
            f"is {_pct(share('ours', conv), 0)} of the self CPU time in ours and {_pct(share('diffusers', conv), 0)} "
            f"in diffusers, then (ours / diffusers) {rest}. Ours runs {calls('ours', 'aten::mkldnn_convolution')} "
            f"convolutions, diffusers {calls('diffusers', 'aten::mkldnn_convolution')}.")


def _ablations(t: dict, switch: str) -> list[tuple[dict, str, str]]:
    """(run, ablation key, the ablated value) for every ``ours, <switch>=<value>`` side of train.json's runs."""
    out = []
    for run in t.get("runs", []):
        for k in run["ratios"]:
            m = re.match(rf"ours, {re.escape(switch)}=(\S+)", k)
            if m:
                out.append((run, k, m.group(1)))
    return out


def block_switches(r: Records) -> str:
    t, a, s, c = r.result("train"), r.result("adam"), r.result("sample"), r.result("sample_compile")
    rows = ["| switch | measured as \"ours\" | measured | what the pairs say |", "|---|---|---|---|"]

    def default(switch: str, rec: Optional[dict] = t) -> str:
        vals = {str(v) for run in (rec or {}).get("runs", []) if (v := run.get("switches", {}).get(switch)) is not None}
        return ", ".join(f"`{v}`" for v in sorted(vals)) if vals else "-"

    # train.adam_impl: the optimizer step alone (adam.json), and the whole step (train.json's ablation)
    measured, says = [], []
    for run in (a or {}).get("runs", []):
        ms = run["ms_per_step"]
        measured.append(f"{run['config']}: fused {ms['fused']:.0f} ms vs {ms['loop']:.0f} ms for-loop (torch's CPU "
                        f"default, `auto`) vs {ms['foreach']:.0f} ms foreach, fused {_x(run['ratios']['loop'])} "
                        f"faster than the loop")
        says.append(f"step alone, {run['config']}: " + _verdict(
            [f / lp for f, lp in zip(run["values"]["fused"], run["values"]["loop"])], "fused", "loop"))
    if a:
        measured[0] = (f"optimizer step alone (`{a['command']}`, {a['threads']} thread, {a['runs'][0]['pairs']} pairs, "
                       f"load {_load1(a)}; adam.json): " + measured[0])
    for run, k, v in _ablations(t or {}, "adam_impl"):
        measured.append(f"whole training step, {run['config']}: ours / adam_impl={v} {_x(run['ratios'][k])} "
                        f"(row 1a, load {_load1(t)})")
        says.append(f"whole step, {run['config']}: " + _verdict(_pair_ratios(run, k), "ours", f"adam_impl={v}"))
    rows.append(f"| `train.adam_impl` | {default('adam_impl')} | {'; '.join(measured) or 'no record yet'} | "
                f"{'; '.join(says) or '-'} |")

    measured, says = [], []
    for run, k, v in _ablations(t or {}, "channels_last"):
        measured.append(f"whole training step, {run['config']}, batch {run['batch']}: ours / channels_last={v} "
                        f"{_x(run['ratios'][k])} ({run['pairs']} pairs, row 1a, load {_load1(t)})")
        says.append(f"{run['config']}: " + _verdict(_pair_ratios(run, k), "ours", f"channels_last={v}"))
    rows.append(f"| `train.channels_last`, `sample.channels_last` | {default('channels_last')} | "
                f"{'; '.join(measured) or 'no record yet'}; sampling not measured separately | "
                f"{'; '.join(says) or '-'} |")

    # bench_switches: every combination of the training switches side by side, one record per network and CPU
    for rel, x in r.glob("switches_*.json"):
        others = [k for k in x["ratios"]]
        rows.append(f"| all training switches together ({_link(rel)}) | `{x['default']}` | whole training step, "
                    f"{x['config']}, batch {x['batch']}, {x['threads']} thread(s), {x['pairs']} rounds, "
                    f"{x['machine']['cpu']}, load {_load1(x)}: default / other " + "; ".join(
                        f"`{k}` {_x(x['ratios'][k])}" for k in others) + f"; fastest `{x['fastest']}` | " + "; ".join(
                        f"`{k}`: " + _verdict([d_ / o for d_, o in zip(x["values"][x["default"]], x["values"][k])],
                                               "the default", "the other") for k in others) + " |")

    measured, says = [], []
    for run in (c or {}).get("runs", []):
        eager = next((e for e in (s or {}).get("runs", []) if (e["config"], e["sampler"], e["batch"]) ==
                      (run["config"], run["sampler"], run["batch"])), None)
        text = (f"{run['sampler']} on the {run['config']} at batch {run['batch']}: with `sample.compile` "
                f"{_x(run['ratios']['diffusers'])} diffusers (row 2c, load {_load1(c)}; first forward, i.e. "
                f"compilation, {run['first_forward_s']} s)")
        if eager:
            text += (f", eager {_x(eager['ratios']['diffusers'])} diffusers (row 2, load {_load1(s)}): two runs, "
                     "so the two ratios compare only roughly")
        measured.append(text)
        says.append("compiled: " + _verdict(_pair_ratios(run, "diffusers"), "ours", "diffusers"))
    rows.append(f"| `train.compile`, `sample.compile` | {default('compile', s)} | "
                f"{'; '.join(measured) or 'no record yet'}; "
                f"training compiled: CPU not measured, GPU in the GPU section | {'; '.join(says) or '-'} |")
    return "\n".join(rows)


def block_goals(r: Records) -> str:
    rows = ["| goal | measured (median of pairs) | status | record |", "|---|---|---|---|"]

    def status(values: list[float], goal: float) -> str:
        met = [v >= goal for v in values]
        return "**met**" if all(met) else "**not met**" if not any(met) else "met in some rows"

    t = r.result("train")
    if t:
        vals = [run["ratios"]["diffusers"] for run in t["runs"]]
        rows.append(f"| training >= {TRAIN_GOAL:g}x diffusers | " + "; ".join(
            f"{run['config']}, batch {run['batch']}: {_x(run['ratios']['diffusers'])}" for run in t["runs"]) +
            f" | {status(vals, TRAIN_GOAL)} | train.json |")
    s, c = r.result("sample"), r.result("sample_compile")
    if s:
        runs = [(run, "") for run in s["runs"]] + [(run, ", sample.compile") for run in (c or {}).get("runs", [])]
        vals = [run["ratios"]["diffusers"] for run, _ in runs]
        rows.append(f"| sampling >= {SAMPLE_GOAL:g}x diffusers | " + "; ".join(
            f"{run['sampler']}, {run['config']}, batch {run['batch']}{tag}: {_x(run['ratios']['diffusers'])}"
            for run, tag in runs) + f" | {status(vals, SAMPLE_GOAL)} | sample.json" +
            (", sample_compile.json" if c else "") + " |")
    y = r.result("ray")
    if y:
        plain = statistics.median(x["step_s"] for x in y["runs"]["plain"])
        ray1 = statistics.median(x["step_s"] for x in y["runs"]["ray_1_worker"])
        ok = y["ray_overhead_per_step"] <= RAY_OVERHEAD_GOAL
        rows.append(f"| Ray Train overhead <= +{RAY_OVERHEAD_GOAL:.0%} per step | "
                    f"{y['ray_overhead_per_step'] * 100:+.1f}% (median of {len(y['runs']['plain'])} pairs' ratios; "
                    f"medians {ray1 * 1000:.0f} ms Ray vs {plain * 1000:.0f} ms plain per step); start-up: `ray.init` "
                    f"{y['ray_init_s']} s once, ~{y['trainer_startup_s_median']:.0f} s per `fit`; load {_load1(y)} | "
                    f"{'**met**' if ok else '**not met**'} | ray.json |")
        if "two_vs_one_worker_speedup" in y:
            rows.append(f"| 2 workers vs 1 (no goal) | {_x(y['two_vs_one_worker_speedup'])} | reported as is | "
                        "ray.json |")
    e = r.result("evaluate")
    if e:
        rows.append(f"| cached evaluate >= {EVALUATE_GOAL:g}x faster | {_x(e['speedup'])} (first "
                    f"{statistics.median(e['first_s']):.2f} s, cached {statistics.median(e['cached_s']):.2f} s; "
                    f"{e['feature_extractor']}, {e['num_reference']:,} reference images) | "
                    f"{status([e['speedup']], EVALUATE_GOAL)} | evaluate.json |")
    b = r.result("run_all")
    if b:
        parts = ", ".join(f"{k} {_dur(v['wall_s'])}" + ("" if v["rc"] == 0 else " (failed)")
                          for k, v in b["benchmarks"].items())
        rows.append(f"| `make bench` runtime | {_dur(b['total_wall_s'])} ({parts}); load at the end {_load1(b)} | "
                    f"reported as is | run_all.json |")
    else:
        rows.append("| `make bench` runtime | no record yet (`make bench` writes benchmarks/results/run_all.json) | "
                    "- | - |")
    return "\n".join(rows)


def _gpu_label(name: str) -> Optional[tuple[tuple, str]]:
    """(sort key, label) of a GPU throughput row, None for the other rows (machine, matmul, flops, warm-ups)."""
    m = re.fullmatch(r"train_(eager|compiled)_bf16_b(\d+)", name)
    if m:
        return (0, m.group(1) == "compiled", int(m.group(2))), (
            "training, eager" if m.group(1) == "eager" else "training, `torch.compile`")
    m = re.fullmatch(r"sampling_(ddpm1000|ddim50)_(eager|compiled)(_bf16weights)?_bf16_b(\d+)", name)
    if m:
        what = "DDPM 1000 steps" if m.group(1) == "ddpm1000" else "DDIM 50 steps"
        extra = ", weights in bf16" if m.group(3) else ""
        return (1, m.group(1) != "ddpm1000", bool(m.group(3)), int(m.group(4))), f"sampling, {what}, {m.group(2)}{extra}"
    if name.startswith("fid_features"):
        return (2,), "FID features (torch-fidelity InceptionV3, fp32)"
    return None


def _gpu_rows(r: Records) -> list[dict]:
    """Every throughput row of every GPU record, with its run's roof and datasheet figure."""
    out = []
    for run_i, (rel, rows) in enumerate(r.gpu_runs(), 1):
        machine = next(x for x in rows if x["name"] == "machine")
        roof = next(x["tflops"] for x in rows if x["name"].startswith("bf16_matmul_"))
        sheet = machine.get("datasheet_dense_bf16_tflops") or datasheet_tflops(machine.get("gpu"))
        for row in rows:
            lab = _gpu_label(row["name"])
            if lab and ("images_per_s" in row or row.get("out_of_memory")):
                out.append(dict(row, run=run_i, file=rel, roof=roof, datasheet=sheet, key=lab[0], label=lab[1],
                                batch=row.get("batch") or int(re.search(r"_b(\d+)$", row["name"]).group(1))))
    return sorted(out, key=lambda x: (x["key"], x["run"]))


def block_gpu(r: Records) -> str:
    runs = r.gpu_runs()
    if not runs:
        return "No record yet: `bash benchmarks/gpu.sh` on a GPU machine writes benchmarks/results/gpu_results.json."
    rows = _gpu_rows(r)
    paper = PAPER_TPU_V3_8
    paper_ips = paper["train_steps_per_s"] * paper["train_batch"]
    paper_sample = paper["sample_batch"] / paper["sample_batch_s"]
    first = runs[0][1]
    m = next(x for x in first if x["name"] == "machine")
    flops = next(x for x in first if x["name"] == "flops")
    log = r.text(runs[0][0].replace(".json", ".log"))
    smi = log.splitlines()[0].split(", ") if log else None
    lines = []
    where = f"one {m['gpu']}"
    if smi and len(smi) >= 3:
        mib = re.fullmatch(r"(\d+) MiB", smi[1])
        where += f" ({f'{int(mib.group(1)):,} MiB' if mib else smi[1]}, driver {smi[2]}, from the log's `nvidia-smi` line)"
    lines.append(f"Runs: {', '.join(f'run {i} = {_link(rel)}' for i, (rel, _) in enumerate(runs, 1))}, on {where}, "
                 f"torch {m['torch']} (CUDA {m['cuda']}), {m['date']}. The paper's CIFAR-10 UNet, {m['params']:,} "
                 f"parameters; FLOPs per image from `torch.utils.flop_counter`: {flops['forward_gflop_per_image']} "
                 f"GFLOP forward, {flops['train_gflop_per_image']} GFLOP forward + backward.")
    roofs = [(i, next(x["tflops"] for x in rs if x["name"].startswith("bf16_matmul_"))) for i, (_, rs) in
             enumerate(runs, 1)]
    sheet = rows[0]["datasheet"] if rows else None
    assumed = sorted({x.get("peak_tflops_assumed") for _, rs in runs for x in rs if x["name"] == "machine"} - {None})
    lines.append("")
    lines.append("**Fraction of peak** is stated against the roof measured in the same run, a bf16 8192³ matmul ("
                 + ", ".join(f"run {i}: {t} TFLOP/s" for i, t in roofs) + ")"
                 + (f", and beside it against the datasheet's dense bf16 figure, {sheet} TFLOP/s ({DATASHEET_SOURCE})"
                    if sheet else "") + "."
                 + (f" The records' own `fraction_of_peak` divides by an assumed {', '.join(f'{v:g}' for v in assumed)} "
                    "TFLOP/s, neither of these; it is not used here." if assumed else ""))
    lines += ["", "| measurement | run | batch | images/s | TFLOP/s | of measured roof | of datasheet | "
                  f"paper's TPU v3-8 at the same batch ({paper_ips:,} images/s at batch {paper['train_batch']}) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for x in rows:
        if x.get("out_of_memory"):
            lines.append(f"| {x['label']} | {x['run']} | {x['batch']:,} | out of memory | | | | |")
            continue
        ips, tf = x["images_per_s"], x["achieved_tflops"]
        ips_s = _n(ips, 1) if ips < 100 else _n(ips)
        if x.get("measured", "full").startswith("projected"):
            ips_s += f" ({x['measured'].split(' (')[0]})"
        if x["key"][0] == 0:
            cmp = (f"{_x(ips / paper_ips)}" if x["batch"] == paper["train_batch"]
                   else f"not compared: batch {x['batch']:,}, the paper's is {paper['train_batch']}")
        elif x["key"][0] == 1:
            cmp = f"not compared: batch {x['batch']:,}, the paper's is {paper['sample_batch']}"
        else:
            cmp = "-"
        lines.append(f"| {x['label']} | {x['run']} | {x['batch']:,} | {ips_s} | {tf} | {_pct(tf / x['roof'])} | "
                     f"{_pct(tf / x['datasheet']) if x['datasheet'] else '-'} | {cmp} |")

    def find(pattern: str, run: Optional[int] = None) -> Optional[dict]:
        return next((x for x in rows if re.fullmatch(pattern, x["name"]) and "images_per_s" in x
                     and (run is None or x["run"] == run)), None)

    lines.append("")
    b = paper["train_batch"]
    e128, c128 = find(rf"train_eager_bf16_b{b}"), find(rf"train_compiled_bf16_b{b}")
    ddpm = [x for x in rows if x["name"].startswith("sampling_ddpm1000") and "images_per_s" in x]
    if e128 or c128:
        both = [(x, k) for x, k in ((c128, "compiled"), (e128, "eager")) if x]
        lines.append(f"- **Against the paper, at the same batch:** at batch {b} one {m['gpu']} trains at "
                     f"{' and '.join(_n(x['images_per_s']) + ' images/s ' + k for x, k in both)}: "
                     f"{' and '.join(_x(x['images_per_s'] / paper_ips) for x, _ in both)} the paper's whole TPU "
                     f"v3-8 ({paper['train_steps_per_s']} steps/s × {b} = "
                     f"{paper_ips:,} images/s; {paper['source']}; ours in bf16 autocast, the paper does not state its "
                     f"precision). The larger-batch rows are at another batch than "
                     f"the paper's and are not compared with it. The paper samples a batch of {paper['sample_batch']} "
                     f"in {paper['sample_batch_s']} s ({paper_sample:.1f} images/s); these runs sampled only at batch "
                     f"{' and '.join(f'{b_:,}' for b_ in sorted({x['batch'] for x in ddpm}))}, so sampling has no "
                     "same-batch "
                     "comparison.")
    e_big = max((x for x in rows if x["name"].startswith("train_eager") and "images_per_s" in x),
                key=lambda x: x["batch"], default=None)
    c_big = find(rf"train_compiled_bf16_b{e_big['batch']}") if e_big else None
    if e128 and c128 and e_big and c_big:
        plateau = [x for x in rows if x["name"].startswith("train_eager") and "images_per_s" in x and x["batch"] >= 512]
        firsts = [x["first_step_s"] for x in rows if x["name"].startswith("train_compiled") and "first_step_s" in x]
        lines.append(f"- **Compilation pays at large batch:** compiled / eager is "
                     f"{_x(c_big['images_per_s'] / e_big['images_per_s'])} at batch {e_big['batch']:,} and "
                     f"{_x(c128['images_per_s'] / e128['images_per_s'])} at {b} (run {c128['run']}). Eager training "
                     f"stays at {_n(min(x['images_per_s'] for x in plateau))}-{_n(max(x['images_per_s'] for x in plateau))}"
                     f" images/s from batch 512 up: GroupNorm runs in fp32 under autocast, and the casts and "
                     f"element-wise ops around it are memory-bound; `torch.compile` fuses them. The first compiled "
                     f"step (compilation) took {min(firsts):.0f}-{max(firsts):.0f} s per shape.")
    best_train = max((x for x in rows if x["name"].startswith("train_") and "images_per_s" in x),
                     key=lambda x: x["images_per_s"])
    best_ddpm = max(ddpm, key=lambda x: x["images_per_s"]) if ddpm else None
    goals = [f"training >= {GPU_TRAIN_GOAL:,} images/s: best {_n(best_train['images_per_s'])} (batch "
             f"{best_train['batch']:,}, run {best_train['run']}), {_pct(best_train['images_per_s'] / GPU_TRAIN_GOAL, 0)}"
             f" of it, {'met' if best_train['images_per_s'] >= GPU_TRAIN_GOAL else 'missed'}"]
    if best_ddpm:
        goals.append(f"DDPM-1000 sampling >= {GPU_DDPM_GOAL} images/s: best {best_ddpm['images_per_s']} (batch "
                     f"{best_ddpm['batch']:,}, run {best_ddpm['run']}), {_pct(best_ddpm['images_per_s'] / GPU_DDPM_GOAL, 0)}"
                     f" of it, {'met' if best_ddpm['images_per_s'] >= GPU_DDPM_GOAL else 'missed'}")
    lines.append(f"- **The run's goals:** {'; '.join(goals)}.")
    later = [i for i, _ in roofs if i > 1]
    if later:
        tried = []
        big = max((x for x in rows if x["name"].startswith("train_compiled") and x["run"] > 1 and "images_per_s" in x),
                  key=lambda x: x["batch"], default=None)
        ref = max((x for x in rows if x["name"].startswith("train_compiled") and x["run"] == 1
                   and "images_per_s" in x), key=lambda x: x["batch"], default=None)
        if big and ref:
            tried.append(f"compiled training at batch {big['batch']:,}: it fits ({big['peak_mem_gib']} GiB) and gives "
                         f"{_n(big['images_per_s'])} images/s against {_n(ref['images_per_s'])} at {ref['batch']:,} in "
                         f"run 1 ({(big['images_per_s'] / ref['images_per_s'] - 1) * 100:+.1f}%, across two runs)")
        w = find(r"sampling_ddpm1000_compiled_bf16weights_bf16_b1024")
        a = find(r"sampling_ddpm1000_compiled_bf16_b1024")
        if w and a:
            tried.append(f"weights cast to bf16 instead of autocast: DDPM-1000 {w['images_per_s']} images/s against "
                         f"{a['images_per_s']} (run {a['run']}), no gain: compilation already fuses the casts")
        w2 = max((x for x in ddpm if x["batch"] > 1024), key=lambda x: x["batch"], default=None)
        if w2 and a:
            tried.append(f"a sampling batch of {w2['batch']:,}: {w2['images_per_s']} images/s "
                         f"({w2.get('measured', 'measured').split(' (')[0]}) against {a['images_per_s']} at 1,024")
        if tried:
            lines.append(f"- **Run {', '.join(map(str, later))} tried:** " + "; ".join(tried) + ".")
    if a_ddpm := find(r"sampling_ddpm1000_compiled_bf16_b1024"):
        lines.append(f"- **Sampling:** a DDPM-1000 batch of {a_ddpm['batch']:,} took {a_ddpm['seconds_per_batch']} s, "
                     f"{a_ddpm['seconds_per_batch'] / 1000 * 1e3:.0f} ms per step. Each sample draws its noise from "
                     "its own generator, one launch per sample and step; the CPU time of that was not measured "
                     "separately.")
    return "\n".join(lines)


# -- README.md ----------------------------------------------------------------------------------------------------------
def _no_demo(d: Optional[dict]) -> str:
    how = ("`python -m benchmarks.bench_demo` runs the demo once in a fresh folder and records its total wall, every "
           "stage, FID/KID with the floor, the classifier's accuracy and the sampler table; `make report` then "
           "writes this paragraph from it.")
    if not d:
        return f"What to expect: no record yet of a demo run (benchmarks/results/demo.json is missing). {how}"
    stages = ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in d["stages"].items())
    details = d.get("stage_details", {})
    steps = details.get("train", {}).get("steps")
    m = d["machine"]
    return (f"What to expect: no full record of a demo run yet. benchmarks/results/demo.json "
            f"(`{d['command']}`, {m['date']}, {m['cpu']}, {m['cores']} cores) holds only what the stages stored: "
            f"{stages}" + (f" (train: {steps:,} steps, Ray start-up + fit)" if steps else "") +
            f"; no total wall, no other stage, no FID. {how}")


def block_demo(r: Records) -> str:
    d = r.result("demo")
    if not d or not d.get("total_wall_s") or "evaluate" not in d:
        return _no_demo(d)
    m, st, ev = d["machine"], d["stages"], d["evaluate"]
    det = d.get("stage_details", {})
    gpu = "without GPU" if m.get("gpu", "") is None else f"with {m['gpu']}" if m.get("gpu") else ""
    out = [f"What to expect, measured on a {m['cores']}-core machine{' ' + gpu if gpu else ''} ({m['cpu']}; {m['date']}, "
           f"`{d['command']}`: the demo's flow once in a fresh clone, load average at the end "
           f"{m['load_average']}): `make demo` takes **{_dur(d['total_wall_s'])}** after install:"]
    parts = []
    for name, s in st.items():
        txt = f"{name} {s['wall_s']:.0f} s" + ("" if s["status"] == "ran" else f" ({s['status']})")
        if name == "train" and det.get("train", {}).get("steps"):
            txt += f" ({det['train']['steps']:,} steps)"
        if name == "sample" and det.get("sample", {}).get("count"):
            k = ev.get("repeats", 1)
            n = det["sample"]["count"]
            txt += (f" ({k} × {n // k:,} images for `evaluate.repeats: {k}`" if k > 1 else f" ({n:,} images")
            smp = det["sample"]
            if smp.get("sampler"):
                nfe = 1000 if smp["sampler"] == "ddpm" else smp.get("steps")
                txt += f", {SAMPLER_TITLES.get(smp['sampler'], smp['sampler'])} at {nfe} network evaluations"
            txt += ")"
        parts.append(txt)
    rest = d["total_wall_s"] - d["sum_of_stages_s"]
    if rest >= 0:
        after = (f"; the rest ({_dur(rest)}) is Prefect's temporary API, the run's Ray and the flow's start-up;")
    else:  # independent stages ran at the same time (the flow's DAG): their walls overlap
        after = (f"; independent stages run at once (train_classifier beside train, figures beside sample, evaluate "
                 f"and sampler_table), so the stages add up to {_dur(d['sum_of_stages_s'])}, more than the total;")
    out.append(f"- {', '.join(parts)} (each through `dvc repro`, its own Python process included){after}")
    fid, floor = ev.get("fid"), ev.get("floor", {})
    k = ev.get("repeats", 1)
    if fid:
        spread = (f"**{fid['mean']:.3f} ± {fid['std']:.3f}** (mean ± std of {k} disjoint seed ranges of "
                  f"{ev['num_generated']:,} images: {', '.join(f'{v:.3f}' for v in fid['values'])}; min {fid['min']:.3f})"
                  if k > 1 and fid.get("std") is not None else f"**{fid['mean']:.3f}** ({ev['num_generated']:,} images)")
        txt = f"- FID in the {ev['feature_extractor']} features {spread}"
        if floor.get("fid"):
            txt += (f" against a real-vs-real floor of {floor['fid']:.3f}, i.e. {ev['fid_ratio']:.2f}× on the mean"
                    + (f", {ev['fid_ratio_min']:.2f}× on the min" if k > 1 else ""))
        kid = ev.get("kid_mean")
        if kid:
            txt += (f"; KID {kid['mean']:.3f}" + (f" ± {kid['std']:.3f}" if kid.get("std") is not None else "") +
                    (f" against a floor of {floor['kid_mean']:.3f}" if "kid_mean" in floor else ""))
        clf = d.get("classifier") or {}
        if clf.get("accuracy") is not None:
            txt += f"; the classifier's held-out accuracy is {_pct(clf['accuracy'])}"
        out.append(txt + ".")
    return "\n".join(out)


SAMPLER_NAMES = {"ddpm": "DDPM (Alg. 2)", "ddim": "DDIM"}


def block_sampler_table(r: Records) -> str:
    d = r.result("demo")
    t = (d or {}).get("sampler_table")
    if not t:
        return ("No record yet: benchmarks/results/demo.json holds no sampler table. `python -m benchmarks.bench_demo` "
                "records the demo's `metrics/sampler_table.json` there, and `make report` writes the table here.")
    if "answer" not in t:  # a record from before the solvers: the old table's columns
        return _old_sampler_table(d, t)
    from tasks.sampler_table import markdown_table

    rows = t["rows"]
    n = t.get("num_samples")
    evals = sum(x["steps"] for x in rows)
    facts = [f"the rows cost {evals:,} network evaluations per seed, {evals * n:,} in all"]
    stage = (d.get("stages") or {}).get("sampler_table")
    if stage:
        facts.append(f"the stage took {_dur(stage['wall_s'])} in the demo")
    body = markdown_table(t).rstrip("\n")
    return body + f"\n\nMeasured {d['machine']['date']} by `{d['command']}`: " + "; ".join(facts) + "."


def _old_sampler_table(d: dict, t: dict) -> str:
    rows = t["rows"]
    out = ["| sampler | steps | FID | KID | sampling time (s) | images/s |", "|---|---|---|---|---|---|"]
    for x in rows:
        name = SAMPLER_NAMES.get(x["sampler"], x["sampler"]) + (f", η={x['eta']:g}" if x.get("eta") is not None else "")
        out.append(f"| {name} | {x['steps']} | {_g(x['fid'], 4)} | {_g(x['kid_mean'], 4)} | {x['sampling_s']:.1f} | "
                   f"{x['images_per_s']:.1f} |")
    fl = t.get("floor", {})
    out.append(f"| real held-out images (floor) | – | {_g(fl['fid'], 4)} | {_g(fl['kid_mean'], 4)} | – | – |")
    seeds = t.get("seeds") or [None, None]
    n = t.get("num_samples")
    evals = sum(x["steps"] for x in rows)
    out += ["", f"{n} samples per row (seeds {seeds[0]}–{seeds[1]}, the same in every row) from "
                f"`{Path(t.get('checkpoint', '')).name}` ({'EMA' if t.get('use_ema') else 'raw'} weights); "
                f"{t.get('feature_extractor')} features against the {t.get('num_reference') or 0:,} training images, "
                f"real-vs-real floor of {fl.get('num_holdout')} held-out images; {t.get('device')}, sampling time per "
                f"actor without start-up. {t.get('note', '')}".rstrip(" .") + "."]
    ddpm = next((x for x in rows if x["sampler"] == "ddpm"), None)
    ddim = max((x for x in rows if x["sampler"] == "ddim"), key=lambda x: x["steps"], default=None)
    facts = [f"The rows cost {evals:,} network evaluations per seed, {evals * n:,} in all"]
    if ddpm and ddim:
        facts.append(f"DDPM-{ddpm['steps']} took {ddpm['sampling_s'] / ddim['sampling_s']:.1f}× the sampling time of "
                     f"DDIM-{ddim['steps']} for {ddpm['steps'] / ddim['steps']:g}× the network evaluations")
    stage = (d.get("stages") or {}).get("sampler_table")
    if stage:
        facts.append(f"the stage took {_dur(stage['wall_s'])} in the demo")
    out += ["", f"Measured {d['machine']['date']} by `{d['command']}`. " + "; ".join(facts) + "."]
    return "\n".join(out)


def block_inpaint(r: Records) -> str:
    x = r.result("inpaint")
    if not x:
        return ("The share of inpainted digits that keep their label is not recorded yet: "
                "`python -m benchmarks.inpaint_agreement` measures it with the demo's checkpoint and classifier "
                "(benchmarks/results/inpaint.json; `python -m benchmarks.bench_demo` runs it after the demo).")
    sampler = f"{x['sampler'].upper()}-{x['steps']}" + (f" η={x['eta']:g}" if x.get("eta") is not None else "")
    kept = ("keeps every known pixel identical" if x["known_pixels_differing"] == 0
            else f"changes {x['known_pixels_differing']:,} of {x['known_pixels']:,} known pixels")
    return (f"Measured with the demo model (`{x['checkpoint']}`, {sampler}; `{x['command']}`, {x['machine']['date']}): "
            f"inpainting the {x['mask'].replace('-', ' ')} of "
            + (f"all {x['count']:,} held-out digits" if x.get("distinct_originals") == x["count"]
               else f"{x['count']:,} held-out digits ({x.get('distinct_originals')} distinct)")
            + f" {kept}, and the digits classifier gives "
            f"the original's label to {_pct(x['label_agreement'])} of the inpainted digits (chance: "
            f"{_pct(x['chance'], 0)}; on the originals: {_pct(x['classifier_accuracy_on_originals'])}).")


def block_repro(r: Records) -> str:
    """README "Reproducibility": how far the same seeds land when batch split or thread count changes."""
    x = r.result("repro")
    if not x:
        return ("Measured differences: not recorded yet (`python -m benchmarks.repro_bounds` writes "
                "benchmarks/results/repro.json; `python -m benchmarks.bench_demo` runs it after the demo).")
    rows = x["rows"]

    def span(pred) -> str:
        v = [row["max_abs_diff"] for row in rows if pred(row["what"])]
        return f"{min(v):.1e} to {max(v):.1e}" if min(v) != max(v) else f"{v[0]:.1e}"

    twice = all(row["bitwise_equal"] for row in rows if "twice" in row["what"])
    worst = max(rows, key=lambda row: row["max_abs_diff"])
    px = max(rows, key=lambda row: (row["uint8_pixels_differing"], row["uint8_pixels"]))
    pixels = (f"at most {px['uint8_pixels_differing']:,} of {px['uint8_pixels']:,} uint8 pixels moved ({px['what']}, "
              f"η = {px['eta']:g}), by at most {px['uint8_max_levels']} level"
              if px["uint8_pixels_differing"] else "no uint8 pixel moved in any comparison")
    m = x["machine"]
    etas = ", ".join(sorted({format(row["eta"], "g") for row in rows}))
    return (f"Measured on {m['cpu']} ({m['date']}, `{x['command']}`, {x['sampler']} of `{x['checkpoint']}`, "
            f"η = {etas}): the same batch sampled twice is "
            + ("bitwise equal" if twice else "NOT bitwise equal") + "; seeds 0-7 in one batch of 8 or in batches of "
            f"3 and 5 differ by {span(lambda w: '3+5' in w)} (max abs, [-1, 1] range), 1 vs 2 threads by "
            f"{span(lambda w: 'threads' in w)}; the largest difference was {worst['max_abs_diff']:.1e} "
            f"({worst['what']}, η = {worst['eta']:g}); {pixels}.")


def block_speed(r: Records) -> str:
    out = []
    a = r.result("adam")
    if a:
        ratios = [run["ratios"]["loop"] for run in a["runs"]]
        out.append(f"Measured: the fused Adam step alone costs {min(ratios):.1f}-{max(ratios):.1f}x less than torch's "
                   f"CPU default (`python -m benchmarks.bench_adam`, on the {len(ratios)} networks of BENCHMARKS.md).")
    runs = r.gpu_runs()
    if runs:
        rows = _gpu_rows(r)
        paper = PAPER_TPU_V3_8
        paper_ips = paper["train_steps_per_s"] * paper["train_batch"]
        b = paper["train_batch"]
        c128 = next((x for x in rows if x["name"] == f"train_compiled_bf16_b{b}" and "images_per_s" in x), None)
        e128 = next((x for x in rows if x["name"] == f"train_eager_bf16_b{b}" and "images_per_s" in x), None)
        best = max((x for x in rows if x["name"].startswith("train_") and "images_per_s" in x),
                   key=lambda x: x["images_per_s"])
        ddpm = max((x for x in rows if x["name"].startswith("sampling_ddpm1000") and "images_per_s" in x
                    and x.get("measured", "").startswith("full")), key=lambda x: x["images_per_s"], default=None)
        gpu = next(x for x in runs[0][1] if x["name"] == "machine")["gpu"]
        txt = f"On one {gpu} (`bash benchmarks/gpu.sh`, bf16) the paper's 35.7M CIFAR-10 network"
        if c128:
            txt += (f", at the paper's batch {b}, trains at {_n(c128['images_per_s'])} images/s compiled"
                    + (f" ({_n(e128['images_per_s'])} eager)" if e128 else "")
                    + f": {_x(c128['images_per_s'] / paper_ips)} the paper's whole TPU v3-8 at that batch "
                      f"({paper['train_steps_per_s']} steps/s × {b} = {paper_ips:,} images/s; the paper does not "
                      "state its precision)")
        if best is not c128:
            txt += (f"; at batch {best['batch']:,}, which the paper did not use, it reaches "
                    f"{_n(best['images_per_s'])} images/s")
        if ddpm:
            txt += (f". It samples 1000-step DDPM at {ddpm['images_per_s']} images/s at batch {ddpm['batch']:,}; the "
                    f"paper's figure ({paper['sample_batch_s']} s for a batch of {paper['sample_batch']}) is at another "
                    "batch, so the two are not compared")
        out.append(txt + " (BENCHMARKS.md, GPU section).")
    return " ".join(out) if out else "No record yet: `make bench` and `bash benchmarks/gpu.sh` write them."


def block_loader(r: Records) -> str:
    """What one loader worker delivers per format and image size (bench_loader) and the cores that feed a GPU."""
    x = r.result("loader")
    if not x:
        return "No record yet: `python -m benchmarks.bench_loader` writes benchmarks/results/loader.json."
    names = {"parquet": "Parquet, raw pixels (ours)", "parquet+torch": "the same + `torch.from_numpy` per batch",
             "npy-mmap": "`.npy` shards, memory-mapped", "parquet-zstd": "Parquet, zstd",
             "parquet-png": "Parquet of PNG bytes (as WebDataset / image files)", "ray-data": "Ray Data `read_parquet`"}
    out = []
    if x.get("quick"):
        out.append("**A smoke run (`--quick`): indicative numbers only.**\n")
    out.append(f"One loader worker (one process, torch at 1 thread, `TrainStream` with its prefetch thread) against a "
               f"consumer that does no work, from the page cache; {x['data']}. Median of {x['settings']['epochs']} "
               f"epochs. Machine: {x.get('cpu_model_name', '?')}, 1-minute load average before the run "
               f"{(x.get('load_average_before') or ['?'])[0]}. Read from the page cache: a disk or an object store "
               "adds its own latency, which the read-ahead thread hides as long as it keeps up.\n")
    for size in x["sizes"]:
        c, h, w = size["shape"]
        out.append(f"**{h}x{w}x{c}**, {size['images']:,} images, batch {size['batch']}:\n")
        out.append("| format | images/s | CPU s per 1,000 images | bytes on disk / raw pixels | first batch of an epoch |")
        out.append("|---|---|---|---|---|")
        for name, f in size["formats"].items():
            extra = f" (+{f['epoch_startup_s']:.1f} s start-up per epoch)" if "epoch_startup_s" in f else ""
            out.append(f"| {names.get(name, name)} | {_n(f['images_per_s'])}{extra} | {f['cpu_s_per_1k_images']:.3g} | "
                       f"{f['of_raw_pixels']:.2f} | {f['first_batch_s']:.3g} s |")
        out.append("")
    cn = x["cores_needed"]
    p32 = cn["32x32"]["formats"]["parquet"]
    out.append(f"**Cores per GPU.** At 32x32 the H200's {_n(cn['gpu_rate_32'])} images/s need "
               f"{p32['cores_by_cpu_time']:.3g} of a core of loading with our format, so one loader worker per GPU "
               "(the training worker's own prefetch thread) is enough; PNG decoding would need "
               f"{cn['32x32']['formats']['parquet-png']['cores_by_cpu_time']:.2g} cores.")
    if "256x256" in cn:
        p256 = cn["256x256"]["formats"]["parquet"]
        out.append(f"At 256x256, {cn['256x256']['target_images_per_s']:.0f} images/s ({cn['gpu_rate_256_basis']}) "
                   f"need {p256['cores_by_cpu_time']:.3g} of a core; one core feeds "
                   f"{_n(1000 / p256['cores_per_1000_images_per_s'])} images/s of 256x256.")
    return "\n".join(out)


def block_memory(r: Records) -> str:
    """Peak RSS of fetch, train and evaluate at N and 10N images (bench_memory)."""
    x = r.result("memory")
    if not x:
        return "No record yet: `python -m benchmarks.bench_memory` writes benchmarks/results/memory.json."
    runs = {run["n"]: run["stages"] for run in x["runs"]}
    small, big = sorted(runs)[:2]
    rows = [f"| stage | peak RSS at {small:,} images | at {big:,} | ratio | goal < 1.15 |", "|---|---|---|---|---|"]
    shown = [("fetch", "peak_rss_mib", "fetch (main process)"), ("fetch", "tree_peak_rss_mib",
             "fetch (with its decode processes, RSS summed)"), ("train", "peak_rss_mib", f"train ({x['train_steps']} steps)"),
             ("evaluate", "peak_rss_mib", "evaluate (reference statistics of every training image)"),
             ("train_classifier", "peak_rss_mib", "train_classifier (reads the split whole, by design)")]
    for stage, key, label in shown:
        a, b = runs[small].get(stage, {}).get(key), runs[big].get(stage, {}).get(key)
        if a is None or b is None:
            continue
        goal = "n/a" if stage == "train_classifier" else ("met" if b / a < 1.15 else "**not met**")
        rows.append(f"| {label} | {_n(a)} MiB | {_n(b)} MiB | {b / a:.3f} | {goal} |")
    c, size = x["channels"], x["image_size"]
    return (f"Image folders of generated {size}x{size} PNGs in {x['classes']} class folders, read as {c}-channel images; "
            f"every stage a child process, its peak RSS from `os.wait4`, the median of {x.get('repeats', 1)} runs. "
            f"Machine: {x.get('lscpu_model_name', '?')}; the whole run took {x['total_wall_s']:.0f} s.\n\n"
            + "\n".join(rows) +
            "\n\nWhat remains of the growth is bounded, not proportional. Training holds at most two shuffle windows "
            "(`train.shuffle_buffer_mb`, 64 MiB each), and at 20,000 images a worker's whole part is one 16 MiB window. "
            "Evaluate hands the extractor 4 MiB of pixels at a time and keeps at most 50,000 reference features. "
            "Fetch keeps the list of file names, about 75 bytes per image.")


# -- the blocks, per file -----------------------------------------------------------------------------------------------


def _solver_label(x: dict) -> str:
    return SAMPLER_TITLES.get(x["sampler"], x["sampler"]) + (f", η={x['eta']:g}" if x.get("eta") is not None else "")


def block_solver_study(r: Records) -> str:
    x = r.result("solver_study")
    if not x:
        return ("No record yet: `python -m benchmarks.bench_solvers --run DEMO_FOLDER --study` writes "
                "benchmarks/results/solver_study.json.")
    rows = x["rows"]
    ref = x["reference_fid"]
    ddpm = next(t for t in rows if t["sampler"] == "ddpm")
    nfes = sorted({t["nfe"] for t in rows if t["sampler"] != "ddpm"})
    out = ["| sampler | spacing | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
           "|---|---|" + "---|" * len(nfes)]
    cells: dict[tuple, dict[int, dict]] = {}
    for t in rows:
        if t["sampler"] != "ddpm":
            cells.setdefault((t["sampler"], t["eta"], t["spacing"]), {})[t["nfe"]] = t
    for (sampler, eta, spacing), by in cells.items():
        vals = []
        for n in nfes:
            t = by.get(n)
            if t is None:
                vals.append("–")
                continue
            sd = f" ± {t['fid_std']:.2f}" if t.get("fid_std") is not None else ""
            vals.append(f"{t['fid_mean']:.3f}{sd} ({t['fid_mean'] / ref:.2f}x)")
        out.append(f"| {_solver_label({'sampler': sampler, 'eta': eta})} | {spacing} | " + " | ".join(vals) + " |")
    sd = f" ± {ddpm['fid_std']:.3f}" if ddpm.get("fid_std") is not None else ""
    out += ["", f"DDPM-{ddpm['nfe']} (Algorithm 2, the reference): FID {ref:.3f}{sd}. Each cell: mean ± std over "
                f"{x['draws']} disjoint draws of {x['samples_per_draw']:,} samples (seeds 0–"
                f"{x['draws'] * x['samples_per_draw'] - 1:,}), and the mean's ratio to DDPM's; "
                f"{x['feature_extractor']} against the {x['num_reference']:,} training images, checkpoint "
                f"`{Path(x['checkpoint']).name}` of the demo (EMA)."]
    # the spacing verdict: how often each spacing is the best of the three for the same sampler and NFE
    wins: dict[str, int] = {}
    groups: dict[tuple, list[dict]] = {}
    for t in rows:
        if t["sampler"] != "ddpm":
            groups.setdefault((t["sampler"], t["eta"], t["nfe"]), []).append(t)
    for g in groups.values():
        best = min(g, key=lambda t: t["fid_mean"])
        wins[best["spacing"]] = wins.get(best["spacing"], 0) + 1
    n_groups = len(groups)
    order = sorted(wins.items(), key=lambda kv: -kv[1])
    win_text = ", ".join(f"{k} {v}" for k, v in order)
    mean_ratio = {}
    for sp in {t["spacing"] for t in rows if t["spacing"]}:
        v = [t["fid_mean"] / ref for t in rows if t["spacing"] == sp]
        mean_ratio[sp] = sum(v) / len(v)
    ratio_text = ", ".join(f"{k} {v:.2f}x" for k, v in sorted(mean_ratio.items(), key=lambda kv: kv[1]))
    out += ["", f"Best spacing per (sampler, NFE), of {n_groups}: {win_text}. Mean ratio to DDPM over every sampler "
                f"and NFE: {ratio_text}."]
    out += ["", f"Measured {x['machine']['date']} on {x['machine']['cpu']} ({x['machine']['cores']} cores) by "
                f"`{x['command']}`."]
    return "\n".join(out)


def block_solvers(r: Records) -> str:
    x = r.result("solvers")
    if not x:
        return ("No record yet: `python -m benchmarks.bench_solvers --run DEMO_FOLDER` writes "
                "benchmarks/results/solvers.json.")
    q, tm = x["quality"], x["timing"]
    names = list(q)
    ours = names[0]
    fast = names[1]
    pipe = names[2]
    med = tm["median"]
    label = {ours: "DDPM-1000, Algorithm 2 (ours)", pipe: "DDPM-1000, diffusers `DDPMPipeline`",
             fast: f"{SAMPLER_TITLES.get(x['solver'], x['solver'])}, {x['nfe']} NFE, {x['spacing']} spacing"}
    nfe = {ours: 1000, pipe: 1000, fast: x["nfe"]}
    out = ["| sampler | NFE | FID ± σ | − DDPM (ours) ± σ | images/s | speed-up vs this row |",
           "|---|---|---|---|---|---|"]
    for n in names:
        speed = "–" if n == fast else f"{med[fast] / med[n]:.1f}x"
        sd = f" ± {q[n]['fid_std']:.2f}" if q[n].get("fid_std") is not None else ""
        delta = "–" if n == ours else (f"{q[n]['fid'] - q[ours]['fid']:+.3f}"
                                       + (f" ± {q[n]['fid_delta_std']:.2f}" if q[n].get("fid_delta_std") else ""))
        out.append(f"| {label[n]} | {nfe[n]} | {q[n]['fid']:.3f}{sd} | {delta} | {med[n]:.2f} | {speed} |")
    out += ["", f"FID of {x['samples']:,} samples per row (seeds 0–{x['samples'] - 1:,}; the pipeline draws from one "
                f"generator seeded 0) against the {x['num_reference']:,} training images, {x['feature_extractor']}; "
                f"the same network and EMA weights (`{Path(x['checkpoint']).name}` of the demo) in every row, the "
                f"pipeline through a wrapper that gives our UNet diffusers' `.sample` output. images/s: median of "
                f"{tm['pairs']} alternating runs of a batch of {x['batch']} in one process, {x['threads']} threads, "
                f"σ: std over 200 bootstrap resamplings of the samples (paired with ours "
                f"for the solver, whose seeds are ours; unpaired for the pipeline's own generator). "
                f"{x['machine']['cpu']}, measured {x['machine']['date']} by `{x['command']}`."]
    gpu = r.result("gpu_h200_2026-11-28")
    row = next((g for g in (gpu or []) if g.get("name") == "sampling_ddpm1000_compiled_bf16_b1024"), None)
    if row:
        rate = row["images_per_s"] * 1000  # network evaluations per second, per image
        t_ddpm = 50_000 * 1000 / rate
        t_fast = 50_000 * x["nfe"] / rate
        out += ["", f"**50k CIFAR-10 samples on one H200**, projected from the DDPM-1000 rate of "
                    f"[gpu_h200_2026-11-28.json]({RESULTS}/gpu_h200_2026-11-28.json) ({row['images_per_s']} images/s "
                    f"at batch {row['batch']}, compiled, bf16: {rate:,.0f} network evaluations per second): DDPM-1000 "
                    f"{_dur(t_ddpm)}, {label[fast]} {_dur(t_fast)} ({rate / x['nfe']:,.0f} images/s), {1000 / x['nfe']:.0f}x "
                    "less. A projection, not a measurement: it counts network evaluations only (a solver step adds a "
                    "few elementwise operations on the batch) and was not run on the GPU."]
    return "\n".join(out)


BLOCKS: dict[str, dict[str, Callable[[Records], str]]] = {
    "README.md": {"demo": block_demo, "speed": block_speed, "sampler_table": block_sampler_table,
                  "inpaint": block_inpaint, "repro": block_repro},
    "BENCHMARKS.md": {"noise": block_noise, "results": block_results, "profile": block_profile,
                      "switches": block_switches, "goals": block_goals, "gpu": block_gpu, "loader": block_loader,
                      "memory": block_memory, "solver_study": block_solver_study, "solvers": block_solvers},
}


def _wrap(text: str, width: int = 118) -> str:
    """Paragraphs and bullets wrapped like the hand-written text around them; tables left alone."""
    out = []
    for line in text.split("\n"):
        if not line or line.startswith("|") or len(line) <= width:
            out.append(line)
        else:
            indent = "  " if line.startswith("- ") else ""
            out.append(textwrap.fill(line, width, subsequent_indent=indent, break_long_words=False,
                                     break_on_hyphens=False))
    return "\n".join(out)


def render(recs: Records, file: str, name: str) -> str:
    """A block's body: its text and, last, the record files it read (relative links, sorted)."""
    recs.used = set()
    text = _wrap(BLOCKS[file][name](recs))
    found = sorted(u for u in recs.used if (recs.root / u).is_file())
    missing = sorted(u for u in recs.used if not (recs.root / u).is_file())
    cite = (f"<sub>Generated by `make report` from {', '.join(_link(u) for u in found) or 'no record'}"
            + (f" ({', '.join(missing)}: not recorded)" if missing else "") + "; edit the records, not this text.</sub>")
    return f"{text}\n\n{_wrap(cite)}\n"


def rewrite(text: str, file: str, recs: Records) -> tuple[str, list[str]]:
    """``text`` with every report block of ``file`` regenerated; also the names of the blocks that changed."""
    found = [m.group("name") for m in BLOCK_RE.finditer(text)]
    unknown = sorted(set(found) - set(BLOCKS[file]))
    absent = sorted(set(BLOCKS[file]) - set(found))
    if unknown or absent or len(found) != len(set(found)):
        raise SystemExit(f"error: {file}: report blocks " + "; ".join(
            s for s in (f"unknown: {', '.join(unknown)}" if unknown else "",
                        f"missing: {', '.join(absent)}" if absent else "",
                        "duplicated" if len(found) != len(set(found)) else "") if s) +
            f" (known: {', '.join(BLOCKS[file])})")
    changed: list[str] = []

    def sub(m: re.Match) -> str:
        name = m.group("name")
        body = render(recs, file, name)
        if body != m.group("body"):
            changed.append(name)
        return f"<!-- report:{name}:begin -->\n{body}<!-- report:{name}:end -->"

    return BLOCK_RE.sub(sub, text), changed


def run(root: Path = REPO, check: bool = False) -> list[str]:
    """Regenerate (or with ``check``, only compare) every block; returns ``file:block`` of the stale ones."""
    root = Path(root)
    recs = Records(root)
    stale = []
    for file in BLOCKS:
        path = root / file
        old = path.read_text()
        new, changed = rewrite(old, file, recs)
        stale += [f"{file}:{name}" for name in changed]
        if changed and not check:
            tmp = path.with_name(f".{path.name}.report.tmp")
            tmp.write_text(new)
            os.replace(tmp, path)
    return stale


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(REPO), help="the checkout whose README.md/BENCHMARKS.md and records to use")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 naming the blocks the records change")
    args = p.parse_args(argv)
    stale = run(Path(args.root), check=args.check)
    if args.check:
        if stale:
            print(f"stale report blocks (run `make report`): {', '.join(stale)}", file=sys.stderr)
            return 1
        print("report blocks match the records")
        return 0
    print(f"rewrote {', '.join(stale)}" if stale else "report blocks already match the records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
