"""The pipeline's own stages on one GPU, timed, beside the standalone loop: run by benchmarks/gpu_pipeline.sh.

Every stage runs as a user runs it, ``python -m tasks.<stage>`` with dvc.yaml's arguments and a params file (the
``cifar10`` preset, configs/cifar10.yaml, with the overrides below), on a CIFAR-10-format dataset written here first
in the official python-batch format (tasks.lib.datasets.write_cifar10; random pixels): nothing is downloaded.

  fetch            the python batches -> the dataset artifact
  train            1 Ray Train worker: DDP over NCCL, bf16 autocast, torch.compile
  train_2_workers  more steps with 2 workers sharing the GPU (train.gpus_per_worker 0.5, DDP over gloo), eager:
                   resumes the first run's checkpoint, so a checkpoint also crosses from 1 worker to 2
  sample_ddpm      Ray actors, Algorithm 2 over all T steps, bf16, compiled
  sample_solver    the same with SDE-DPM-Solver++(2M) at 20 network evaluations
  evaluate         FID/KID/IS of the solver's samples with torch-fidelity's Inception-v3 on the GPU; random weights
                   (tasks.lib.scoring.write_random_inception_weights) when the published file is absent, and the
                   record says so: the scores are then meaningless, the throughput is not
  standalone       benchmarks/gpu.sh (the library's loop in one process) at the same batches, for the ratios

Per stage the record holds ``wall_s`` (its process, start to exit), ``images`` (fetch: written; train: steps x
batch; sample: samples; evaluate: images through Inception), ``images_per_s`` (the steady rate, read from what the
stage itself wrote: train from its loss log's intervals after the first (its metrics JSON); sample from the times
its shard files were written, first to last; evaluate from the lines it prints before and after the training
split's reference statistics; fetch: images / wall_s) and ``startup_s`` = wall_s - images / images_per_s: the
seconds not spent at that rate (interpreter and imports, Ray and its workers or actors, model build, compilation,
the first steps, and a second or two of teardown). ``--smoke`` runs all of it on the CPU at a tiny size (no
compile, tiny UNet, T = 40) to check the script before a GPU run; gpu.sh is skipped then, and the record says so.
RAY_ADDRESS is ignored: every stage starts its own local Ray, as on one machine.

    bash benchmarks/gpu_pipeline.sh            # -> $OUT/gpu_pipeline.json (or benchmarks/results/)
    bash benchmarks/gpu_pipeline.sh --smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESET = REPO / "configs" / "cifar10.yaml"
# What the stages import; checked before anything else, so a machine without them gets one line, not a traceback.
NEEDED = ("torch", "numpy", "yaml", "pydantic", "ray", "pyarrow", "tqdm", "diffusers", "torch_fidelity", "scipy", "PIL")


@dataclass(frozen=True)
class Plan:
    """The sizes of one run. Defaults: one GPU in 8 minutes with gpu.sh, planned from BENCHMARKS.md's H200 run
    (compiling the training step took 75 s there, the sampling network 26 s; the stages compile in each process)."""

    train_images: int = 10_000       # 5 batches of 2,000 (the real CIFAR-10 has 5 of 10,000)
    test_images: int = 2_000
    batch: int = 128                 # the paper's
    steps: int = 200                 # first run (1 worker): ~11 s at BENCHMARKS.md's 2,289 images/s, once compiled
    steps_2_workers: int = 100       # the second run's further steps
    log_every: int = 10
    timesteps: int = 1000
    ddpm: tuple[int, int] = (256, 128)      # samples, shard = batch: two shards (the rate is the second one's)
    solver: tuple[int, int] = (4096, 1024)  # 20 evaluations each: four shards of ~1 s
    solver_steps: int = 20
    eval_batch: int = 500                   # gpu.sh's FID batch
    kid_subset: int = 500
    fid: bool = True
    compile: bool = True
    use_gpu: bool = True
    model: Optional[dict] = None            # None: the preset's 35.7M UNet
    num_cpus: Optional[int] = None          # Ray's CPUs; None: all
    object_store_mb: int = 2048
    standalone_s: float = 150               # of the budget, kept for gpu.sh after the stages


# The same path on the CPU: tiny UNet (gpu_bench.py's SMOKE), T = 40, a few steps and samples, no compile (minutes
# on a CPU). The batches keep >= 2 shards per sampler and a few logged intervals per training run. FID is off: its
# two 2048x2048 matrix square roots (scipy's sqrtm: samples, floor) take 10-25 s each on 2 cores; KID and IS stay.
SMOKE = Plan(train_images=20, test_images=10, batch=8, steps=3, steps_2_workers=3, log_every=1, timesteps=40,
             ddpm=(10, 5), solver=(10, 5), eval_batch=16, kid_subset=5, fid=False, compile=False, use_gpu=False,
             model={"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16], "num_groups": 8},
             num_cpus=2, object_store_mb=128, standalone_s=0)


class Stopped(Exception):
    """SIGTERM (gpu_pipeline.sh's `timeout`): the running stage is stopped and the record says so."""


def _stop(signum, frame) -> None:
    raise Stopped()


# -- inputs -----------------------------------------------------------------------------------------------------------
def write_dataset(root: Path, plan: Plan, seed: int = 0) -> None:
    """Random uint8 pixels and labels in the official python batches (throughput does not depend on the pixels)."""
    import numpy as np

    from tasks.lib.shards import Split
    from tasks.lib.datasets import write_cifar10

    rng = np.random.default_rng(seed)

    def split(n: int):
        return Split(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n))

    write_cifar10(root, split(plan.train_images), split(plan.test_images))


