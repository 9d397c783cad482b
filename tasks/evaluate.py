"""Stage `evaluate`: FID / KID (and IS, precision/recall when enabled) of the samples against the training split,
each beside its real-vs-real floor (held-out real images against the same reference, at the same count).

Features are the dataset's own classifier's on labeled grayscale data and torch-fidelity's Inception-v3 otherwise
(``evaluate.feature_extractor``); the training split's statistics are a keyed entry of ``--ref-dir``
(:mod:`tasks.lib.scoring` holds the extractor, the reference statistics, the metrics and the floor, shared with the
sampler table). With ``evaluate.repeats: k`` the samples are k disjoint seed ranges of equal size (the sample stage
draws k * sample.num_samples); each metric is reported per range with its mean (the top-level value), std and min.
``eval.json`` carries a ``provenance`` block: counts, seed ranges, sampler, checkpoint, extractor, library versions.
The command line reports the scores to the trackers (tasks/lib/callbacks.py).

    python -m tasks.evaluate --params params.yaml --data data/dataset --samples samples \\
        --classifier models/classifier.pt --classifier-metrics metrics/classifier.json \\
        --ref-dir ref_stats --out metrics/eval.json
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from tasks.lib.config import Config, load_config, write_resolved

from .lib import refstats
from .lib.callbacks import after_stage
from .lib.cli import run_cli, stage_parser
from .lib.errors import StageError
from .lib.files import read_json, write_json
from .lib.inputs import check_for_dvc_stage
from .lib.samples import SampleShards
from .lib.scoring import (
    METRICS,
    PREPROCESSING,
    Extractor,
    check_count,
    compare,
    enabled_metrics,
    floor_metrics,
    open_extractor,
    reference_statistics,
    summarize,
)
from .lib.shards import open_dataset


def repeat_size(cfg: Config, samples: SampleShards, data, samples_dir) -> int:
    """The samples of one measurement: ``evaluate.repeats`` k disjoint seed ranges of equal size, each enough for
    the metrics. Raises :class:`StageError`."""
    k, n_total = cfg.evaluate.repeats, len(samples)
    if tuple(samples.shape) != data.shape:
        raise StageError(f"{samples_dir}: samples are {'x'.join(map(str, samples.shape))}, the dataset's images "
                         f"are {'x'.join(map(str, data.shape))}")
    if len(np.unique(samples.seeds)) != n_total:
        raise StageError(f"{samples_dir}: some seeds occur twice; rerun the sample stage")
    if k > 1 and n_total != k * cfg.sample.num_samples:
        raise StageError(f"{samples_dir}: {n_total} samples; evaluate.repeats={k} needs {k} x sample.num_samples="
                         f"{cfg.sample.num_samples} = {k * cfg.sample.num_samples} (disjoint seed ranges); rerun the "
                         "sample stage with these params")
    if n_total % k:
        raise StageError(f"{samples_dir}: {n_total} samples do not split into evaluate.repeats={k} equal ranges")
    return n_total // k


def score_repeats(cfg: Config, gen: dict, extractor: Extractor, ref: refstats.Reference, which: dict[str, bool],
                  n_gen: int) -> dict[str, dict[str, Any]]:
    """Each metric on each of the k seed ranges of ``gen`` (the samples' features, in seed order), summarized:
    {metric: {"values", "mean", "std", "min"}}."""
    ev = cfg.evaluate
    runs = [compare({name: f[i * n_gen:(i + 1) * n_gen] for name, f in gen.items()}, ref, extractor.layer,
                    extractor.isc_layer, which, ev.kid_subset_size, ev.seed) for i in range(ev.repeats)]
    return {m: summarize([r[m] for r in runs]) for m in METRICS if m in runs[0]}


def provenance(cfg: Config, samples: SampleShards, extractor: Extractor, ref: refstats.Reference,
               n_gen: int) -> dict[str, Any]:
    """What the scores were measured on: counts, seed ranges, the sampler and checkpoint (from samples.json), the
    extractor, the reference and the library versions."""
    path = samples.folder / "samples.json"
    manifest = read_json(path) if path.is_file() else {}
    manifest = manifest if isinstance(manifest, dict) else {}
    k, seeds = cfg.evaluate.repeats, samples.seeds
    return {
        "num_generated": n_gen,
        "num_generated_total": len(samples),
        "num_reference": ref.provenance.get("num_images"),
        "repeats": k,
        "seed_range": [int(seeds[0]), int(seeds[-1])],
        "seed_ranges": [[int(seeds[i * n_gen]), int(seeds[(i + 1) * n_gen - 1])] for i in range(k)],
        "sampler": manifest.get("sampler"),
        "steps": manifest.get("steps"),
        "eta": manifest.get("eta"),
        "checkpoint": {"path": manifest.get("checkpoint"), "step": manifest.get("checkpoint_step"),
                       "ema": manifest.get("use_ema")},
        "feature_extractor": {"name": extractor.name, "weights_sha256": extractor.weights_sha256,
                              "layer": extractor.layer, "preprocessing": PREPROCESSING[extractor.name]},
        "reference": {"split": "train", "path": Path(ref.path).name if ref.source != "published" else str(ref.path),
                      "key": ref.provenance.get("key"), "dataset_sha256": ref.provenance.get("dataset_sha256"),
                      "published": ref.source == "published"},
        "libraries": refstats.library_versions(),
    }


def _say(result: dict[str, Any], metrics_path) -> None:
    per_repeat, floor, k = result["per_repeat"], result["floor"], result["repeats"]

    def show(m: str) -> str:
        s = per_repeat[m]
        return f"{m} {s['mean']:.4g}" + (f" ± {s['std']:.2g} (min {s['min']:.4g}, {k} repeats)" if k > 1 else "")

    summary = ", ".join(show(m) for m in ("fid", "kid_mean", "isc_mean") if m in per_repeat)
    floor_s = ", ".join(f"{m} {floor[m]:.4g}" for m in ("fid", "kid_mean", "isc_mean") if m in floor)
    print(f"{result['num_generated']} samples{'' if k == 1 else ' per repeat'} vs train "
          f"({result['feature_extractor']}): {summary}; real-vs-real floor ({floor['num_holdout']} held-out): "
          f"{floor_s} -> {metrics_path}")


def run(cfg: Config, data_dir: os.PathLike | str, samples_dir: os.PathLike | str,
        classifier_path: os.PathLike | str | None, ref_dir: os.PathLike | str, metrics_path: os.PathLike | str,
        classifier_metrics_path: os.PathLike | str | None = None) -> dict[str, Any]:
    """Evaluate the samples in ``samples_dir`` against ``data_dir``'s train split; write ``metrics_path``.

    ``classifier_path`` is the weights file of the classifier feature extractor (unused with Inception);
    ``ref_dir`` holds the keyed training-set statistics; ``classifier_metrics_path`` (optional) supplies the
    classifier's held-out accuracy. Raises :class:`StageError` (or :class:`~ddpm.checkpoint.CheckpointError`)
    for anything the user can fix. Returns the metrics written::

        {"feature_extractor": "ddpm-classifier" | "inception-v3-compat", "reference": "train" | <published .npz>,
         "reference_key": str, "num_generated": int (per repeat), "num_reference": int | None,
         "fid": float, "kid_mean": float, "kid_std": float, "kid_subset_size": int,   # when enabled; with
         "isc_mean": float, "isc_std": float,                                        # repeats: their means
         "precision": float, "recall": float, "f_score": float,
         "repeats": k, "per_repeat": {metric: {"values": [k floats], "mean", "std" (None for k=1), "min"}},
         "floor": {"num_holdout": int, "num_reference": int, <the same metric keys>, "note": str (optional)},
         "fid_ratio": fid / floor fid, "classifier_accuracy": float (with classifier_metrics_path),
         "provenance": {num_generated, num_generated_total, num_reference, repeats, seed_range, seed_ranges,
                        sampler, steps, eta, checkpoint: {path, step, ema}, feature_extractor: {name,
                        weights_sha256, layer, preprocessing}, reference: {...}, libraries: {...}}}
    """
    ev = cfg.evaluate
    data = open_dataset(data_dir)  # the splits stream from their shards
    which = enabled_metrics(cfg, data)
    # The extractor's weights before the samples: a missing file is the commonest error.
    extractor = open_extractor(cfg, data, classifier_path, which["isc"])
    accuracy = read_json(classifier_metrics_path).get("accuracy") if classifier_metrics_path is not None else None
    samples = SampleShards(samples_dir)  # streamed from their shards (one in memory at a time), in seed order
    n_gen = repeat_size(cfg, samples, data, samples_dir)
    check_count(cfg, n_gen, len(data.train), str(samples_dir), str(data_dir), "" if ev.repeats == 1 else " per repeat")

    gen = extractor.features(samples)
    ref = reference_statistics(cfg, data, extractor, ref_dir, gen[extractor.layer].shape[1])
    per_repeat = score_repeats(cfg, gen, extractor, ref, which, n_gen)
    metrics = {m: s["mean"] for m, s in per_repeat.items()}
    floor = floor_metrics(cfg, data, extractor, ref, n_gen, which)
    result: dict[str, Any] = {
        "feature_extractor": extractor.name,
        "reference": "train" if ref.source != "published" else str(ref.path),
        "reference_key": Path(ref.path).stem,
        "num_generated": n_gen,
        "num_reference": ref.provenance.get("num_images"),
        **metrics,
        "repeats": ev.repeats,
        "per_repeat": per_repeat,
        "floor": floor,
        "provenance": provenance(cfg, samples, extractor, ref, n_gen),
    }
    if ev.kid:
        result["kid_subset_size"] = ev.kid_subset_size
    if ev.fid:
        result["fid_ratio"] = metrics["fid"] / floor["fid"] if floor.get("fid", 0) > 0 else None
    if classifier_metrics_path is not None:
        result["classifier_accuracy"] = accuracy
    write_json(metrics_path, result)
    write_resolved(cfg, Path(metrics_path).parent, f"{Path(metrics_path).stem}.config.json")
    _say(result, metrics_path)
    return result


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = stage_parser("FID/KID (IS, precision/recall) of the samples against the training set, with the "
                     "real-vs-real floor.")
    p.add_argument("--data", required=True, help="dataset folder (output of the fetch stage)")
    p.add_argument("--samples", required=True, help="samples folder (output of the sample stage)")
    p.add_argument("--classifier", default=None, help="classifier weights (train_classifier output)")
    p.add_argument("--classifier-metrics", default=None, help="classifier metrics JSON, for its accuracy")
    p.add_argument("--ref-dir", required=True, help="folder of the keyed training-set reference statistics")
    p.add_argument("--out", required=True, help="metrics JSON to write, e.g. metrics/eval.json")
    args = p.parse_args(argv)
    cfg = load_config(args.params, args.overrides)
    check_for_dvc_stage(cfg)  # under `dvc repro`: the inputs of this stage and the later ones, before any compute
    result = run(cfg, args.data, args.samples, args.classifier, args.ref_dir, args.out, args.classifier_metrics)
    after_stage("evaluate", cfg, eval_metrics=args.out, samples=args.samples,
                samples_record=Path(args.samples) / "samples.json", dataset_record=Path(args.data) / "dataset.json")
    return result


if __name__ == "__main__":
    run_cli(main)
