"""How far apart the same seeds' samples land when the computation changes shape: the numbers behind README's
"Reproducibility" contract, measured on this machine's CPU with a trained checkpoint.

For the demo's sampler (``sample`` section of the params: DDIM-100, eta 1, and the same with eta 0) it samples the
same seeds several ways and records, for each pair, the largest absolute difference in the model's [-1, 1] range
and how many uint8 pixels differ (and by how many levels):

- the same batch twice (must be 0: the bitwise part of the contract);
- 1 vs 2 intra-op threads, same batch;
- seeds 0-7 as one batch of 8 vs batches of 3 and 5;
- ``--count`` seeds in batches of ``sample.batch_size`` vs batches of 8.

Writes benchmarks/results/repro.json (with the CPU model); `make report` writes README's numbers from it.

    python -m benchmarks.repro_bounds [--root ROOT] [--params params.yaml] [--count 360]

ROOT is a finished demo's output root holding ``checkpoints/`` (default: this checkout); `python -m
benchmarks.bench_demo` runs this on its fresh demo folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import REPO, write_result


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Max abs difference of two [N, C, H, W] batches in [-1, 1], and their uint8 images' differing pixels."""
    from tasks.lib.images import to_uint8

    ua, ub = to_uint8(a).astype(np.int16), to_uint8(b).astype(np.int16)
    levels = np.abs(ua - ub)
    return {"max_abs_diff": float((a - b).abs().max()), "bitwise_equal": bool(torch.equal(a, b)),
            "uint8_pixels": int(levels.size), "uint8_pixels_differing": int((levels > 0).sum()),
            "uint8_max_levels": int(levels.max())}


def main(argv=None) -> dict:
    from tasks.lib.config import load_config
    from ddpm.samplers import ddim_sample
    from tasks.lib.sampling import ShardSampler, newest_checkpoint

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(REPO), help="a finished demo's output root (holds checkpoints/)")
    p.add_argument("--params", default=str(REPO / "params.yaml"))
    p.add_argument("--count", type=int, default=360, help="seeds of the batch-size comparison")
    p.add_argument("--results", help="write repro.json here instead of benchmarks/results/")
    args = p.parse_args(argv)
    cfg = load_config(args.params, {"tracking.enabled": False})
    ckpt = newest_checkpoint(Path(args.root) / "checkpoints")
    sampler = ShardSampler(str(ckpt), cfg.sample, "cpu", 1)
    s = cfg.sample

    def run(seeds: list[int], split: list[int], threads: int, eta: float) -> torch.Tensor:
        torch.set_num_threads(threads)
        out, lo = [], 0
        for n in split:
            out.append(ddim_sample(sampler.model, sampler.diffusion, seeds[lo:lo + n], sampler.shape, steps=s.steps,
                                   eta=eta, clip_denoised=s.clip_denoised))
            lo += n
        return torch.cat(out)

    rows = []
    big = [s.batch_size] * (args.count // s.batch_size) + ([args.count % s.batch_size] if args.count % s.batch_size else [])
    for eta in sorted({s.eta, 0.0}, reverse=True):
        eight = list(range(8))
        base = run(eight, [8], 1, eta)
        rows.append({"eta": eta, "what": "seeds 0-7, batch 8, 1 thread, twice", **compare(base, run(eight, [8], 1, eta))})
        rows.append({"eta": eta, "what": "seeds 0-7, batch 8: 1 vs 2 threads", **compare(base, run(eight, [8], 2, eta))})
        rows.append({"eta": eta, "what": "seeds 0-7, 1 thread: batch 8 vs batches 3+5",
                     **compare(base, run(eight, [3, 5], 1, eta))})
        seeds = list(range(args.count))
        rows.append({"eta": eta, "what": f"seeds 0-{args.count - 1}, 1 thread: batch {s.batch_size} vs batch 8",
                     **compare(run(seeds, big, 1, eta), run(seeds, [8] * (args.count // 8) + [args.count % 8] * bool(args.count % 8), 1, eta))})
        for r in rows[-4:]:
            print(f"eta={eta:g} {r['what']:50s} max |diff| {r['max_abs_diff']:.2e}, uint8 pixels differing "
                  f"{r['uint8_pixels_differing']} of {r['uint8_pixels']} (max {r['uint8_max_levels']} level)", flush=True)
    command = "python -m benchmarks.repro_bounds " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"checkpoint": ckpt.name, "sampler": f"ddim-{s.steps}", "network": "digits preset (params.yaml)",
              "rows": rows}
    write_result("repro", result, command.strip(), Path(args.results) if args.results else None)
    return result


if __name__ == "__main__":
    main()
