"""Benchmark 1: training-step throughput (images/s) on CPU, ours vs a plain diffusers loop, same architecture.

Ours is the step of tasks/train.py's loop with the params' speed switches (ddpm/perf.py): L_simple via
``GaussianDiffusion.training_loss``, backward, grad-norm clipping, Adam, EMA update. The diffusers side is the
plain loop its docs teach: ``UNet2DModel`` + ``DDPMScheduler.add_noise`` + MSE + ``torch.optim.Adam`` (torch's
default implementation), with no clipping and no EMA, i.e. less work than ours. Also measured, as ablations of our
switches: ours with torch's default Adam, and ours with channels_last. Sides alternate A/B/A/B in one process;
each ratio is the median over pairs of (ours / other) images/s.

    python -m benchmarks.bench_train [--threads 1] [--pairs 3] [--cifar-batch 4] [--digits-batch 128]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import CIFAR10, diffusers_unet, digits_unet_kwargs, interleave, set_threads, throughput, write_result


def our_step(kw: dict, batch: int, *, adam_impl: str, channels_last: bool, seed: int = 0):
    """One training step exactly as tasks/train.py takes it (no data loading), as a closure."""
    from ddpm.ema import EMA
    from ddpm.perf import make_adam, prepare_model
    from ddpm.schedules import make_betas
    from ddpm.diffusion import GaussianDiffusion
    from ddpm.unet import UNet, count_parameters

    torch.manual_seed(seed)
    model = prepare_model(UNet(**kw), channels_last=channels_last)
    ema = EMA(model, 0.9999)
    opt = make_adam(model.parameters(), 2e-4, adam_impl)
    diffusion = GaussianDiffusion(make_betas("linear", 1000, beta_start=1e-4, beta_end=0.02))
    x0 = torch.rand(batch, kw["image_channels"], kw["image_size"], kw["image_size"]) * 2 - 1
    model.train()

    def step():
        loss = diffusion.training_loss(model, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        float(loss.detach())  # the loop reads the loss every step (NaN check, log)
        opt.step()
        ema.update(model)

    return step, count_parameters(model)


def diffusers_step(kw: dict, batch: int, seed: int = 0):
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    unet = diffusers_unet(**kw)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-4)
    x0 = torch.rand(batch, kw["image_channels"], kw["image_size"], kw["image_size"]) * 2 - 1
    unet.train()

    def step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        xt = sched.add_noise(x0, noise, t)
        loss = F.mse_loss(unet(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in unet.parameters())


def measure(name: str, kw: dict, batch: int, reps: int, pairs: int) -> dict:
    from tasks.lib.config import load_config
    from benchmarks.common import REPO

    tc = load_config(REPO / "params.yaml").train
    ours, n_ours = our_step(kw, batch, adam_impl=tc.adam_impl, channels_last=tc.channels_last)
    theirs, n_theirs = diffusers_step(kw, batch)
    sides = {"ours": throughput(ours, batch, reps), "diffusers": throughput(theirs, batch, reps)}
    ablations = {}
    if tc.adam_impl != "auto":
        ablations["ours, adam_impl=auto (torch's default)"] = dict(adam_impl="auto", channels_last=tc.channels_last)
    ablations[f"ours, channels_last={not tc.channels_last}"] = dict(adam_impl=tc.adam_impl,
                                                                   channels_last=not tc.channels_last)
    for label, sw in ablations.items():
        sides[label] = throughput(our_step(kw, batch, **sw)[0], batch, reps)
    print(f"[train {name}] params ours {n_ours:,} / diffusers {n_theirs:,}; batch {batch}, {reps} step(s) per "
          f"measurement, {pairs} pairs", flush=True)
    r = interleave(sides, pairs)
    for k, v in r["median"].items():
        print(f"  {k:45s} {v:9.2f} images/s", flush=True)
    for k, v in r["ratios"].items():
        print(f"  ours / {k:38s} {v:6.3f}x", flush=True)
    return {"config": name, "params_ours": n_ours, "params_diffusers": n_theirs, "batch": batch,
            "steps_per_measurement": reps, "switches": {"adam_impl": tc.adam_impl, "channels_last": tc.channels_last},
            **r}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--cifar-batch", type=int, default=4, help="batch of the 35.7M CIFAR-10 network (0: skip)")
    p.add_argument("--cifar-steps", type=int, default=1, help="steps per measurement, CIFAR-10 network")
    p.add_argument("--digits-batch", type=int, default=128, help="batch of the digits preset's network (0: skip)")
    p.add_argument("--digits-steps", type=int, default=3, help="steps per measurement, digits network")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    runs = []
    if args.digits_batch:
        runs.append(measure("digits preset (params.yaml)", digits_unet_kwargs(), args.digits_batch, args.digits_steps,
                            args.pairs))
    if args.cifar_batch:
        runs.append(measure("CIFAR-10 (paper, 35.7M)", CIFAR10, args.cifar_batch, args.cifar_steps, args.pairs))
    command = "python -m benchmarks.bench_train " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"threads": threads, "goal": "ours >= 1.2x diffusers", "runs": runs}
    write_result("train", result, command.strip())
    return result


if __name__ == "__main__":
    main()
