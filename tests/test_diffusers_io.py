"""diffusers' format in and out (ddpm/diffusers_io.py, ddpm/pretrained.py, `ddpm import-diffusers` and
`ddpm export-diffusers`), with real diffusers objects: published layouts import and predict what diffusers predicts,
a trained checkpoint exports to a folder DDPMPipeline loads and runs, and every layout our UNet cannot express is
refused naming its key."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_DIFFUSERS_UNET, save_diffusers_pipeline
from ddpm.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from ddpm.diffusers_io import (DiffusersFormatError, UnsupportedLayout, diffusers_unet_kwargs, diffusion_from_scheduler,
                               unet_config_from_diffusers)
from ddpm.pretrained import from_diffusers, import_diffusers, load_model, read_diffusers, to_diffusers, write_diffusers
from ddpm.unet import UNet, count_parameters
from tasks.lib.config import load_config

# google/ddpm-cifar10-32's UNet, as published: huggingface.co/google/ddpm-cifar10-32/blob/main/config.json
CIFAR10_32_UNET = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# huggingface.co/google/ddpm-cifar10-32/blob/main/scheduler_config.json
CIFAR10_32_SCHEDULER = {
    "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.0", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
    "variance_type": "fixed_large",
}
# The 256x256 six-level layout, attention at 16x16 (level 4): huggingface.co/google/ddpm-ema-church-256/blob/main/
# config.json, the same in google/ddpm-ema-celebahq-256 and google/ddpm-ema-bedroom-256.
CHURCH_256_UNET = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 128, 256, 256, 512, 512], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}
# huggingface.co/google/ddpm-ema-church-256/blob/main/scheduler_config.json (timestep_values: a key of diffusers 0.0.4)
CHURCH_256_SCHEDULER = {
    "_class_name": "DDPMScheduler", "_diffusers_version": "0.0.4", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "timestep_values": None,
    "trained_betas": None, "variance_type": "fixed_small",
}
RTOL = 1e-5  # max |ours - diffusers'| / max |diffusers'|


def published(dest: Path, unet: dict, scheduler: dict, seed: int = 0):
    """A DDPMPipeline folder of a published layout with N(0, 0.02) weights, its config files verbatim as published
    (diffusers' own save writes every default; the published files leave most out)."""
    model = save_diffusers_pipeline(dest, unet, scheduler, seed=seed)
    (dest / "unet" / "config.json").write_text(json.dumps(unet))
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return model


def rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@torch.no_grad()
def predictions(ours: UNet, theirs, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ours(x, t), theirs(x, t).sample


# -- import: the published layouts -----------------------------------------------------------------------------------
def test_cifar10_32_imports_and_predicts_what_diffusers_predicts(tmp_path, repo_root):
    theirs = published(tmp_path / "ddpm-cifar10-32", CIFAR10_32_UNET, CIFAR10_32_SCHEDULER)
    read = read_diffusers(tmp_path / "ddpm-cifar10-32")
    assert count_parameters(read.model) == count_parameters(theirs) == 35_746_307
    # The published network is the cifar10 preset's (the paper's), norm_eps included; the published config leaves
    # dropout out (diffusers' default 0.0), which only training uses.
    preset = load_config(repo_root / "configs" / "cifar10.yaml")
    assert replace(read.model.config, dropout=0.1) == preset.unet_config()
    assert read.diffusion_config == {**preset.diffusion.model_dump()}
    assert read.hints == {"variance": preset.sample.variance, "clip_denoised": True}  # fixed_large: beta_t
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 10, 500, 999])
    ours, ref = predictions(read.model, theirs, x, t)
    assert rel_diff(ours, ref) < RTOL
    # The test can fail: the same weights with torch's GroupNorm epsilon predict measurably otherwise.
    other = UNet.from_config(replace(read.model.config, norm_eps=1e-5)).eval()
    other.load_state_dict(read.model.state_dict())
    assert rel_diff(predictions(other, theirs, x, t)[0], ref) > 100 * RTOL


