"""The training speed switches side by side: every combination of ``train.channels_last`` and ``train.adam_impl``
on the whole training step of tasks/train.py (loss, backward, clipping, Adam, EMA), in one process, alternating.

Each ratio is ``default / other`` images/s (the median over rounds), the default being params.yaml's switches.
BENCHMARKS.md states the defaults' rule from these records, one file per network and CPU:
benchmarks/results/switches_<network>_<cpu vendor>[_<n>threads].json.

    python -m benchmarks.bench_switches [--network digits|cifar10] [--threads 1] [--pairs 7] [--batch 128]

One torch thread by default: on a 2-core machine shared with other processes, two spinning OpenMP threads swing
10x with the neighbours (benchmarks/TUNING.md), one thread degrades proportionally, so ratios stay readable.
"""

from __future__ import annotations

import argparse
import itertools
import sys

from benchmarks.bench_train import our_step
from benchmarks.common import CIFAR10, digits_unet_kwargs, interleave, machine, set_threads, throughput, write_result

ADAM_IMPLS = ("fused", "auto", "foreach")


def label(channels_last: bool, adam_impl: str) -> str:
    return f"channels_last={str(channels_last).lower()}, adam_impl={adam_impl}"


def main(argv=None) -> dict:
    from tasks.lib.config import load_config
    from benchmarks.common import REPO

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", choices=("digits", "cifar10"), default="digits",
                   help="digits: params.yaml's network at train.batch_size; cifar10: the paper's 35.7M network")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--pairs", type=int, default=7, help="rounds over all combinations (order alternates)")
    p.add_argument("--batch", type=int, default=None, help="default: train.batch_size (digits), 4 (cifar10)")
    p.add_argument("--steps", type=int, default=None, help="training steps per measurement (3 digits, 1 cifar10)")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    tc = load_config(REPO / "params.yaml").train
    digits = args.network == "digits"
    batch = args.batch or (tc.batch_size if digits else 4)
    steps = args.steps or (3 if digits else 1)
    kw = digits_unet_kwargs() if digits else CIFAR10
    combos = [(cl, impl) for cl, impl in itertools.product((False, True), ADAM_IMPLS)]
    default = (tc.channels_last, tc.adam_impl)
    if default not in combos:
        combos.append(default)
    combos.sort(key=lambda c: c != default)  # the current default first: every ratio is default / other
    sides = {label(*c): throughput(our_step(kw, batch, channels_last=c[0], adam_impl=c[1])[0], batch, steps)
             for c in combos}
    config = "digits preset (params.yaml)" if digits else "CIFAR-10 (paper, 35.7M)"
    print(f"[switches] {config}, batch {batch}, {threads} thread(s), {steps} step(s) per measurement, "
          f"{args.pairs} rounds; default {label(*default)}", flush=True)
    r = interleave(sides, args.pairs)
    for k, v in sorted(r["median"].items(), key=lambda kv: -kv[1]):
        ratio = "" if k == label(*default) else f"  default / this {r['ratios'][k]:.3f}x"
        print(f"  {k:45s} {v:8.1f} images/s{ratio}", flush=True)
    command = "python -m benchmarks.bench_switches " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"network": args.network, "config": config, "batch": batch, "threads": threads,
              "steps_per_measurement": steps, "default": label(*default),
              "fastest": max(r["median"], key=r["median"].get), **r}
    cpu = machine().get("cpu", "").lower()
    vendor = "amd" if "amd" in cpu else "intel" if "intel" in cpu else "cpu"
    write_result(f"switches_{args.network}_{vendor}" + (f"_{threads}threads" if threads != 1 else ""), result,
                 command.strip())
    return result


if __name__ == "__main__":
    main()
