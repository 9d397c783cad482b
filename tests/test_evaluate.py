"""The classifier feature extractor and the evaluate stage on the real digits dataset (offline, CPU).

One digits dataset (the fetch stage's output) and one classifier trained with the DEFAULT classifier config are
shared by the module: the default must reach the accuracy the pipeline promises, and the FID tests need a
classifier good enough for its features to separate digits from noise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.lib.config import load_config
from tasks import evaluate, fetch, train_classifier
from tasks.lib import refstats, scoring
from tasks.lib.classifier import ClassifierFeatureExtractor, load_classifier
from tasks.lib.shards import load_dataset, write_dataset
from tasks.lib.shards import Split
from tasks.lib.errors import StageError
from tasks.lib.files import sha256_file, write_json, write_npz
from tasks.lib.images import to_model_range


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
    """Train through the command line's ``main`` with the default classifier section (an empty file is refused)."""
    work = tmp_path_factory.mktemp("classifier")
    (work / "params.yaml").write_text("classifier: {}\n")
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


def test_classifier_on_unlabeled_data_is_skipped_or_refused(tmp_path, tiny_config):
    rng = np.random.default_rng(0)
    train, holdout = (Split(rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8), np.full(n, -1, dtype=np.int64))
                      for n in (40, 10))
    write_dataset(tmp_path, train, holdout, {"dataset": "image-folder", "num_classes": 0})
    # feature_extractor auto picks Inception for unlabeled data, so nothing reads a classifier: none is trained.
    metrics = train_classifier.run(tiny_config(), tmp_path, tmp_path / "c.pt", tmp_path / "c.json")
    assert metrics == {"skipped": True, "reason": "not needed: FID/KID/IS of 1x8x8 image-folder images use "
                       "inception-v3-compat features (evaluate.feature_extractor: auto), not the classifier's"}
    # Asked for explicitly, the classifier cannot be trained without labels: refused, nothing written.
    with pytest.raises(StageError, match="evaluate.feature_extractor: inception-v3-compat"):
        train_classifier.run(tiny_config({"evaluate.feature_extractor": "classifier"}), tmp_path,
                             tmp_path / "c2.pt", tmp_path / "c2.json")
    assert not (tmp_path / "c2.pt").exists()
    # evaluate's auto choice on unlabeled data is Inception, which needs its weights file.
    with pytest.raises(StageError, match=scoring.INCEPTION_WEIGHTS_FILE):
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
    """Through the command line's ``main``; the second run reads the keyed entry, untouched."""
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  kid_subset_size: 10\n  repeats: 1\ntracking:\n  enabled: false\n")
    ref = tmp_path / "ref_stats"

    def cli(out: str) -> dict:
        return evaluate.main(["--params", str(params), "--data", str(digits), "--samples", str(noise),
                              "--classifier", str(classifier["weights"]), "--classifier-metrics",
                              str(classifier["metrics"]), "--ref-dir", str(ref), "--out", str(tmp_path / out)])

    first = cli("a.json")
    data = load_dataset(digits)
    n_train = len(data.train.labels)
    out = capsys.readouterr().out
    assert f"recomputing the reference statistics of the train split ({n_train} images): no reference " in out
    files = {p.name: p.stat().st_mtime_ns for p in ref.iterdir()}
    key = first["reference_key"]
    assert set(files) == {f"{key}.npz", f"{key}.json"} and key.startswith("digits-train-1x8x8-ddpm-classifier-")
    prov = json.loads((ref / f"{key}.json").read_text())
    assert prov["dataset_sha256"] == data.meta["sha256"] and prov["split"] == "train"
    assert prov["image_shape"] == [1, 8, 8] and prov["num_images"] == n_train == first["num_reference"]
    assert prov["feature_extractor"] == "ddpm-classifier" and prov["feature_layer"] == "features"
    assert prov["feature_extractor_weights_sha256"] == sha256_file(classifier["weights"])
    assert prov["preprocessing"] == scoring.PREPROCESSING["ddpm-classifier"]
    assert set(prov["libraries"]) == {"python", "numpy", "torch", "torch_fidelity"}
    with np.load(ref / f"{key}.npz") as z:  # the statistics are those of the train split's features
        feats = z["features"]
        assert feats.shape == (n_train, 64) and z["mu"] == pytest.approx(feats.astype(np.float64).mean(0))

    second = cli("b.json")
    assert f"reused from {ref / key}.npz" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in ref.iterdir()} == files
    assert second == first
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def _restamp(ref: Path, key: str, **changes) -> str:
    """Rewrite cache entry ``key`` as if computed under other key fields (``changes``); returns its new name."""
    prov = json.loads((ref / f"{key}.json").read_text())
    prov.update(changes)
    prov["key"] = refstats.key_of(prov)
    name = refstats.entry_name(prov)
    (ref / f"{key}.npz").rename(ref / f"{name}.npz")
    (ref / f"{key}.json").unlink()
    write_json(ref / f"{name}.json", prov)
    return name


