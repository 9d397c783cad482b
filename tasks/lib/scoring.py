"""FID / KID (and IS, precision/recall when enabled) of samples with torch-fidelity: the machinery of the
``evaluate`` stage, shared with ``sampler_table``.

Following the paper, the generated samples are compared with the TRAINING split. Beside each metric stands its
real-vs-real floor: the same metric for held-out real images against the same training reference, at the same
sample count as the generated set (all of the holdout when it is smaller, which the output says). A model
can only be judged relative to that floor: FID is biased by sample count and feature space.

Features come from the dataset's own classifier (:mod:`tasks.lib.classifier`) on labeled grayscale datasets and
from torch-fidelity's Inception-v3 otherwise (``evaluate.feature_extractor``); the Inception weights file must
have the pinned SHA-256 and is read with ``weights_only=True``. FID is "statistics, then distance": the training
split's statistics are a keyed entry of ``--ref-dir`` (:mod:`tasks.lib.refstats`), used only when the dataset hash,
split, image shape, extractor (name, weights hash, layer), preprocessing and image count all match; or a published
``.npz`` of (mu, sigma) given as ``evaluate.reference``.

With ``evaluate.repeats: k`` the samples are k disjoint seed ranges of equal size (the sample stage draws
k * sample.num_samples); each metric is reported per range with its mean (the top-level value), std and min.
``eval.json`` carries a ``provenance`` block: counts, seed ranges, sampler, checkpoint, extractor, library versions.

    python -m tasks.evaluate --params params.yaml --data data/dataset --samples samples \
        --classifier models/classifier.pt --classifier-metrics metrics/classifier.json \
        --ref-dir ref_stats --out metrics/eval.json
"""

from __future__ import annotations

import io
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from tasks.lib.config import Config, write_resolved

from . import refstats
from .classifier import FEATURE_EXTRACTOR_NAME as CLASSIFIER_EXTRACTOR
from .classifier import ClassifierFeatureExtractor, load_classifier
from .inputs import (  # noqa: F401  (the Inception names are part of this stage's interface)
    INCEPTION_EXTRACTOR,
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_URL,
    extractor_for,
    inception_weights_path,
)
from .common import (
    DatasetArtifact,
    StageError,
    SampleShards,
    atomic_write_bytes,
    read_json,
    sha256_file,
    write_json,
)
from .shards import open_dataset

