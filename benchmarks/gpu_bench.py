"""GPU throughput of the paper's CIFAR-10 model (35.7M) with this project's library: run by benchmarks/gpu.sh.

Random weights and synthetic data: nothing is downloaded. Prints one JSON line per measurement as it goes (so a run
stopped at its time limit keeps what it measured) and writes them all to ``--out``/gpu_results.json.

Each throughput's TFLOP/s is stated as a fraction of the roof measured in the same run (an 8192^3 bf16 matmul,
``bf16_matmul_8192``), and beside it as a fraction of the chip's datasheet dense bf16 peak (``--datasheet-tflops``;
known chips from benchmarks/reference.py), which the machine row records separately. Measured:
  * FLOPs per image, forward and forward+backward, from torch.utils.flop_counter (matmuls and convolutions);
  * FID feature extraction (torch-fidelity's InceptionV3, fp32, uint8 32x32 inputs resized to 299), images/s;
  * training images/s: L_simple (Algorithm 1) + Adam + grad clipping + EMA, bf16 autocast, channels_last, eager and
    torch.compile, at batch 128 and at the largest batch that fits (doubling until out of memory);
  * sampling images/s: Algorithm 2 with 1000 steps and DDIM-50 through ddpm.samplers at a large batch.

A global deadline (``--budget-s``) skips what would not finish; a skipped measurement says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm.diffusion import GaussianDiffusion  # noqa: E402
from ddpm.ema import EMA  # noqa: E402
from ddpm.samplers import ddim_sample, ddpm_sample  # noqa: E402
from ddpm.schedules import make_betas  # noqa: E402
from ddpm.unet import UNet, UNetConfig, count_parameters  # noqa: E402

from benchmarks.common import cpu_model  # noqa: E402
from benchmarks.reference import DATASHEET_SOURCE, datasheet_tflops  # noqa: E402

CIFAR10 = UNetConfig(image_channels=3, image_size=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                     attn_resolutions=(16,), dropout=0.1, num_groups=32)
SHAPE = (3, 32, 32)
# --smoke: the same code path on the CPU with a tiny model, to check the script before spending GPU time on it.
SMOKE = UNetConfig(image_channels=3, image_size=32, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                   dropout=0.1, num_groups=8)
DEV = "cuda"
MODEL = CIFAR10


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


class Bf16(nn.Module):
    """Runs the UNet under bf16 autocast on channels_last inputs and hands float32 back to the diffusion math."""

    def __init__(self, unet: nn.Module, bf16: bool = True, channels_last: bool = True):
        super().__init__()
        self.unet, self.bf16, self.channels_last = unet, bf16, channels_last

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=self.bf16):
            return self.unet(x, t).float()


class Report:
    """The rows of one run. ``roof``: the bf16 matmul TFLOP/s measured in this run, the denominator of every
    ``fraction_of_roof``; ``datasheet``: the chip's datasheet dense bf16 TFLOP/s (None when unknown)."""

    def __init__(self, out: Path, datasheet_tflops: float | None, deadline: float):
        self.out, self.datasheet, self.deadline, self.rows = out, datasheet_tflops, deadline, []
        self.roof: float | None = None

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def add(self, **row) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows, indent=1) + "\n")
        os.replace(tmp, self.out)

    def rate(self, name: str, images_per_s: float, flops_per_image: float, **extra) -> None:
        if self.roof is None:
            raise RuntimeError("the bf16 matmul roof must be measured before any throughput")
        tflops = images_per_s * flops_per_image / 1e12
        self.add(name=name, images_per_s=round(images_per_s, 1), achieved_tflops=round(tflops, 1),
                 fraction_of_roof=round(tflops / self.roof, 3),
                 fraction_of_datasheet=round(tflops / self.datasheet, 3) if self.datasheet else None, **extra)


