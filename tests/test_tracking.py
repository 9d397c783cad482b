"""MLflow tracking (the tracking layer, tracking/, reached by the stages through tasks/lib/callbacks.py): the stages against a real `mlflow server` on loopback, read back through its
REST API; the default local SQLite store without any server; and the small pure pieces (run identity, URIs)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ddpm.checkpoint import load_checkpoint
from ddpm.unet import UNet
from tasks import evaluate, fetch, sample, train, train_classifier
from tasks.lib import summary
from tracking import outputs, training
from tracking import run as tracking
from tasks.lib.images import grid_image
from conftest import free_port

ON = {"tracking.enabled": True}  # explicit: the tiny test params may turn tracking off for the other tests


# -- pure pieces (fast) --------------------------------------------------------------------------------------------
def start_training(cfg, dataset_sha256: str, fresh: bool):
    """The driver's half of the mlflow tracker's train callback: what it hands the rank-0 worker, or None."""
    cb = training.MlflowTrainCallback()
    cb.on_fit_start(cfg, dataset_sha256, fresh)
    return cb.info


def test_params_hash_names_what_is_computed(tiny_config):
    base = tracking.params_hash(tiny_config())
    # How long, how fast, where: the same pipeline run (a rerun with more steps continues it).
    for same in ({"train.steps": 60}, {"train.log_every": 5}, {"train.num_workers": 2}, {"sample.num_workers": 2},
                 {"sample.batch_size": 5}, {"evaluate.batch_size": 10}, {"ray.num_cpus": 1},
                 {"tracking.grid_every": 7}, {"tracking.uri": "http://127.0.0.1:1"}):
        assert tracking.params_hash(tiny_config(same)) == base, same
    # What is learned, sampled or measured: another pipeline run.
    for other in ({"train.lr": 5e-4}, {"model.ch": 8}, {"diffusion.schedule": "cosine"}, {"sample.steps": 4},
                  {"sample.seed": 1}, {"evaluate.kid_subset_size": 12}, {"data.holdout_fraction": 0.25}):
        assert tracking.params_hash(tiny_config(other)) != base, other


def test_flat_params_are_dotted_and_read_like_params_yaml(tiny_config):
    p = tracking.flat_params(tiny_config({"tracking.register_model": "ddpm-digits"}))
    assert p["train.lr"] == "0.001" and p["model.ch"] == "16" and p["model.ch_mult"] == "[1, 2]"
    assert p["data.dataset"] == "digits" and p["data.image_size"] == "null" and p["sample.clip_denoised"] == "true"
    assert p["tracking.register_model"] == "ddpm-digits"
    assert len(p) == sum(len(v) for v in tiny_config().to_dict().values())


def test_tracking_uri_precedence_and_absolute_paths(tiny_config, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri(tiny_config()) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking._artifact_root(f"sqlite:///{tmp_path}/mlflow.db", "my exp") == str(tmp_path / "mlruns/my_exp")
    assert tracking._artifact_root("http://127.0.0.1:5000", "digits") is None  # the server decides
    # Relative SQLite paths become absolute: Ray workers run elsewhere.
    assert tracking.resolve_uri(tiny_config({"tracking.uri": "sqlite:///db/t.db"})) == f"sqlite:///{tmp_path}/db/t.db"
    assert tracking.resolve_uri(tiny_config({"tracking.uri": "http://10.0.0.1:5000"})) == "http://10.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert tracking.resolve_uri(tiny_config({"tracking.uri": "http://10.0.0.1:5000"})) == "http://127.0.0.1:5001"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))  # dvc exp run --temp runs in a copy
    assert tracking.resolve_uri(tiny_config()) == f"sqlite:///{tmp_path}/project/mlflow.db"


def test_disabled_or_unreachable_tracking_never_fails_a_stage(tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert start_training(tiny_config({"tracking.enabled": False}), "sha", fresh=True) is None
    assert tracking.find_run(tiny_config(ON)) is None  # read-only: no store yet, none created
    assert not (tmp_path / "mlflow.db").exists()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg = tiny_config({**ON, "tracking.uri": dead})
    t0 = time.monotonic()
    assert start_training(cfg, "sha", fresh=True) is None
    assert outputs.log_evaluation(cfg, {"fid": 1.0}, "sha", tmp_path, tmp_path / "eval.json") is None
    assert time.monotonic() - t0 < 30  # no minutes of HTTP retries
    assert "unreachable" in capsys.readouterr().err
    cb = training.MlflowTrainCallback()  # no run found by the driver: every hook is a no-op
    cb.on_train_start(cfg, 0, [])
    cb.on_log({"step": 1, "loss": "0.5"})
    cb.on_step_end(1, None, None)
    cb.on_train_end(1, None)


def test_stages_find_their_run_and_a_fresh_training_starts_a_new_one(tiny_config, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(ON)
    first = start_training(cfg, "sha-1", fresh=True)
    assert first["uri"] == f"sqlite:///{tmp_path}/mlflow.db" and tracking.find_run(cfg)["run_id"] == first["run_id"]
    found = tracking.find_run(cfg)
    assert found["compare_url"] == (f"http://127.0.0.1:5000/#/experiments/{found['experiment_id']}/runs"
                                    "?workflowType=machine_learning&compareRunsMode=CHART")  # the chart view
    client = MlflowClient(first["uri"])
    client.log_metric(first["run_id"], "train/loss", 0.5, step=1)
    # A resume (and, with more steps, the same params hash) continues the run; a changed value becomes a tag.
    resumed = start_training(tiny_config({**ON, "train.steps": 12}), "sha-1", fresh=False)
    assert resumed["run_id"] == first["run_id"]
    assert client.get_run(first["run_id"]).data.tags["latest.train.steps"] == "12"
    assert outputs.log_evaluation(cfg, {"fid": 2.5, "floor": {"fid": 1.25}, "fid_ratio": 2.0}, "sha-1", tmp_path,
                                   tmp_path / "none.json") == first["run_id"]
    # Training from step 0 where the run already has a loss curve: a new run, the old one points to it.
    restarted = start_training(cfg, "sha-1", fresh=True)
    assert restarted["run_id"] != first["run_id"] and tracking.find_run(cfg)["run_id"] == restarted["run_id"]
    old = client.get_run(first["run_id"])
    assert old.data.tags["superseded_by"] == restarted["run_id"] and old.info.status == "FINISHED"
    assert old.data.metrics == {"train/loss": 0.5, "trained/fid": 2.5, "trained/floor/fid": 1.25,
                                "trained/fid_ratio": 2.0}
    # Other params: another run.
    assert start_training(tiny_config({**ON, "train.lr": 5e-4}), "sha-1", fresh=True)["run_id"] not in (
        first["run_id"], restarted["run_id"])


def test_fluent_scope_restores_the_process_tracking_uri(monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    before = mlflow.get_tracking_uri()
    with training._Fluent("http://127.0.0.1:9", {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}):
        assert mlflow.get_tracking_uri() == "http://127.0.0.1:9"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert mlflow.get_tracking_uri() == before
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_grid_image_is_an_rgb_grid():
    images = np.zeros((16, 1, 8, 8), dtype=np.uint8)
    images[3] = 200
    grid = grid_image(images)
    # 4x4 cells of 8 px upscaled to 32, 2 px padding around each.
    assert grid.dtype == np.uint8 and grid.shape == (4 * 34 + 2, 4 * 34 + 2, 3)
    assert grid[2:34, 2 + 3 * 34:34 + 3 * 34].min() == 200 and grid[2:34, 2:34].max() == 0
    # what MLflow gets: at least 512 px wide, cells of 8 px scaled by 16 (4 x 8 x 16 = 512), an 8 px white gutter
    big = grid_image(images, min_side=512)
    assert big.shape == (4 * (128 + 8) + 8, 4 * (128 + 8) + 8, 3) and big.shape[1] >= 512
    assert (big[:8] == 255).all() and big[8:136, 8 + 3 * 136:136 + 3 * 136].min() == 200
    # what an MLflow image card shows whole: a 4:1 strip, 2 rows of 8, at least 1024 px wide (8 px x 16, 8 px gutter)
    strip = tracking.card_image(images)
    assert strip.shape == (2 * (128 + 8) + 8, 8 * (128 + 8) + 8, 3) and strip.shape[1] >= tracking.CARD_WIDTH
    assert strip[8:136, 8 + 3 * 136:136 + 3 * 136].min() == 200 and strip[8:136, 8:136].max() == 0
    assert grid_image(images[:4], aspect=4).shape[:2] == (34 + 2, 4 * 34 + 2)  # 4 images: one row


@pytest.mark.parametrize("n", [1, 2, 5, 16, 17])
def test_grid_image_lays_out_what_torchvisions_make_grid_does(n):
    """grid_image is numpy (no torchvision import in the flow's process); its pixels are make_grid's, gray and RGB,
    square and strip, with and without a minimum width."""
    import torch
    from torchvision.utils import make_grid

    rng = np.random.default_rng(n)
    for channels, (h, w) in ((1, (8, 8)), (3, (32, 32)), (1, (5, 7))):
        images = rng.integers(0, 256, (n, channels, h, w), dtype=np.uint8)
        for min_side, aspect in ((0, 1.0), (512, 1.0), (tracking.CARD_WIDTH, tracking.CARD_ASPECT)):
            ours = grid_image(images, min_side=min_side, aspect=aspect)
            ncol = math.ceil(math.sqrt(n)) if aspect == 1.0 else math.ceil(n / max(1, round(math.sqrt(n / aspect))))
            scale = max(1, math.ceil(32 / w), math.ceil(min_side / (ncol * w)) if min_side else 1)
            big = torch.from_numpy(images).repeat_interleave(scale, -1).repeat_interleave(scale, -2)
            theirs = make_grid(big, nrow=ncol, padding=max(2, scale // 2) if min_side else 2, pad_value=255)
            np.testing.assert_array_equal(ours, theirs.permute(1, 2, 0).numpy(), err_msg=f"{channels, h, w, min_side}")


# -- end to end (real Ray, real MLflow server) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


def _history_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _image_steps(client, run_id: str, key: str) -> list[int]:
    """Steps of the stepped images ``key`` (files images/<key with / as ~>+step+<n>+timestamp+...png)."""
    names = [Path(a.path).name for a in client.list_artifacts(run_id, "images")]
    stem = key.replace("/", "~")
    return sorted(int(n.split("+")[2]) for n in names if n.startswith(f"{stem}+step+") and n.endswith(".png"))


@pytest.mark.slow
def test_pipeline_run_tracked_on_a_server(mlflow_server, tiny_config, tmp_path, ray_local, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    import mlflow.pyfunc

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # the tiny training lasts a few seconds
    monkeypatch.setenv(tracking.PREFECT_ENV, "flow-run-1234")
    over = {**ON, "ray.storage": str(tmp_path / "ray"), "train.steps": 6, "train.checkpoint_every": 3,
            "tracking.grid_every": 3, "tracking.grid_samples": 4, "tracking.grid_steps": 3,
            "tracking.register_model": "ddpm-tiny"}
    data, clf, clf_metrics = tmp_path / "data", tmp_path / "classifier.pt", tmp_path / "classifier.json"
    ckpts, samples, eval_json = tmp_path / "ckpt", tmp_path / "samples", tmp_path / "eval.json"

    # Stages that do not log run while the server starts.
    cfg = tiny_config(over)
    meta = fetch.run(cfg, data)
    train_classifier.run(cfg, data, clf, clf_metrics)
    uri = mlflow_server()
    cfg = tiny_config({**over, "tracking.uri": uri})
    train.run(cfg, data, ckpts, tmp_path / "loss.tsv")
    # The sample and evaluate stages through their command lines, which report to the installed trackers (the
    # train stage's callbacks are the installed trackers' too).
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.to_dict()))
    sample.main(["--params", str(params), "--checkpoints", str(ckpts), "--out", str(samples)])
    result = evaluate.main(["--params", str(params), "--data", str(data), "--samples", str(samples), "--classifier",
                            str(clf), "--classifier-metrics", str(clf_metrics), "--ref-dir", str(tmp_path / "ref"),
                            "--out", str(eval_json)])

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("digits")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "every stage logs into the one pipeline run"
    run = runs[0]
    assert tracking.find_run(cfg) == {"run_id": run.info.run_id, "experiment_id": exp.experiment_id, "uri": uri,
                                      "url": f"{uri}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}",
                                      "compare_url": f"{uri}/#/experiments/{exp.experiment_id}/runs?"
                                                     "workflowType=machine_learning&compareRunsMode=CHART"}
    run_id, data_ = run.info.run_id, run.data
    assert run.info.status == "FINISHED"

    # Tags and params.
    assert data_.tags[tracking.PARAMS_HASH_TAG] == tracking.params_hash(cfg)
    assert data_.tags[tracking.DATASET_TAG] == meta["sha256"]
    assert data_.tags[tracking.PREFECT_TAG] == "flow-run-1234"
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        assert data_.tags[tracking.GIT_TAG] == git.stdout.strip()
    # six params runs are compared by (MLflow prints them on every image card); the rest of what defines the
    # result, and where it ran, are tags config.<key>; the whole config is an artifact
    assert data_.params == tracking.result_params(cfg) and len(data_.params) == 6
    assert {k: v for k, v in data_.tags.items() if k.startswith("config.")} == tracking.config_tags(cfg)
    assert data_.tags["config.train.num_workers"] == "1" and data_.tags["config.model.ch_mult"] == "[1, 2]"
    config = download_artifacts(run_id=run_id, artifact_path="config/params.yaml", tracking_uri=uri,
                                dst_path=str(tmp_path / "cfg"))
    assert yaml.safe_load(Path(config).read_text()) == cfg.to_dict()

    # Training curves: one point per logged step (train.log_every = 1), from rank 0 only.
    for key in training.TRAIN_METRICS:
        assert _history_steps(client, run_id, f"train/{key}") == [1, 2, 3, 4, 5, 6], key
    with open(tmp_path / "loss.tsv") as f:
        tsv = [line.split("\t") for line in f.read().splitlines()[1:]]
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert [loss[int(r[0])] for r in tsv] == pytest.approx([float(r[1]) for r in tsv])
    assert any(k.startswith("system/") for k in data_.metrics), sorted(data_.metrics)
    assert _image_steps(client, run_id, "train/samples") == [0, 3, 6]  # 0: the initial weights
    # every metric key has a section; nothing flat but what MLflow itself adds
    assert all("/" in k for k in data_.metrics), sorted(k for k in data_.metrics if "/" not in k)

    # Sample stage: the grid as an artifact and as the image "samples" at the checkpoint's step.
    artifacts = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert {"samples/grid.png", "samples/samples.json"} <= artifacts
    assert _image_steps(client, run_id, "trained/samples") == [6]
    assert data_.tags["sample.count"] == "24" and data_.tags["sample.sampler"] == "ddim-5"
    assert data_.metrics["trained/perf/sample_images_per_s"] > 0

    # Evaluate stage: the metrics of eval.json, the floor, the classifier's accuracy.
    for key in ("fid", "kid_mean", "kid_std", "fid_ratio", "classifier_accuracy"):
        assert data_.metrics[f"trained/{key}"] == pytest.approx(result[key]), key
    for key in ("fid", "kid_mean", "kid_std"):
        assert data_.metrics[f"trained/floor/{key}"] == pytest.approx(result["floor"][key]), key
    assert data_.tags["eval.num_generated"] == str(result["num_generated"])  # counts are tags
    assert data_.tags["eval.floor_num_holdout"] == str(result["floor"]["num_holdout"])
    assert _history_steps(client, run_id, "trained/fid") == [6]
    assert "evaluate/eval.json" in {a.path for a in client.list_artifacts(run_id, "evaluate")}

    # The EMA UNet: loads back (through the server's artifact proxy) and computes what the checkpoint's EMA does.
    (model,) = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert model.name == training.MODEL_NAME and model.params["unet.image_size"] == "8"
    local = download_artifacts(artifact_uri=model.artifact_location, dst_path=str(tmp_path / "model"),
                               tracking_uri=uri)
    assert not list(Path(local).rglob("*.pkl")) and (Path(local) / "artifacts" / "weights.pt").is_file()  # no pickle
    assert (Path(local) / "artifacts" / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pyfunc = mlflow.pyfunc.load_model(local)
    loaded = pyfunc.unwrap_python_model().unet
    state = load_checkpoint(ckpts / "ckpt_00000006.pt")
    ref = UNet.from_config(state["config"]["model"])
    ref.load_state_dict({k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")})
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 50, 99])
    with torch.no_grad():
        out = loaded.eval()(x, t)
        assert out.shape == (3, 1, 8, 8)
        assert torch.allclose(out, ref.eval()(x, t), atol=1e-6)
    assert np.allclose(pyfunc.predict(x.numpy(), params={"t": t.tolist()}), out.numpy(), atol=1e-6)
    (version,) = client.search_model_versions("name = 'ddpm-tiny'")
    assert version.run_id == run_id

    # More steps, on 2 DDP workers: the train stage continues the same run, each step once (rank 0 alone logs);
    # the grids continue at 9.
    cfg9 = tiny_config({**over, "tracking.uri": uri, "train.steps": 9, "train.num_workers": 2})
    train.run(cfg9, data, ckpts, tmp_path / "loss.tsv")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert _history_steps(client, run_id, "train/loss") == list(range(1, 10))
    assert _image_steps(client, run_id, "train/samples") == [0, 3, 6, 9]
    assert runs[0].data.params["train.steps"] == "6" and runs[0].data.tags["latest.train.steps"] == "9"
    assert len(client.search_model_versions("name = 'ddpm-tiny'")) == 2


@pytest.mark.slow
def test_default_local_store_without_a_server(tiny_config, tmp_path, ray_local, monkeypatch):
    """tracking.uri and MLFLOW_TRACKING_URI unset: the stage writes sqlite:///<cwd>/mlflow.db and <cwd>/mlruns, from
    the Ray worker too (whose working directory is elsewhere)."""
    from mlflow import MlflowClient

    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", tracking.PREFECT_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config({**ON, "ray.storage": str(tmp_path / "ray"), "train.steps": 2, "tracking.grid_every": 2,
                       "tracking.grid_samples": 4, "tracking.grid_steps": 2})
    assert cfg.tracking.uri is None
    fetch.run(cfg, "data")
    train.run(cfg, "data", "ckpt", "loss.tsv")

    db = tmp_path / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("digits")
    assert exp.artifact_location == str(tmp_path / "mlruns" / "digits")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags[tracking.PARAMS_HASH_TAG] == tracking.params_hash(cfg)
    assert run.info.status == "FINISHED"
    assert tracking.find_run(cfg)["run_id"] == run.info.run_id
    assert _history_steps(client, run.info.run_id, "train/loss") == [1, 2]
    assert _image_steps(client, run.info.run_id, "train/samples") == [0, 2]
    assert list((tmp_path / "mlruns").rglob("train~samples+step+2+*.png"))
    assert list((tmp_path / "mlruns").rglob("MLmodel"))
    assert json.loads((tmp_path / "ckpt" / "run_key.json").read_text())["data_sha256"] == \
        run.data.tags[tracking.DATASET_TAG]


# -- comparable grids (fast: the tracker and the sample stage's grid without Ray) ---------------------------------
def _step0_grid(tiny_config, experiment: str, grid_seed: int, tmp_path: Path) -> tuple[bytes, np.ndarray]:
    """A fresh training's step-0 grid as the train stage logs it (its network seeded as train.py does, the EMA
    copy); returns the logged PNG file's bytes and the grid it should show."""
    from ddpm.ema import EMA
    from ddpm.samplers import sample
    from tasks.lib.images import to_uint8

    cfg = tiny_config({**ON, "tracking.experiment": experiment, "tracking.system_metrics": False,
                       "tracking.grid_samples": 4, "tracking.grid_steps": 3, "sample.grid_seed": grid_seed})
    torch.manual_seed(cfg.train.seed)
    ema = EMA(UNet.from_config(cfg.unet_config()), cfg.train.ema_decay)
    diffusion = train.build_diffusion(cfg.diffusion.model_dump())
    cb = training.MlflowTrainCallback()
    cb.on_fit_start(cfg, "sha", True)
    cb.on_train_start(cfg, 0, [])
    cb.on_step_end(0, ema.module, diffusion)  # what the train loop reports before the first update
    cb.on_train_end(0, ema.module)
    (png,) = [p for p in (tmp_path / "mlruns" / experiment).rglob("train~samples+step+0+*.png")
              if "compressed" not in p.name]
    seeds = list(range(grid_seed, grid_seed + 4))
    # the grids' sampler (tracking.grid_sampler, default unipc) on the sample section's timestep spacing
    want = sample(ema.module, diffusion, seeds, (1, 8, 8), sampler="unipc", steps=3, timestep_spacing="trailing")
    return png.read_bytes(), tracking.card_image(to_uint8(want))


