"""The shipped params: params.yaml is the digits preset (and the config classes' defaults, tests/test_config.py), the
presets in configs/ the other datasets'; the cifar10 preset holds the paper's settings."""

from __future__ import annotations

import pytest

from tasks.lib.config import load_config
from ddpm.unet import UNet, count_parameters


@pytest.mark.parametrize("name", ["digits-best", "cifar10", "celebahq256", "lsun256", "fashion-mnist"])
def test_every_preset_validates(repo_root, name):
    cfg = load_config(repo_root / "configs" / f"{name}.yaml")
    assert cfg.sample.num_samples >= cfg.evaluate.kid_subset_size


def test_params_yaml_is_the_one_digits_preset(repo_root):
    """No second copy of the digits preset: params.yaml is it (a copy would be a second home for every value)."""
    assert sorted(p.stem for p in (repo_root / "configs").glob("*.yaml")) == [
        "celebahq256", "cifar10", "digits-best", "fashion-mnist", "lsun256"]
    assert load_config(repo_root / "params.yaml").data.dataset == "digits"


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


@pytest.mark.parametrize("name", ["celebahq256", "lsun256"])
def test_256_presets_are_the_papers_model(repo_root, name):
    """The paper's 256x256 model (Appendix B): 113,673,219 parameters by our UNet, the paper's ~114M."""
    import torch

    cfg = load_config(repo_root / "configs" / f"{name}.yaml")
    with torch.device("meta"):  # shapes only: no 450 MB of weights for a count
        assert count_parameters(UNet.from_config(cfg.unet_config())) == 113_673_219
    m, t, d = cfg.model, cfg.train, cfg.diffusion
    assert (cfg.data.dataset, cfg.data.shape) == ("image-folder", (3, 256, 256))
    assert (m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout) == (
        128, (1, 1, 2, 2, 4, 4), 2, (16,), 0.0)
    assert (t.lr, t.batch_size, t.ema_decay, t.random_flip) == (2e-5, 64, 0.9999, True)
    assert (d.schedule, d.timesteps, d.beta_start, d.beta_end, d.objective) == ("linear", 1000, 1e-4, 0.02, "eps")
    assert cfg.evaluate.feature_extractor == "inception-v3-compat" and not cfg.sampler_table.enabled


def test_fashion_mnist_preset_is_28x28x1(repo_root):
    cfg = load_config(repo_root / "configs" / "fashion-mnist.yaml")
    assert (cfg.data.dataset, cfg.data.shape) == ("fashion-mnist", (1, 28, 28))
    assert cfg.evaluate.feature_extractor == "classifier"
    assert cfg.sample.num_samples == 10_000  # the official test split


def test_demo_params_turn_figures_and_sampler_table_on(repo_root):
    cfg = load_config(repo_root / "params.yaml")
    assert cfg.figures.enabled and cfg.sampler_table.enabled
    assert cfg.sampler_table.ddpm and cfg.sampler_table.ddim_steps == (10, 20, 50)
    assert cfg.sampler_table.solvers == ("dpm++2m", "unipc", "dpm++2m-sde")
    assert cfg.sampler_table.solver_steps == (5, 10, 20, 50) and cfg.sampler_table.bootstrap > 0
    # the defaults the solver study chose (benchmarks/results/solver_study.json)
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.timestep_spacing) == ("dpm++2m-sde", 20, "trailing")
    assert (cfg.tracking.grid_sampler, cfg.tracking.grid_steps) == ("dpm++2m-sde", 10)
    assert cfg.sample.mode == "generate"


# -- ddpm info --------------------------------------------------------------------------------------------------------
def test_info_counts_params_flops_and_memory(repo_root):
    from tasks.lib.info import activation_bytes, count_flops, info

    cfg = load_config(repo_root / "configs" / "cifar10.yaml")
    d = info(cfg)
    n = 35_746_307
    assert d["parameters"] == n
    f = d["flops_per_image"]
    assert 11e9 < f["forward"] < 14e9  # ~6.1 GMACs, the usual figure for this network
    assert f["train_step"] == 3 * f["forward"]
    counted = count_flops(load_config(repo_root / "params.yaml"), backward=True)  # backward really is ~2x forward
    assert 2.9 < counted["train_step"] / counted["forward"] < 3.1
    assert f["sample"] == 1000 * f["forward"]  # Algorithm 2: T network evaluations
    m = d["memory_bytes_per_worker"]
    assert (m["weights"], m["gradients"], m["adam_moments"], m["ema"]) == (4 * n, 4 * n, 8 * n, 4 * n)
    # Activations grow with the per-worker batch: half the batch per worker with two workers.
    assert m["activations"] > 10 * m["weights"]
    digits = load_config(repo_root / "params.yaml")
    ratio = activation_bytes(digits, 128) / activation_bytes(digits, 64)  # twice the batch, ~twice the memory
    assert 1.9 < ratio < 2.1
    assert m["total"] == sum(v for k, v in m.items() if k != "total")


def test_ddpm_info_command(repo_root, capsys, tmp_path):
    import tomllib

    from tasks.lib.info import cli

    scripts = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ddpm"] == "tasks.lib.info:cli"
    assert cli(["info", "--params", str(repo_root / "configs" / "celebahq256.yaml")]) == 0
    out = capsys.readouterr().out
    assert "parameters   113,673,219" in out and "3x256x256" in out and "Adam m, v" in out
    assert cli(["info", "--params", str(repo_root / "params.yaml"), "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["parameters"] == 1_062_497
    assert cli(["info", "--params", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip().endswith("missing.yaml: params file not found")
    assert cli(["infoo"]) == 2
