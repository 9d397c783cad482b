"""Keyed reference statistics (tasks/lib/refstats.py): the key, the cache look-up and its reasons, export and the
published-file checks, on small synthetic features (the stage-level tests are in test_evaluate.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tasks.lib import refstats
from tasks.lib.errors import StageError
from tasks.lib.files import sha256_file, write_json

WANT = {"dataset": "digits", "dataset_sha256": "a" * 64, "split": "train", "image_shape": [1, 8, 8],
        "feature_extractor": "ddpm-classifier", "feature_extractor_weights_sha256": "b" * 64,
        "feature_layer": "features", "preprocessing": "uint8, x/127.5-1", "num_images": 50}


def features(n: int = 50, d: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_the_key_is_every_field_that_changes_the_numbers():
    base = refstats.key_of(WANT)
    other_values = {"dataset": "mnist", "dataset_sha256": "c" * 64, "split": "holdout", "image_shape": [1, 16, 16],
                    "feature_extractor": "inception-v3-compat", "feature_extractor_weights_sha256": "d" * 64,
                    "feature_layer": "2048", "preprocessing": "resize 299", "num_images": 49}
    assert set(other_values) == set(refstats.KEY_FIELDS)
    for field, value in other_values.items():
        changed = {**WANT, field: value}
        assert refstats.key_of(changed) != base, field
        assert refstats.entry_name(changed) != refstats.entry_name(WANT), field
    # Tuples and lists, extra fields (library versions): the same key.
    assert refstats.key_of({**WANT, "image_shape": (1, 8, 8), "libraries": {"torch": "x"}}) == base
    assert refstats.entry_name(WANT) == f"digits-train-1x8x8-ddpm-classifier-{base[:12]}"


def test_lookup_uses_only_a_matching_entry_and_says_why_not(tmp_path):
    assert refstats.lookup(tmp_path, WANT) == (None, f"no reference statistics in {tmp_path} yet")
    f = features()
    saved = refstats.save(tmp_path, WANT, f)
    prov = json.loads(saved.path.with_suffix(".json").read_text())
    assert {k: prov[k] for k in refstats.KEY_FIELDS} == WANT and prov["feature_dim"] == 4
    assert prov["npz_sha256"] == sha256_file(saved.path) and prov["key"] == refstats.key_of(WANT)

    hit, why = refstats.lookup(tmp_path, {**WANT, "image_shape": (1, 8, 8)})
    assert why == "" and hit.source == "cache" and hit.path == saved.path
    np.testing.assert_allclose(hit.mu, f.astype(np.float64).mean(0))
    np.testing.assert_allclose(hit.sigma, np.cov(f.astype(np.float64), rowvar=False))
    np.testing.assert_array_equal(hit.features, f)

    miss, why = refstats.lookup(tmp_path, {**WANT, "image_shape": [1, 16, 16], "dataset_sha256": "c" * 64})
    assert miss is None
    assert why == (f"the nearest cached entry {saved.path.name} differs in dataset_sha256: {'a' * 16} there, "
                   f"{'c' * 16} here; image_shape: 1x8x8 there, 1x16x16 here")
    _, why = refstats.lookup(tmp_path, {**WANT, "num_images": 60, "feature_extractor_weights_sha256": "e" * 64})
    assert "feature_extractor_weights_sha256: bbbbbbbbbbbbbbbb there, eeeeeeeeeeeeeeee here" in why
    assert "num_images: 50 there, 60 here" in why

    # The nearest of two entries is named; an entry whose file changed is never used.
    refstats.save(tmp_path, {**WANT, "split": "holdout", "num_images": 20}, features(20))
    _, why = refstats.lookup(tmp_path, {**WANT, "num_images": 51})
    assert why.startswith(f"the nearest cached entry {saved.path.name} differs in num_images")
    np.savez(saved.path, mu=np.zeros(4), sigma=np.eye(4), features=np.zeros((50, 4)))
    miss, why = refstats.lookup(tmp_path, WANT)
    assert miss is None and why == f"{saved.path.name} has the key but its content changed since it was written"


def test_export_and_published_checks(tmp_path, capsys):
    ref = tmp_path / "ref"
    a = refstats.save(ref, WANT, features())
    b = refstats.save(ref, {**WANT, "split": "holdout", "num_images": 20}, features(20, seed=1))
    with pytest.raises(StageError, match=f"2 entries, choose one with --name: {a.path.stem}, {b.path.stem}|"
                                         f"2 entries, choose one with --name: {b.path.stem}, {a.path.stem}"):
        refstats.main(["export", "--ref-dir", str(ref), "--out", str(tmp_path / "x.npz")])
    with pytest.raises(StageError, match="--out: .*x.txt must end in .npz"):
        refstats.main(["export", "--ref-dir", str(ref), "--name", a.path.stem, "--out", str(tmp_path / "x.txt")])
    out = tmp_path / "pub" / "ref.npz"
    published = refstats.main(["export", "--ref-dir", str(ref), "--name", a.path.stem, "--out", str(out)])
    assert f"exported {a.path.name} -> {out}" in capsys.readouterr().out
    with np.load(out) as z:
        assert sorted(z.files) == ["mu", "sigma"]
        np.testing.assert_array_equal(z["mu"], a.mu)
    assert json.loads(out.with_suffix(".json").read_text()) == published
    assert {k: published[k] for k in refstats.KEY_FIELDS} == WANT and published["npz_sha256"] == sha256_file(out)

    got = refstats.load_published(out, WANT, feature_dim=4)
    assert got.source == "published" and got.features is None and got.mu.dtype == np.float64
    np.testing.assert_array_equal(got.sigma, a.sigma)
    # Another count is fine (a published reference may use more images); other key fields are not.
    assert refstats.load_published(out, {**WANT, "num_images": 5000}, feature_dim=4).provenance == published
    with pytest.raises(StageError, match=r"does not match this evaluation \(feature_extractor: ddpm-classifier there, "
                                         r"inception-v3-compat here; feature_layer: features there, 2048 here\)"):
        refstats.load_published(out, {**WANT, "feature_extractor": "inception-v3-compat", "feature_layer": "2048"}, 4)
    with pytest.raises(StageError, match="holds statistics of 4 features, the ddpm-classifier extractor gives 64"):
        refstats.load_published(out, WANT, feature_dim=64)
    # Fields missing from a published .json are not checked (an EDM-style file may carry only some).
    write_json(out.with_suffix(".json"), {"feature_extractor": "ddpm-classifier"})
    assert refstats.load_published(out, {**WANT, "dataset_sha256": "f" * 64}, 4).source == "published"
    out.with_suffix(".json").unlink()
    refstats.load_published(out, WANT, 4)
    assert "has no provenance file ref.json; only its feature size (4) is checked" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros(4))
    with pytest.raises(StageError, match=r"expected arrays mu \[D\] and sigma \[D, D\], found \['mean'\]"):
        refstats.load_published(bad, WANT, 4)


def test_export_command_line_error_is_one_line_exit_2(tmp_path, repo_root):
    proc = subprocess.run([sys.executable, "-m", "tasks.lib.refstats", "export", "--ref-dir", str(tmp_path / "none"),
                           "--out", str(tmp_path / "x.npz")], cwd=repo_root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none'}: no reference statistics; run the evaluate stage first"]
    assert not (tmp_path / "x.npz").exists()