def inception_weights(work: Path, preset: dict) -> tuple[str, str, str]:
    """(path, SHA-256, label): the preset's published file when it is there with its pinned hash, else random weights
    of the same architecture written into ``work``."""
    from tasks.lib.files import sha256_file
    from tasks.lib.scoring import write_random_inception_weights

    ev = preset["evaluate"]
    published = REPO / ev["inception_weights"]
    if published.is_file() and sha256_file(published) == ev["inception_sha256"]:
        return str(published), ev["inception_sha256"], "published (pinned SHA-256)"
    path = work / "random-inception.pth"
    sha = write_random_inception_weights(path)
    return str(path), sha, (f"random: {ev['inception_weights']} is absent, so FID/KID/IS are meaningless here; "
                            "the architecture, resize and cost are torch-fidelity's")


def write_params(work: Path, plan: Plan, weights: str, weights_sha: str) -> Path:
    """The preset with this run's overrides, validated, as ``work``/params.yaml. The sample section is DDPM's; the
    solver's run overrides it on its command line."""
    import yaml

    from tasks.lib.config import apply_overrides, from_dict, read_yaml

    raw = read_yaml(PRESET)
    over = {
        "data.root": str(work / "raw"),
        **{f"model.{k}": v for k, v in (plan.model or {}).items()},
        "diffusion.timesteps": plan.timesteps,
        "train.steps": plan.steps, "train.batch_size": plan.batch, "train.log_every": plan.log_every,
        "train.checkpoint_every": plan.steps, "train.keep_checkpoints": 2, "train.num_workers": 1,
        "train.use_gpu": plan.use_gpu, "train.precision": "bf16", "train.compile": plan.compile,
        "train.max_failures": 0,  # a failure is a result here, not something to retry
        "sample.sampler": "ddpm", "sample.num_samples": plan.ddpm[0], "sample.shard_size": plan.ddpm[1],
        "sample.batch_size": plan.ddpm[1], "sample.num_workers": 1, "sample.use_gpu": plan.use_gpu,
        "sample.precision": "bf16", "sample.compile": plan.compile, "sample.channels_last": True,
        "sample.grid_size": min(64, plan.ddpm[0]),  # taken from the samples: no extra sampling for the grid
        "evaluate.feature_extractor": "inception-v3-compat", "evaluate.inception_weights": weights,
        "evaluate.inception_sha256": weights_sha, "evaluate.repeats": 1, "evaluate.batch_size": plan.eval_batch,
        "evaluate.kid_subset_size": plan.kid_subset, "evaluate.fid": plan.fid,
        "ray.num_cpus": plan.num_cpus, "ray.object_store_mb": plan.object_store_mb, "ray.storage": str(work / "ray"),
        "tracking.enabled": False,
    }
    cfg = from_dict(apply_overrides(raw, over))  # fails here, naming the key, rather than in a stage
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