def test_logged_model_carries_a_diffusers_folder(tiny_config, tmp_path, monkeypatch):
    """The logged EMA UNet's artifacts hold the same network as a diffusers folder (``artifacts/diffusers/``):
    DDPMPipeline loads it from a download of the model and predicts what the EMA network does."""
    from diffusers import DDPMPipeline
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from ddpm.ema import EMA

    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", tracking.PREFECT_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config({**ON, "tracking.experiment": "hub", "tracking.system_metrics": False,
                       "tracking.grid_every": 0})
    torch.manual_seed(0)
    ema = EMA(UNet.from_config(cfg.unet_config()), cfg.train.ema_decay)
    with torch.no_grad():  # as if trained: the zero-initialised output layers too
        for p in ema.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cb = training.MlflowTrainCallback()
    cb.on_fit_start(cfg, "sha", True)
    cb.on_train_start(cfg, 0, [])
    cb.on_train_end(2, ema.module)  # two steps trained: the model is logged
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hub")
    (model,) = client.search_logged_models([exp.experiment_id])
    local = Path(download_artifacts(artifact_uri=model.artifact_location, dst_path=str(tmp_path / "model")))
    hub = local / "artifacts" / "diffusers"
    assert {p.name for p in hub.iterdir()} == {"model_index.json", "unet", "scheduler", "README.md"}
    pipe = DDPMPipeline.from_pretrained(hub)
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 50, 99])
    with torch.no_grad():
        ours, theirs = ema.module.eval()(x, t), pipe.unet.eval()(x, t).sample
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5
    assert torch.equal(pipe.scheduler.betas, train.build_diffusion(cfg.diffusion.model_dump()).betas.float())
    assert pipe.scheduler.config.variance_type == "fixed_large"  # the run's sample.variance
    assert "training step 2" in (hub / "README.md").read_text()


