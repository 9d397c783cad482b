"""FID / KID (and IS, precision/recall when enabled) of samples with torch-fidelity, shared by the ``evaluate``
stage and the ``sampler_table``: the feature extractor, the training split's reference statistics, the metrics of a
set of features against them, and the real-vs-real floor.

Following the paper, the generated samples are compared with the TRAINING split. Beside each metric stands its
real-vs-real floor (:func:`floor_metrics`): the same metric for held-out real images against the same training
reference, at the same sample count as the generated set (all of the holdout when it is smaller, which the output
says). A model can only be judged relative to that floor: FID is biased by sample count and feature space.

Features come from the dataset's own classifier (:mod:`tasks.lib.classifier`) on labeled grayscale datasets and
from torch-fidelity's Inception-v3 otherwise (``evaluate.feature_extractor``, :func:`open_extractor`); the Inception
weights file must have the pinned SHA-256 and is read with ``weights_only=True``. FID is "statistics, then distance":
the training split's statistics are a keyed entry of ``--ref-dir`` (:mod:`tasks.lib.refstats`), used only when the
dataset hash, split, image shape, extractor (name, weights hash, layer), preprocessing and image count all match; or a
published ``.npz`` of (mu, sigma) given as ``evaluate.reference`` (:func:`reference_statistics`).
"""

from __future__ import annotations

import io
import math
import os
import sys
from dataclasses import dataclass, field
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

from ddpm.checkpoint import atomic_write_bytes

from tasks.lib.config import Config

from . import refstats
from .classifier import FEATURE_EXTRACTOR_NAME as CLASSIFIER_EXTRACTOR
from .classifier import ClassifierFeatureExtractor, load_classifier
from .errors import StageError
from .files import sha256_file
from .inputs import (  # noqa: F401  (the Inception names are part of this module's interface)
    INCEPTION_EXTRACTOR,
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_URL,
    extractor_for,
    inception_weights_path,
)
from .shards import DatasetMeta

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
    :class:`tasks.lib.samples.SampleShards`, which reads one shard at a time)."""

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


# -- what is measured, with what -------------------------------------------------------------------------------------
def enabled_metrics(cfg: Config, data: DatasetMeta) -> dict[str, bool]:
    """``{"fid", "kid", "isc", "prc"}``: which metrics the evaluate section turns on (IS ``auto``: on RGB data).
    Raises :class:`StageError` when none is, or when a published reference (mu, sigma) cannot serve KID or PRC."""
    ev = cfg.evaluate
    which = {"fid": ev.fid, "kid": ev.kid, "isc": (data.shape[0] == 3) if ev.isc == "auto" else ev.isc,
             "prc": ev.prc}
    if not any(which.values()):
        raise StageError("evaluate: every metric is off; enable at least one of evaluate.fid, kid, isc, prc")
    if ev.reference and (ev.kid or ev.prc):
        raise StageError(f"evaluate.reference: {ev.reference} holds (mu, sigma) only, KID and precision/recall need "
                         "the reference features; set evaluate.kid: false and evaluate.prc: false (or "
                         "evaluate.reference: null)")
    return which


@dataclass
class Extractor:
    """The feature extractor the evaluate section selects for a dataset: its name, weights file (and SHA-256), the
    layers of FID (also KID, PRC) and IS; the network itself is built on the first :meth:`features` call."""

    name: str
    weights: str
    weights_sha256: str
    layer: str
    isc_layer: str
    layers: list[str]
    expected_sha256: str
    batch_size: int
    cuda: bool = field(default_factory=torch.cuda.is_available)
    _fe: Any = None

    def features(self, images) -> dict[str, torch.Tensor]:
        """Features of uint8 images (an array [N, C, H, W] or a :class:`~tasks.lib.samples.SampleShards`), in
        order: {layer: float [N, D]}."""
        if self._fe is None:
            self._fe = build_extractor(self.name, self.weights, self.layers, self.cuda, self.expected_sha256)
        return extract(self._fe, images, self.batch_size, self.cuda)

    def reference_features(self, split) -> tuple[np.ndarray, tuple]:
        """:func:`reference_features` of a streamed split with this extractor."""
        if self._fe is None:
            self._fe = build_extractor(self.name, self.weights, self.layers, self.cuda, self.expected_sha256)
        return reference_features(self._fe, split, self.layer, self.batch_size, self.cuda)


def _classifier_weights(classifier_path, data: DatasetMeta) -> str:
    """The classifier extractor's weights file, checked against the dataset it will measure."""
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
    return str(classifier_path)


def open_extractor(cfg: Config, data: DatasetMeta, classifier_path, isc: bool) -> Extractor:
    """The feature extractor of ``evaluate.feature_extractor`` for ``data``, its weights found and checked (a missing
    or wrong file fails here, before any image is read). Raises :class:`StageError`."""
    ev = cfg.evaluate
    name = extractor_for(ev.feature_extractor, data.shape[0], data.num_classes > 0)
    if name == CLASSIFIER_EXTRACTOR:
        weights, cls = _classifier_weights(classifier_path, data), ClassifierFeatureExtractor
    else:
        weights, cls = inception_weights_path(cfg), VerifiedInceptionV3
    weights_sha = sha256_file(weights)
    if name == INCEPTION_EXTRACTOR:
        check_inception_sha256(weights, weights_sha, ev.inception_sha256)
    layer = cls.get_default_feature_layer_for_metric("fid")
    isc_layer = cls.get_default_feature_layer_for_metric("isc")
    return Extractor(name, weights, weights_sha, layer, isc_layer, sorted({layer} | ({isc_layer} if isc else set())),
                     ev.inception_sha256, ev.batch_size)


