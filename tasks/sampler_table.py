"""Stage `sampler_table`: sample quality against network evaluations (NFE) for one trained model, and the question
it answers: how many evaluations does each sampler need to come within ``sampler_table.tolerance`` (10%) of
DDPM-1000's FID?

Rows: Algorithm 2 over all T steps (``sampler_table.ddpm``, the reference), DDIM (Song et al. 2021, eta=0) at each
of ``sampler_table.ddim_steps``, and each of ``sampler_table.solvers`` (DPM-Solver++, UniPC: ddpm/solvers.py) at each
of ``sampler_table.solver_steps``; DDIM and the solvers place their steps by ``sample.timestep_spacing``. Every row
samples the same seeds (``sampler_table.seed`` ...), from the newest checkpoint with the weights ``sample.use_ema``
names. Each row is sampled by the sampling actors the sample stage uses (tasks/lib/sampling.py) into a temporary
folder and scored as the evaluate stage scores (tasks/lib/scoring.py: FID/KID against the training split, the same
feature extractor and cached reference statistics in ``--ref-dir``). One set of actors, started before the first
row, samples every row, so no row's wall time holds Ray's or the actors' start-up (``actors_startup_s``).

The noise is stated, not assumed: every row's FID is recomputed on ``sampler_table.bootstrap`` resamplings of the
seeds, the same resampling for every row, which gives each FID's standard deviation and, paired, the standard
deviation of its difference to DDPM's. A row holds quality when its FID is within the tolerance of DDPM's; only when no
row does, the cheapest row whose excess over DDPM's is within two standard deviations of that difference is named
instead ("within the noise"). The real-vs-real floor at the same sample count closes the table. Writes ``--out`` (JSON) and ``--markdown`` (the table and the answer).

    python -m tasks.sampler_table --params params.yaml --checkpoints checkpoints --data data/dataset \
        --classifier models/classifier.pt --ref-dir ref_stats --out metrics/sampler_table.json \
        --markdown metrics/sampler_table.md
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ddpm.checkpoint import atomic_write_bytes
from ddpm.config import SAMPLER_TITLES, setting_key
from tasks.lib.config import Config, load_config, override, write_resolved

from .lib.callbacks import after_stage
from .lib.cli import run_cli, stage_parser
from .lib.errors import StageError
from .lib.files import write_json
from .lib.inputs import check_for_dvc_stage

METRICS = ("fid", "kid_mean", "kid_std", "isc_mean", "isc_std")
NOISE_SIGMAS = 2.0  # "within the noise": an excess over DDPM's FID below this many std of the paired difference
GOAL_NFE, MOONSHOT_NFE = 50, 20  # issue "Sampling at equal quality": >= 20x and >= 50x fewer evaluations than 1000
TITLES = {**SAMPLER_TITLES, "ddim": "DDIM, η=0"}  # the table's DDIM rows are deterministic


def settings(cfg: Config) -> list[dict[str, Any]]:
    """The rows to sample: ``{"sampler", "steps", "eta"}`` in table order: DDPM first, then DDIM by steps (most
    first), then each solver by steps (fewest first)."""
    st = cfg.sampler_table
    rows = [{"sampler": "ddpm", "steps": cfg.diffusion.timesteps, "eta": None}] if st.ddpm else []
    rows += [{"sampler": "ddim", "steps": n, "eta": 0.0} for n in sorted(set(st.ddim_steps), reverse=True)]
    rows += [{"sampler": s, "steps": n, "eta": None} for s in dict.fromkeys(st.solvers) for n in sorted(set(st.solver_steps))]
    return rows


def row_name(row: dict[str, Any]) -> str:
    """``ddpm1000``, ``ddim10``, ``dpmpp2m20``, ``unipc10``: a row's name in files and metric keys (no '+')."""
    return setting_key(row["sampler"], row["steps"])


