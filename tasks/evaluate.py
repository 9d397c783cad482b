"""Stage `evaluate`: FID / KID (and IS, precision/recall when enabled) of the samples with torch-fidelity.

Following the paper, the generated samples are compared with the TRAINING split. Beside each metric stands its
real-vs-real floor: the same metric for held-out real images against the same training reference, at the same
sample count as the generated set (all of the holdout when it is smaller, which the output says). A model
can only be judged relative to that floor: FID is biased by sample count and feature space.

Features come from the dataset's own classifier (:mod:`tasks.classifier`) on labeled grayscale datasets and
from torch-fidelity's Inception-v3 otherwise (``evaluate.feature_extractor``). The training-set features and
statistics are computed once and cached in ``--ref-dir`` by torch-fidelity, under a name built from the
dataset content hash, the feature extractor (and classifier weights) and the image shape.

    python -m tasks.evaluate --params params.yaml --data data/dataset --samples samples \
        --classifier models/classifier.pt --classifier-metrics metrics/classifier.json \
        --ref-dir ref_stats --out metrics/eval.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset

from ddpm.config import Config, write_resolved

from . import tracking
from .classifier import FEATURE_EXTRACTOR_NAME as CLASSIFIER_EXTRACTOR
from .classifier import load_classifier
from .common import (
    DatasetArtifact,
    StageError,
    config_from_args,
    load_dataset,
    load_samples,
    read_json,
    run_cli,
    sha256_arrays,
    sha256_file,
    stage_parser,
    write_json,
)

INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"

# torch-fidelity's result keys -> ours.
METRIC_KEYS = {
    torch_fidelity.KEY_METRIC_FID: "fid",
    torch_fidelity.KEY_METRIC_KID_MEAN: "kid_mean",
    torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
    torch_fidelity.KEY_METRIC_ISC_MEAN: "isc_mean",
    torch_fidelity.KEY_METRIC_ISC_STD: "isc_std",
    torch_fidelity.KEY_METRIC_PRECISION: "precision",
    torch_fidelity.KEY_METRIC_RECALL: "recall",
    torch_fidelity.KEY_METRIC_F_SCORE: "f_score",
}


class UInt8Images(Dataset):
    """uint8 images [N, C, H, W] served as torch-fidelity reads them: uint8 [3, H, W] (grayscale repeated)."""

    def __init__(self, images: np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images [N, 1 or 3, H, W], got {images.dtype} {images.shape}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def resolve_extractor(cfg: Config, data: DatasetArtifact) -> str:
    """``evaluate.feature_extractor`` resolved: auto -> the classifier for labeled grayscale data, else Inception."""
    choice = cfg.evaluate.feature_extractor
    if choice == "auto":
        labeled_gray = data.shape[0] == 1 and data.num_classes > 0
        return CLASSIFIER_EXTRACTOR if labeled_gray else INCEPTION_EXTRACTOR
    return CLASSIFIER_EXTRACTOR if choice == "classifier" else INCEPTION_EXTRACTOR


def inception_weights_path(cfg: Config) -> str:
    """The local Inception weights file; never downloaded (the machines are offline)."""
    path = cfg.evaluate.inception_weights
    how = (f"download {INCEPTION_WEIGHTS_FILE} ({INCEPTION_WEIGHTS_URL}) on a machine with internet, copy it "
           f"e.g. to models/{INCEPTION_WEIGHTS_FILE} and set evaluate.inception_weights to that path")
    if not path:
        raise StageError(f"evaluate.inception_weights: not set; the inception-v3-compat feature extractor needs "
                         f"torch-fidelity's {INCEPTION_WEIGHTS_FILE} offline: {how}")
    if not Path(path).is_file():
        raise StageError(f"evaluate.inception_weights: {path} not found (expected {INCEPTION_WEIGHTS_FILE}): {how}")
    return str(path)


def reference_key(data: DatasetArtifact, extractor_tag: str) -> str:
    """Cache name of the training-set statistics: dataset content hash, feature extractor, image shape."""
    sha = data.meta.get("sha256") or sha256_arrays(data.train.images)
    c, h, w = data.shape
    name = str(data.meta.get("dataset", "data")).replace(os.sep, "_")
    return f"{name}-train-{sha[:16]}-{c}x{h}x{w}-{extractor_tag}"


def fidelity(images: np.ndarray, fidelity_kwargs: dict[str, Any], *, kid_subset_size: int) -> dict[str, float]:
    """torch-fidelity metrics of ``images`` (input1) against the cached training reference (input2)."""
    out = torch_fidelity.calculate_metrics(input1=UInt8Images(images), kid_subset_size=kid_subset_size,
                                           **fidelity_kwargs)
    return {METRIC_KEYS[k]: float(v) for k, v in out.items() if k in METRIC_KEYS}


def _cache_files(ref_dir: Path, key: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in ref_dir.glob(f"{key}-*.pt")}


def run(
    cfg: Config,
    data_dir: os.PathLike | str,
    samples_dir: os.PathLike | str,
    classifier_path: os.PathLike | str | None,
    ref_dir: os.PathLike | str,
    metrics_path: os.PathLike | str,
    classifier_metrics_path: os.PathLike | str | None = None,
) -> dict[str, Any]:
    """Evaluate the samples in ``samples_dir`` against ``data_dir``'s train split; write ``metrics_path``.

    ``classifier_path`` is the weights file of the classifier feature extractor (unused with Inception);
    ``ref_dir`` caches the training-set statistics; ``classifier_metrics_path`` (optional) supplies the
    classifier's held-out accuracy. Raises :class:`StageError` (or :class:`~ddpm.checkpoint.CheckpointError`)
    for anything the user can fix. Returns the metrics written::

        {"feature_extractor": "ddpm-classifier" | "inception-v3-compat", "reference": "train",
         "reference_key": str, "num_generated": int, "num_reference": int,
         "fid": float, "kid_mean": float, "kid_std": float, "kid_subset_size": int,   # when enabled
         "isc_mean": float, "isc_std": float,                                        # when IS is on
         "precision": float, "recall": float, "f_score": float,                      # when evaluate.prc
         "floor": {"num_holdout": int, "num_reference": int, <the same metric keys>, "note": str (optional)},
         "fid_ratio": fid / floor fid, "classifier_accuracy": float (with classifier_metrics_path)}
    """
    ev = cfg.evaluate
    data = load_dataset(data_dir)
    extractor = resolve_extractor(cfg, data)
    isc = (data.shape[0] == 3) if ev.isc == "auto" else ev.isc
    if not (ev.fid or ev.kid or isc or ev.prc):
        raise StageError("evaluate: every metric is off; enable at least one of evaluate.fid, kid, isc, prc")

    # Resolve the feature extractor before touching the samples: a missing file is the commonest error.
    if extractor == CLASSIFIER_EXTRACTOR:
        if classifier_path is None:
            raise StageError("the classifier feature extractor needs --classifier (the train_classifier output)")
        net, state = load_classifier(classifier_path)
        a = net.args
        if (a.channels, a.image_size, a.image_size) != data.shape:
            raise StageError(f"{classifier_path}: classifier trained on {a.channels}x{a.image_size}x{a.image_size} "
                             f"images, the dataset's are {'x'.join(map(str, data.shape))}; rerun train_classifier")
        if state.get("dataset_sha256") and state["dataset_sha256"] != data.meta.get("sha256"):
            print(f"warning: {classifier_path} was trained on another version of the dataset; "
                  "rerun train_classifier for comparable metrics", file=sys.stderr)
        weights, tag = str(classifier_path), f"clf{sha256_file(classifier_path)[:12]}"
    else:
        weights, tag = inception_weights_path(cfg), "inception"
    accuracy = read_json(classifier_metrics_path).get("accuracy") if classifier_metrics_path is not None else None

    images, _ = load_samples(samples_dir)
    n_gen, n_train, n_hold = len(images), len(data.train.images), len(data.holdout.images)
    if tuple(images.shape[1:]) != data.shape:
        raise StageError(f"{samples_dir}: samples are {'x'.join(map(str, images.shape[1:]))}, the dataset's images "
                         f"are {'x'.join(map(str, data.shape))}")
    if n_gen < 2:
        raise StageError(f"{samples_dir}: {n_gen} sample(s); the metrics need at least 2")
    if ev.prc and n_gen < 4:
        raise StageError(f"{samples_dir}: {n_gen} samples; precision/recall (evaluate.prc) need at least 4")
    if ev.kid and n_gen < ev.kid_subset_size:
        raise StageError(f"{samples_dir}: {n_gen} samples, fewer than evaluate.kid_subset_size={ev.kid_subset_size} "
                         "that KID needs; sample more or lower evaluate.kid_subset_size (or set evaluate.kid: false)")
    if ev.kid and n_train < ev.kid_subset_size:
        raise StageError(f"{data_dir}: {n_train} training images, fewer than evaluate.kid_subset_size="
                         f"{ev.kid_subset_size} that KID needs; lower evaluate.kid_subset_size")

    ref_dir = Path(ref_dir)
    ref_dir.mkdir(parents=True, exist_ok=True)
    key = reference_key(data, tag)
    common_kwargs = dict(
        input2=UInt8Images(data.train.images),
        input2_cache_name=key,  # torch-fidelity caches this input's features and FID statistics under this name
        cache=True,
        cache_root=str(ref_dir),
        feature_extractor=extractor,
        feature_extractor_weights_path=weights,
        fid=ev.fid,
        kid=ev.kid,
        isc=isc,
        prc=ev.prc,
        batch_size=ev.batch_size,
        rng_seed=ev.seed,
        cuda=torch.cuda.is_available(),
        save_cpu_ram=True,  # in-memory tensors: DataLoader worker processes only add start-up time
        verbose=sys.stderr.isatty(),
    )

    before = _cache_files(ref_dir, key)
    metrics: dict[str, Any] = fidelity(images, common_kwargs, kid_subset_size=ev.kid_subset_size)
    after = _cache_files(ref_dir, key)
    reused = bool(before) and after == before
    print(f"reference statistics of the train split ({n_train} images) "
          f"{'reused from' if reused else 'computed and cached in'} {ref_dir}/{key}-*")

    # The floor: real held-out images against the same reference, at the generated sample count.
    floor_kid = min(ev.kid_subset_size, n_hold)
    if n_hold > n_gen:
        pick = np.sort(np.random.default_rng(ev.seed).choice(n_hold, n_gen, replace=False))
        holdout = data.holdout.images[pick]
    else:
        holdout = data.holdout.images
    floor: dict[str, Any] = {"num_holdout": len(holdout), "num_reference": n_train}
    notes = []
    if n_hold < n_gen:
        notes.append(f"the holdout has {n_hold} images, fewer than the {n_gen} generated; the floor uses all of them")
    if ev.kid and floor_kid < ev.kid_subset_size:
        notes.append(f"floor KID uses subsets of {floor_kid} (the holdout size)")
    # KID needs subsets of 2, precision/recall a 3-nearest-neighbour ball: skip them on a tinier holdout.
    floor_kwargs = dict(common_kwargs, kid=ev.kid and floor_kid >= 2, prc=ev.prc and len(holdout) > 3)
    if any(floor_kwargs[m] for m in ("fid", "kid", "isc", "prc")):
        floor.update(fidelity(holdout, floor_kwargs, kid_subset_size=max(floor_kid, 2)))
    if ev.kid:
        floor["kid_subset_size"] = floor_kid
    if notes:
        floor["note"] = "; ".join(notes)

    result: dict[str, Any] = {
        "feature_extractor": extractor,
        "reference": "train",
        "reference_key": key,
        "num_generated": n_gen,
        "num_reference": n_train,
        **metrics,
        "floor": floor,
    }
    if ev.kid:
        result["kid_subset_size"] = ev.kid_subset_size
    if ev.fid:
        result["fid_ratio"] = metrics["fid"] / floor["fid"] if floor.get("fid", 0) > 0 else None
    if classifier_metrics_path is not None:
        result["classifier_accuracy"] = accuracy
    write_json(metrics_path, result)
    write_resolved(cfg, Path(metrics_path).parent, f"{Path(metrics_path).stem}.config.json")
    summary = ", ".join(f"{k} {result[k]:.4g}" for k in ("fid", "kid_mean", "isc_mean") if k in result)
    floor_s = ", ".join(f"{k} {floor[k]:.4g}" for k in ("fid", "kid_mean", "isc_mean") if k in floor)
    print(f"{n_gen} samples vs train ({extractor}): {summary}; real-vs-real floor ({len(holdout)} held-out): "
          f"{floor_s} -> {metrics_path}")
    tracking.log_evaluation(cfg, result, data.meta.get("sha256"), samples_dir, metrics_path)
    return result


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = stage_parser("FID/KID (IS, precision/recall) of the samples against the training set, with the "
                     "real-vs-real floor.")
    p.add_argument("--data", required=True, help="dataset folder (output of the fetch stage)")
    p.add_argument("--samples", required=True, help="samples folder (output of the sample stage)")
    p.add_argument("--classifier", default=None, help="classifier weights (train_classifier output)")
    p.add_argument("--classifier-metrics", default=None, help="classifier metrics JSON, for its accuracy")
    p.add_argument("--ref-dir", required=True, help="cache folder of the training-set reference statistics")
    p.add_argument("--out", required=True, help="metrics JSON to write, e.g. metrics/eval.json")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    return run(cfg, args.data, args.samples, args.classifier, args.ref_dir, args.out, args.classifier_metrics)


if __name__ == "__main__":
    run_cli(main)