def test_256_six_level_layout_imports_and_predicts_what_diffusers_predicts(tmp_path, repo_root):
    """The exact published 256x256 config, not a smaller stand-in, at batch 2."""
    theirs = published(tmp_path / "ddpm-ema-church-256", CHURCH_256_UNET, CHURCH_256_SCHEDULER)
    model, diffusion = from_diffusers(tmp_path / "ddpm-ema-church-256")
    assert model.config == load_config(repo_root / "configs" / "lsun256.yaml").unet_config()
    assert model.config.attn_resolutions == (16,) and count_parameters(model) == 113_673_219
    # diffusers' float32 linspace and our float64 one agree to float32 round-off
    want = torch.linspace(1e-4, 0.02, 1000)
    assert float(((diffusion.betas.float() - want).abs() / want).max()) < 1e-6
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    ours, ref = predictions(model, theirs, x, torch.tensor([10, 900]))
    assert rel_diff(ours, ref) < RTOL


def test_flat_and_bare_unet_folders_import(tmp_path):
    """google/ddpm-cifar10-32 is published flat (config.json beside scheduler_config.json); a bare UNet2DModel
    folder takes its scheduler config from elsewhere."""
    from diffusers import DDPMScheduler

    pipe = tmp_path / "pipe"
    theirs = save_diffusers_pipeline(pipe, scheduler={"beta_schedule": "squaredcos_cap_v2"})
    flat = tmp_path / "flat"
    shutil.copytree(pipe / "unet", flat)
    shutil.copy(pipe / "scheduler" / "scheduler_config.json", flat)
    bare = tmp_path / "bare"
    shutil.copytree(pipe / "unet", bare)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    for folder, scheduler in ((flat, None), (bare, pipe / "scheduler"), (bare, pipe / "scheduler" /
                                                                          "scheduler_config.json")):
        model, diffusion = from_diffusers(folder, scheduler)
        ours, ref = predictions(model, theirs, x, t)
        assert rel_diff(ours, ref) < RTOL
        # squaredcos_cap_v2 is our cosine schedule with s = 0.008, to float32 round-off
        want = DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas
        assert float(((diffusion.betas.float() - want).abs() / want).max()) < 1e-6
    with pytest.raises(DiffusersFormatError, match="no scheduler config"):
        from_diffusers(bare)


@pytest.mark.parametrize("scheduler,diffusion,hints", [
    ({}, {"schedule": "linear", "objective": "eps"}, {"variance": "fixedsmall", "clip_denoised": True}),
    ({"prediction_type": "sample", "variance_type": "fixed_small_log", "clip_sample": False},
     {"schedule": "linear", "objective": "x0"}, {"variance": "fixedsmall", "clip_denoised": False}),
    ({"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_large"},
     {"schedule": "cosine", "objective": "v", "cosine_s": 0.008}, {"variance": "fixedlarge", "clip_denoised": True}),
    ({"num_train_timesteps": 200, "beta_start": 0.001, "beta_end": 0.05},
     {"schedule": "linear", "timesteps": 200, "beta_start": 0.001, "beta_end": 0.05}, {"variance": "fixedsmall"}),
    ({"trained_betas": torch.linspace(2e-4, 0.03, 500).tolist(), "num_train_timesteps": 500},
     {"schedule": "linear", "timesteps": 500, "beta_start": 2e-4, "beta_end": 0.03}, {}),
    ({"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2"}, {"schedule": "cosine"},
     {"variance": None}),
])
def test_scheduler_configs_map_to_our_diffusion(scheduler, diffusion, hints):
    got, got_hints = diffusion_from_scheduler(scheduler)
    assert {k: got[k] for k in diffusion} == diffusion
    assert {k: got_hints[k] for k in hints} == hints


# -- export ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tiny_trained, tmp_path_factory):
    """The tiny trained checkpoint in a project layout with an eval.json, exported with `ddpm export-diffusers`."""
    from tasks.lib.info import cli

    project = tmp_path_factory.mktemp("project")
    shutil.copytree(tiny_trained / "checkpoints", project / "checkpoints")
    (project / "metrics").mkdir()
    (project / "metrics" / "eval.json").write_text(json.dumps({
        "fid": 12.345, "num_generated": 24, "num_reference": 1437, "reference": "train",
        "feature_extractor": "ddpm-classifier", "floor": {"fid": 1.5},
        "provenance": {"sampler": "ddim", "steps": 5, "checkpoint": {"step": 6}}}))
    assert cli(["export-diffusers", "--checkpoint", str(project / "checkpoints"), "--out", str(project / "hub")]) == 0
    ckpt = list_checkpoints(project / "checkpoints")[-1][1]
    return project / "hub", ckpt


