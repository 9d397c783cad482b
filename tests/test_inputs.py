"""Inputs from outside the pipeline are checked before any stage computes (tasks/lib/inputs.py), and a stage whose
output nothing reads under the chosen params (the classifier when FID uses Inception) computes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from tasks import train_classifier
from tasks.lib import inputs
from tasks.lib.dvcfile import downstream, read_stages
from tasks.lib.classifier import load_classifier
from tasks.lib.errors import DataError
from test_fetch import make_cifar

from ddpm.checkpoint import CheckpointError


def _env() -> dict[str, str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "RAY_USAGE_STATS_ENABLED": "0"}
    for k in ("DVC_STAGE", "DVC_ROOT", "RAY_ADDRESS"):
        env.pop(k, None)
    return env


# -- which stages come after which (read from dvc.yaml) -------------------------------------------------------------
def test_downstream_follows_dvc_yaml():
    stages = read_stages()
    assert downstream("fetch", stages) == ["fetch", "train_classifier", "train", "sample", "evaluate", "figures",
                                          "sampler_table"]
    assert downstream("train", stages) == ["train", "sample", "evaluate", "figures", "sampler_table"]
    assert downstream("train_classifier", stages) == ["train_classifier", "evaluate", "sampler_table"]
    assert downstream("sample", stages) == ["sample", "evaluate", "sampler_table"]  # via evaluate's ref_stats
    assert downstream("figures", stages) == ["figures"]


def test_downstream_of_another_dvc_yaml(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"cmd": "x", "outs": ["out/a"]},
        "b": {"cmd": "x", "deps": ["out/a/part.txt"], "metrics": [{"m/b.json": {"cache": False}}]},
        "c": {"cmd": "x", "deps": ["m"]},
        "d": {"cmd": "x", "deps": ["elsewhere"]},
    }}))
    stages = read_stages(tmp_path / "dvc.yaml")
    assert downstream("a", stages) == ["a", "b", "c"]
    assert downstream("d", stages) == ["d"]
    assert stages["b"].uncached == ("m/b.json",) and stages["b"].outs == ("m/b.json",)


# -- what the params select -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,extractor,needed", [
    ({}, "ddpm-classifier", True),  # digits: labeled grayscale
    ({"data.dataset": "cifar10", "model.attn_resolutions": []}, "inception-v3-compat", False),
    ({"data.dataset": "cifar10", "data.channels": 1, "model.attn_resolutions": []}, "ddpm-classifier", True),
    ({"evaluate.feature_extractor": "inception-v3-compat"}, "inception-v3-compat", False),
    ({"data.dataset": "image-folder", "data.image_size": 8}, "inception-v3-compat", False),  # RGB by default
    ({"data.dataset": "image-folder", "data.image_size": 8, "data.channels": 1}, None, True),  # labels unknown yet
])
def test_planned_extractor_and_classifier_need(tiny_config, overrides, extractor, needed):
    cfg = tiny_config(overrides)
    assert inputs.planned_extractor(cfg) == extractor
    got, why = inputs.classifier_needed(cfg)
    assert got is needed
    if not needed:
        assert why.startswith("not needed: ") and "inception-v3-compat" in why


# -- the check itself -----------------------------------------------------------------------------------------------
def test_every_missing_input_is_named_once(tiny_config, tmp_path):
    cfg = tiny_config({"data.dataset": "cifar10", "data.root": str(tmp_path / "raw"), "model.attn_resolutions": [],
                       "evaluate.inception_weights": str(tmp_path / "w.pth"), "sampler_table.enabled": True,
                       "evaluate.reference": str(tmp_path / "ref.npz"), "evaluate.kid": False})
    missing = inputs.missing_inputs(cfg, downstream("fetch", read_stages()))
    assert [m.key for m in missing] == ["data.root", "evaluate.inception_weights", "evaluate.reference"]
    assert missing[1].stages == ("evaluate", "sampler_table")
    with pytest.raises(DataError) as exc:
        inputs.check(cfg, downstream("fetch", read_stages()))
    lines = str(exc.value).splitlines()
    assert lines[0] == "3 inputs of this run are missing; it stopped before any stage ran:"
    assert "cifar-10-batches-py" in lines[1] and "(read by fetch)" in lines[1]
    assert "w.pth not found" in lines[2] and "(read by evaluate, sampler_table)" in lines[2]
    assert "ref.npz not found" in lines[3]
    # From train on, the dataset sources are fetch's business only.
    assert [m.key for m in inputs.missing_inputs(cfg, downstream("train", read_stages()))] == [
        "evaluate.inception_weights", "evaluate.reference"]
    # Present files pass; the classifier path of digits needs none of them.
    make_cifar(tmp_path / "raw")
    (tmp_path / "w.pth").write_bytes(b"x")
    (tmp_path / "ref.npz").write_bytes(b"x")
    inputs.check(cfg, downstream("fetch", read_stages()))
    inputs.check(tiny_config(), downstream("fetch", read_stages()))


def test_dvc_stage_env_checks_the_stages_after_it(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config({"evaluate.feature_extractor": "inception-v3-compat",
                       "evaluate.inception_weights": str(tmp_path / "absent.pth")})
    inputs.check_for_dvc_stage(cfg)  # not under DVC: nothing checked here (the stage checks its own inputs)
    monkeypatch.setenv("DVC_ROOT", str(REPO))
    monkeypatch.setenv("DVC_STAGE", "train")
    with pytest.raises(DataError, match=r"evaluate.inception_weights: .*absent.pth not found.*dvc repro \(from "
                                        r"stage train\) stopped before any stage ran"):
        inputs.check_for_dvc_stage(cfg)
    monkeypatch.setenv("DVC_STAGE", "figures")  # nothing after figures reads the weights
    inputs.check_for_dvc_stage(cfg)


# -- the classifier stage when nothing reads it ---------------------------------------------------------------------
def test_train_classifier_computes_nothing_when_fid_uses_inception(tiny_config, tmp_path):
    from tasks import fetch

    make_cifar(tmp_path / "raw")
    cfg = tiny_config({"data.dataset": "cifar10", "data.root": str(tmp_path / "raw"),
                       "model.attn_resolutions": []})
    fetch.run(cfg, tmp_path / "ds")
    metrics = train_classifier.run(cfg, tmp_path / "ds", tmp_path / "m" / "clf.pt", tmp_path / "m" / "clf.json")
    assert metrics["skipped"] is True
    assert metrics["reason"] == ("not needed: FID/KID/IS of 3x32x32 cifar10 images use inception-v3-compat "
                                 "features (evaluate.feature_extractor: auto), not the classifier's")
    assert json.loads((tmp_path / "m" / "clf.json").read_text()) == metrics
    with pytest.raises(CheckpointError, match="no classifier was trained .not needed: FID"):
        load_classifier(tmp_path / "m" / "clf.pt")
    # The same data with the classifier asked for explicitly trains one.
    cfg2 = tiny_config({"data.dataset": "cifar10", "data.root": str(tmp_path / "raw"),
                        "model.attn_resolutions": [], "evaluate.feature_extractor": "classifier",
                        "classifier.steps": 2})
    m2 = train_classifier.run(cfg2, tmp_path / "ds", tmp_path / "m2" / "clf.pt", tmp_path / "m2" / "clf.json")
    assert "skipped" not in m2 and m2["steps"] == 2
    net, _ = load_classifier(tmp_path / "m2" / "clf.pt")
    assert net.args.channels == 3


# -- end to end: the cifar10 preset without Inception weights -------------------------------------------------------
def _cifar10_project(tmp_path: Path) -> Path:
    """The cifar10 preset with its dataset files present (tiny, in the real pickle format), no Inception weights."""
    make_cifar(tmp_path / "raw")
    params = yaml.safe_load((REPO / "configs" / "cifar10.yaml").read_text())
    params["data"]["root"] = str(tmp_path / "raw")
    params["evaluate"]["inception_weights"] = str(tmp_path / "models" / inputs.INCEPTION_WEIGHTS_FILE)
    params["tracking"] = {**(params.get("tracking") or {}), "enabled": False}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path / "params.yaml"


def test_flow_with_cifar10_preset_fails_before_any_stage_without_inception_weights(tmp_path):
    params = _cifar10_project(tmp_path)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "flows.train_eval", "--params", str(params), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("error: evaluate.inception_weights: ")
    assert inputs.INCEPTION_WEIGHTS_FILE in lines[0] and "not found" in lines[0]
    assert "(read by evaluate)" in lines[0] and "stopped before any stage ran" in lines[0]
    assert not out.exists()  # neither fetch nor train wrote anything


@pytest.mark.slow
def test_dvc_repro_with_cifar10_preset_fails_before_fetch_without_inception_weights(tmp_path):
    from conftest import GIT_ENV, clone_project

    dest = clone_project(tmp_path / "proj")
    shutil.copy(_cifar10_project(tmp_path), dest / "params.yaml")
    env = {**_env(), **GIT_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=dest, capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode != 0
    err = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error: ")]
    assert len(err) == 1, r.stdout + r.stderr
    assert err[0].startswith("error: evaluate.inception_weights: ") and "not found" in err[0]
    assert "dvc repro (from stage fetch) stopped before any stage ran" in err[0]
    assert not (dest / "data" / "dataset").exists() and not (dest / "checkpoints").exists()


def test_missing_mnist_and_image_folder_sources_are_named(tiny_config, tmp_path):
    from test_fetch import make_mnist

    cfg = tiny_config({"data.dataset": "mnist", "data.root": str(tmp_path / "raw"), "model.attn_resolutions": []})
    [m] = inputs.missing_inputs(cfg, ["fetch"])
    assert m.key == "data.root" and "mnist: missing train-images-idx3-ubyte" in m.message and "MNIST/raw" in m.message
    make_mnist(tmp_path / "raw")
    assert inputs.missing_inputs(cfg, ["fetch"]) == []
    download = tiny_config({"data.dataset": "mnist", "data.root": str(tmp_path / "elsewhere"), "data.download": True,
                            "model.attn_resolutions": []})
    assert inputs.missing_inputs(download, ["fetch"]) == []  # download: true fetches them
    folder = tiny_config({"data.dataset": "image-folder", "data.image_size": 8, "data.root": str(tmp_path / "no")})
    [m] = inputs.missing_inputs(folder, ["fetch", "train"])
    assert m.message.endswith("no is not a folder (set data.root to the folder of PNG/JPEG images)")


# -- a published model (train.pretrained) ----------------------------------------------------------------------------
def test_a_published_model_is_checked_before_any_stage_runs(tiny_config, tmp_path, monkeypatch):
    """The folder train.pretrained names is read by the train stage only, and checked with the other inputs: a
    missing or non-diffusers folder, a layout this project cannot express, no weights, or a model of other images or
    another T than the params' is one line naming train.pretrained (docs/diffusers.md)."""
    from conftest import TINY_DIFFUSERS_UNET as U, save_diffusers_pipeline

    t100 = {"num_train_timesteps": 100}  # the tiny params' T
    save_diffusers_pipeline(tmp_path / "ok", scheduler=t100)
    save_diffusers_pipeline(tmp_path / "heads", {**U, "attention_head_dim": 8}, t100)
    save_diffusers_pipeline(tmp_path / "rgb", {**U, "in_channels": 3, "out_channels": 3}, t100)
    save_diffusers_pipeline(tmp_path / "t1000")
    save_diffusers_pipeline(tmp_path / "noweights", scheduler=t100)
    (tmp_path / "noweights" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "empty").mkdir()
    every = downstream("fetch", read_stages())
    for name, says in [
        ("nowhere", f"{tmp_path}/nowhere: not a folder; expected a diffusers DDPMPipeline folder"),
        ("empty", f"{tmp_path}/empty: no UNet config (unet/config.json or config.json); expected a diffusers "
                  "DDPMPipeline folder (model_index.json, unet/, scheduler/) or a flat one"),
        ("heads", "heads/unet/config.json: attention_head_dim: 8 splits 16 channels into 2 heads"),
        ("noweights", f"{tmp_path}/noweights/unet: no weights (diffusion_pytorch_model.safetensors or "
                      "diffusion_pytorch_model.bin)"),
        ("rgb", f"{tmp_path}/rgb is a model of 3x8x8 images, the params' data are 1x8x8 (data.dataset digits, "
                "data.image_size null, data.channels null); set data.* to the model's images"),
        ("t1000", f"{tmp_path}/t1000 was trained with T = 1000 (num_train_timesteps in {tmp_path}/t1000/scheduler/"
                  "scheduler_config.json), the params' diffusion.timesteps is 100; set diffusion.timesteps: 1000"),
    ]:
        cfg = tiny_config({"train.pretrained": str(tmp_path / name)})
        [m] = inputs.missing_inputs(cfg, every)
        assert (m.key, m.stages) == ("train.pretrained", ("train",)), name
        assert says in m.message, m.message
        assert "\n" not in m.line()
        # Only the train stage reads it: from the sample stage on, a run does not look at it.
        assert inputs.missing_inputs(cfg, downstream("sample", read_stages())) == []
    ok = tiny_config({"train.pretrained": str(tmp_path / "ok")})
    assert inputs.missing_inputs(ok, every) == [] and inputs.pretrained_problem(tiny_config()) is None
    # Under `dvc repro` the first stage, fetch, stops the whole reproduction before it fetches anything.
    monkeypatch.setenv("DVC_ROOT", str(REPO))
    monkeypatch.setenv("DVC_STAGE", "fetch")
    with pytest.raises(DataError, match=r"^train.pretrained: .*rgb is a model of 3x8x8 images.*\(read by train\); "
                                        r"dvc repro \(from stage fetch\) stopped before any stage ran$"):
        inputs.check_for_dvc_stage(tiny_config({"train.pretrained": str(tmp_path / "rgb")}))
    inputs.check_for_dvc_stage(ok)


def test_flow_with_a_missing_published_model_fails_before_any_stage(tmp_path, tiny_params):
    tiny_params["train"]["pretrained"] = "models/ddpm-cifar10-32"  # relative to the working directory: absent
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "flows.train_eval", "--params", str(tmp_path / "params.yaml"),
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0] == (f"error: train.pretrained: models/ddpm-cifar10-32: not a folder; expected "
                        f"{inputs.PRETRAINED_LAYOUTS} (read by train); this run stopped before any stage ran")
    assert not out.exists()


def test_the_classifier_extractor_name_is_the_classifiers():
    from tasks.lib import classifier, inputs

    assert inputs.CLASSIFIER_EXTRACTOR == classifier.FEATURE_EXTRACTOR_NAME