def noise(rows: list[dict[str, Any]], boot: dict[str, np.ndarray]) -> None:
    """Add each row's ``fid_std`` (bootstrap) and, against the DDPM row, ``fid_delta_std`` (paired bootstrap)."""
    ref = next((r for r in rows if r["sampler"] == "ddpm"), None)
    for r in rows:
        b = boot.get(row_name(r))
        if b is None or len(b) < 2:
            continue
        r["fid_std"] = float(np.std(b, ddof=1))
        if ref is not None and r is not ref:
            r["fid_delta_std"] = float(np.std(b - boot[row_name(ref)], ddof=1))


def answer(rows: list[dict[str, Any]], tolerance: float) -> Optional[dict[str, Any]]:
    """Which rows hold DDPM's quality, the cheapest of them, and each sampler's NFE needed. None without a DDPM row.

    A row holds quality when ``fid <= (1 + tolerance) * fid_ddpm`` (``within_tolerance``, ``holds``). Its excess
    ``fid - fid_ddpm`` is ``within_noise`` when at most :data:`NOISE_SIGMAS` standard deviations of the paired
    difference; the cheapest such row is named only when no row holds (a noisy table must not crown a 5-step row
    because its noise is wide). Rows gain ``ratio_to_ddpm``, ``excess_sigmas``, ``within_tolerance``,
    ``within_noise`` and ``holds``.
    """
    ref = next((r for r in rows if r["sampler"] == "ddpm" and isinstance(r.get("fid"), (int, float))), None)
    if ref is None:
        return None
    f0 = ref["fid"]
    for r in rows:
        if r is ref or not isinstance(r.get("fid"), (int, float)):
            continue
        r["ratio_to_ddpm"] = r["fid"] / f0 if f0 > 0 else None
        r["within_tolerance"] = bool(r["fid"] <= (1 + tolerance) * f0)
        sd = r.get("fid_delta_std")
        r["excess_sigmas"] = (r["fid"] - f0) / sd if sd else None
        r["within_noise"] = bool(sd is not None and r["fid"] - f0 <= NOISE_SIGMAS * sd)
        r["holds"] = r["within_tolerance"]
    others = [r for r in rows if r is not ref and "holds" in r]
    per_sampler: dict[str, Any] = {}
    for name in dict.fromkeys(r["sampler"] for r in others):
        mine = sorted((r for r in others if r["sampler"] == name), key=lambda r: r["steps"])
        ok = [r for r in mine if r["holds"]]
        best = min(mine, key=lambda r: r["fid"])
        per_sampler[name] = {
            "nfe_needed": ok[0]["steps"] if ok else None,
            "nfe_within_noise": next((r["steps"] for r in mine if r["within_noise"]), None),
            "fid_by_nfe": {str(r["steps"]): r["fid"] for r in mine},
            "best": {"nfe": best["steps"], "fid": best["fid"], "ratio_to_ddpm": best.get("ratio_to_ddpm")},
        }
    holding = sorted((r for r in others if r["holds"]), key=lambda r: (r["steps"], r["fid"]))
    if not holding:
        holding = sorted((r for r in others if r["within_noise"]), key=lambda r: (r["steps"], r["fid"]))
    cheapest = holding[0] if holding else None
    delta_sd = [r["fid_delta_std"] for r in others if r.get("fid_delta_std") is not None]
    moon = [r for r in others if r["steps"] <= MOONSHOT_NFE]
    best_moon = min(moon, key=lambda r: r["fid"]) if moon else None
    return {
        "reference": row_name(ref),
        "reference_fid": f0,
        "reference_fid_std": ref.get("fid_std"),
        "tolerance": tolerance,
        "noise_sigmas": NOISE_SIGMAS,
        "median_delta_std": float(np.median(delta_sd)) if delta_sd else None,
        "cheapest": None if cheapest is None else {
            "row": row_name(cheapest), "sampler": cheapest["sampler"], "nfe": cheapest["steps"],
            "fid": cheapest["fid"], "ratio_to_ddpm": cheapest.get("ratio_to_ddpm"),
            "by": "tolerance" if cheapest["within_tolerance"] else "noise",
            "excess_sigmas": cheapest.get("excess_sigmas"),
            "speedup_in_nfe": ref["steps"] / cheapest["steps"]},
        "per_sampler": per_sampler,
        "goal": {"nfe": GOAL_NFE, "met": bool(cheapest and cheapest["steps"] <= GOAL_NFE)},
        "moonshot": {"nfe": MOONSHOT_NFE, "met": bool(cheapest and cheapest["steps"] <= MOONSHOT_NFE),
                     "best_row": None if best_moon is None else row_name(best_moon),
                     "best_ratio_to_ddpm": None if best_moon is None else best_moon.get("ratio_to_ddpm")},
    }