# What the extractor sees of the uint8 images (samples are rounded to the nearest of 256 levels, see to_uint8).
PREPROCESSING = {
    INCEPTION_EXTRACTOR: "uint8 RGB (gray repeated), TF1-compatible bilinear resize to 299x299, (x-128)/128, float32",
    CLASSIFIER_EXTRACTOR: "uint8 (gray channel), native size, x/127.5-1, float32",
}
METRICS = ("fid", "kid_mean", "kid_std", "isc_mean", "isc_std", "precision", "recall", "f_score")

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
    """uint8 images served as torch-fidelity reads them: uint8 [3, H, W] (grayscale repeated). ``images`` is an
    array [N, C, H, W], or anything with ``len()``, ``shape`` (C, H, W) and ``[i]`` -> uint8 [C, H, W] (e.g.
    :class:`tasks.lib.common.SampleShards`, which reads one shard at a time)."""

    def __init__(self, images):
        shape = tuple(images.shape[1:]) if isinstance(images, np.ndarray) else tuple(images.shape)
        dtype = images.dtype if isinstance(images, np.ndarray) else np.uint8
        if dtype != np.uint8 or len(shape) != 3 or shape[0] not in (1, 3):
            raise ValueError(f"expected uint8 images [N, 1 or 3, H, W], got {dtype} {shape}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.images[i]))
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x


# -- the feature extractors ------------------------------------------------------------------------------------------
def resolve_extractor(cfg: Config, data: DatasetArtifact) -> str:
    """``evaluate.feature_extractor`` resolved: auto -> the classifier for labeled grayscale data, else Inception."""
    return extractor_for(cfg.evaluate.feature_extractor, data.shape[0], data.num_classes > 0)


def check_inception_sha256(path: os.PathLike | str, actual: str, expected: str) -> None:
    if actual != expected:
        raise StageError(f"evaluate.inception_weights: {path} has SHA-256 {actual}, expected {expected} "
                         f"(torch-fidelity's {INCEPTION_WEIGHTS_FILE}, see evaluate.inception_sha256); "
                         f"download it again from {INCEPTION_WEIGHTS_URL}")


def load_inception_weights(path: os.PathLike | str, expected_sha256: str) -> dict[str, torch.Tensor]:
    """The state dict of ``path``, after checking its SHA-256 against ``expected_sha256``; read with
    ``weights_only=True`` (no pickle code runs, whatever the torch version's default). Raises :class:`StageError`."""
    check_inception_sha256(path, sha256_file(path), expected_sha256)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise StageError(f"evaluate.inception_weights: {path} does not load as plain tensors with weights_only=True "
                         f"({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StageError(f"evaluate.inception_weights: {path} is not a state dict of tensors")
    return state


class VerifiedInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 (its architecture, resize and layers) with weights from a file that has the
    pinned SHA-256 and was read with ``weights_only=True``.

    torch-fidelity itself unpickles its weights argument with ``weights_only=False``; it is handed our own in-memory
    serialisation of the already-loaded tensors, never the file's bytes.
    """

    def __init__(self, name: str, features_list, feature_extractor_weights_path: Optional[str] = None,
                 expected_sha256: Optional[str] = None, **kwargs):
        if feature_extractor_weights_path is None or expected_sha256 is None:
            raise ValueError("VerifiedInceptionV3 needs feature_extractor_weights_path and expected_sha256")
        state = load_inception_weights(feature_extractor_weights_path, expected_sha256)
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        try:
            super().__init__(name, features_list, feature_extractor_weights_path=buf, **kwargs)
        except RuntimeError:  # load_state_dict: missing or unexpected keys, size mismatches
            want = {k: tuple(v.shape) for k, v in self.state_dict().items()}
            missing = [k for k in want if k not in state]
            unexpected = [k for k in state if k not in want]
            wrong = [f"{k}: shape {tuple(state[k].shape)}, expected {want[k]}" for k in want
                     if k in state and tuple(state[k].shape) != want[k]]
            parts = ([f"{len(missing)} missing tensors (e.g. {missing[0]})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []) + wrong[:3]
            raise StageError(f"evaluate.inception_weights: {feature_extractor_weights_path} does not fit "
                             f"torch-fidelity's Inception-v3 ({'; '.join(parts)})") from None


def write_random_inception_weights(path: os.PathLike | str, seed: int = 0) -> str:
    """A weights file for torch-fidelity's Inception-v3 architecture with random values: for throughput runs and
    tests where the published file is absent. Its features are meaningless (but vary with the image) and cost what
    the real ones cost. Returns the file's SHA-256, to pin as ``evaluate.inception_sha256``."""
    shapes: dict[str, tuple] = {}

    class Probe(FeatureExtractorInceptionV3):  # records the architecture's state-dict shapes instead of loading
        def load_state_dict(self, state_dict, strict=True, assign=False):
            shapes.update({k: tuple(v.shape) for k, v in self.state_dict().items()})

    buf = io.BytesIO()  # an empty state dict: the probe's "weights"
    torch.save({}, buf)
    buf.seek(0)
    Probe(INCEPTION_EXTRACTOR, ["2048"], feature_extractor_weights_path=buf)
    g = torch.Generator().manual_seed(seed)

    def value(name: str, shape: tuple) -> torch.Tensor:
        if not shape:  # num_batches_tracked
            return torch.tensor(1)
        if len(shape) > 1:  # convolutions and fc: He et al.'s scale, so activations neither vanish nor blow up
            return torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))
        if name.endswith("running_var"):
            return torch.rand(shape, generator=g) + 0.5
        return (1.0 if name.endswith(".weight") else 0.0) + 0.1 * torch.randn(shape, generator=g)

    state = {k: value(k, s) for k, s in shapes.items()}
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    return sha256_file(path)


def build_extractor(extractor: str, weights: str, layers: list[str], cuda: bool, expected_sha256: str):
    if extractor == CLASSIFIER_EXTRACTOR:
        return create_feature_extractor(CLASSIFIER_EXTRACTOR, layers, cuda=cuda, feature_extractor_weights_path=weights,
                                        verbose=False)
    fe = VerifiedInceptionV3(INCEPTION_EXTRACTOR, layers, feature_extractor_weights_path=weights,
                             expected_sha256=expected_sha256)
    return fe.cuda() if cuda else fe


def extract(fe, images, batch_size: int, cuda: bool) -> dict[str, torch.Tensor]:
    """Features of uint8 images (an array [N, C, H, W] or a :class:`UInt8Images` source), read in order in batches
    of ``batch_size``: {layer: float [N, D]} (on the CPU)."""
    return get_featuresdict_from_dataset(UInt8Images(images), fe, batch_size, cuda, save_cpu_ram=True,
                                         verbose=sys.stderr.isatty())


