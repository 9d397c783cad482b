"""The classifier feature extractor and the evaluate stage on the real digits dataset (offline, CPU).

One digits dataset (the fetch stage's output) and one classifier trained with the DEFAULT classifier config are
shared by the module: the default must reach the accuracy the pipeline promises, and the FID tests need a
classifier good enough for its features to separate digits from noise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.config import load_config
from tasks import evaluate, fetch, train_classifier
from tasks.classifier import ClassifierFeatureExtractor, load_classifier
from tasks.common import StageError, load_dataset, to_model_range, write_json, write_npz


def write_samples(folder: Path, images: np.ndarray, shard_size: int = 128) -> Path:
    """Fake sample-stage output: shard_NNNNN.npz files of ``images`` uint8 [N, C, H, W] and ``seeds`` [N]."""
    for k, start in enumerate(range(0, len(images), shard_size)):
        chunk = images[start:start + shard_size]
        write_npz(folder / f"shard_{k:05d}.npz", images=chunk, seeds=np.arange(start, start + len(chunk)))
    return folder


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "dataset"
    fetch.run(load_config(None), folder)
    return folder


@pytest.fixture(scope="module")
def classifier(digits, tmp_path_factory) -> dict:
    """Train through the command line's ``main`` with an empty params file, i.e. the default config."""
    work = tmp_path_factory.mktemp("classifier")
    (work / "params.yaml").write_text("")
    paths = {"weights": work / "classifier.pt", "metrics": work / "classifier.json"}
    metrics = train_classifier.main(["--params", str(work / "params.yaml"), "--data", str(digits),
                                     "--out", str(paths["weights"]), "--metrics", str(paths["metrics"])])
    return {**paths, "result": metrics}


@pytest.fixture(scope="module")
def noise(digits, tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    return write_samples(tmp_path_factory.mktemp("noise"), rng.integers(0, 256, (300, 1, 8, 8), dtype=np.uint8))


def evaluate_run(cfg, digits, samples, classifier, ref_dir, out):
    return evaluate.run(cfg, digits, samples, classifier["weights"], ref_dir, out, classifier["metrics"])


# -- the classifier -------------------------------------------------------------------------------------------------
def test_default_classifier_reaches_95_percent_on_digits(digits, classifier):
    m = classifier["result"]
    data = load_dataset(digits)
    assert m["accuracy"] >= 0.95
    assert m["num_holdout"] == len(data.holdout.labels) and m["num_train"] == len(data.train.labels)
    assert json.loads(classifier["metrics"].read_text()) == m

    # The weights file alone rebuilds the network, which reproduces the held-out accuracy.
    net, state = load_classifier(classifier["weights"])
    assert state["model_args"] == {"channels": 1, "image_size": 8, "num_classes": 10, "width": 16}
    with torch.no_grad():
        _, logits = net(to_model_range(data.holdout.images))
    acc = (logits.argmax(1).numpy() == data.holdout.labels).mean()
    assert acc == pytest.approx(m["accuracy"])


def test_feature_extractor_reads_torch_fidelity_input(digits, classifier):
    """uint8 [B, 3, H, W] (gray repeated), as torch-fidelity hands it, gives the network's own features."""
    data = load_dataset(digits)
    fe = ClassifierFeatureExtractor("ddpm-classifier", ["features", "logits"],
                                    feature_extractor_weights_path=str(classifier["weights"]))
    x = torch.from_numpy(data.holdout.images[:16])
    features, logits = fe(x.expand(-1, 3, -1, -1))
    want_features, want_logits = fe.net(to_model_range(x))
    assert features.shape == (16, 64) and logits.shape == (16, 10)
    torch.testing.assert_close(features, want_features)
    torch.testing.assert_close(logits, want_logits)


def test_classifier_refuses_unlabeled_data(tmp_path, tiny_config):
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("holdout", 10)):
        write_npz(tmp_path / f"{split}.npz", images=rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8),
                  labels=np.full(n, -1, dtype=np.int64))
    write_json(tmp_path / "dataset.json", {"dataset": "image-folder", "shape": [1, 8, 8], "num_classes": 0,
                                           "sha256": "0" * 64})
    with pytest.raises(StageError, match="evaluate.feature_extractor: inception-v3-compat"):
        train_classifier.run(tiny_config(), tmp_path, tmp_path / "c.pt", tmp_path / "c.json")
    assert not (tmp_path / "c.pt").exists()
    # evaluate's auto choice on unlabeled data is Inception, which needs its weights file.
    with pytest.raises(StageError, match=evaluate.INCEPTION_WEIGHTS_FILE):
        evaluate.run(tiny_config(), tmp_path, tmp_path, None, tmp_path / "ref", tmp_path / "eval.json")