def timed(fn, min_s: float = 3.0, warmup: int = 3, max_iters: int = 200) -> tuple[float, int]:
    """Seconds per call of ``fn`` (GPU-synchronised), after ``warmup`` calls, over at least ``min_s``."""
    for _ in range(warmup):
        fn()
    sync()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if n >= max_iters or (n >= 3 and time.perf_counter() - start >= min_s):
            break
        if n % 5 == 0:
            sync()
    sync()
    return (time.perf_counter() - start) / n, n


def flops_per_image(diffusion: GaussianDiffusion) -> tuple[float, float]:
    from torch.utils.flop_counter import FlopCounterMode

    model = UNet.from_config(MODEL).to(DEV)
    x = torch.randn(4, *SHAPE, device=DEV)
    t = torch.randint(0, 1000, (4,), device=DEV)
    with FlopCounterMode(display=False) as fc:
        model(x, t)
    fwd = fc.get_total_flops() / 4
    with FlopCounterMode(display=False) as fc:
        diffusion.training_loss(model, x).backward()
    return fwd, fc.get_total_flops() / 4


def bench_fid(rep: Report, batch: int) -> None:
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as fe
    except ImportError:
        rep.add(name="fid_features", skipped="torch-fidelity is not installed")
        return
    from torch.utils.flop_counter import FlopCounterMode

    # Random weights: the real file would be downloaded, and throughput does not depend on the values.
    fe.load_state_dict_from_url = lambda *a, **k: None

    class RandomInception(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    net = RandomInception("inception-v3-compat", ["2048"]).to(DEV).eval()
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=DEV)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            net(x[:8])
        per_image = fc.get_total_flops() / 8
        sec, n = timed(lambda: net(x), min_s=4.0)
    rep.rate("fid_features_inception_fp32", batch / sec, per_image, batch=batch, iters=n,
             gflop_per_image=round(per_image / 1e9, 2),
             tf32_conv=torch.backends.cudnn.allow_tf32, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)


