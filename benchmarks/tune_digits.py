"""Quality/time probe for digits presets: train in-process (no Ray start-up), sample, evaluate vs the floor.

    python benchmarks/tune_digits.py --params configs/digits.yaml --work /tmp/tune/a [--set train.steps=1500 ...]

Prints one JSON line: train/sample/eval wall times, FID, floor FID, ratio. The pipeline's own stages are used
(fetch.run, train.run_local, sample.ShardSampler, evaluate.run), so what is measured is what the demo runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm.config import load_config  # noqa: E402
from tasks import evaluate, fetch, sample, train, train_classifier  # noqa: E402
from tasks.common import write_json, write_npz  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    cfg = load_config(args.params, args.overrides)
    torch.set_num_threads(args.threads)
    w = args.work
    data = w.parent / "data"
    if not (data / "dataset.json").is_file():
        fetch.run(cfg, data)
    clf = w.parent / "classifier.pt"
    if not clf.is_file():
        train_classifier.run(cfg, data, clf, w.parent / "classifier.json")
    t0 = time.perf_counter()
    train.run_local(cfg, data, w / "ckpt", w / "loss.tsv", threads=args.threads)
    t_train = time.perf_counter() - t0
    ckpt = sample.newest_checkpoint(w / "ckpt")
    t1 = time.perf_counter()
    sampler = sample.ShardSampler(str(ckpt), cfg.to_dict(), "cpu", args.threads)
    seeds = list(range(cfg.sample.seed, cfg.sample.seed + cfg.sample.num_samples))
    images = sampler.sample(seeds)
    t_sample = time.perf_counter() - t1
    (w / "samples").mkdir(parents=True, exist_ok=True)
    write_npz(w / "samples" / "shard_00000.npz", images=images, seeds=torch.tensor(seeds).numpy())
    sample.save_grid(images[:100], w / "samples" / "grid.png")
    t2 = time.perf_counter()
    m = evaluate.run(cfg, data, w / "samples", clf, w.parent / "ref_stats", w / "eval.json")
    t_eval = time.perf_counter() - t2
    out = {"work": str(w), "overrides": args.overrides, "train_s": round(t_train, 1), "sample_s": round(t_sample, 1),
           "eval_s": round(t_eval, 1), "fid": m["fid"], "floor_fid": m["floor"]["fid"], "ratio": m["fid_ratio"],
           "kid": m.get("kid_mean"), "floor_kid": m["floor"].get("kid_mean")}
    write_json(w / "result.json", out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