def test_same_grid_seed_logs_identical_step0_grids(tiny_config, tmp_path, monkeypatch):
    import io

    from PIL import Image

    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", tracking.PREFECT_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    a, want = _step0_grid(tiny_config, "run-a", 7, tmp_path)
    b, _ = _step0_grid(tiny_config, "run-b", 7, tmp_path)
    c, want_c = _step0_grid(tiny_config, "run-c", 8, tmp_path)
    assert a == b  # two runs, same grid seed: the same file, pixel for pixel
    shown = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"))
    np.testing.assert_array_equal(shown, want)  # ... and it shows seeds 7..10
    assert c != a and not np.array_equal(want_c, want)  # another grid seed: other noise


def test_final_grid_uses_the_grid_seeds(tiny_config, tmp_path):
    """samples/grid.png shows seeds grid_seed.. : taken from the samples when they hold them, else sampled; with the
    training grids' sampler settings its images are the training grid's."""
    from ddpm.checkpoint import save_checkpoint
    from ddpm.ema import EMA
    from ddpm.samplers import ddim_sample
    from tasks.lib.images import to_uint8

    cfg = tiny_config({"sample.grid_seed": 30, "sample.grid_size": 4, "sample.steps": 3, "sample.eta": 0.0})
    torch.manual_seed(0)
    model = UNet.from_config(cfg.unet_config())
    ema = EMA(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ema.update(model)  # the EMA differs from the raw weights, so the test sees which one is used
    ckpt = tmp_path / "ckpt_00000001.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": {}, "step": 1,
                           "config": {"model": cfg.unet_config().to_dict(), "diffusion": cfg.diffusion.model_dump(),
                                      "params": cfg.to_dict()}})
    diffusion = train.build_diffusion(cfg.diffusion.model_dump())
    want = to_uint8(ddim_sample(ema.module, diffusion, [30, 31, 32, 33], (1, 8, 8), steps=3, spacing="trailing"))

    images = np.arange(40 * 64, dtype=np.int64).reshape(40, 1, 8, 8).astype(np.uint8)
    seeds = np.arange(40)
    np.testing.assert_array_equal(sample.grid_images(cfg, images, seeds, ckpt), images[30:34])
    got = sample.grid_images(cfg, images[:24], seeds[:24], ckpt)  # the samples lack seeds 30..33
    np.testing.assert_array_equal(got, want)


