"""Benchmark 2: sampling throughput (images/s), ours vs diffusers' pipelines, same architecture and batch, CPU.

1000-step ancestral sampling: ``ddpm.samplers.ddpm_sample`` vs ``DDPMPipeline``; DDIM-50 (eta=0):
``ddim_sample`` vs ``DDIMPipeline``. Both sides start from random weights (throughput does not depend on them),
both clip x_0 to [-1, 1]; ours draws each sample's noise from its own seed (see ddpm/samplers.py), diffusers
from one generator. The network is built with the params' ``sample`` speed switches (ddpm/perf.py). Sides
alternate A/B/A/B in one process; the ratio is the median over pairs of (ours / diffusers) images/s.

On 2 CPU cores a 1000-step run of the 35.7M CIFAR-10 network takes minutes per image, so the DDPM-1000 row uses
the digits preset's network; DDIM-50 is measured on both.

    python -m benchmarks.bench_sample [--threads 1] [--pairs 3] [--ddpm-batch 8] [--ddim-batch 90] [--cifar-batch 2]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.common import (
    CIFAR10,
    REPO,
    diffusers_unet,
    digits_unet_kwargs,
    interleave,
    set_threads,
    throughput,
    write_result,
)


def build(kw: dict, seed: int = 0, compile_override: bool | None = None):
    from tasks.lib.config import load_config
    from ddpm.perf import prepare_model
    from ddpm.unet import UNet, count_parameters

    sc = load_config(REPO / "params.yaml").sample
    compile = sc.compile if compile_override is None else compile_override
    torch.manual_seed(seed)
    ours = prepare_model(UNet(**kw).eval(), channels_last=sc.channels_last, compile=compile)
    theirs = diffusers_unet(**kw).eval()
    return ours, theirs, count_parameters(ours), sum(p.numel() for p in theirs.parameters()), \
        {"channels_last": sc.channels_last, "compile": compile}


def measure(name: str, kw: dict, sampler: str, batch: int, pairs: int, compile: bool | None = None) -> dict:
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    from ddpm.diffusion import GaussianDiffusion
    from ddpm.samplers import ddim_sample, ddpm_sample
    from ddpm.schedules import make_betas

    ours, unet, n_ours, n_theirs, switches = build(kw, compile_override=compile)
    diffusion = GaussianDiffusion(make_betas("linear", 1000, beta_start=1e-4, beta_end=0.02))
    shape = (kw["image_channels"], kw["image_size"], kw["image_size"])
    sched_kw = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=True)
    if sampler == "ddpm":
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**sched_kw, variance_type="fixed_large"))
        run_ours = lambda: ddpm_sample(ours, diffusion, list(range(batch)), shape)  # noqa: E731
        run_theirs = lambda: pipe(batch_size=batch, generator=torch.Generator().manual_seed(0),  # noqa: E731
                                  num_inference_steps=1000, output_type="np")
    else:
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(**sched_kw))
        run_ours = lambda: ddim_sample(ours, diffusion, list(range(batch)), shape, steps=50, eta=0.0)  # noqa: E731
        run_theirs = lambda: pipe(batch_size=batch, generator=torch.Generator().manual_seed(0), eta=0.0,  # noqa: E731
                                  num_inference_steps=50, output_type="np")
    pipe.set_progress_bar_config(disable=True)
    label = "DDPM-1000" if sampler == "ddpm" else "DDIM-50"
    print(f"[sample {label}, {name}] params ours {n_ours:,} / diffusers {n_theirs:,}; batch {batch}, {pairs} pairs",
          flush=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ours(torch.zeros(batch, *shape), torch.zeros(batch, dtype=torch.long))  # compiles here with compile on
    first_call_s = time.perf_counter() - t0
    with torch.inference_mode():
        # The warm-up is a short DDIM run on both sides (a whole 1000-step run would double the cost).
        ddim_sample(ours, diffusion, list(range(batch)), shape, steps=2)
        warm = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(**sched_kw))
        warm.set_progress_bar_config(disable=True)
        warm(batch_size=batch, num_inference_steps=2, output_type="np")
        r = interleave({"ours": throughput(run_ours, batch), "diffusers": throughput(run_theirs, batch)}, pairs,
                       warmup=0)
    for k, v in r["median"].items():
        print(f"  {k:10s} {v:9.3f} images/s", flush=True)
    print(f"  ours / diffusers {r['ratios']['diffusers']:6.3f}x", flush=True)
    return {"config": name, "sampler": label, "params_ours": n_ours, "params_diffusers": n_theirs, "batch": batch,
            "switches": switches, "first_forward_s": round(first_call_s, 2), **r}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--ddpm-batch", type=int, default=8, help="DDPM-1000 batch, digits network (0: skip)")
    p.add_argument("--ddim-batch", type=int, default=90, help="DDIM-50 batch, digits network (0: skip)")
    p.add_argument("--cifar-batch", type=int, default=2, help="DDIM-50 batch, CIFAR-10 35.7M network (0: skip)")
    p.add_argument("--compile", action="store_true",
                   help="ours with sample.compile on (torch.compile; its compile time is reported as first_forward_s); "
                        "results go to results/sample_compile.json")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    digits = digits_unet_kwargs()
    comp = True if args.compile else None
    runs = []
    if args.ddpm_batch:
        runs.append(measure("digits preset (params.yaml)", digits, "ddpm", args.ddpm_batch, args.pairs, comp))
    if args.ddim_batch:
        runs.append(measure("digits preset (params.yaml)", digits, "ddim", args.ddim_batch, args.pairs, comp))
    if args.cifar_batch:
        runs.append(measure("CIFAR-10 (paper, 35.7M)", CIFAR10, "ddim", args.cifar_batch, args.pairs, comp))
    command = "python -m benchmarks.bench_sample " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"threads": threads, "goal": "ours >= 1.5x diffusers", "runs": runs}
    write_result("sample_compile" if args.compile else "sample", result, command.strip())
    return result


if __name__ == "__main__":
    main()