# -- running a stage --------------------------------------------------------------------------------------------------
class StageRun:
    """One command (``python -m tasks.<stage> ...``) in its own process group, its output echoed and time-stamped line
    by line."""

    def __init__(self, name: str, argv: list[str], log: Path, env: Optional[dict[str, str]] = None):
        self.name, self.argv, self.log, self.extra_env = name, argv, log, env or {}
        self.lines: list[tuple[float, str]] = []  # (seconds since start, line)
        self.proc: Optional[subprocess.Popen] = None

    def run(self, timeout: float) -> tuple[int, float]:
        """Exit status (124 past ``timeout``) and wall seconds."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", "DO_NOT_TRACK": "1",
               **self.extra_env}
        env.pop("RAY_ADDRESS", None)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=env, text=True, bufsize=1,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        reader = threading.Thread(target=self._read, args=(t0,), daemon=True)
        reader.start()
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.stop()
            rc = 124
        except BaseException:
            self.stop()
            raise
        wall = time.perf_counter() - t0
        reader.join(timeout=10)
        self.log.write_text("".join(f"{t:8.2f} {line}" for t, line in self.lines))
        return rc, wall

    def _read(self, t0: float) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter() - t0, line))
            print(f"[{self.name}] {line}", end="", flush=True)

    def stop(self) -> None:
        """SIGTERM to the stage's process group (the stage and what it started), SIGKILL 10 s later."""
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                pass

    def seconds_at(self, prefix: str) -> Optional[float]:
        """When the first output line starting with ``prefix`` arrived (seconds since start), or None."""
        return next((t for t, line in self.lines if line.startswith(prefix)), None)

    def last_line(self) -> str:
        """The stage's last output line: its one-line error when it failed (the stages' command-line convention)."""
        text = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for _, line in self.lines]
        return next((t for t in reversed(text) if t), "")[-600:]


def rates(images: int, wall: float, steady: Optional[float]) -> dict[str, Any]:
    steady = steady if steady and steady > 0 else None
    return {"images": images, "images_per_s": round(steady, 2) if steady else None,
            "startup_s": round(wall - images / steady, 2) if steady else None}


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# -- what each stage wrote ----------------------------------------------------------------------------------------
def fetch_numbers(work: Path, wall: float) -> dict[str, Any]:
    meta = read_json(work / "data" / "dataset" / "dataset.json")
    n = meta["count"]["train"] + meta["count"]["holdout"]
    return {"images": n, "images_per_s": round(n / wall, 1), "startup_s": None,
            "note": "one pass: images / wall_s, start-up included", "count": meta["count"],
            "source": meta["source"].replace(str(work), "$WORK")}


def train_numbers(work: Path, metrics: str, batch: int, wall: float) -> dict[str, Any]:
    s = read_json(work / "metrics" / metrics)
    images = (s["steps"] - s["resumed_from_step"]) * batch
    keep = ("steps", "resumed_from_step", "num_workers", "gpus_per_worker", "backend", "use_gpu", "final_loss",
            "ray_startup_s", "fit_wall_s")
    return {**rates(images, wall, s["images_per_s"]), "checkpoint_step": s["steps"], **{k: s[k] for k in keep}}


def sample_numbers(out: Path, shard: int, wall: float) -> dict[str, Any]:
    s = read_json(out / "samples.json")
    done = sorted(p.stat().st_mtime for p in out.glob("shard_*.npz"))
    # One actor: the shards after the first were drawn at the steady rate (the first holds compilation and warm-up).
    steady = (s["count"] - shard) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else None
    keep = ("count", "sampler", "steps", "network_evaluations", "workers", "ray_startup_s", "checkpoint_step")
    return {**rates(s["count"], wall, steady), **{k: s[k] for k in keep}}


def evaluate_numbers(work: Path, run: StageRun, wall: float, weights_label: str, device: str) -> dict[str, Any]:
    m = read_json(work / "metrics" / "eval.json")
    n_ref, n_gen, n_floor = m["num_reference"], m["num_generated"], m["floor"]["num_holdout"]
    start = run.seconds_at("recomputing the reference statistics")
    end = run.seconds_at("reference statistics cached as")
    steady = n_ref / (end - start) if start is not None and end is not None and end > start else None
    scores = {k: m.get(k) for k in ("fid", "kid_mean", "isc_mean")}
    return {**rates(n_gen + n_ref + n_floor, wall, steady), "num_generated": n_gen, "num_reference": n_ref,
            "num_floor": n_floor, "feature_extractor": m["feature_extractor"], "inception_weights": weights_label,
            "scores": scores, "device": device}


# -- the standalone loop of the same run -------------------------------------------------------------------------------
SIDE_BY_SIDE = {  # stage -> gpu_bench.py's row at the same batch and settings (bf16, compiled, channels_last)
    "train": "train_compiled_bf16_b{batch}",
    "sample_ddpm": "sampling_ddpm1000_compiled_bf16_b{ddpm_batch}",
    "evaluate": "fid_features_inception_fp32",
}