def test_stale_cache_other_image_size_or_dataset_is_recomputed(digits, classifier, noise, tmp_path, tiny_config,
                                                               capsys):
    cfg = tiny_config({"evaluate.kid": False})
    ref = tmp_path / "ref"
    first = evaluate_run(cfg, digits, noise, classifier, ref, tmp_path / "a.json")
    capsys.readouterr()

    # The only entry is (now) one of 16x16 images: never used, recomputed, the differing field named.
    stale = _restamp(ref, first["reference_key"], image_shape=[1, 16, 16])
    again = evaluate_run(cfg, digits, noise, classifier, ref, tmp_path / "b.json")
    out = capsys.readouterr().out
    assert f"recomputing the reference statistics" in out and f"nearest cached entry {stale}.npz differs in " \
        "image_shape: 1x16x16 there, 1x8x8 here" in out
    assert again["reference_key"] == first["reference_key"] and again["fid"] == first["fid"]
    assert (ref / f"{stale}.npz").is_file()  # the other entry stays: it is another key

    # Another version of the dataset (other content hash): the same key fields but the hash, recomputed.
    other = tmp_path / "other"
    shutil.copytree(digits, other)
    meta = json.loads((other / "dataset.json").read_text())
    meta["sha256"] = "f" * 64
    write_json(other / "dataset.json", meta)
    moved = evaluate_run(cfg, other, noise, classifier, ref, tmp_path / "c.json")
    out = capsys.readouterr().out
    assert f"differs in dataset_sha256: {load_dataset(digits).meta['sha256'][:16]} there, {'f' * 16} here" in out
    assert moved["reference_key"] != first["reference_key"] and moved["provenance"]["reference"]["dataset_sha256"] \
        == "f" * 64
    assert len(refstats.entries(ref)) == 3

    # An entry whose content changed after it was written is not used either.
    np.savez(ref / f"{first['reference_key']}.npz", mu=np.zeros(64), sigma=np.eye(64), features=np.zeros((5, 64)))
    evaluate_run(cfg, digits, noise, classifier, ref, tmp_path / "d.json")
    assert "its content changed since it was written" in capsys.readouterr().out
    assert json.loads((tmp_path / "d.json").read_text())["fid"] == first["fid"]


