"""Reference statistics of a dataset split as a keyed, versioned artifact, and the command that exports them.

An entry in the reference folder (``ref_stats/``, a DVC output) is a pair of files named after its key:

- ``<name>.npz``: ``mu`` float64 [D], ``sigma`` float64 [D, D] (FID's Gaussian, accumulated batch by batch) and
  ``features`` float32 [M, D] (what KID and precision/recall need): all N images' features, or a seeded uniform
  subset of :data:`MAX_FEATURES` of them for a larger split, so that memory does not grow with the dataset;
- ``<name>.json``: its provenance, the fields of :data:`KEY_FIELDS` plus the library versions and the hash of the
  ``.npz``.

The key is every field that changes the numbers: the dataset artifact's content hash, the split, the image shape,
the feature extractor's name, weights hash and layer, the preprocessing and the number of images. An entry is used
only when all of them are equal (and its ``.npz`` still has the hash its ``.json`` recorded); otherwise the
statistics are recomputed and the stage says which fields differed.

Export an entry as a published-style ``.npz`` of (mu, sigma) with its provenance ``.json`` beside it; evaluation
takes such a file (yours, a colleague's, or e.g. an EDM-style CIFAR-10 reference) through ``evaluate.reference``::

    python -m tasks.lib.refstats list --ref-dir ref_stats
    python -m tasks.lib.refstats export --ref-dir ref_stats --out cifar10-train-inception.npz [--name NAME]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .cli import run_cli
from .errors import StageError
from .files import read_json, sha256_file, write_json, write_npz

FORMAT = 1
# The fields that decide the numbers; a cached entry must match every one of them.
KEY_FIELDS = ("dataset", "dataset_sha256", "split", "image_shape", "feature_extractor",
              "feature_extractor_weights_sha256", "feature_layer", "preprocessing", "num_images")


def library_versions() -> dict[str, str]:
    """The versions that the numbers depend on (recorded, not part of the key: a patch release keeps the cache)."""
    import platform

    import torch
    import torch_fidelity

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "torch_fidelity": torch_fidelity.__version__}


def key_of(provenance: dict[str, Any]) -> str:
    """SHA-256 of the key fields of ``provenance``."""
    blob = json.dumps({k: provenance.get(k) for k in KEY_FIELDS}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def entry_name(provenance: dict[str, Any]) -> str:
    """Readable and unique: ``digits-train-1x8x8-ddpm-classifier-<key[:12]>``."""
    shape = "x".join(map(str, provenance["image_shape"]))
    name = f"{provenance['dataset']}-{provenance['split']}-{shape}-{provenance['feature_extractor']}"
    return f"{name.replace(os.sep, '_')}-{key_of(provenance)[:12]}"


def differences(want: dict[str, Any], have: dict[str, Any], fields: Sequence[str] = KEY_FIELDS) -> list[str]:
    """``field: <have> there, <want> here`` for each of ``fields`` present in ``have`` whose value differs."""
    def show(v: Any) -> str:
        if isinstance(v, list) and all(isinstance(x, int) for x in v):
            return "x".join(map(str, v))
        s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
        return s[:16] if len(s) == 64 and all(c in "0123456789abcdef" for c in s) else s

    return [f"{k}: {show(have[k])} there, {show(want.get(k))} here" for k in fields
            if k in have and _norm(have[k]) != _norm(want.get(k))]


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v))  # tuples -> lists, so JSON and Python values compare


MAX_FEATURES = 50_000  # reference feature rows kept for KID and precision/recall (FID's usual 50k)


def fid_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) in float64 of features [N, D]: the Gaussian FID compares."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


class Moments:
    """The mean and covariance of features that arrive in batches, accumulated in float64 (shifted by the first
    batch's mean, so that large means cost no precision): what :func:`fid_statistics` gives for all the rows at
    once, to round-off, in memory of D x D whatever the number of rows."""

    def __init__(self):
        self.n, self.shift, self.s, self.ss = 0, None, None, None

    def add(self, features: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)
        if self.shift is None:
            self.shift = f.mean(axis=0)
            self.s = np.zeros_like(self.shift)
            self.ss = np.zeros((len(self.shift), len(self.shift)))
        d = f - self.shift
        self.n += len(f)
        self.s += d.sum(axis=0)
        self.ss += d.T @ d

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError("the covariance needs at least 2 rows")
        m = self.s / self.n
        return self.shift + m, (self.ss - self.n * np.outer(m, m)) / (self.n - 1)


def feature_subset(n: int, limit: int = MAX_FEATURES) -> np.ndarray:
    """The rows (ascending) whose features a reference entry keeps: all of them up to ``limit``, else a seeded
    uniform draw of ``limit`` (fixed seed: the same split gives the same subset)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(0x4B4944).choice(n, size=limit, replace=False))