def _g(x, fmt="{:.4g}"):
    return fmt.format(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else "–"


def answer_lines(a: Optional[dict[str, Any]]) -> list[str]:
    """The answer in words: the cheapest row that holds DDPM's quality, each sampler's NFE needed, the noise."""
    if not a:
        return ["No DDPM row (sampler_table.ddpm: false): no reference to hold quality against."]
    tol = f"{a['tolerance']:.0%}"
    sd = a.get("median_delta_std")
    lines = [f"**Equal quality** = FID within {tol} of {a['reference']}'s {_g(a['reference_fid'])} (when no row is, "
             f"an excess of at most {a['noise_sigmas']:g} σ of the paired bootstrap difference). The noise: median σ "
             f"of a row's difference to DDPM {_g(sd, '{:.3g}')}"
             + (f", {sd / a['reference_fid']:.0%} of DDPM's FID" if sd and a['reference_fid'] else "") + "."
             + (" That is wider than the tolerance: at this sample count a row holds on its point estimate, and "
                "a 10% difference is not resolved (more samples narrow σ as 1/√N)."
                if sd and sd > a["tolerance"] * a["reference_fid"] else "")]
    lines.append("")
    c = a.get("cheapest")
    if c:
        sig = f", {c['excess_sigmas']:+.1f} σ" if c.get("excess_sigmas") is not None else ""
        lines.append(f"**Cheapest that holds it: {TITLES.get(c['sampler'], c['sampler'])} at {c['nfe']} NFE** (FID "
                     f"{_g(c['fid'])}, {_g(c['ratio_to_ddpm'], '{:.2f}')}x DDPM's{sig}, by "
                     f"{'the tolerance' if c['by'] == 'tolerance' else 'the noise only'}): "
                     f"{c['speedup_in_nfe']:.0f}x fewer network evaluations than DDPM-1000.")
    else:
        lines.append("**No row holds DDPM's quality** at these NFE.")
    lines.append("")
    for name, p in a["per_sampler"].items():
        need = f"{p['nfe_needed']} NFE" if p["nfe_needed"] else "not within the tolerance"
        lines.append(f"- {TITLES.get(name, name)}: {need}; best {_g(p['best']['fid'])} at {p['best']['nfe']} NFE "
                     f"({_g(p['best']['ratio_to_ddpm'], '{:.2f}')}x DDPM's).")
    m = a["moonshot"]
    if not m["met"] and m["best_row"]:
        lines += ["", f"Moonshot (≤ {m['nfe']} NFE): missed; the best row at ≤ {m['nfe']} NFE, {m['best_row']}, is at "
                     f"{_g(m['best_ratio_to_ddpm'], '{:.2f}')}x DDPM's FID (needs ≤ {1 + a['tolerance']:.2f}x)."]
    return lines


def markdown_table(result: dict[str, Any]) -> str:
    """The table as GitHub markdown: sampler, NFE, FID ± bootstrap std, ratio to DDPM, KID, time, images/s; then the
    answer."""
    lines = ["| sampler | NFE | FID | ± (bootstrap) | / DDPM | holds | KID | sampling time (s) | images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        name = TITLES.get(r["sampler"], r["sampler"])
        holds = {True: "yes", False: "no"}.get(r.get("holds"), "ref" if r["sampler"] == "ddpm" else "–")
        lines.append(f"| {name} | {r['steps']} | {_g(r.get('fid'))} | {_g(r.get('fid_std'), '{:.2g}')} | "
                     f"{_g(r.get('ratio_to_ddpm'), '{:.2f}')} | {holds} | {_g(r.get('kid_mean'))} | "
                     f"{_g(r.get('sampling_s', r['wall_s']), '{:.1f}')} | {_g(r['images_per_s'], '{:.1f}')} |")
    floor = result.get("floor") or {}
    if floor:
        lines.append(f"| real held-out images (floor) | – | {_g(floor.get('fid'))} | – | – | – | "
                     f"{_g(floor.get('kid_mean'))} | – | – |")
    spacing = result.get("timestep_spacing")
    lines += ["", f"{result['num_samples']} samples per row (seeds {result['seeds'][0]}–{result['seeds'][1]}, the "
                  f"same in every row) from `{Path(result['checkpoint']).name}` "
                  f"({'EMA' if result['use_ema'] else 'raw'} weights); {result['feature_extractor']} features "
                  f"against the {result['num_reference']} training images; {result['device']}, sampling time per actor "
                  f"without start-up. DDIM rows use eta=0; DDPM is Algorithm 2 with sample.variance"
                  + (f"; DDIM and the solvers use {spacing} timestep spacing" if spacing else "")
                  + (f"; ± is the std over {result['bootstrap']} bootstrap resamplings of the seeds"
                     if result.get("bootstrap") else "") + "."]
    if "answer" in result:
        lines += [""] + answer_lines(result["answer"])
    return "\n".join(lines) + "\n"


# -- the noise of a FID: a bootstrap over the samples ----------------------------------------------------------------
class FrechetDistance:
    """FID of feature sets against one fixed Gaussian (mu, sigma), fast enough to repeat per bootstrap resample.

    tr sqrt(S_g S_r) = tr sqrt(R S_g R) with R = S_r^(1/2) (same eigenvalues), so each call is one symmetric
    eigendecomposition; R is computed once. Agrees with torch-fidelity's ``fid_statistics_to_metric`` to round-off.
    """

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        w, v = np.linalg.eigh(np.asarray(sigma, dtype=np.float64))
        self.root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        self.mu = np.asarray(mu, dtype=np.float64)
        self.trace = float(np.trace(sigma))

    def __call__(self, features: np.ndarray) -> float:
        f = np.asarray(features, dtype=np.float64)
        m, c = f.mean(axis=0), np.cov(f, rowvar=False)
        e = np.linalg.eigvalsh(self.root @ c @ self.root)
        return float(((m - self.mu) ** 2).sum() + np.trace(c) + self.trace - 2.0 * np.sqrt(np.clip(e, 0, None)).sum())


def paired_bootstrap(features: dict[str, np.ndarray], mu: np.ndarray, sigma: np.ndarray, resamples: int,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """FID of every row in ``features`` ({row: [N, D] features, row i of each from the same seed}) on ``resamples``
    resamplings of the N seeds with replacement, the same seeds for every row in each resample, so that differences
    between rows keep their pairing. Returns {row: [resamples] FIDs}."""
    n = {len(f) for f in features.values()}
    if len(n) != 1:
        raise ValueError(f"paired rows need the same number of samples, got {sorted(n)}")
    n_rows = n.pop()
    fid = FrechetDistance(mu, sigma)
    rng = np.random.default_rng(seed)
    out = {name: np.empty(resamples) for name in features}
    for b in range(resamples):
        idx = rng.integers(0, n_rows, n_rows)
        for name, f in features.items():
            out[name][b] = fid(f[idx])
    return out


# -- sampling and scoring the rows ----------------------------------------------------------------------------------
def row_config(cfg: Config, spec: dict[str, Any]) -> Config:
    """The params of one row: the sample section on the row's sampler and the table's seeds, batch and count, in
    shards of one per actor; one seed range (``evaluate.repeats`` 1): the table's cost is N per row."""
    st = cfg.sampler_table
    over = {"sample.sampler": spec["sampler"], "sample.steps": spec["steps"], "sample.mode": "generate",
            "sample.num_samples": st.num_samples, "sample.seed": st.seed, "sample.batch_size": st.batch_size,
            "sample.shard_size": -(-st.num_samples // cfg.sample.num_workers),
            "sample.grid_size": min(cfg.sample.grid_size, st.num_samples), "evaluate.repeats": 1}
    if spec["eta"] is not None:
        over["sample.eta"] = spec["eta"]
    return override(cfg, over)


def sample_row(pool, row: Config, ckpt: Path, out_dir: Path) -> dict[str, float]:
    """Sample the row's seeds into shards in ``out_dir`` with the pool's actors; its times: ``wall_s`` (the shards,
    scheduling included) and ``sampling_s`` (inside the actors, per actor: no scheduling)."""
    import time

    from tqdm.auto import tqdm

    from .lib.sampling import plan_shards, sampling_key

    s = row.sample
    todo = list(enumerate(plan_shards(s.num_samples, s.shard_size, s.seed)))
    out_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    jobs = pool.write_shards(s, out_dir, todo, sampling_key(s, ckpt))
    progress = tqdm(jobs, total=len(todo), desc=setting_key(s.sampler, s.steps), unit="shard")
    seconds = [secs for _, _, secs, _ in progress]
    wall = round(time.perf_counter() - t0, 2)
    return {"wall_s": wall, "sampling_s": round(sum(seconds) / pool.workers, 2) or wall}


def sample_and_score(cfg: Config, ckpt: Path, extractor, which: dict[str, bool], tmp: Path, data, ref_dir):
    """Every row sampled by one set of actors (one copy of the network each, started before the first row, so no
    row's time holds their start-up) and scored against the reference statistics: the rows, each row's features
    (seed order, for the bootstrap), the reference and the pool's size and start-up."""
    from .lib.sampling import SamplerPool
    from .lib.samples import SampleShards
    from .lib.scoring import compare, reference_statistics

    st, ev = cfg.sampler_table, cfg.evaluate
    rows, feats, ref = [], {}, None
    specs = settings(cfg)
    first = row_config(cfg, specs[0])
    with SamplerPool(first, ckpt, -(-st.num_samples // first.sample.shard_size)) as pool:
        print(f"sampler_table: {pool.workers} sampling actor(s) for every row, started in "
              f"{pool.actors_startup_s:.1f} s")
        for spec in specs:
            name = row_name(spec)
            times = sample_row(pool, row_config(cfg, spec), ckpt, tmp / name)
            samples = SampleShards(tmp / name)
            if int(samples.seeds[0]) != st.seed or len(samples) != st.num_samples:
                raise StageError(f"sampler_table: row {name} sampled {len(samples)} seeds from {samples.seeds[0]}, "
                                 f"not {st.num_samples} from {st.seed}")
            gen = extractor.features(samples)
            if ref is None:
                ref = reference_statistics(cfg, data, extractor, ref_dir, gen[extractor.layer].shape[1])
            feats[name] = gen[extractor.layer].numpy()
            out = compare(gen, ref, extractor.layer, extractor.isc_layer, which, ev.kid_subset_size, ev.seed)
            scores = {k: out[k] for k in METRICS if isinstance(out.get(k), (int, float))}
            sampling = times["sampling_s"]
            spacing = None if spec["sampler"] == "ddpm" else cfg.sample.timestep_spacing
            rows.append({**spec, "timestep_spacing": spacing, **scores, **times,
                         "images_per_s": round(len(samples) / sampling, 2) if sampling > 0 else None})
            print(f"sampler_table: {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
                  + f", sampling {sampling:.1f} s ({times['wall_s']:.1f} s wall)")
    return rows, feats, ref, pool


def run(cfg: Config, ckpt_dir, data_dir, classifier_path, ref_dir, out_path, markdown_path) -> dict[str, Any]:
    """Sample and score every row; write ``out_path`` (JSON) and ``markdown_path``. Returns the JSON's content::

        {"enabled": true, "rows": [{"sampler", "steps" (= NFE), "eta", "timestep_spacing", "fid", "fid_std",
         "fid_delta_std", "ratio_to_ddpm", "within_tolerance", "within_noise", "holds", "kid_mean", "kid_std",
         "sampling_s", "wall_s", "images_per_s"}, ...], "answer": {...} (see :func:`answer`),
         "floor": {"fid", "kid_mean", ...}, "num_samples", "seeds": [first, last], "bootstrap", "checkpoint",
         "checkpoint_step", "feature_extractor", "device", ...}

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
    from .lib.sampling import checkpoint_step, newest_checkpoint
    from .lib.scoring import check_count, enabled_metrics, floor_metrics, open_extractor
    from .lib.shards import open_dataset
    from .lib.workers import check_local_gpus

    check_local_gpus(cfg, "sample")  # before anything is written or Ray starts
    data = open_dataset(data_dir)
    which = enabled_metrics(cfg, data)
    extractor = open_extractor(cfg, data, classifier_path, which["isc"])
    check_count(cfg, st.num_samples, len(data.train), "sampler_table.num_samples", str(data_dir))
    ckpt = newest_checkpoint(ckpt_dir)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # absolute: the sampling actors write the rows' shards there, and Ray's workers have their own working directory
    # (a Ray cluster the flow started elsewhere)
    with tempfile.TemporaryDirectory(prefix="sampler_table-", dir=out_path.parent.resolve()) as tmp:
        rows, feats, ref, pool = sample_and_score(cfg, ckpt, extractor, which, Path(tmp), data, ref_dir)
    if st.bootstrap and cfg.evaluate.fid:
        noise(rows, paired_bootstrap(feats, ref.mu, ref.sigma, st.bootstrap, st.seed))
    floor = floor_metrics(cfg, data, extractor, ref, st.num_samples, which)
    result = {
        "enabled": True,
        "rows": rows,
        "answer": answer(rows, st.tolerance) if cfg.evaluate.fid else None,
        "floor": {k: v for k, v in floor.items() if k in (*METRICS, "num_holdout", "kid_subset_size")},
        "num_samples": st.num_samples,
        "seeds": [st.seed, st.seed + st.num_samples - 1],
        "bootstrap": st.bootstrap,
        "timestep_spacing": cfg.sample.timestep_spacing,
        "checkpoint": str(ckpt),
        "checkpoint_step": checkpoint_step(ckpt),
        "use_ema": cfg.sample.use_ema,
        "feature_extractor": extractor.name,
        "reference_key": Path(ref.path).stem,
        "num_reference": ref.provenance.get("num_images"),
        "kid_subset_size": cfg.evaluate.kid_subset_size if cfg.evaluate.kid else None,
        "device": f"{pool.workers} Ray sampling actor(s) of the sample stage",
        "actors_startup_s": round(pool.actors_startup_s, 2),
    }
    write_json(out_path, result)
    md = markdown_table(result)
    atomic_write_bytes(markdown_path, lambda f: f.write(md.encode()))
    write_resolved(cfg, out_path.parent, f"{out_path.stem}.config.json")
    print(md)
    return result


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = stage_parser("FID/KID and wall time of DDPM, DDIM and the multistep solvers at several NFE, same seeds, one "
                     "model, and the NFE each needs to hold DDPM-1000's quality.")
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint folder from the train stage")
    p.add_argument("--data", required=True, help="dataset folder (output of the fetch stage)")
    p.add_argument("--classifier", default=None, help="classifier weights (train_classifier output)")
    p.add_argument("--ref-dir", required=True, help="cache folder of the training-set reference statistics")
    p.add_argument("--out", required=True, help="JSON to write, e.g. metrics/sampler_table.json")
    p.add_argument("--markdown", required=True, help="markdown table to write, e.g. metrics/sampler_table.md")
    args = p.parse_args(argv)
    cfg = load_config(args.params, args.overrides)
    check_for_dvc_stage(cfg)  # under `dvc repro`: the inputs of this stage and the later ones, before any compute
    result = run(cfg, args.checkpoints, args.data, args.classifier, args.ref_dir, args.out, args.markdown)
    after_stage("sampler_table", cfg, sampler_table=args.out, sampler_table_md=args.markdown)
    return result


if __name__ == "__main__":
    run_cli(main)
