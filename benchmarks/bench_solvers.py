"""Benchmark 8: samplers at equal quality, on the weights of a finished `make demo` run.

Two parts, both scored with the run's own classifier features (the evaluate stage's extractor for digits) as a
Fréchet distance against the whole training split:

``--study``: FID against network evaluations for every sampler (DDIM eta 0 and 1, DPM-Solver++(2M/3M), SDE-DPM-
Solver++(2M), UniPC) x timestep spacing (leading, trailing, linspace) x NFE, with DDPM-1000 as the reference,
over ``--draws`` disjoint seed ranges of ``--samples`` each. It is what the defaults (``sample.timestep_spacing``,
the demo's sampler, the training grids' sampler) were chosen from. Record: ``results/solver_study.json``.

default: equal-quality speed in one run. DDPM-1000 (ours), diffusers' ``DDPMPipeline`` at its default 1,000 steps
driving the same network (a thin wrapper gives it ``.sample``), and ``--solver`` at ``--nfe`` (the sampler table's
pick), each scored the same way, and their images/s timed alternately (A/B/A/B) at one batch. Record:
``results/solvers.json``.

    python -m benchmarks.bench_solvers --run /path/to/demo --study [--samples 1000 --draws 2]
    python -m benchmarks.bench_solvers --run /path/to/demo --solver unipc --nfe 20 --spacing trailing
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from benchmarks.common import RESULTS, machine, set_threads, write_result

NFES = (5, 10, 20, 50)
SPACINGS = ("leading", "trailing", "linspace")
BOOTSTRAP = 200  # resamplings of the samples for each FID's noise in the speed run
STUDY_SAMPLERS = (("ddim", 0.0), ("ddim", 1.0), ("dpm++2m", None), ("dpm++3m", None), ("dpm++2m-sde", None),
                  ("unipc", None))


class Run:
    """The EMA network, diffusion, classifier and training-split statistics of a finished demo folder."""

    def __init__(self, root: Path):
        from ddpm.checkpoint import newest_checkpoint
        from ddpm.pretrained import load_model
        from tasks.lib.classifier import load_classifier
        from tasks.lib.shards import open_dataset

        self.root = root
        self.checkpoint = newest_checkpoint(root / "checkpoints")
        self.model, self.diffusion, state = load_model(self.checkpoint, use_ema=True)
        self.step = int(state.get("step", 0))
        self.classifier, _ = load_classifier(root / "models" / "classifier.pt")
        self.classifier.eval()
        data = open_dataset(root / "data" / "dataset")
        self.shape = tuple(data.shape)
        train = data.train.read_all().images
        self.num_reference = len(train)
        f = self.features(train)
        self.ref_mu, self.ref_sigma = f.mean(axis=0), np.cov(f, rowvar=False)

    @torch.inference_mode()
    def features(self, images: np.ndarray) -> np.ndarray:
        """The classifier's penultimate features [N, D] of uint8 images [N, C, H, W] (as the evaluate stage)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)
        return torch.cat([self.classifier(x[i:i + 1000])[0] for i in range(0, len(x), 1000)]).double().numpy()

    def fid(self, feats: np.ndarray) -> float:
        from torch_fidelity.metric_fid import fid_statistics_to_metric

        stats = {"mu": feats.mean(axis=0), "sigma": np.cov(feats, rowvar=False)}
        ref = {"mu": self.ref_mu, "sigma": self.ref_sigma}
        return float(fid_statistics_to_metric(stats, ref, False)["frechet_inception_distance"])


def draw(run: Run, seeds: list[int], batch: int, **kw) -> np.ndarray:
    """uint8 samples [N, C, H, W] for ``seeds`` with :func:`ddpm.samplers.sample`'s keywords ``kw``."""
    from ddpm.samplers import sample
    from tasks.lib.images import to_uint8

    out = [to_uint8(sample(run.model, run.diffusion, seeds[i:i + batch], run.shape, **kw))
           for i in range(0, len(seeds), batch)]
    return np.concatenate(out)


def row_kwargs(sampler: str, nfe: int, spacing: Optional[str], eta: Optional[float]) -> dict[str, Any]:
    kw: dict[str, Any] = {"sampler": sampler, "steps": nfe}
    if spacing is not None:
        kw["timestep_spacing"] = spacing
    if eta is not None:
        kw["eta"] = eta
    return kw


def study(run: Run, samples: int, draws: int, batch: int, partial: Path) -> dict[str, Any]:
    """FID per (sampler, eta, spacing, NFE) and draw; rows already in ``partial`` (JSON lines) are kept."""
    done = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            r = json.loads(line)
            done[(r["sampler"], r["eta"], r["spacing"], r["nfe"], r["draw"])] = r
    specs = [("ddpm", None, None, run.diffusion.num_timesteps)]
    specs += [(s, eta, sp, n) for s, eta in STUDY_SAMPLERS for sp in SPACINGS for n in NFES]
    rows = []
    for d in range(draws):
        seeds = list(range(d * samples, (d + 1) * samples))
        for sampler, eta, spacing, nfe in specs:
            key = (sampler, eta, spacing, nfe, d)
            if key not in done:
                t0 = time.perf_counter()
                images = draw(run, seeds, batch, **row_kwargs(sampler, nfe, spacing, eta))
                wall = time.perf_counter() - t0
                done[key] = {"sampler": sampler, "eta": eta, "spacing": spacing, "nfe": nfe, "draw": d,
                             "seeds": [seeds[0], seeds[-1]], "fid": run.fid(run.features(images)),
                             "wall_s": round(wall, 2)}
                with partial.open("a") as f:
                    f.write(json.dumps(done[key]) + "\n")
                print(f"{sampler:12s} eta={eta} {spacing or '-':9s} NFE {nfe:5d} draw {d}: "
                      f"FID {done[key]['fid']:.4f} ({wall:.1f} s)", flush=True)
            rows.append(done[key])
    return summarize_study(rows)