def train_step_fn(model: nn.Module, diffusion: GaussianDiffusion, batch: int, compiled: bool):
    net = Bf16(model)
    fwd = torch.compile(net) if compiled else net
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, fused=DEV == "cuda")
    ema = EMA(model, 0.9999)
    x0 = torch.rand(batch, *SHAPE, device=DEV) * 2 - 1

    def step() -> None:
        loss = diffusion.training_loss(fwd, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        ema.update(model)

    return step


def bench_train(rep: Report, diffusion: GaussianDiffusion, batch: int, compiled: bool, train_flops: float,
                min_s: float = 3.0) -> float:
    model = UNet.from_config(MODEL).to(DEV).to(memory_format=torch.channels_last).train()
    step = train_step_fn(model, diffusion, batch, compiled)
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    sec, n = timed(step, min_s=min_s, warmup=2 if not compiled else 3)
    ips = batch / sec
    rep.rate(f"train_{'compiled' if compiled else 'eager'}_bf16_b{batch}", ips, train_flops, batch=batch, iters=n,
             steps_per_s=round(1 / sec, 2), first_step_s=round(first, 1),
             peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEV == "cuda" else None)
    del step, model
    empty_cache()
    return ips


def largest_batch(rep: Report, diffusion: GaussianDiffusion, train_flops: float, start: int, limit: int) -> int:
    """Doubles the eager training batch until out of memory (or ``limit``); returns the largest that ran."""
    best, batch = start, start
    while batch <= limit and rep.left() > 120:
        try:
            bench_train(rep, diffusion, batch, compiled=False, train_flops=train_flops, min_s=2.0)
            best = batch
        except torch.cuda.OutOfMemoryError:
            rep.add(name=f"train_eager_bf16_b{batch}", out_of_memory=True)
            gc.collect()
            torch.cuda.empty_cache()
            break
        batch *= 2
    return best


class StopAfter(Exception):
    pass


def bench_sampling(rep: Report, diffusion: GaussianDiffusion, batch: int, compiled: bool, fwd_flops: float,
                   max_s: float, bf16_weights: bool = False) -> None:
    """``bf16_weights``: the weights themselves in bf16 (no autocast): GroupNorm and the element-wise work then
    move half the bytes; the diffusion arithmetic stays float32."""
    model = UNet.from_config(MODEL).to(DEV).to(memory_format=torch.channels_last).eval()
    if bf16_weights:
        model = model.to(torch.bfloat16)
    net = Bf16(model, bf16=not bf16_weights)
    fwd = torch.compile(net) if compiled else net
    tag = ("compiled" if compiled else "eager") + ("_bf16weights" if bf16_weights else "")
    seeds = list(range(batch))
    # Warm-up (and compilation): a short DDIM run at the same batch.
    t0 = time.perf_counter()
    ddim_sample(fwd, diffusion, seeds, SHAPE, steps=5, device=DEV)
    sync()
    rep.add(name=f"sampling_{tag}_warmup", seconds=round(time.perf_counter() - t0, 1))

    sec, _ = timed(lambda: ddim_sample(fwd, diffusion, seeds, SHAPE, steps=50, device=DEV), min_s=2.0,
                   warmup=1, max_iters=3)
    rep.rate(f"sampling_ddim50_{tag}_bf16_b{batch}", batch / sec, 50 * fwd_flops, batch=batch,
             seconds_per_batch=round(sec, 2))

    # Algorithm 2, 1000 network evaluations; stopped early (and projected) only if the deadline would be missed.
    marks: dict[int, float] = {}

    def callback(i, step, x, x0):
        if i in (9, 99) or i % 100 == 99:
            sync()
            marks[i] = time.perf_counter()
            if i >= 99 and (marks[i] - marks[9]) / (i - 9) * (999 - i) > min(max_s, rep.left() - 30):
                raise StopAfter

    start = time.perf_counter()
    try:
        ddpm_sample(fwd, diffusion, seeds, SHAPE, device=DEV, callback=callback)
        sync()
        total, measured = time.perf_counter() - start, "full 1000-step run"
    except StopAfter:
        last = max(marks)
        total = (marks[last] - marks[9]) / (last - 9) * 1000
        measured = f"projected from steps 10..{last + 1} (deadline)"
    rep.rate(f"sampling_ddpm1000_{tag}_bf16_b{batch}", batch / total, 1000 * fwd_flops, batch=batch,
             seconds_per_batch=round(total, 1), measured=measured)
    del fwd, net, model
    empty_cache()


def main(argv=None) -> int:
    global DEV, MODEL
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results", help="folder for gpu_results.json")
    p.add_argument("--budget-s", type=float, default=450, help="stop starting new measurements after this")
    p.add_argument("--datasheet-tflops", type=float, default=None,
                   help="the chip's datasheet dense bf16 TFLOP/s, recorded beside the measured matmul roof "
                        "(default: benchmarks/reference.py's figure for the device, if it knows it)")
    p.add_argument("--sample-batch", type=int, default=1024)
    p.add_argument("--max-train-batch", type=int, default=8192)
    p.add_argument("--fid-batch", type=int, default=500)
    p.add_argument("--skip-compile", action="store_true", help="eager only (no torch.compile)")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script, measures nothing")
    p.add_argument("--only", default="", help="comma-separated measurements to run (default: the standard set); "
                   "extra ones: sampling_bf16weights, sampling_bf16weights_large, train_compiled_largest")
    p.add_argument("--large-batch", type=int, default=0, help="batch of train_compiled_largest (0: the search's)")
    args = p.parse_args(argv)
    if args.smoke:
        DEV, MODEL = "cpu", SMOKE
        args.sample_batch, args.max_train_batch, args.fid_batch = 4, 8, 2
    elif not torch.cuda.is_available():
        print("error: no CUDA device: benchmarks/gpu_bench.py measures GPU throughput (--smoke runs on the CPU)",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu, mem = props.name, round(props.total_memory / 2**30)
    else:
        gpu, mem = "cpu (smoke)", None
    datasheet = args.datasheet_tflops if args.datasheet_tflops is not None else datasheet_tflops(gpu)
    rep = Report(out / "gpu_results.json", datasheet, time.perf_counter() + args.budget_s)
    rep.add(name="machine", gpu=gpu, memory_gib=mem, cpu=cpu_model(), torch=torch.__version__,
            cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d"), datasheet_dense_bf16_tflops=datasheet,
            datasheet_source=(DATASHEET_SOURCE if args.datasheet_tflops is None and datasheet else
                              "--datasheet-tflops" if datasheet else None),
            fractions_of="the bf16 matmul roof measured in this run (fraction_of_roof) and the datasheet "
                         "dense bf16 figure (fraction_of_datasheet)",
            params=count_parameters(UNet.from_config(MODEL)))
    torch.backends.cudnn.benchmark = True
    # One static graph per batch size: a second shape would otherwise switch dynamo to slower dynamic-shape kernels.
    torch._dynamo.config.automatic_dynamic_shapes = False

    n = 8192 if DEV == "cuda" else 256
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    sec, _ = timed(lambda: a @ a, min_s=1.0, warmup=3)
    rep.roof = 2 * n**3 / sec / 1e12
    rep.add(name=f"bf16_matmul_{n}", tflops=round(rep.roof, 1 if rep.roof >= 10 else 4), roof=True)
    del a

    diffusion = GaussianDiffusion(make_betas("linear", 1000, beta_start=1e-4, beta_end=0.02))
    fwd_flops, train_flops = flops_per_image(diffusion)
    rep.add(name="flops", forward_gflop_per_image=round(fwd_flops / 1e9, 2),
            train_gflop_per_image=round(train_flops / 1e9, 2))

    best = {"batch": 128}

    def sampling() -> None:
        try:
            bench_sampling(rep, diffusion, args.sample_batch, not args.skip_compile, fwd_flops, max_s=150)
        except Exception as e:
            if args.skip_compile:
                raise
            rep.add(name="sampling_compiled", failed=f"{type(e).__name__}: {e}"[:300])
            empty_cache()
            bench_sampling(rep, diffusion, args.sample_batch, False, fwd_flops, max_s=150)

    steps = [
        ("fid", lambda: bench_fid(rep, args.fid_batch)),
        ("train_eager_128", lambda: bench_train(rep, diffusion, 128 if DEV == "cuda" else 4, False, train_flops)),
        ("train_batch_search", lambda: best.update(
            batch=largest_batch(rep, diffusion, train_flops, 256 if DEV == "cuda" else 4, args.max_train_batch))),
    ]
    if not args.skip_compile:
        steps.append(("train_compiled_128", lambda: bench_train(rep, diffusion, 128 if DEV == "cuda" else 4, True,
                                                                train_flops)))
    steps.append(("sampling", sampling))
    if not args.skip_compile:
        steps.append(("train_compiled_large", lambda: bench_train(rep, diffusion, min(best["batch"], 2048), True,
                                                                  train_flops)))
    extra = {
        "sampling_bf16weights": lambda: bench_sampling(rep, diffusion, args.sample_batch, not args.skip_compile,
                                                       fwd_flops, max_s=150, bf16_weights=True),
        "sampling_bf16weights_large": lambda: bench_sampling(rep, diffusion, 2 * args.sample_batch,
                                                             not args.skip_compile, fwd_flops, max_s=150,
                                                             bf16_weights=True),
        "train_compiled_largest": lambda: bench_train(rep, diffusion, args.large_batch or best["batch"], True,
                                                      train_flops),
    }
    if args.only:
        known = dict(steps) | extra
        unknown = [n for n in args.only.split(",") if n not in known]
        if unknown:
            print(f"error: --only: unknown {unknown}; known: {sorted(known)}", file=sys.stderr)
            return 2
        steps = [(n, known[n]) for n in args.only.split(",")]
    for name, fn in steps:
        if rep.left() < 45:
            rep.add(name=name, skipped=f"global budget of {args.budget_s:.0f} s reached")
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # one failed measurement must not cost the others
            rep.add(name=name, failed=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
            empty_cache()
        print(f"# {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