def test_the_tracking_layer_logs_what_a_stage_wrote(tiny_config, tmp_path, monkeypatch):
    """The installed ``mlflow`` tracker (an entry point of this package) reads a run's files after a stage and logs
    them into the run of its params: called by the train-eval flow in its own process (with the flow run's tags in
    the environment), or by a stage's command line (tasks.lib.callbacks.after_stage), which under the flow does
    nothing."""
    from mlflow import MlflowClient
    from PIL import Image

    from flows.train_eval import environ
    from tasks.lib.callbacks import TRACKING_BY_ENV, after_stage, trackers
    from tasks.lib.layout import layout_paths
    from tracking.plugin import MLFLOW

    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", tracking.PREFECT_ENV, TRACKING_BY_ENV):
        monkeypatch.delenv(var, raising=False)
    cfg = tiny_config(ON)
    assert trackers(cfg) == [("mlflow", MLFLOW)]  # found through its entry point, not imported by the stages
    assert trackers(tiny_config()) == []  # tracking.enabled: false loads none

    ws = tmp_path / "ws"
    (ws / "samples").mkdir(parents=True)
    (ws / "metrics").mkdir()
    (ws / "data" / "dataset").mkdir(parents=True)
    Image.new("L", (8, 8), 128).save(ws / "samples" / "grid.png")
    (ws / "samples" / "samples.json").write_text(json.dumps(
        {"count": 24, "sampler": "ddim", "steps": 5, "checkpoint": "checkpoints/ckpt_00000006.pt",
         "checkpoint_step": 6, "wall_s": 1.5}))
    (ws / "metrics" / "eval.json").write_text(json.dumps({"fid": 3.5, "floor": {"fid": 1.75}, "fid_ratio": 2.0}))
    (ws / "data" / "dataset" / "dataset.json").write_text(json.dumps({"sha256": "sha-ws"}))
    uri = f"sqlite:///{tmp_path}/store.db"
    tags = {"MLFLOW_TRACKING_URI": uri, tracking.PREFECT_ENV: "flow-run-1", "DVC_EXP_NAME": "ws-exp",
            "DVC_ROOT": str(ws)}
    paths = layout_paths(ws)
    with environ(tags):  # what the flow's track() does
        run_id = MLFLOW.after_stage("sample", cfg, ws, paths)
        assert run_id and MLFLOW.after_stage("evaluate", cfg, ws, paths) == run_id
        assert MLFLOW.after_stage("fetch", cfg, ws, paths) is None  # nothing of fetch's is logged
        assert MLFLOW.after_stage("evaluate", tiny_config(), ws, paths) is None  # tracking off
    assert "MLFLOW_TRACKING_URI" not in os.environ and "DVC_ROOT" not in os.environ  # the environment restored
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "ws-exp"
    assert run.data.tags[tracking.PREFECT_TAG] == "flow-run-1" and run.data.tags[tracking.DVC_EXP_TAG] == "ws-exp"
    assert run.data.tags["sample.checkpoint"] == str(ws / "checkpoints/ckpt_00000006.pt")
    assert run.data.metrics["trained/fid"] == 3.5 and run.data.metrics["trained/floor/fid"] == 1.75
    # the run page's description: the result against its floor, where the pictures are; the table adds its answer
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("**digits** diffusion model, params hash `") and "(ws-exp)" in note
    # the same row the console and the Prefect summary show (tasks/lib/summary.py): one source, three renderings
    evaluation = summary.evaluation_row(json.loads((ws / "metrics" / "eval.json").read_text()))
    assert evaluation.text.startswith("FID 3.5 (real-vs-real floor 1.75, FID / floor 2.00)")
    assert f"**{evaluation.text}**" in note and "`trained/samples`" in note
    table = {"enabled": True, "checkpoint_step": 6, "rows": [],
             "answer": {"cheapest": {"sampler": "unipc", "nfe": 10, "ratio_to_ddpm": 1.04, "by": "tolerance",
                                     "speedup_in_nfe": 100.0}}}
    with environ(tags):
        assert outputs.log_sampler_table(cfg, table, ws / "none.json", ws / "none.md") == run_id
    note = client.get_run(run_id).data.tags["mlflow.note.content"]
    assert f"**{evaluation.text}**" in note and f"**{summary.sampler_table_row(table).text}**" in note
    assert "unipc at 10 network evaluations holds DDPM-1000's FID (1.04x" in note

    # A stage's command line run by hand in the workspace: its own output paths, through the installed tracker;
    # under the flow (DDPM_TRACKING_BY=flow) it leaves that to the flow.
    (ws / "metrics" / "eval2.json").write_text(json.dumps({"fid": 4.25}))
    monkeypatch.chdir(ws)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(TRACKING_BY_ENV, "flow")
    after_stage("evaluate", cfg, eval_metrics="metrics/eval2.json")
    assert client.get_run(run_id).data.metrics["trained/fid"] == 3.5
    monkeypatch.delenv(TRACKING_BY_ENV)
    after_stage("evaluate", cfg, eval_metrics="metrics/eval2.json")
    assert client.get_run(run_id).data.metrics["trained/fid"] == 4.25


