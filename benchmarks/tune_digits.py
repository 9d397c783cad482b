"""Quality/time probe for digits presets: train in-process (no Ray start-up), sample, evaluate vs the floor.

    python benchmarks/tune_digits.py --params params.yaml --work /tmp/tune/a [--set train.steps=1500 ...]
    python benchmarks/tune_digits.py ... --work /tmp/tune/a --resample ddim50 --set sample.steps=50   # re-sample only

``--resample TAG`` skips training (the train params must match the run in ``--work``) and writes samples, eval
and result under ``<work>/<TAG>/``, so sampler settings can be compared on one trained network; ``--ckpt-step N``
samples an older kept checkpoint. ``ms_step_med``/``ms_step_best`` come from the loss log's images/s (median and
fastest 10-step interval: the machine is shared, the fastest interval is the closest to an unloaded machine).

Prints one JSON line: train/sample/eval wall times, FID, floor FID, ratio. The pipeline's own stages are used
(fetch.run, train.run_local, sampling.ShardSampler, evaluate.run), so what is measured is what the demo runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.lib.config import load_config  # noqa: E402
from tasks import evaluate, fetch, sample, train, train_classifier  # noqa: E402
from tasks.lib import sampling  # noqa: E402
from tasks.lib.files import write_json, write_npz  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resample", default=None, help="skip training; write samples/eval under <work>/<TAG>/")
    p.add_argument("--ckpt-step", type=int, default=None, help="sample this kept checkpoint instead of the newest")
    args = p.parse_args()
    cfg = load_config(args.params, args.overrides)
    torch.set_num_threads(args.threads)
    w = args.work
    # The evaluate stage logs to MLflow; keep probe runs out of the project's mlflow.db (and its demo run).
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{w.parent.resolve() / 'mlflow.db'}")
    data = w.parent / "data"
    if not (data / "dataset.json").is_file():
        fetch.run(cfg, data)
    clf = w.parent / "classifier.pt"
    if not clf.is_file():
        train_classifier.run(cfg, data, clf, w.parent / "classifier.json")
    t0 = time.perf_counter()
    if args.resample is None:
        train.run_local(cfg, data, w / "ckpt", w / "loss.tsv", threads=args.threads)
        out_dir = w
    else:
        if not (w / "ckpt").is_dir():
            raise SystemExit(f"--resample: {w / 'ckpt'} has no trained run")
        out_dir = w / args.resample
    t_train = time.perf_counter() - t0
    ckpt = sampling.newest_checkpoint(w / "ckpt")
    if args.ckpt_step is not None:
        from ddpm.checkpoint import checkpoint_path

        ckpt = checkpoint_path(w / "ckpt", args.ckpt_step)
    t1 = time.perf_counter()
    sampler = sampling.ShardSampler(str(ckpt), cfg.sample, "cpu", args.threads)
    seeds = list(range(cfg.sample.seed, cfg.sample.seed + cfg.sample.num_samples))
    images = sampler.sample(seeds)
    t_sample = time.perf_counter() - t1
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    write_npz(out_dir / "samples" / "shard_00000.npz", images=images, seeds=torch.tensor(seeds).numpy())
    sample.save_grid(images[:100], out_dir / "samples" / "grid.png")
    t2 = time.perf_counter()
    m = evaluate.run(cfg, data, out_dir / "samples", clf, w.parent / "ref_stats", out_dir / "eval.json")
    t_eval = time.perf_counter() - t2
    ms_med = ms_best = None
    if (w / "loss.tsv").is_file():
        rows = train.read_loss_log(w / "loss.tsv", cfg.train.steps)
        ips = sorted(float(r["images_per_s"]) for r in rows[1:]) or [0.0]
        if ips[-1] > 0:
            ms_med = round(1000 * cfg.train.batch_size / ips[len(ips) // 2], 1)
            ms_best = round(1000 * cfg.train.batch_size / ips[-1], 1)
    out = {"work": str(out_dir), "overrides": args.overrides, "ckpt": ckpt.name, "threads": args.threads,
           "train_s": round(t_train, 1), "ms_step_med": ms_med, "ms_step_best": ms_best,
           "sample_s": round(t_sample, 1), "eval_s": round(t_eval, 1), "fid": m["fid"],
           "floor_fid": m["floor"]["fid"], "ratio": m["fid_ratio"],
           "kid": m.get("kid_mean"), "floor_kid": m["floor"].get("kid_mean")}
    write_json(out_dir / "result.json", out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
