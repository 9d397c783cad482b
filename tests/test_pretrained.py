"""``train.pretrained``: a published model (a diffusers DDPMPipeline folder) through the pipeline's stages without
training. The train stage imports it as the run's checkpoint; ``python -m tasks.sample`` and ``tasks.evaluate`` read
it as any checkpoint (docs/diffusers.md "Use a published model").

The published model is google/ddpm-cifar10-32's layout made tiny (conftest.TINY_DIFFUSERS_UNET: 1x8x8, attention at
4x4, GroupNorm eps 1e-6) with random N(0, 0.02) weights, saved by diffusers itself; the data are the digits."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, TINY_DIFFUSERS_UNET, save_diffusers_pipeline
from ddpm.checkpoint import list_checkpoints
from ddpm.pretrained import load_model
from ddpm.unet import UNetConfig, count_parameters
from tasks import fetch, train_classifier
from tasks.lib.config import load_config
from tasks.lib.samples import load_samples

pytestmark = pytest.mark.slow

# The tiny published layout in this project's terms (what the imported checkpoint must carry): ch 8 x (1, 2), one
# ResNet block per level, attention at 4x4, 4 groups, the paper's epsilon.
PUBLISHED = UNetConfig(image_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                       dropout=0.0, num_groups=4, norm_eps=1e-6)


def _stage(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_STAGE", "DVC_ROOT", "RAY_ADDRESS")}
    r = subprocess.run([sys.executable, "-m", *args], cwd=project, capture_output=True, text=True, timeout=600,
                       env={**env, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder in the pipeline's layout: params.yaml (the tests' tiny params with train.pretrained naming a
    published-layout folder whose scheduler has the params' T = 100), the digits (data/dataset) and their FID
    classifier (models/), as the fetch and train_classifier stages write them."""
    from conftest import TINY

    root = tmp_path_factory.mktemp("pretrained")
    published = root / "ddpm-tiny"
    unet = save_diffusers_pipeline(published, scheduler={"num_train_timesteps": 100})
    params = json.loads(json.dumps(TINY))
    params["train"]["pretrained"] = "ddpm-tiny"  # relative to the project folder, as a user writes it
    params["ray"]["storage"] = str(root / "ray")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(root / "params.yaml")
    fetch.run(cfg, root / "data" / "dataset")
    train_classifier.run(cfg, root / "data" / "dataset", root / "models" / "classifier.pt",
                         root / "metrics" / "classifier.json")
    return root, unet