@dataclass
class Reference:
    """Statistics of the reference images: ``features`` is None for a published (mu, sigma) file."""

    mu: np.ndarray
    sigma: np.ndarray
    features: Optional[np.ndarray]
    provenance: dict[str, Any]
    path: Path
    source: str  # "computed", "cache" or "published"


# -- the cache folder ------------------------------------------------------------------------------------------------
def entries(ref_dir: os.PathLike | str) -> list[tuple[Path, dict[str, Any]]]:
    """(npz path, provenance) of every entry of this format in ``ref_dir``; other files are ignored."""
    out = []
    for js in sorted(Path(ref_dir).glob("*.json")):
        try:
            prov = json.loads(js.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(prov, dict) and prov.get("format") == FORMAT and js.with_suffix(".npz").is_file():
            out.append((js.with_suffix(".npz"), prov))
    return out


def _load_npz(path: Path, need_features: bool) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            names = sorted(z.files)
            arrays = {k: z[k] for k in names if k in ("mu", "sigma", "features")}
    except Exception as e:
        raise StageError(f"{path}: unreadable statistics file ({type(e).__name__}: {e})") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise StageError(f"{path}: expected arrays mu [D] and sigma [D, D], found {names or 'none'}")
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise StageError(f"{path}: expected mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    if need_features and "features" not in arrays:
        raise StageError(f"{path}: no features array")
    return arrays


def lookup(ref_dir: os.PathLike | str, want: dict[str, Any]) -> tuple[Optional[Reference], str]:
    """The cached entry whose key fields all equal ``want``'s, else None and why nothing could be used."""
    found = entries(ref_dir)
    reasons = []
    for npz, prov in found:
        if differences(want, prov) or any(k not in prov for k in KEY_FIELDS):
            continue
        if prov.get("npz_sha256") != sha256_file(npz):
            reasons.append(f"{npz.name} has the key but its content changed since it was written")
            continue
        arrays = _load_npz(npz, need_features=True)
        rows = prov.get("num_features", prov["num_images"])
        if arrays["features"].shape != (rows, len(arrays["mu"])):
            reasons.append(f"{npz.name}: {arrays['features'].shape[0]} feature rows, its provenance says {rows}")
            continue
        return Reference(arrays["mu"], arrays["sigma"], arrays["features"], prov, npz, "cache"), ""
    if reasons:
        return None, "; ".join(reasons)
    if not found:
        return None, f"no reference statistics in {ref_dir} yet"
    # The nearest entry (fewest differing fields) says what changed.
    npz, prov = min(found, key=lambda e: (len(differences(want, e[1])), e[0].name))
    return None, f"the nearest cached entry {npz.name} differs in " + "; ".join(differences(want, prov))


def save(ref_dir: os.PathLike | str, provenance: dict[str, Any], features: np.ndarray,
         moments: Optional[tuple[np.ndarray, np.ndarray]] = None) -> Reference:
    """Write an entry (``.npz`` first, then the ``.json`` that makes it visible, both atomic); return it.
    ``moments`` (mu, sigma) of all the images when ``features`` holds a subset of them (:func:`feature_subset`)."""
    ref_dir = Path(ref_dir)
    ref_dir.mkdir(parents=True, exist_ok=True)
    features = np.ascontiguousarray(features, dtype=np.float32)
    mu, sigma = moments if moments is not None else fid_statistics(features)
    name = entry_name(provenance)
    npz = write_npz(ref_dir / f"{name}.npz", mu=mu, sigma=sigma, features=features)
    prov = {"format": FORMAT, **{k: _norm(provenance[k]) for k in KEY_FIELDS}, "key": key_of(provenance),
            "feature_dim": int(features.shape[1]), "num_features": int(features.shape[0]), "libraries": library_versions(), "npz_sha256": sha256_file(npz)}
    write_json(ref_dir / f"{name}.json", prov)
    return Reference(mu, sigma, features, prov, npz, "computed")


# -- published statistics ------------------------------------------------------------------------------------------
def load_published(path: os.PathLike | str, want: dict[str, Any], feature_dim: int) -> Reference:
    """A published ``.npz`` of (mu, sigma): its size must be the extractor's feature size and every provenance field
    of the ``.json`` beside it (when there is one) must equal ``want``'s. Raises :class:`StageError`."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"evaluate.reference: {path} not found (a .npz of mu [D] and sigma [D, D])")
    arrays = _load_npz(path, need_features=False)
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if len(mu) != feature_dim:
        raise StageError(f"evaluate.reference: {path} holds statistics of {len(mu)} features, the "
                         f"{want.get('feature_extractor')} extractor gives {feature_dim}; refused")
    js = path.with_suffix(".json")
    prov: dict[str, Any] = {}
    if js.is_file():
        prov = read_json(js)
        if not isinstance(prov, dict):
            raise StageError(f"{js}: expected a JSON object of provenance fields")
        diff = differences(want, prov, [k for k in KEY_FIELDS if k != "num_images"])
        if diff:
            raise StageError(f"evaluate.reference: {path} does not match this evaluation ({'; '.join(diff)}); "
                             f"refused")
    else:
        print(f"warning: {path} has no provenance file {js.name}; only its feature size ({feature_dim}) is checked",
              file=sys.stderr)
    return Reference(mu, sigma, None, prov, path, "published")


def export(ref_dir: os.PathLike | str, out: os.PathLike | str, name: Optional[str] = None) -> dict[str, Any]:
    """Write entry ``name`` of ``ref_dir`` (the only one when None) as ``out`` (mu, sigma) and its ``.json``."""
    found = entries(ref_dir)
    if not found:
        raise StageError(f"{ref_dir}: no reference statistics; run the evaluate stage first")
    names = [npz.stem for npz, _ in found]
    if name is None and len(found) > 1:
        raise StageError(f"{ref_dir}: {len(found)} entries, choose one with --name: {', '.join(names)}")
    pick = [e for e in found if name is None or e[0].stem == name]
    if not pick:
        raise StageError(f"--name: no entry {name!r} in {ref_dir}; entries: {', '.join(names)}")
    npz, prov = pick[0]
    if prov.get("npz_sha256") != sha256_file(npz):
        raise StageError(f"{npz}: content changed since it was written; rerun the evaluate stage")
    arrays = _load_npz(npz, need_features=False)
    out = Path(out)
    if out.suffix != ".npz":
        raise StageError(f"--out: {out} must end in .npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_npz(out, mu=arrays["mu"], sigma=arrays["sigma"])
    published = {k: v for k, v in prov.items() if k != "npz_sha256"}
    published.update(exported_from=npz.name, npz_sha256=sha256_file(out))
    write_json(out.with_suffix(".json"), published)
    return published


def main(argv: Optional[Sequence[str]] = None) -> Any:
    p = argparse.ArgumentParser(description="List or export the keyed reference statistics of the evaluate stage.")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="the entries of a reference folder and their keys")
    ls.add_argument("--ref-dir", default="ref_stats")
    ex = sub.add_parser("export", help="an entry as a .npz of (mu, sigma) with its provenance .json beside it")
    ex.add_argument("--ref-dir", default="ref_stats")
    ex.add_argument("--name", default=None, help="entry to export (see `list`); default: the only one")
    ex.add_argument("--out", required=True, help="the .npz to write (the .json goes beside it)")
    args = p.parse_args(argv)
    if args.command == "list":
        found = entries(args.ref_dir)
        for npz, prov in found:
            print(f"{npz.stem}: {prov['num_images']} {prov['split']} images of {prov['dataset']} "
                  f"{'x'.join(map(str, prov['image_shape']))}, {prov['feature_extractor']} "
                  f"(weights {str(prov['feature_extractor_weights_sha256'])[:12]}), dataset "
                  f"{str(prov['dataset_sha256'])[:12]}")
        if not found:
            print(f"{args.ref_dir}: no reference statistics")
        return found
    published = export(args.ref_dir, args.out, args.name)
    print(f"exported {published['exported_from']} -> {args.out} (+ {Path(args.out).with_suffix('.json').name})")
    return published


if __name__ == "__main__":
    run_cli(main)
