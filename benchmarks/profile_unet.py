"""Where a training step's time goes: torch.profiler over ours vs diffusers' UNet2DModel (same architecture).

Prints the top operators by self CPU time for one forward+backward of each network and writes their shares to
benchmarks/results/profile.json. Not part of `make bench` (it explains the ratios rather than measuring them).

    python -m benchmarks.profile_unet [--config digits|cifar10] [--batch 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import CIFAR10, diffusers_unet, digits_unet_kwargs, set_threads, write_result


def top_ops(fn, n: int = 12) -> tuple[list[dict], float]:
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000, 2), "share": round(e.self_cpu_time_total / total, 4),
             "calls": e.count} for e in rows], total / 1000


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=["digits", "cifar10"], default="digits")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    set_threads(args.threads)
    from ddpm.unet import UNet

    kw = digits_unet_kwargs() if args.config == "digits" else CIFAR10
    torch.manual_seed(0)
    ours, theirs = UNet(**kw), diffusers_unet(**kw)
    x = torch.randn(args.batch, kw["image_channels"], kw["image_size"], kw["image_size"])
    t = torch.randint(0, 1000, (args.batch,))

    def step(m, diff):
        def f():
            out = m(x, t).sample if diff else m(x, t)
            F.mse_loss(out, x).backward()
        return f

    result = {"config": args.config, "batch": args.batch}
    for name, m, diff in (("ours", ours, False), ("diffusers", theirs, True)):
        ops, total = top_ops(step(m, diff))
        result[name] = {"total_self_cpu_ms": round(total, 1), "top_ops": ops}
        print(f"\n{name}: forward+backward, total self CPU {total:.0f} ms")
        for o in ops:
            print(f"  {o['op']:45s} {o['self_ms']:9.1f} ms  {o['share'] * 100:5.1f}%  x{o['calls']}")
    command = "python -m benchmarks.profile_unet " + " ".join(sys.argv[1:] if argv is None else argv)
    write_result(f"profile_{args.config}", result, command.strip())
    return result


if __name__ == "__main__":
    main()