def check_count(cfg: Config, n_gen: int, n_train: int, where: str, data_where: str, per: str = "") -> None:
    """Enough samples (``n_gen`` per measurement) and training images for the enabled metrics; ``where`` and
    ``data_where`` name the samples and the dataset in messages, ``per`` how samples are counted (" per repeat").
    Raises :class:`StageError`."""
    ev = cfg.evaluate
    if n_gen < 2:
        raise StageError(f"{where}: {n_gen} sample(s){per}; the metrics need at least 2")
    if ev.prc and n_gen < 4:
        raise StageError(f"{where}: {n_gen} samples{per}; precision/recall (evaluate.prc) need at least 4")
    if ev.kid and n_gen < ev.kid_subset_size:
        raise StageError(f"{where}: {n_gen} samples{per}, fewer than evaluate.kid_subset_size="
                         f"{ev.kid_subset_size} that KID needs; sample more or lower evaluate.kid_subset_size (or set "
                         "evaluate.kid: false)")
    if ev.kid and n_train < ev.kid_subset_size:
        raise StageError(f"{data_where}: {n_train} training images, fewer than evaluate.kid_subset_size="
                         f"{ev.kid_subset_size} that KID needs; lower evaluate.kid_subset_size")


# -- the reference and the floor ------------------------------------------------------------------------------------
def reference_statistics(cfg: Config, data, extractor: Extractor, ref_dir, feature_dim: int) -> refstats.Reference:
    """The training split's statistics in ``extractor``'s features: the published ``evaluate.reference``, else the
    entry of ``ref_dir`` whose key (dataset hash, split, shape, extractor, weights, layer, preprocessing, count)
    matches, else computed now (streamed) and cached there."""
    want = {"dataset": str(data.meta.get("dataset", "data")), "split": "train",
            "dataset_sha256": data.meta["sha256"],
            "image_shape": list(data.shape), "feature_extractor": extractor.name,
            "feature_extractor_weights_sha256": extractor.weights_sha256, "feature_layer": extractor.layer,
            "preprocessing": PREPROCESSING[extractor.name], "num_images": len(data.train)}
    if cfg.evaluate.reference:
        ref = refstats.load_published(cfg.evaluate.reference, want, feature_dim)
        print(f"reference statistics: the published {ref.path}"
              + (f" ({ref.provenance['num_images']} images)" if "num_images" in ref.provenance else ""))
        return ref
    ref, why = refstats.lookup(ref_dir, want)
    if ref is not None:
        print(f"reference statistics of the train split ({len(data.train)} images) reused from {ref.path}")
        return ref
    print(f"recomputing the reference statistics of the train split ({len(data.train)} images): {why}")
    feats, moments = extractor.reference_features(data.train)
    ref = refstats.save(ref_dir, want, feats, moments)
    print(f"reference statistics cached as {ref.path} (+ {ref.path.with_suffix('.json').name})")
    return ref


def floor_metrics(cfg: Config, data, extractor: Extractor, ref: refstats.Reference, n_gen: int,
                  which: dict[str, bool]) -> dict[str, Any]:
    """The real-vs-real floor: held-out real images against the same reference, at the ``n_gen`` samples of one
    measurement (a seeded choice of them; all of the holdout when it is smaller, which ``note`` says)."""
    ev, n_hold = cfg.evaluate, len(data.holdout)
    floor_kid = min(ev.kid_subset_size, n_hold)
    if n_hold > n_gen:
        pick = np.sort(np.random.default_rng(ev.seed).choice(n_hold, n_gen, replace=False))
        holdout = data.holdout.take(pick).images  # only the row groups that hold them are read
    else:
        holdout = data.holdout.read_all().images
    floor: dict[str, Any] = {"num_holdout": len(holdout), "num_reference": ref.provenance.get("num_images")}
    notes = []
    if n_hold < n_gen:
        notes.append(f"the holdout has {n_hold} images, fewer than the {n_gen} generated; the floor uses all of them")
    if ev.kid and floor_kid < ev.kid_subset_size:
        notes.append(f"floor KID uses subsets of {floor_kid} (the holdout size)")
    # KID needs subsets of 2, precision/recall a 3-nearest-neighbour ball: skip them on a tinier holdout.
    floor_which = dict(which, kid=ev.kid and floor_kid >= 2, prc=ev.prc and len(holdout) > 3)
    if any(floor_which.values()):
        floor.update(compare(extractor.features(holdout), ref, extractor.layer, extractor.isc_layer, floor_which,
                             max(floor_kid, 2), ev.seed))
    if ev.kid:
        floor["kid_subset_size"] = floor_kid
    if notes:
        floor["note"] = "; ".join(notes)
    return floor