def test_export_loads_in_diffusers_and_predicts_what_ours_does(exported):
    from diffusers import DDPMPipeline

    folder, ckpt = exported
    model, diffusion, state = load_model(ckpt)  # the EMA weights
    pipe = DDPMPipeline.from_pretrained(folder)
    assert isinstance(pipe, DDPMPipeline)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 42, 99])
    ours, ref = predictions(model, pipe.unet.eval(), x, t)
    assert rel_diff(ours, ref) < RTOL
    s = pipe.scheduler
    assert torch.equal(s.betas, diffusion.betas.float())  # the exact betas, as trained_betas
    assert s.config.num_train_timesteps == 100 and s.config.prediction_type == "epsilon"
    assert s.config.variance_type == "fixed_large" and s.config.clip_sample is True  # the run's sample section
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1


def test_export_card_names_the_params_dataset_and_fid(exported):
    folder, ckpt = exported
    card = (folder / "README.md").read_text()
    assert "library_name: diffusers" in card and "# DDPM on digits (1x8x8)" in card
    assert "**FID 12.35**" in card and "floor" in card and "FID 1.5" in card
    assert "Note: these metrics were measured at training step 6" not in card  # the checkpoint is step 6
    assert '"batch_size": 16' in card and "EMA decay 0.9" in card
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model_index.json", "scheduler", "unet"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_export_round_trips_through_import_bitwise(exported, tmp_path):
    folder, ckpt = exported
    path = import_diffusers(folder, tmp_path / "ckpts", step=6)
    assert path.name == "ckpt_00000006.pt"
    a, da, sa = load_model(ckpt)
    b, db, sb = load_model(path)
    assert a.config == b.config and sa["config"]["diffusion"] == sb["config"]["diffusion"]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(da.betas, db.betas)
    assert sb["config"]["diffusers"]["variance"] == "fixedlarge"
    raw, _, _ = load_model(path, use_ema=False)  # the published weights are the raw ones too
    assert all(torch.equal(p, q) for p, q in zip(raw.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("diffusion", [
    {"schedule": "cosine", "objective": "v", "timesteps": 50},
    {"schedule": "linear", "objective": "x0", "timesteps": 30, "beta_start": 0.001, "beta_end": 0.04},
    {"schedule": "cosine", "objective": "eps", "timesteps": 40, "cosine_s": 0.02},  # no named diffusers schedule
])
def test_write_then_read_keeps_schedule_objective_and_variance(tiny_unet, diffusion, tmp_path):
    from diffusers import DDPMPipeline

    from ddpm.config import DiffusionConfig

    cfg = DiffusionConfig(**diffusion).model_dump()
    write_diffusers(tiny_unet, cfg, tmp_path / "hub", variance="fixedsmall", clip_denoised=False)
    read = read_diffusers(tmp_path / "hub")
    assert read.diffusion_config == cfg
    assert read.hints == {"variance": "fixedsmall", "clip_denoised": False}
    pipe = DDPMPipeline.from_pretrained(tmp_path / "hub")
    assert pipe.scheduler.config.prediction_type == {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[
        cfg["objective"]]
    assert torch.equal(pipe.scheduler.betas, read.diffusion.betas.float())


def test_export_is_atomic_and_replaces_only_a_diffusers_folder(tiny_trained, tmp_path):
    ckpt = list_checkpoints(tiny_trained / "checkpoints")[-1][1]
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a diffusers pipeline folder"):
        to_diffusers(ckpt, keep)
    assert [p.name for p in keep.iterdir()] == ["todo.txt"]
    out = to_diffusers(ckpt, tmp_path / "hub")
    (out / "stale.txt").write_text("from an earlier export")
    to_diffusers(ckpt, out)  # a diffusers folder: replaced whole
    assert not (out / "stale.txt").exists() and (out / "model_index.json").is_file()
    assert "Not evaluated" in (out / "README.md").read_text()  # no metrics/eval.json beside tiny_trained's run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "notes"]


def test_ddpm_console_script_imports_and_refuses_in_one_line(tmp_path, capsys):
    import subprocess
    import sys

    from tasks.lib.info import cli

    ddpm = str(Path(sys.executable).parent / "ddpm")  # the console script pyproject.toml installs
    save_diffusers_pipeline(tmp_path / "pipe", {**TINY_DIFFUSERS_UNET, "norm_eps": 1e-5})
    done = subprocess.run([ddpm, "import-diffusers", str(tmp_path / "pipe"), "--out", str(tmp_path / "ckpts"),
                           "--step", "7"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'ckpts' / 'ckpt_00000007.pt'}: UNet " in done.stdout
    assert "sample.variance: fixedsmall" in done.stdout  # DDPMScheduler's default variance_type, fixed_small
    save_diffusers_pipeline(tmp_path / "flip", {**TINY_DIFFUSERS_UNET, "flip_sin_to_cos": True})
    refused = subprocess.run([ddpm, "import-diffusers", str(tmp_path / "flip"), "--out", str(tmp_path / "more")],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and not (tmp_path / "more").exists()
    assert refused.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'flip' / 'unet' / 'config.json'}: flip_sin_to_cos: True is not expressible: this "
        "project's UNet needs False (the time embedding is [sin, cos], in that order)"]
    assert cli(["export-diffusers", "--checkpoint", str(tmp_path / "ckpts"), "--out", str(tmp_path / "hub")]) == 0
    assert json.loads((tmp_path / "hub" / "unet" / "config.json").read_text())["norm_eps"] == 1e-5
    capsys.readouterr()
    assert cli(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "  import-diffusers  ddpm import-diffusers FOLDER" in usage and "  export-diffusers  ddpm export" in usage


# -- old checkpoints -------------------------------------------------------------------------------------------------
def test_checkpoints_without_norm_eps_load_as_1e_5_bitwise(tiny_trained, tmp_path):
    ckpt = list_checkpoints(tiny_trained / "checkpoints")[-1][1]
    state = load_checkpoint(ckpt)
    assert state["config"]["model"]["norm_eps"] == 1e-5
    del state["config"]["model"]["norm_eps"]  # as written before the key existed
    old = tmp_path / "ckpt_00000006.pt"
    save_checkpoint(old, state)
    a, _, _ = load_model(ckpt)
    b, _, _ = load_model(old)
    assert b.config.norm_eps == 1e-5
    norms = [m for m in b.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 5, 50, 99])
    with torch.no_grad():
        assert torch.equal(a(x, t), b(x, t))


# -- refused layouts -------------------------------------------------------------------------------------------------
UNET_REFUSALS = [  # (change to google/ddpm-cifar10-32's config, key named, words of the message)
    ({"attention_head_dim": 64}, "attention_head_dim", "4 heads"),
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos", "[sin, cos]"),
    ({"freq_shift": 0}, "freq_shift", "half - 1"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]},
     "down_block_types[1]", "DownBlock2D and AttnDownBlock2D"),
    ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}, "up_block_types",
     "levels [2] on the way up but [1]"),
    ({"downsample_padding": 1}, "downsample_padding", "'SAME'"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type", "sinusoids"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift", "scale-shift"),
    ({"class_embed_type": "timestep"}, "class_embed_type", "unconditional"),
    ({"mid_block_type": None}, "mid_block_type", "middle"),
    ({"add_attention": False}, "add_attention", "middle block has attention"),
    ({"center_input_sample": True}, "center_input_sample", "[-1, 1]"),
    ({"block_out_channels": [128, 192, 256, 256]}, "block_out_channels", "multiples"),
    ({"sample_size": [32, 64]}, "sample_size", "square"),
    ({"out_channels": 6}, "out_channels", "in_channels 3"),
    ({"attn_norm_num_groups": 16}, "attn_norm_num_groups", "norm_num_groups 32"),
    ({"time_embedding_dim": 256}, "time_embedding_dim", "512"),
    ({"norm_num_groups": 24}, "norm_num_groups", "do not divide"),
    ({"sample_size": 30}, "sample_size", "not divisible by 8"),
    ({"low_rank_adapter": 4}, "low_rank_adapter", "unknown UNet2DModel setting"),
    ({"_class_name": "UNet2DConditionModel"}, "_class_name", "UNet2DModel"),
]
SCHEDULER_REFUSALS = [
    ({"beta_schedule": "scaled_linear"}, "beta_schedule", "not among this project's schedules"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule", "linear; squaredcos_cap_v2"),
    ({"trained_betas": torch.logspace(-4, -1.7, 1000).tolist()}, "trained_betas", "none of this project's schedules"),
    ({"prediction_type": "flow_prediction"}, "prediction_type", "epsilon, sample, v_prediction"),
    ({"variance_type": "learned_range"}, "variance_type", "learned variance"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr", "zero terminal SNR"),
    ({"num_train_timesteps": 1}, "num_train_timesteps", "at least 2"),
    ({"_class_name": "EulerDiscreteScheduler"}, "_class_name", "DDPMScheduler or DDIMScheduler"),
]


@pytest.mark.parametrize("change,key,words", UNET_REFUSALS, ids=[c[1] + str(i) for i, c in enumerate(UNET_REFUSALS)])
def test_unet_layouts_we_cannot_express_are_refused_naming_the_key(change, key, words):
    with pytest.raises(UnsupportedLayout) as exc:
        unet_config_from_diffusers({**CIFAR10_32_UNET, **change}, "unet/config.json")
    assert exc.value.key == key
    line = str(exc.value)
    assert "\n" not in line and line.startswith(f"unet/config.json: {key}: ") and words in line, line


@pytest.mark.parametrize("change,key,words", SCHEDULER_REFUSALS, ids=[c[1] for c in SCHEDULER_REFUSALS])
def test_schedulers_we_cannot_express_are_refused_naming_the_key(change, key, words):
    with pytest.raises(UnsupportedLayout) as exc:
        diffusion_from_scheduler({**CIFAR10_32_SCHEDULER, **change}, "scheduler_config.json")
    assert exc.value.key == key
    line = str(exc.value)
    assert "\n" not in line and line.startswith(f"scheduler_config.json: {key}: ") and words in line, line


def test_our_layout_maps_to_diffusers_and_back(repo_root):
    from diffusers import UNet2DModel

    for name in ("configs/cifar10", "configs/lsun256", "params", "configs/fashion-mnist"):  # params.yaml: digits
        cfg = load_config(repo_root / f"{name}.yaml").unet_config()
        kwargs = diffusers_unet_kwargs(cfg)
        assert unet_config_from_diffusers(kwargs) == cfg, name
        with torch.device("meta"):
            assert count_parameters(UNet2DModel(**kwargs)) == count_parameters(UNet.from_config(cfg)), name


# -- a published-layout model through the pipeline's stages ----------------------------------------------------------
def test_imported_model_samples_in_the_library(tmp_path):
    from ddpm.samplers import sample

    save_diffusers_pipeline(tmp_path / "pipe", scheduler={"num_train_timesteps": 100}, std=0.05)
    path = import_diffusers(tmp_path / "pipe", tmp_path / "checkpoints")
    model, diffusion, state = load_model(path)
    assert state["step"] == 0 and state["config"]["model"]["norm_eps"] == 1e-6
    images = sample(model, diffusion, seeds=range(4), shape=(1, 8, 8), sampler="ddim", steps=5)
    again = sample(*from_diffusers(tmp_path / "pipe"), seeds=range(4), shape=(1, 8, 8), sampler="ddim", steps=5)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    assert torch.equal(images, again)  # the checkpoint samples exactly what the folder does


@pytest.mark.slow
def test_sample_stage_reads_an_imported_checkpoint(tmp_path, repo_root, tiny_params):
    """`ddpm import-diffusers` then `python -m tasks.sample` (real Ray), with a tiny params file: the stage's shards
    hold what the library samples from the diffusers folder."""
    import subprocess
    import sys

    import yaml

    from conftest import ACROSS_BATCHES_UINT8_FRACTION, ACROSS_BATCHES_UINT8_LEVELS
    from ddpm.samplers import sample
    from tasks.lib.images import to_uint8
    from tasks.lib.samples import load_samples
    from tasks.lib.info import cli

    save_diffusers_pipeline(tmp_path / "pipe", scheduler={"num_train_timesteps": 100}, std=0.05)
    assert cli(["import-diffusers", str(tmp_path / "pipe"), "--out", str(tmp_path / "checkpoints")]) == 0
    tiny_params["ray"]["storage"] = str(tmp_path / "ray")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    done = subprocess.run([sys.executable, "-m", "tasks.sample", "--params", str(tmp_path / "params.yaml"),
                           "--checkpoints", str(tmp_path / "checkpoints"), "--out", str(tmp_path / "samples")],
                          cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    images, seeds = load_samples(tmp_path / "samples")
    assert images.shape == (24, 1, 8, 8) and seeds.tolist() == list(range(24))
    s = load_config(tmp_path / "params.yaml").sample  # the stage's settings, its batch (8) included
    assert s.batch_size == 8
    want = to_uint8(sample(*from_diffusers(tmp_path / "pipe"), seeds=range(8), shape=(1, 8, 8), **s.kwargs()))
    diff = np.abs(images[:8].astype(int) - want.astype(int))
    assert diff.max() <= ACROSS_BATCHES_UINT8_LEVELS and (diff > 0).mean() <= ACROSS_BATCHES_UINT8_FRACTION