def test_a_published_model_is_sampled_and_evaluated_without_training(project):
    root, unet = project
    r = _stage(root, "tasks.train", "--params", "params.yaml", "--data", "data/dataset", "--checkpoints",
               "checkpoints", "--log", "metrics/train_loss.tsv", "--metrics", "metrics/train.json")
    assert "not trained" in r.stdout and "replaced" not in r.stdout  # a new folder: checkpoints/ did not exist
    # The params' model section (ch 16, 8 groups, eps 1e-5) is not the published model's: said, and not used.
    assert "model.ch 16 (model: 8)" in r.stdout
    # diffusers' default scheduler samples with fixed_small; the params (fixedlarge) decide, and the stage says so
    assert "sample.variance fixedlarge (its scheduler's: fixedsmall)" in r.stdout
    ckpts = list_checkpoints(root / "checkpoints")
    assert [s for s, _ in ckpts] == [0]
    train = json.loads((root / "metrics" / "train.json").read_text())
    assert train["pretrained"] == "ddpm-tiny" and train["trained"] is False and train["steps"] == 0
    assert train["source"] == str((root / "ddpm-tiny").resolve())
    assert train["parameters"] == sum(p.numel() for p in unet.parameters())
    assert train["params_not_used"] == {"model.ch": [16, 8], "model.num_groups": [8, 4], "model.norm_eps": [1e-5, 1e-6]}
    assert train["diffusion"]["schedule"] == "linear" and train["diffusion"]["timesteps"] == 100
    with open(root / "metrics" / "train_loss.tsv") as f:  # the loss log DVC declares: a header, no rows
        assert list(csv.reader(f, delimiter="\t")) == [["step", "loss", "lr", "grad_norm", "images_per_s"]]

    # The checkpoint is the published model in this project's terms: its own config, the same predictions.
    model, diffusion, state = load_model(ckpts[0][1])
    assert model.config == PUBLISHED and count_parameters(model) == train["parameters"]
    assert diffusion.num_timesteps == 100 and state["config"]["diffusers"]["variance"] == "fixedsmall"
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 10, 50, 99])
    with torch.no_grad():
        ours, theirs = model(x, t), unet(x, t).sample
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5

    # A rerun imports the same bytes (the sample stage's key, the checkpoint's hash, keeps its shards), and replaces
    # the checkpoints of an earlier training: the newest checkpoint must be the published model.
    first = hashlib.sha256(ckpts[0][1].read_bytes()).hexdigest()
    (root / "checkpoints" / "ckpt_00000500.pt").write_bytes(b"a checkpoint of an earlier training")
    r = _stage(root, "tasks.train", "--params", "params.yaml")
    assert "replaced 1 checkpoint(s) of an earlier run" in r.stdout
    assert [s for s, _ in list_checkpoints(root / "checkpoints")] == [0]
    assert hashlib.sha256(ckpts[0][1].read_bytes()).hexdigest() == first
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["ckpt_00000000.pt", "config.json",
                                                                        "run_key.json"]

    _stage(root, "tasks.sample", "--params", "params.yaml", "--checkpoints", "checkpoints", "--out", "samples")
    samples = json.loads((root / "samples" / "samples.json").read_text())
    assert samples["count"] == 24 and samples["checkpoint_step"] == 0
    assert Path(samples["checkpoint"]).name == "ckpt_00000000.pt"
    images, seeds = load_samples(root / "samples")
    assert images.dtype == np.uint8 and images.shape == (24, 1, 8, 8) and seeds.tolist() == list(range(24))
    assert len({img.tobytes() for img in images}) == 24  # one image per seed, not one image repeated

    _stage(root, "tasks.evaluate", "--params", "params.yaml", "--data", "data/dataset", "--samples", "samples",
           "--classifier", "models/classifier.pt", "--classifier-metrics", "metrics/classifier.json",
           "--ref-dir", "ref_stats", "--out", "metrics/eval.json")
    ev = json.loads((root / "metrics" / "eval.json").read_text())
    assert ev["num_generated"] == 24 and ev["feature_extractor"] == "ddpm-classifier"
    assert ev["provenance"]["checkpoint"]["step"] == 0
    assert Path(ev["provenance"]["checkpoint"]["path"]).name == "ckpt_00000000.pt"
    # Random weights draw noise, not digits: a finite FID far above the real-vs-real floor at the same count.
    assert np.isfinite(ev["fid"]) and np.isfinite(ev["floor"]["fid"])
    assert ev["fid"] > 3 * ev["floor"]["fid"], (ev["fid"], ev["floor"]["fid"])

    # The figures of the published model; its loss.png says that nothing was trained (the log has no rows).
    _stage(root, "tasks.figures", "--params", "params.yaml", "--set", "figures.enabled=true", "--checkpoints",
           "checkpoints", "--data", "data/dataset", "--loss-log", "metrics/train_loss.tsv", "--out", "figures")
    figures = json.loads((root / "figures" / "figures.json").read_text())
    assert figures["checkpoint_step"] == 0 and figures["loss"]["points"] == 0
    assert figures["loss"]["note"] == "no training: the published model ddpm-tiny was imported (train.pretrained)"
    assert all((root / "figures" / name).stat().st_size > 0 for name in ("loss.png", "progressive.png",
                                                                          "denoising.gif"))
