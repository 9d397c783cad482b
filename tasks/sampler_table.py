"""Stage `sampler_table`: sample quality against speed for one trained model.

One row per sampler: Algorithm 2 over all T steps (``sampler_table.ddpm``) and DDIM (Song et al. 2021, eta=0) at
each of ``sampler_table.ddim_steps``; every row samples the same seeds (``sampler_table.seed`` ...), from the
newest checkpoint with the weights ``sample.use_ema`` names. Each row runs the sample stage (Ray actors) into a
temporary folder and scores it with the evaluate stage's ``run`` (FID/KID against the training split, the same
feature extractor and cached reference statistics in ``--ref-dir``). One set of actors, started before the first
row, samples every row, so no row's wall time holds Ray's or the actors' start-up (``actors_startup_s``). The
real-vs-real floor at the same sample count closes the table. Writes ``--out`` (JSON) and ``--markdown`` (the
table).

    python -m tasks.sampler_table --params params.yaml --checkpoints checkpoints --data data/dataset \
        --classifier models/classifier.pt --ref-dir ref_stats --out metrics/sampler_table.json \
        --markdown metrics/sampler_table.md
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional, Sequence

from tasks.lib.config import Config, apply_overrides, from_dict, write_resolved

from .lib.callbacks import after_stage
from .lib.common import (
    StageError,
    atomic_write_bytes,
    run_cli,
    stage_parser,
    write_json,
)
from .lib.inputs import stage_config

METRICS = ("fid", "kid_mean", "kid_std", "isc_mean", "isc_std")
SETTINGS_NOTE = "DDIM rows use eta=0 (deterministic given x_T); DDPM is Algorithm 2 with sample.variance"


def settings(cfg: Config) -> list[dict[str, Any]]:
    """The rows to sample: ``{"sampler", "steps", "eta"}`` in table order (DDPM first, then DDIM by steps)."""
    st = cfg.sampler_table
    rows = [{"sampler": "ddpm", "steps": cfg.diffusion.timesteps, "eta": None}] if st.ddpm else []
    rows += [{"sampler": "ddim", "steps": n, "eta": 0.0} for n in sorted(set(st.ddim_steps), reverse=True)]
    return rows


def markdown_table(result: dict[str, Any]) -> str:
    """The table as GitHub markdown: sampler, network evaluations, FID, KID, wall time, images/s."""
    def g(x, fmt="{:.4g}"):
        return fmt.format(x) if isinstance(x, (int, float)) else "–"

    lines = ["| sampler | steps | FID | KID | sampling time (s) | images/s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        name = "DDPM (Alg. 2)" if r["sampler"] == "ddpm" else "DDIM, η=0"
        lines.append(f"| {name} | {r['steps']} | {g(r.get('fid'))} | {g(r.get('kid_mean'))} | "
                     f"{g(r.get('sampling_s', r['wall_s']), '{:.1f}')} | {g(r['images_per_s'], '{:.1f}')} |")
    floor = result.get("floor") or {}
    if floor:
        lines.append(f"| real held-out images (floor) | – | {g(floor.get('fid'))} | {g(floor.get('kid_mean'))} "
                     "| – | – |")
    lines += ["", f"{result['num_samples']} samples per row (seeds {result['seeds'][0]}–{result['seeds'][1]}, the "
                  f"same in every row) from `{Path(result['checkpoint']).name}` "
                  f"({'EMA' if result['use_ema'] else 'raw'} weights); {result['feature_extractor']} features "
                  f"against the {result['num_reference']} training images; {result['device']}, sampling time per actor "
                  f"without start-up. {SETTINGS_NOTE}."]
    return "\n".join(lines) + "\n"


def run(cfg: Config, ckpt_dir, data_dir, classifier_path, ref_dir, out_path, markdown_path) -> dict[str, Any]:
    """Sample and score every row; write ``out_path`` (JSON) and ``markdown_path``. Returns the JSON's content::

        {"enabled": true, "rows": [{"sampler", "steps", "eta", "fid", "kid_mean", "kid_std", "wall_s",
         "images_per_s"}, ...], "floor": {"fid", "kid_mean", ...}, "num_samples", "seeds": [first, last],
         "checkpoint", "checkpoint_step", "feature_extractor", "device", ...}

    With ``sampler_table.enabled: false`` both files only say so.
    """
    st = cfg.sampler_table
    out_path, markdown_path = Path(out_path), Path(markdown_path)
    if not st.enabled:
        result: dict[str, Any] = {"enabled": False, "rows": []}
        write_json(out_path, result)
        atomic_write_bytes(markdown_path, lambda f: f.write(b"sampler_table.enabled is false: no table\n"))
        print("sampler_table.enabled is false: no table")
        return result
    from .lib.sampling import SamplerPool, newest_checkpoint, sample_shards
    from .lib.scoring import score_samples

    out_path.parent.mkdir(parents=True, exist_ok=True)
    seeds = list(range(st.seed, st.seed + st.num_samples))
    rows: list[dict[str, Any]] = []
    pool: Optional[SamplerPool] = None  # one set of actors (one copy of the network each) samples every row
    with tempfile.TemporaryDirectory(prefix="sampler_table-", dir=out_path.parent) as tmp, ExitStack() as actors:
        for spec in settings(cfg):
            # The sample and evaluate stages' own machinery (support modules), on this row's sampler.
            over = {"sample.sampler": spec["sampler"], "sample.steps": spec["steps"], "sample.mode": "generate",
                    "sample.num_samples": st.num_samples, "sample.seed": st.seed, "sample.batch_size": st.batch_size,
                    "sample.shard_size": -(-st.num_samples // cfg.sample.num_workers),
                    "sample.grid_size": min(cfg.sample.grid_size, st.num_samples)}
            if spec["eta"] is not None:
                over["sample.eta"] = spec["eta"]
            if "repeats" in type(cfg.evaluate).model_fields:  # one seed range per row: the table's cost is N/row
                over["evaluate.repeats"] = 1
            row_cfg = from_dict(apply_overrides(cfg.to_dict(), over))
            name = f"{spec['sampler']}{spec['steps']}"
            if pool is None:
                shards = -(-st.num_samples // over["sample.shard_size"])
                pool = actors.enter_context(SamplerPool(row_cfg, newest_checkpoint(ckpt_dir), shards))
                print(f"sampler_table: {pool.workers} sampling actor(s) for every row, started in "
                      f"{pool.actors_startup_s:.1f} s")
            summary = sample_shards(row_cfg, ckpt_dir, Path(tmp) / name, pool=pool)
            if summary["seeds"][0] != seeds[0]:
                raise StageError(f"sampler_table: row {name} sampled seeds from {summary['seeds'][0]}, not {seeds[0]}")
            wall = summary["wall_s"]  # the actors were started before the first row: no start-up in any row
            sampling = summary.get("sampling_s") or wall  # inside the actors, per actor: no grid, no scheduling
            ev = score_samples(row_cfg, data_dir, Path(tmp) / name, classifier_path, ref_dir, Path(tmp) / f"{name}.json")
            scores = {k: ev[k] for k in METRICS if isinstance(ev.get(k), (int, float))}
            rows.append({**spec, **scores, "sampling_s": round(sampling, 2), "wall_s": round(wall, 2),
                         "images_per_s": round(summary["count"] / sampling, 2) if sampling > 0 else None})
            print(f"sampler_table: {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
                  + f", sampling {sampling:.1f} s ({wall:.1f} s wall)")
    floor = {k: v for k, v in ev["floor"].items() if k in (*METRICS, "num_holdout", "kid_subset_size")}
    ckpt = Path(summary["checkpoint"])
    result = {
        "enabled": True,
        "rows": rows,
        "floor": floor,
        "num_samples": st.num_samples,
        "seeds": [seeds[0], seeds[-1]],
        "checkpoint": str(ckpt),
        "checkpoint_step": int(ckpt.stem.split("_")[1]),
        "use_ema": cfg.sample.use_ema,
        "feature_extractor": ev["feature_extractor"],
        "reference_key": ev.get("reference_key"),
        "num_reference": ev.get("num_reference"),
        "kid_subset_size": ev.get("kid_subset_size"),
        "device": f"{pool.workers} Ray sampling actor(s) of the sample stage",
        "actors_startup_s": round(pool.actors_startup_s, 2),
        "note": SETTINGS_NOTE,
    }
    write_json(out_path, result)
    md = markdown_table(result)
    atomic_write_bytes(markdown_path, lambda f: f.write(md.encode()))
    write_resolved(cfg, out_path.parent, f"{out_path.stem}.config.json")
    print(md)
    return result


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = stage_parser("FID/KID and wall time of DDPM and DDIM at several step counts, same seeds, one model.")
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint folder from the train stage")
    p.add_argument("--data", required=True, help="dataset folder (output of the fetch stage)")
    p.add_argument("--classifier", default=None, help="classifier weights (train_classifier output)")
    p.add_argument("--ref-dir", required=True, help="cache folder of the training-set reference statistics")
    p.add_argument("--out", required=True, help="JSON to write, e.g. metrics/sampler_table.json")
    p.add_argument("--markdown", required=True, help="markdown table to write, e.g. metrics/sampler_table.md")
    args = p.parse_args(argv)
    cfg = stage_config(args)
    result = run(cfg, args.checkpoints, args.data, args.classifier, args.ref_dir, args.out, args.markdown)
    after_stage("sampler_table", cfg, sampler_table=args.out, sampler_table_md=args.markdown)
    return result


if __name__ == "__main__":
    run_cli(main)
