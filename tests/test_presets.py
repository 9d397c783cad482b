"""The shipped params: params.yaml is the digits preset, and the cifar10 preset holds the paper's settings."""

from __future__ import annotations

import pytest

from ddpm.config import load_config
from ddpm.unet import UNet, count_parameters


@pytest.mark.parametrize("name", ["digits", "digits-best", "cifar10"])
def test_every_preset_validates(repo_root, name):
    cfg = load_config(repo_root / "configs" / f"{name}.yaml")
    assert cfg.sample.num_samples >= cfg.evaluate.kid_subset_size


def test_params_yaml_is_the_digits_preset(repo_root):
    assert load_config(repo_root / "params.yaml") == load_config(repo_root / "configs" / "digits.yaml")


def test_cifar10_preset_is_the_papers_run(repo_root):
    cfg = load_config(repo_root / "configs" / "cifar10.yaml")
    assert count_parameters(UNet.from_config(cfg.unet_config())) == 35_746_307
    assert (cfg.data.dataset, cfg.data.shape) == ("cifar10", (3, 32, 32))
    assert (cfg.diffusion.schedule, cfg.diffusion.timesteps, cfg.diffusion.beta_start, cfg.diffusion.beta_end,
            cfg.diffusion.objective) == ("linear", 1000, 1e-4, 0.02, "eps")
    t = cfg.train
    assert (t.lr, t.warmup_steps, t.batch_size, t.grad_clip, t.ema_decay, t.random_flip, t.steps) == (
        2e-4, 5000, 128, 1.0, 0.9999, True, 800_000)
    assert t.lr_schedule == "constant" and cfg.model.dropout == 0.1
    assert (cfg.sample.sampler, cfg.sample.variance, cfg.sample.num_samples) == ("ddpm", "fixedlarge", 50_000)
    assert cfg.evaluate.feature_extractor == "inception-v3-compat"
