"""The `train.adam_impl` switch alone: one Adam step over the network's parameters, each implementation, on CPU.

Random gradients, 3 steps per measurement, implementations interleaved; reported as steps/s and the median
ratio fused / other. Not in `make bench` (row 1a there measures the switch inside a whole training step).

    python -m benchmarks.bench_adam [--threads 1] [--pairs 4]
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import CIFAR10, digits_unet_kwargs, interleave, set_threads, throughput, write_result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs", type=int, default=4)
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    from ddpm.perf import make_adam
    from ddpm.unet import UNet, count_parameters

    runs = []
    for name, kw in (("CIFAR-10 (paper, 35.7M)", CIFAR10), ("digits preset (params.yaml)", digits_unet_kwargs())):
        sides = {}
        for impl in ("fused", "foreach", "loop"):
            m = UNet(**kw)
            for q in m.parameters():
                q.grad = torch.randn_like(q)
            sides[impl] = throughput(make_adam(m.parameters(), 1e-4, impl).step, 1, 3)
        r = interleave(sides, args.pairs)
        ms = {k: round(1000 / v, 2) for k, v in r["median"].items()}
        print(f"[adam {name}] {count_parameters(m):,} params: ms/step {ms}; fused faster by "
              f"{ {k: round(v, 2) for k, v in r['ratios'].items()} }", flush=True)
        runs.append({"config": name, "params": count_parameters(m), "ms_per_step": ms, **r})
    command = "python -m benchmarks.bench_adam " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"threads": threads, "runs": runs}
    write_result("adam", result, command.strip())
    return result


if __name__ == "__main__":
    main()