@pytest.mark.slow
def test_make_mlflow_ui_is_light(tmp_path, repo_root):
    """`make mlflow-ui` starts the UI and what it needs, nothing else: MLflow's job runner (huey consumers for
    server-side jobs) is off. Measured: 2 processes instead of 10."""
    import signal
    import urllib.request

    import psutil

    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(["make", "-s", "mlflow-ui", f"MLFLOW_PORT={port}", f"MLFLOW_STORE={tmp_path}"],
                            cwd=repo_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "make mlflow-ui exited"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the UI did not answer within 120 s"
                time.sleep(1.0)
        time.sleep(3)  # anything started after the first answer
        procs = [p for p in psutil.Process(proc.pid).children(recursive=True) if "mlflow" in " ".join(p.cmdline())]
        cmdlines = [" ".join(p.cmdline())[:120] for p in procs]
        assert 1 <= len(procs) <= 3, cmdlines
        assert not any("huey" in c for c in cmdlines), cmdlines
        assert (tmp_path / "mlflow.db").is_file()  # the store named by MLFLOW_STORE, not the project's
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_run_of_the_layout_before_sections_still_opens_and_resumes(tiny_config, tmp_path, monkeypatch):
    """A store written before the metric sections (flat ``loss``, ``fid``): its run is found again by its params,
    keeps its old keys readable, and a resumed training continues after the old curve's last step under
    ``train/loss`` instead of logging its steps twice."""
    from mlflow import MlflowClient

    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", tracking.PREFECT_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config({**ON, "tracking.grid_every": 0})
    first = start_training(cfg, "sha-1", fresh=True)
    client = MlflowClient(first["uri"])
    for step in (1, 2, 3):
        client.log_metric(first["run_id"], "loss", 1.0 / step, step=step)  # the old layout's keys
    client.log_metric(first["run_id"], "fid", 2.5, step=3)
    cb = training.MlflowTrainCallback()
    cb.on_fit_start(cfg, "sha-1", False)  # a resume: the same run
    rows = [{"step": str(s), "loss": str(1.0 / s)} for s in (1, 2, 3, 4)]
    cb.on_train_start(cfg, 4, rows)  # the loss log replayed up to the checkpoint's step 4
    cb.on_log({"step": "5", "loss": "0.2", "lr": "0.001", "grad_norm": "1.0", "images_per_s": "10"})
    cb.flush()
    cb._close("FINISHED")
    run = client.get_run(first["run_id"])
    assert run.data.metrics["fid"] == 2.5 and run.data.metrics["loss"] == pytest.approx(1 / 3)  # old keys readable
    assert _history_steps(client, first["run_id"], "train/loss") == [4, 5]  # only what the old curve lacked
    assert _history_steps(client, first["run_id"], "loss") == [1, 2, 3]