def standalone(work: Path, plan: Plan, seconds: float) -> dict[str, Any]:
    """benchmarks/gpu.sh --only fid,train_compiled_128,sampling at this run's batches, within ``seconds``."""
    out = work / "standalone"
    argv = ["bash", "benchmarks/gpu.sh", "--only", "fid,train_compiled_128,sampling",
            "--sample-batch", str(plan.ddpm[1]), "--fid-batch", str(plan.eval_batch)]
    run = StageRun("standalone", argv, work / "logs" / "standalone.log",
                   {"OUT": str(out), "PYTHON": sys.executable, "GPU_BENCH_BUDGET": str(int(seconds - 30)),
                    "GPU_BENCH_TIMEOUT": str(int(seconds - 5))})
    rc, wall = run.run(seconds + 10)
    rows = json.loads((out / "gpu_results.json").read_text()) if (out / "gpu_results.json").is_file() else []
    return {"command": " ".join(argv), "exit_status": rc, "wall_s": round(wall, 1), "rows": rows}


def side_by_side(stages: dict[str, Any], alone: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    rows = {r.get("name"): r for r in alone.get("rows", [])}
    out = []
    for stage, pattern in SIDE_BY_SIDE.items():
        name = pattern.format(batch=plan.batch, ddpm_batch=plan.ddpm[1])
        ours, theirs = stages.get(stage, {}).get("images_per_s"), rows.get(name, {}).get("images_per_s")
        out.append({"stage": stage, "standalone": name, "stage_images_per_s": ours, "standalone_images_per_s": theirs,
                    "ratio": round(ours / theirs, 3) if ours and theirs else None})
    return out


# -- the run ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                   help="folder for gpu_pipeline.json (gpu_pipeline_smoke.json with --smoke)")
    p.add_argument("--work", default=None, help="scratch folder for the dataset, checkpoints, samples (default: a "
                   "temporary folder, removed at the end)")
    p.add_argument("--budget-s", type=float, default=450, help="stop starting stages after this; gpu.sh gets the rest")
    p.add_argument("--smoke", action="store_true", help="the same stages on the CPU at a tiny size; gpu.sh skipped")
    args = p.parse_args(argv)

    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: missing Python packages {', '.join(missing)}: the stages need the project's dependencies "
              "(pyproject.toml); on an offline machine put their wheels in .whl/ (benchmarks/gpu_pipeline.sh installs "
              "them)", file=sys.stderr)
        return 2
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device: benchmarks/gpu_pipeline.py times the stages on a GPU (--smoke runs them on the "
              "CPU)", file=sys.stderr)
        return 2
    plan = SMOKE if args.smoke else Plan()
    start = time.perf_counter()
    deadline = start + args.budget_s - plan.standalone_s  # the stages' share
    from benchmarks.common import write_result
    from tasks.lib.config import read_yaml

    temp = None if args.work else tempfile.TemporaryDirectory(prefix="gpu_pipeline-")
    work = Path(args.work or temp.name).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "metrics").mkdir(exist_ok=True)

    preset = read_yaml(PRESET)
    write_dataset(work / "raw", plan)
    weights, weights_sha, weights_label = inception_weights(work, preset)
    params = str(write_params(work, plan, weights, weights_sha))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "cpu (smoke)"
    record: dict[str, Any] = {
        "device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke,
        "plan": asdict(plan), "preset": str(PRESET.relative_to(REPO)),
        "dataset": {"format": "CIFAR-10 python batches (cifar-10-batches-py), uniform random pixels",
                    "train": plan.train_images, "test": plan.test_images},
        "inception_weights": weights_label, "budget_s": args.budget_s,
        "definitions": "wall_s: the stage's process; images_per_s: its steady rate, from what the stage wrote; "
                       "startup_s: wall_s - images / images_per_s (start-up, compilation, first steps, teardown)",
        "work": str(work), "stages": {},
    }
    stages: dict[str, Any] = record["stages"]
    precision = "bf16" if plan.use_gpu else "fp32 (bf16 applies on GPUs only)"
    command = "bash benchmarks/gpu_pipeline.sh" + (" --smoke" if args.smoke else "")

    def save() -> None:  # a smoke's record never replaces a GPU run's
        write_result("gpu_pipeline_smoke" if args.smoke else "gpu_pipeline", record, command, Path(args.out))

    data, ckpts, m = work / "data" / "dataset", work / "checkpoints", work / "metrics"
    train_args = ["tasks.train", "--params", params, "--data", str(data), "--checkpoints", str(ckpts),
                  "--log", str(m / "train_loss.tsv")]
    solver = ["--set", "sample.sampler=dpm++2m-sde", "--set", f"sample.steps={plan.solver_steps}",
              "--set", f"sample.num_samples={plan.solver[0]}", "--set", f"sample.shard_size={plan.solver[1]}",
              "--set", f"sample.batch_size={plan.solver[1]}"]
    steps = [  # name, needs, command, what it measured
        ("fetch", None, ["tasks.fetch", "--params", params, "--out", str(data)],
         lambda run, wall: fetch_numbers(work, wall)),
        ("train", "fetch", [*train_args, "--metrics", str(m / "train.json")],
         lambda run, wall: {**train_numbers(work, "train.json", plan.batch, wall), "precision": precision,
                            "compile": plan.compile}),
        ("train_2_workers", "train",
         [*train_args, "--metrics", str(m / "train_2_workers.json"), "--set", "train.num_workers=2",
          "--set", "train.gpus_per_worker=0.5", "--set", f"train.steps={plan.steps + plan.steps_2_workers}",
          "--set", "train.compile=false"],
         lambda run, wall: {**train_numbers(work, "train_2_workers.json", plan.batch, wall), "precision": precision,
                            "compile": False}),
        ("sample_ddpm", "train",
         ["tasks.sample", "--params", params, "--checkpoints", str(ckpts), "--out", str(work / "samples_ddpm")],
         lambda run, wall: {**sample_numbers(work / "samples_ddpm", plan.ddpm[1], wall), "batch": plan.ddpm[1],
                            "precision": precision, "compile": plan.compile}),
        ("sample_solver", "train",
         ["tasks.sample", "--params", params, "--checkpoints", str(ckpts), "--out", str(work / "samples"), *solver],
         lambda run, wall: {**sample_numbers(work / "samples", plan.solver[1], wall), "batch": plan.solver[1],
                            "precision": precision, "compile": plan.compile}),
        ("evaluate", "sample_solver",
         ["tasks.evaluate", "--params", params, "--data", str(data), "--samples", str(work / "samples"),
          "--ref-dir", str(work / "ref_stats"), "--out", str(m / "eval.json")],
         lambda run, wall: evaluate_numbers(work, run, wall, weights_label, "cuda" if torch.cuda.is_available()
                                            else "cpu")),
    ]
    ok = True
    signal.signal(signal.SIGTERM, _stop)
    try:
        for name, needs, cmd, numbers in steps:
            left = deadline - time.perf_counter()
            if needs and stages.get(needs, {}).get("images_per_s") is None:
                stages[name] = {"skipped": f"{needs} did not finish"}
            elif left < (20 if args.smoke else 45):
                stages[name] = {"skipped": f"the budget of {args.budget_s:.0f} s was spent"}
            else:
                run = StageRun(name, [sys.executable, "-m", *cmd], work / "logs" / f"{name}.log")
                rc, wall = run.run(left)
                entry = {"command": "python -m " + " ".join(cmd).replace(str(work), "$WORK"), "wall_s": round(wall, 2),
                         "exit_status": rc}
                try:
                    entry.update(numbers(run, wall) if rc == 0 else
                                 {"failed": f"exit {rc}: {run.last_line()}" if rc != 124 else
                                  f"stopped at the budget after {wall:.0f} s"})
                except (OSError, KeyError, ValueError) as e:  # a stage that exited 0 without its outputs
                    entry["failed"] = f"{type(e).__name__}: {e}"
                stages[name] = entry
                print(f"# {name}: {json.dumps({k: v for k, v in entry.items() if k != 'command'})}", flush=True)
            ok = ok and "images_per_s" in stages[name] and stages[name]["images_per_s"] is not None
            save()
        if args.smoke:
            record["standalone"] = {"skipped": "--smoke: benchmarks/gpu.sh measures a GPU (its own --smoke checks it "
                                               "on the CPU)"}
        else:
            left = start + args.budget_s - time.perf_counter()  # gpu.sh's share, and what the stages left
            record["standalone"] = standalone(work, plan, left) if left > 90 else {
                "skipped": f"{left:.0f} s left of the budget, too little for gpu.sh"}
            record["side_by_side"] = side_by_side(stages, record["standalone"], plan)
        save()
    except Stopped:
        record["stopped"] = "SIGTERM (the time limit of gpu_pipeline.sh) during the run; later stages missing"
        save()
        return 124
    finally:
        if temp is not None:
            temp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