# -- the metrics ----------------------------------------------------------------------------------------------------
def test_real_floor_is_small_and_noise_is_far(digits, classifier, noise, tmp_path, tiny_config):
    # KID subsets of 100 (not the tiny config's 10) so that its std separates the two cleanly.
    cfg = tiny_config({"sample.num_samples": 300, "evaluate.kid_subset_size": 100})
    m = evaluate_run(cfg, digits, noise, classifier, tmp_path / "ref", tmp_path / "eval.json")
    assert m["feature_extractor"] == "ddpm-classifier" and m["reference"] == "train"
    assert m["num_generated"] == 300 and m["num_reference"] == len(load_dataset(digits).train.labels)
    floor = m["floor"]
    assert floor["num_holdout"] == 300 and "note" not in floor  # the larger holdout is subsampled to 300
    assert 0 < floor["fid"] < 5
    assert m["fid"] > 50 * floor["fid"] and m["fid_ratio"] == pytest.approx(m["fid"] / floor["fid"])
    assert m["kid_mean"] - 3 * m["kid_std"] > floor["kid_mean"] + 3 * floor["kid_std"]
    assert m["classifier_accuracy"] == classifier["result"]["accuracy"]
    assert "isc_mean" not in m  # IS is off for grayscale data under isc: auto
    assert json.loads((tmp_path / "eval.json").read_text()) == m


def test_train_against_itself_is_zero_and_holdout_matches_floor(digits, classifier, tmp_path, tiny_config):
    data = load_dataset(digits)
    cfg = tiny_config()
    m = evaluate_run(cfg, digits, write_samples(tmp_path / "train", data.train.images), classifier,
                     tmp_path / "ref", tmp_path / "train.json")
    assert abs(m["fid"]) < 1e-6
    assert abs(m["kid_mean"]) < m["kid_std"]  # unbiased MMD^2 of one distribution: zero up to subset noise
    # Fewer held-out images than samples: all of the holdout, said so, both counts reported.
    n_hold = len(data.holdout.labels)
    assert m["num_generated"] == len(data.train.labels) and m["floor"]["num_holdout"] == n_hold
    assert f"holdout has {n_hold} images" in m["floor"]["note"]

    # Samples that ARE the holdout give exactly the floor.
    h = evaluate_run(cfg, digits, write_samples(tmp_path / "hold", data.holdout.images), classifier,
                     tmp_path / "ref", tmp_path / "hold.json")
    assert h["fid"] == pytest.approx(h["floor"]["fid"], rel=1e-9) and h["fid_ratio"] == pytest.approx(1.0)
    assert h["floor"]["fid"] == pytest.approx(m["floor"]["fid"], rel=1e-9)


def test_reference_statistics_are_cached_and_reused(digits, classifier, noise, tmp_path, capsys):
    """Through the command line's ``main``; the second run reads torch-fidelity's cache files untouched."""
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  kid_subset_size: 10\n")
    ref = tmp_path / "ref_stats"

    def cli(out: str) -> dict:
        return evaluate.main(["--params", str(params), "--data", str(digits), "--samples", str(noise),
                              "--classifier", str(classifier["weights"]), "--classifier-metrics",
                              str(classifier["metrics"]), "--ref-dir", str(ref), "--out", str(tmp_path / out)])

    first = cli("a.json")
    n_train = len(load_dataset(digits).train.labels)
    assert f"reference statistics of the train split ({n_train} images) computed" in capsys.readouterr().out
    files = {p.name: p.stat().st_mtime_ns for p in ref.iterdir()}
    assert any("-stat-fid-" in name for name in files) and all(first["reference_key"] in n for n in files)

    second = cli("b.json")
    assert "reused from" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in ref.iterdir()} == files
    assert second == first
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


# -- errors ---------------------------------------------------------------------------------------------------------
def test_kid_needs_kid_subset_size_samples(digits, classifier, tmp_path, tiny_config):
    few = write_samples(tmp_path / "few", load_dataset(digits).holdout.images[:5])
    with pytest.raises(StageError, match=r"5 samples, fewer than evaluate.kid_subset_size=10"):
        evaluate_run(tiny_config(), digits, few, classifier, tmp_path / "ref", tmp_path / "eval.json")
    assert not (tmp_path / "eval.json").exists()
    # Without KID the same five samples are enough for FID.
    m = evaluate_run(tiny_config({"evaluate.kid": False}), digits, few, classifier, tmp_path / "ref",
                     tmp_path / "eval.json")
    assert "kid_mean" not in m and m["fid"] > 0


def test_inception_without_weights_is_one_line_exit_2(digits, noise, tmp_path, repo_root):
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  feature_extractor: inception-v3-compat\n")
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.evaluate", "--params", str(params), "--data", str(digits), "--samples",
         str(noise), "--ref-dir", str(tmp_path / "ref"), "--out", str(tmp_path / "eval.json")],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert evaluate.INCEPTION_WEIGHTS_FILE in lines[0] and "evaluate.inception_weights" in lines[0]
    assert not (tmp_path / "eval.json").exists()