def test_published_reference_is_accepted_and_a_mismatching_one_refused(digits, classifier, noise, tmp_path,
                                                                        tiny_config, capsys):
    cfg = tiny_config({"evaluate.kid": False})
    ref = tmp_path / "ref"
    own = evaluate_run(cfg, digits, noise, classifier, ref, tmp_path / "own.json")
    published = tmp_path / "pub" / "digits-ref.npz"
    assert refstats.main(["export", "--ref-dir", str(ref), "--out", str(published)])["exported_from"] == \
        f"{own['reference_key']}.npz"
    with np.load(published) as z:
        assert sorted(z.files) == ["mu", "sigma"] and z["sigma"].shape == (64, 64)
    prov = json.loads(published.with_suffix(".json").read_text())
    assert prov["num_images"] == own["num_reference"] and prov["image_shape"] == [1, 8, 8]

    # Accepted: the same FID and floor as with the cached statistics; the provenance says where it came from.
    pub_cfg = tiny_config({"evaluate.kid": False, "evaluate.reference": str(published)})
    m = evaluate_run(pub_cfg, digits, noise, classifier, tmp_path / "unused", tmp_path / "pub.json")
    assert m["fid"] == pytest.approx(own["fid"], rel=1e-12) and m["floor"]["fid"] == pytest.approx(own["floor"]["fid"])
    assert m["reference"] == str(published) and m["provenance"]["reference"]["published"] is True
    assert m["num_reference"] == own["num_reference"] and not (tmp_path / "unused").exists()

    # Refused: provenance of another image size (one clear line naming the field), another feature size, KID on.
    prov["image_shape"] = [3, 32, 32]
    write_json(published.with_suffix(".json"), prov)
    with pytest.raises(StageError, match=r"does not match this evaluation \(image_shape: 3x32x32 there, 1x8x8 here"):
        evaluate_run(pub_cfg, digits, noise, classifier, tmp_path / "unused", tmp_path / "bad.json")
    bare = tmp_path / "edm-style.npz"  # no provenance beside it: only its size is checked
    np.savez(bare, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(StageError, match="statistics of 2048 features, the ddpm-classifier extractor gives 64"):
        evaluate_run(tiny_config({"evaluate.kid": False, "evaluate.reference": str(bare)}), digits, noise, classifier,
                     tmp_path / "unused", tmp_path / "bad.json")
    with pytest.raises(StageError, match="KID and precision/recall need the reference features"):
        evaluate_run(tiny_config({"evaluate.reference": str(published)}), digits, noise, classifier,
                     tmp_path / "unused", tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


def test_repeats_give_k_values_from_disjoint_seed_ranges(digits, classifier, tmp_path, tiny_config, monkeypatch):
    """Three ranges of 100 seeds: each value is the metric of that range alone; mean, std, min; MLflow has them."""
    from mlflow import MlflowClient

    from tasks.lib.callbacks import TRACKING_BY_ENV, after_stage

    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", TRACKING_BY_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    train_images = load_dataset(digits).train.images
    images = np.concatenate([train_images[:100], train_images[100:200] // 2, 255 - train_images[200:300]])
    samples = write_samples(tmp_path / "samples", images, shard_size=90)  # shards need not align with repeats
    write_json(samples / "samples.json", {"sampler": "ddim", "steps": 100, "eta": 1.0, "use_ema": True,
                                          "checkpoint": "checkpoints/ckpt_00001500.pt", "checkpoint_step": 1500})
    # Feature batches of 100 = one repeat: each range's features come from the same computation as its run alone
    # (oneDNN picks kernels per batch size, so a batch of 250 across two ranges could move their last bits).
    cfg = tiny_config({"evaluate.repeats": 3, "sample.num_samples": 100, "tracking.enabled": True,
                       "evaluate.batch_size": 100})
    m = evaluate_run(cfg, digits, samples, classifier, tmp_path / "ref", tmp_path / "eval.json")
    # what the stage's command line does next: the installed trackers (MLflow) read and log eval.json
    after_stage("evaluate", cfg, eval_metrics=tmp_path / "eval.json", samples=samples,
                samples_record=samples / "samples.json", dataset_record=digits / "dataset.json")

    alone = [evaluate_run(tiny_config({"sample.num_samples": 100, "evaluate.batch_size": 100}), digits,
                          write_samples(tmp_path / f"alone{i}", images[100 * i:100 * (i + 1)]), classifier,
                          tmp_path / "ref", tmp_path / f"alone{i}.json") for i in range(3)]
    fid = m["per_repeat"]["fid"]
    assert fid["values"] == pytest.approx([a["fid"] for a in alone], rel=1e-9)
    assert len(set(fid["values"])) == 3 and fid["min"] == min(fid["values"])
    assert fid["mean"] == pytest.approx(np.mean(fid["values"])) == m["fid"]
    assert fid["std"] == pytest.approx(np.std(fid["values"], ddof=1))
    assert m["per_repeat"]["kid_mean"]["values"] == pytest.approx([a["kid_mean"] for a in alone], rel=1e-9)
    assert alone[0]["per_repeat"]["fid"]["std"] is None and alone[0]["repeats"] == 1
    assert m["num_generated"] == 100 and m["floor"]["num_holdout"] == min(100, len(load_dataset(digits).holdout.labels))

    p = m["provenance"]
    assert p["seed_ranges"] == [[0, 99], [100, 199], [200, 299]] and p["seed_range"] == [0, 299]
    assert (p["num_generated"], p["num_generated_total"], p["repeats"]) == (100, 300, 3)
    assert (p["sampler"], p["steps"], p["eta"]) == ("ddim", 100, 1.0)
    assert p["checkpoint"] == {"path": "checkpoints/ckpt_00001500.pt", "step": 1500, "ema": True}
    assert p["feature_extractor"]["name"] == "ddpm-classifier"
    assert p["feature_extractor"]["weights_sha256"] == sha256_file(classifier["weights"])
    assert p["libraries"]["torch"] == torch.__version__ and p["libraries"]["numpy"] == np.__version__
    assert p["num_reference"] == m["num_reference"] == len(load_dataset(digits).train.labels)

    # MLflow: the mean as the metric, each repeat, std and min, the provenance as tags, at the checkpoint's step.
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    metrics, tags = run.data.metrics, run.data.tags
    assert metrics["trained/fid"] == pytest.approx(fid["mean"])
    assert metrics["trained/repeats/fid_min"] == pytest.approx(fid["min"])
    assert [metrics[f"trained/repeats/fid_r{i}"] for i in range(3)] == pytest.approx(fid["values"])
    assert metrics["trained/repeats/fid_std"] == pytest.approx(fid["std"])
    assert [h.step for h in client.get_metric_history(run.info.run_id, "trained/repeats/fid_r2")] == [1500]
    assert json.loads(tags["eval.seed_ranges"]) == p["seed_ranges"] and tags["eval.sampler"] == "ddim"
    assert tags["eval.checkpoint.step"] == "1500" and tags["eval.feature_extractor.weights_sha256"] == \
        p["feature_extractor"]["weights_sha256"]
    assert tags["eval.libraries.torch_fidelity"] == p["libraries"]["torch_fidelity"]

    # Samples that are not k ranges of sample.num_samples are refused.
    with pytest.raises(StageError, match=r"300 samples; evaluate.repeats=3 needs 3 x sample.num_samples=50 = 150"):
        evaluate_run(tiny_config({"evaluate.repeats": 3, "sample.num_samples": 50}), digits, samples, classifier,
                     tmp_path / "ref", tmp_path / "bad.json")


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
    assert scoring.INCEPTION_WEIGHTS_FILE in lines[0] and "evaluate.inception_weights" in lines[0]
    assert not (tmp_path / "eval.json").exists()


def test_inception_weights_are_pinned_checked_and_read_without_pickle(digits, noise, tmp_path, tiny_config):
    # The published file's SHA-256 (its name carries the first 8 hex digits, torch.hub's convention).
    assert tiny_config().evaluate.inception_sha256.startswith(scoring.INCEPTION_WEIGHTS_FILE.split("-")[-1][:8])
    fake = tmp_path / scoring.INCEPTION_WEIGHTS_FILE
    torch.save({"fc.weight": torch.randn(4, 4), "fc.bias": torch.randn(4)}, fake)
    actual = sha256_file(fake)
    over = {"evaluate.feature_extractor": "inception-v3-compat", "evaluate.inception_weights": str(fake)}

    # Wrong hash: the file, the expected and the actual hash in one message, before any sample is read.
    cfg = tiny_config(over)
    with pytest.raises(StageError) as e:
        evaluate.run(cfg, digits, tmp_path / "no-samples", None, tmp_path / "ref", tmp_path / "eval.json")
    assert str(fake) in str(e.value) and actual in str(e.value) and cfg.evaluate.inception_sha256 in str(e.value)
    # The expected hash overridden to this file's: it loads (weights_only) but does not fit the network.
    with pytest.raises(StageError, match=r"does not fit torch-fidelity's Inception-v3 \(\d+ missing tensors \(e.g. "
                       r"Conv2d_1a_3x3.conv.weight\); fc.weight: shape \(4, 4\), expected \(1008, 2048\)"):
        evaluate.run(tiny_config({**over, "evaluate.inception_sha256": actual}), digits, noise, None,
                     tmp_path / "ref", tmp_path / "eval.json")
    assert not (tmp_path / "eval.json").exists()
    # A pickle that would build an arbitrary object is refused by weights_only=True, whatever its hash.
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "meta": argparse.Namespace(run="code")}, evil)
    with pytest.raises(StageError, match=r"does not load as plain tensors with weights_only=True"):
        scoring.VerifiedInceptionV3(scoring.INCEPTION_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(evil),
                                     expected_sha256=sha256_file(evil))


def test_verified_inception_gives_torch_fidelity_features(digits, tmp_path):
    """A random-weights file of the right shapes (its own hash pinned): read with weights_only=True it gives the
    features torch-fidelity's own loader gives from the same file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = tmp_path / "random-inception.pth"
    assert scoring.write_random_inception_weights(weights) == sha256_file(weights)

    ours = scoring.VerifiedInceptionV3(scoring.INCEPTION_EXTRACTOR, ["2048"], str(weights),
                                        expected_sha256=sha256_file(weights))
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    x = torch.from_numpy(load_dataset(digits).holdout.images[:2]).expand(-1, 3, -1, -1)
    with torch.no_grad():
        (f_ours,), (f_theirs,) = ours(x), theirs(x)
    assert f_ours.shape == (2, 2048) and f_ours.abs().sum() > 0
    torch.testing.assert_close(f_ours, f_theirs, rtol=0, atol=0)