REFERENCE_CHUNK_BYTES = 4 << 20  # pixels of the training split handed to the extractor at a time (bigger chunks
# only grow the heap: glibc keeps what torch-fidelity's batch loop freed, benchmarks/results/memory.json)


def reference_features(fe, split, layer: str, batch_size: int, cuda: bool) -> tuple[np.ndarray, tuple]:
    """Features of a streamed split (:class:`tasks.lib.shards.SplitReader`), a chunk of row groups at a time: the
    mean and covariance of all of them, accumulated (:class:`refstats.Moments`), and the rows
    :func:`refstats.feature_subset` keeps for KID and precision/recall. Memory: one chunk, D x D and the subset."""
    n = len(split)
    keep = refstats.feature_subset(n, refstats.MAX_FEATURES)
    moments, kept = refstats.Moments(), []
    chunk_rows = max(batch_size, REFERENCE_CHUNK_BYTES // int(np.prod(split.shape)))
    pending: list[np.ndarray] = []
    start = 0  # the split's row index of pending[0][0]

    def flush():
        nonlocal start, pending
        images = np.concatenate(pending) if len(pending) > 1 else pending[0]
        f = extract(fe, images, batch_size, cuda)[layer].numpy()
        moments.add(f)
        lo, hi = np.searchsorted(keep, [start, start + len(f)])
        kept.append(f[keep[lo:hi] - start].astype(np.float32))
        start += len(f)
        pending = []

    for images, _ in split.iter_groups():
        pending.append(images)
        if sum(len(p) for p in pending) >= chunk_rows:
            flush()
    if pending:
        flush()
    return np.concatenate(kept), moments.statistics()


def compare(feats: dict[str, torch.Tensor], ref: refstats.Reference, layer: str, isc_layer: str, which: dict[str, bool],
            kid_subset_size: int, seed: int) -> dict[str, float]:
    """The enabled metrics of ``feats`` (generated or held-out) against the reference statistics."""
    out: dict[str, Any] = {}
    x = feats[layer]
    if which["fid"]:
        mu, sigma = refstats.fid_statistics(x.numpy())
        out.update(fid_statistics_to_metric({"mu": mu, "sigma": sigma}, {"mu": ref.mu, "sigma": ref.sigma}, False))
    if which["kid"]:
        out.update(kid_features_to_metric(x, torch.from_numpy(ref.features), kid_subset_size=kid_subset_size,
                                          rng_seed=seed, verbose=False))
    if which["isc"]:
        out.update(isc_features_to_metric(feats[isc_layer], rng_seed=seed))
    if which["prc"]:
        out.update(prc_features_to_metric(x, torch.from_numpy(ref.features), save_cpu_ram=True, verbose=False))
    return {METRIC_KEYS[k]: float(v) for k, v in out.items() if k in METRIC_KEYS}


def summarize(values: list[float]) -> dict[str, Any]:
    """Each value, their mean, sample std (None for one value) and min (EDM reports the min of 3)."""
    a = np.asarray(values, dtype=np.float64)
    return {"values": [float(v) for v in a], "mean": float(a.mean()),
            "std": float(a.std(ddof=1)) if len(a) > 1 else None, "min": float(a.min())}


def _sample_manifest(samples_dir: Path) -> dict[str, Any]:
    path = samples_dir / "samples.json"
    if not path.is_file():
        return {}
    m = read_json(path)
    return m if isinstance(m, dict) else {}


def score_samples(
    cfg: Config,
    data_dir: os.PathLike | str,
    samples_dir: os.PathLike | str,
    classifier_path: os.PathLike | str | None,
    ref_dir: os.PathLike | str,
    metrics_path: os.PathLike | str,
    classifier_metrics_path: os.PathLike | str | None = None,
    features: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Evaluate the samples in ``samples_dir`` against ``data_dir``'s train split; write ``metrics_path``.

    ``features``, when given, is filled with the FID layer's features of the samples (``"generated"``, float [N, D]
    in seed order) and the reference's ``"mu"`` and ``"sigma"``: what a bootstrap over the samples needs.

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
    samples_dir = Path(samples_dir)
    data = open_dataset(data_dir)  # the splits stream from their shards
    extractor = resolve_extractor(cfg, data)
    isc = (data.shape[0] == 3) if ev.isc == "auto" else ev.isc
    if not (ev.fid or ev.kid or isc or ev.prc):
        raise StageError("evaluate: every metric is off; enable at least one of evaluate.fid, kid, isc, prc")
    if ev.reference and (ev.kid or ev.prc):
        raise StageError(f"evaluate.reference: {ev.reference} holds (mu, sigma) only, KID and precision/recall need "
                         "the reference features; set evaluate.kid: false and evaluate.prc: false (or "
                         "evaluate.reference: null)")

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
        weights, extractor_cls = str(classifier_path), ClassifierFeatureExtractor
    else:
        weights, extractor_cls = inception_weights_path(cfg), VerifiedInceptionV3
    weights_sha = sha256_file(weights)
    if extractor == INCEPTION_EXTRACTOR:  # a wrong file fails now, not after the samples are read
        check_inception_sha256(weights, weights_sha, ev.inception_sha256)
    accuracy = read_json(classifier_metrics_path).get("accuracy") if classifier_metrics_path is not None else None

    # The samples stream from their shards (one shard in memory at a time), in seed order.
    samples = SampleShards(samples_dir)
    seeds = samples.seeds
    k, n_total, n_train, n_hold = ev.repeats, len(samples), len(data.train), len(data.holdout)
    if tuple(samples.shape) != data.shape:
        raise StageError(f"{samples_dir}: samples are {'x'.join(map(str, samples.shape))}, the dataset's images "
                         f"are {'x'.join(map(str, data.shape))}")
    if len(np.unique(seeds)) != n_total:
        raise StageError(f"{samples_dir}: some seeds occur twice; rerun the sample stage")
    if k > 1 and n_total != k * cfg.sample.num_samples:
        raise StageError(f"{samples_dir}: {n_total} samples; evaluate.repeats={k} needs {k} x sample.num_samples="
                         f"{cfg.sample.num_samples} = {k * cfg.sample.num_samples} (disjoint seed ranges); rerun the "
                         "sample stage with these params")
    if n_total % k:
        raise StageError(f"{samples_dir}: {n_total} samples do not split into evaluate.repeats={k} equal ranges")
    n_gen = n_total // k
    per = "" if k == 1 else " per repeat"
    if n_gen < 2:
        raise StageError(f"{samples_dir}: {n_gen} sample(s){per}; the metrics need at least 2")
    if ev.prc and n_gen < 4:
        raise StageError(f"{samples_dir}: {n_gen} samples{per}; precision/recall (evaluate.prc) need at least 4")
    if ev.kid and n_gen < ev.kid_subset_size:
        raise StageError(f"{samples_dir}: {n_gen} samples{per}, fewer than evaluate.kid_subset_size="
                         f"{ev.kid_subset_size} that KID needs; sample more or lower evaluate.kid_subset_size (or set "
                         "evaluate.kid: false)")
    if ev.kid and n_train < ev.kid_subset_size:
        raise StageError(f"{data_dir}: {n_train} training images, fewer than evaluate.kid_subset_size="
                         f"{ev.kid_subset_size} that KID needs; lower evaluate.kid_subset_size")

    layer = extractor_cls.get_default_feature_layer_for_metric("fid")
    isc_layer = extractor_cls.get_default_feature_layer_for_metric("isc")
    layers = sorted({layer} | ({isc_layer} if isc else set()))
    cuda = torch.cuda.is_available()
    fe = build_extractor(extractor, weights, layers, cuda, ev.inception_sha256)
    gen = extract(fe, samples, ev.batch_size, cuda)
    feature_dim = gen[layer].shape[1]

    want = {"dataset": str(data.meta.get("dataset", "data")), "split": "train",
            "dataset_sha256": data.meta["sha256"],
            "image_shape": list(data.shape), "feature_extractor": extractor,
            "feature_extractor_weights_sha256": weights_sha, "feature_layer": layer,
            "preprocessing": PREPROCESSING[extractor], "num_images": n_train}
    if ev.reference:
        ref = refstats.load_published(ev.reference, want, feature_dim)
        print(f"reference statistics: the published {ref.path}"
              + (f" ({ref.provenance['num_images']} images)" if "num_images" in ref.provenance else ""))
    else:
        ref, why = refstats.lookup(ref_dir, want)
        if ref is not None:
            print(f"reference statistics of the train split ({n_train} images) reused from {ref.path}")
        else:
            print(f"recomputing the reference statistics of the train split ({n_train} images): {why}")
            feats, moments = reference_features(fe, data.train, layer, ev.batch_size, cuda)
            ref = refstats.save(ref_dir, want, feats, moments)
            print(f"reference statistics cached as {ref.path} (+ {ref.path.with_suffix('.json').name})")

    if features is not None:
        features.update(generated=gen[layer].numpy(), mu=ref.mu, sigma=ref.sigma)
    which = {"fid": ev.fid, "kid": ev.kid, "isc": isc, "prc": ev.prc}
    runs = [compare({name: f[i * n_gen:(i + 1) * n_gen] for name, f in gen.items()}, ref, layer, isc_layer, which,
                    ev.kid_subset_size, ev.seed) for i in range(k)]
    per_repeat = {m: summarize([r[m] for r in runs]) for m in METRICS if m in runs[0]}
    metrics = {m: s["mean"] for m, s in per_repeat.items()}

    # The floor: real held-out images against the same reference, at the per-repeat sample count.
    floor_kid = min(ev.kid_subset_size, n_hold)
    if n_hold > n_gen:
        pick = np.sort(np.random.default_rng(ev.seed).choice(n_hold, n_gen, replace=False))
        holdout = data.holdout.take(pick).images  # only the row groups that hold them are read
    else:
        holdout = data.holdout.read_all().images
    num_reference = ref.provenance.get("num_images")
    floor: dict[str, Any] = {"num_holdout": len(holdout), "num_reference": num_reference}
    notes = []
    if n_hold < n_gen:
        notes.append(f"the holdout has {n_hold} images, fewer than the {n_gen} generated; the floor uses all of them")
    if ev.kid and floor_kid < ev.kid_subset_size:
        notes.append(f"floor KID uses subsets of {floor_kid} (the holdout size)")
    # KID needs subsets of 2, precision/recall a 3-nearest-neighbour ball: skip them on a tinier holdout.
    floor_which = dict(which, kid=ev.kid and floor_kid >= 2, prc=ev.prc and len(holdout) > 3)
    if any(floor_which.values()):
        floor.update(compare(extract(fe, holdout, ev.batch_size, cuda), ref, layer, isc_layer, floor_which,
                             max(floor_kid, 2), ev.seed))
    if ev.kid:
        floor["kid_subset_size"] = floor_kid
    if notes:
        floor["note"] = "; ".join(notes)

    manifest = _sample_manifest(samples_dir)
    seed_ranges = [[int(seeds[i * n_gen]), int(seeds[(i + 1) * n_gen - 1])] for i in range(k)]
    ckpt = manifest.get("checkpoint")
    provenance = {
        "num_generated": n_gen,
        "num_generated_total": n_total,
        "num_reference": num_reference,
        "repeats": k,
        "seed_range": [int(seeds[0]), int(seeds[-1])],
        "seed_ranges": seed_ranges,
        "sampler": manifest.get("sampler"),
        "steps": manifest.get("steps"),
        "eta": manifest.get("eta"),
        "checkpoint": {"path": ckpt, "step": manifest.get("checkpoint_step"), "ema": manifest.get("use_ema")},
        "feature_extractor": {"name": extractor, "weights_sha256": weights_sha, "layer": layer,
                              "preprocessing": PREPROCESSING[extractor]},
        "reference": {"split": "train", "path": Path(ref.path).name if ref.source != "published" else str(ref.path),
                      "key": ref.provenance.get("key"), "dataset_sha256": ref.provenance.get("dataset_sha256"),
                      "published": ref.source == "published"},
        "libraries": refstats.library_versions(),
    }
    result: dict[str, Any] = {
        "feature_extractor": extractor,
        "reference": "train" if ref.source != "published" else str(ref.path),
        "reference_key": Path(ref.path).stem,
        "num_generated": n_gen,
        "num_reference": num_reference,
        **metrics,
        "repeats": k,
        "per_repeat": per_repeat,
        "floor": floor,
        "provenance": provenance,
    }
    if ev.kid:
        result["kid_subset_size"] = ev.kid_subset_size
    if ev.fid:
        result["fid_ratio"] = metrics["fid"] / floor["fid"] if floor.get("fid", 0) > 0 else None
    if classifier_metrics_path is not None:
        result["classifier_accuracy"] = accuracy
    write_json(metrics_path, result)
    write_resolved(cfg, Path(metrics_path).parent, f"{Path(metrics_path).stem}.config.json")

    def show(m: str) -> str:
        s = per_repeat[m]
        return f"{m} {s['mean']:.4g}" + (f" ± {s['std']:.2g} (min {s['min']:.4g}, {k} repeats)" if k > 1 else "")

    summary = ", ".join(show(m) for m in ("fid", "kid_mean", "isc_mean") if m in per_repeat)
    floor_s = ", ".join(f"{m} {floor[m]:.4g}" for m in ("fid", "kid_mean", "isc_mean") if m in floor)
    print(f"{n_gen} samples{per} vs train ({extractor}): {summary}; real-vs-real floor ({len(holdout)} held-out): "
          f"{floor_s} -> {metrics_path}")
    return result


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