def summarize_study(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, std over draws and the draws' values per setting; DDPM-1000's mean FID as the reference."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["sampler"], r["eta"], r["spacing"], r["nfe"]), []).append(r["fid"])
    table = []
    for (sampler, eta, spacing, nfe), v in groups.items():
        a = np.asarray(v)
        table.append({"sampler": sampler, "eta": eta, "spacing": spacing, "nfe": nfe, "fid_values": v,
                      "fid_mean": float(a.mean()), "fid_std": float(a.std(ddof=1)) if len(a) > 1 else None})
    ref = next(t for t in table if t["sampler"] == "ddpm")["fid_mean"]
    for t in table:
        t["ratio_to_ddpm"] = t["fid_mean"] / ref
    return {"reference_fid": ref, "rows": table}


class _Wrapped(torch.nn.Module):
    """Our UNet as diffusers' pipelines call a UNet2DModel: ``unet(x, t).sample`` and ``unet.config``."""

    def __init__(self, unet, shape):
        super().__init__()
        from types import SimpleNamespace

        self.unet = unet
        self.config = SimpleNamespace(sample_size=shape[1], in_channels=shape[0])

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @property
    def device(self):
        return next(self.parameters()).device

    def forward(self, x, t):
        from types import SimpleNamespace

        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]).long()
        return SimpleNamespace(sample=self.unet(x, t))


def diffusers_ddpm(run: Run, n: int, batch: int, seed: int) -> np.ndarray:
    """``DDPMPipeline`` at its default 1,000 steps over our network, with our betas and clipping."""
    from diffusers import DDPMPipeline, DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=run.diffusion.num_timesteps, trained_betas=run.diffusion.betas.numpy(),
                          variance_type="fixed_large", clip_sample=True, prediction_type="epsilon")
    pipe = DDPMPipeline(unet=_Wrapped(run.model, run.shape), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, batch):
        img = pipe(batch_size=min(batch, n - i), generator=gen, output_type="np").images  # [B, H, W, C] in [0, 1]
        out.append((np.asarray(img) * 255).round().astype(np.uint8).transpose(0, 3, 1, 2))
    return np.concatenate(out)


def speed(run: Run, solver: str, nfe: int, spacing: str, samples: int, batch: int, pairs: int) -> dict[str, Any]:
    """FID of each side on ``samples`` samples, and images/s timed alternately on one batch."""
    from benchmarks.common import interleave, throughput

    seeds = list(range(samples))
    sides = {
        "ddpm1000_ours": lambda s: draw(run, s, batch, sampler="ddpm"),
        f"{solver}{nfe}_{spacing}": lambda s: draw(run, s, batch, sampler=solver, steps=nfe, timestep_spacing=spacing),
        "ddpm1000_diffusers_pipeline": lambda s: diffusers_ddpm(run, len(s), batch, s[0]),
    }
    from tasks.sampler_table import paired_bootstrap

    quality, feats = {}, {}
    for name, fn in sides.items():
        t0 = time.perf_counter()
        feats[name] = run.features(fn(seeds))
        quality[name] = {"fid": run.fid(feats[name]), "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"{name}: FID {quality[name]['fid']:.4f} ({quality[name]['wall_s']} s for {samples})", flush=True)
    # the noise: each FID's std over resamplings of the samples; ours and the solver share their seeds (paired), the
    # pipeline draws from its own generator, so its difference to ours is unpaired
    boot = paired_bootstrap(feats, run.ref_mu, run.ref_sigma, BOOTSTRAP, seed=0)
    base = list(sides)[0]
    for name in sides:
        quality[name]["fid_std"] = float(np.std(boot[name], ddof=1))
        if name != base:
            quality[name]["fid_delta_std"] = float(np.std(boot[name] - boot[base], ddof=1))
            quality[name]["paired_with_ours"] = name != "ddpm1000_diffusers_pipeline"
    timing = interleave({name: throughput(lambda fn=fn: fn(list(range(batch))), batch) for name, fn in sides.items()},
                        pairs=pairs, warmup=0)
    return {"quality": quality, "timing": timing}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a finished `make demo` folder (checkpoints/, models/, data/)")
    p.add_argument("--study", action="store_true", help="the sampler x spacing x NFE grid instead of the speed run")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--solver", default="unipc")
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--spacing", default="trailing")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    run = Run(args.run)
    common = {"checkpoint": str(run.checkpoint.relative_to(run.root)), "checkpoint_step": run.step,
              "feature_extractor": "ddpm-classifier (the run's models/classifier.pt, penultimate layer)",
              "num_reference": run.num_reference, "threads": threads}
    if args.study:
        partial = args.out / "solver_study.partial.jsonl"
        result = {**common, "samples_per_draw": args.samples, "draws": args.draws, "batch": args.batch,
                  **study(run, args.samples, args.draws, args.batch, partial)}
        path = write_result("solver_study", result, "python -m benchmarks.bench_solvers --study " + " ".join(
            f"--{k} {v}" for k, v in (("samples", args.samples), ("draws", args.draws))), args.out)
        partial.unlink(missing_ok=True)
    else:
        result = {**common, "samples": args.samples, "batch": args.batch, "solver": args.solver, "nfe": args.nfe,
                  "spacing": args.spacing,
                  **speed(run, args.solver, args.nfe, args.spacing, args.samples, args.batch, args.pairs)}
        path = write_result("solvers", result, "python -m benchmarks.bench_solvers " + " ".join(
            f"--{k} {v}" for k, v in (("solver", args.solver), ("nfe", args.nfe), ("spacing", args.spacing),
                                      ("samples", args.samples))), args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
