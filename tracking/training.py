"""Training as MLflow sees it: the ``mlflow`` tracker's :class:`~tasks.lib.callbacks.TrainCallback`.

The driver finds or creates the pipeline run before Ray starts (:meth:`MlflowTrainCallback.on_fit_start`); the
callback then travels to the rank-0 Ray Train worker, which logs the loss log's rows as metrics ``train/loss``,
``train/lr``, ``train/grad_norm``, ``train/images_per_s`` (batched, at most every ``FLUSH_SECONDS``), MLflow's
``system/*`` metrics, a strip sampled from the EMA network every ``tracking.grid_every`` steps (image
``train/samples``, beside the loss curve in the run's ``train`` section) and, at the end, the EMA
UNet as logged model ``ema_unet`` (registered under ``tracking.register_model`` when set). A failed training marks
the run FAILED from the driver.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

from tasks.lib.callbacks import TrainCallback
from tasks.lib.config import Config

from .run import (
    card_image,
    client_for,
    end_run,
    forwarded_env,
    open_from_driver,
    params_hash,
    tracking_errors,
    warn,
)

TRAIN_METRICS = ("loss", "lr", "grad_norm", "images_per_s")  # the loss log's columns, logged as train/<column>
MODEL_NAME = "ema_unet"
GRID_KEY = "train/samples"  # beside train/loss in the train section
FLUSH_SECONDS = 5.0  # training metrics are sent in batches at most this often (and before grids and at the end)


class _Fluent:
    """MLflow's module-level API (needed for system metrics and ``log_model``) pointed at ``uri`` for a while,
    then the process's tracking URI and environment as they were (Prefect runs every stage in one process)."""

    def __init__(self, uri: str, env: dict[str, str]):
        self.uri, self.env = uri, env

    def __enter__(self) -> "_Fluent":
        import mlflow
        from mlflow.tracking._tracking_service import utils

        self.saved_env = {k: os.environ.get(k) for k in ["MLFLOW_TRACKING_URI", *self.env]}
        self.saved_uri = utils._tracking_uri
        for k, v in self.env.items():
            os.environ.setdefault(k, v)
        mlflow.set_tracking_uri(self.uri)
        return self

    def __exit__(self, *exc) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.saved_uri)
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v



class MlflowTrainCallback(TrainCallback):
    """Rank 0's MLflow logging of a training, opened by the driver. Every hook is a no-op when the driver found no
    run (tracking off or unreachable) and after a tracking failure, which is reported once and never stops training.

    Metric rows are buffered and sent as one batch at most every ``FLUSH_SECONDS``; steps the run already holds
    are skipped, so a resumed training adds each step once, and rows of the loss log the run lacks (lost in a
    crash) are sent when training starts.
    """

    def __init__(self) -> None:
        self.info: Optional[dict[str, Any]] = None  # what the worker needs: absolute URI, run id, MLflow settings
        self.active = False

    def __getstate__(self) -> dict[str, Any]:  # what travels to the Ray worker: the driver's findings only
        return {"info": self.info, "active": False}

    # -- driver ---------------------------------------------------------------------------------------------------
    def on_fit_start(self, cfg: Config, dataset_sha256: str, fresh: bool) -> None:
        """Find or create the pipeline run (a new one when ``fresh`` training would overwrite a curve)."""
        opened = open_from_driver(cfg, "set-up", dataset_sha256, fresh)
        if opened is not None:
            _, uri, run_id = opened
            self.info = {"uri": uri, "run_id": run_id, "env": forwarded_env()}

    def on_fit_end(self, ok: bool) -> None:
        """A failed training marks the run FAILED (a finished one was ended by the worker)."""
        if not ok and self.info:
            try:
                end_run(client_for(self.info["uri"]), self.info["run_id"], "FAILED")
            except tracking_errors():
                pass

    # -- rank 0 ---------------------------------------------------------------------------------------------------
    def on_train_start(self, cfg: Config, step: int, rows: list[dict[str, Any]]) -> None:
        if self.info:
            self._safely("start", self._open, self.info, cfg, step, rows)

    def on_log(self, row: dict[str, Any]) -> None:
        self.log_row(row)

    def on_step_end(self, step: int, ema_model, diffusion) -> None:
        self.grid(step, ema_model, diffusion)

    def on_train_end(self, step: int, ema_model) -> None:
        self.finish(step, ema_model)

    def _open(self, info: dict[str, Any], cfg: Config, step: int, rows: list[dict[str, Any]]) -> None:
        import mlflow

        self.cfg, self.run_id, self.start_step = cfg, info["run_id"], step
        self.fluent = _Fluent(info["uri"], info.get("env", {})).__enter__()
        try:
            mlflow.start_run(run_id=self.run_id, log_system_metrics=cfg.tracking.system_metrics)
        except BaseException:
            self.fluent.__exit__(None, None, None)
            raise
        self.active = True
        self.client = client_for(info["uri"])
        self.logged_upto = max((m.step for key in ("train/loss", "loss")  # "loss": a run of the layout before sections
                                for m in self.client.get_metric_history(self.run_id, key)), default=0)
        # Grids are logged after their step's metrics: none beyond this; a fresh training may log step 0's.
        self.images_upto = self.logged_upto if step > 0 else -1
        self.buffer: list = []
        self.last_flush = time.monotonic()
        for row in rows:
            self.log_row(row)
        self.flush()

    def _safely(self, what: str, fn, *args) -> Any:
        try:
            return fn(*args)
        except tracking_errors() as e:
            warn(what, e)
            self._close("FAILED")
            return None

    def _close(self, status: str) -> None:
        if not self.active:
            return
        self.active = False
        import mlflow

        try:
            mlflow.end_run(status)
        except tracking_errors():
            pass
        finally:
            self.fluent.__exit__(None, None, None)

    def log_row(self, row: dict[str, Any]) -> None:
        """One row of the loss log (``step``, ``loss``, ``lr``, ``grad_norm``, ``images_per_s``, as strings)."""
        if not self.active:
            return
        from mlflow.entities import Metric

        step = int(row["step"])
        if step <= self.logged_upto:
            return
        now = int(time.time() * 1000)
        for key in TRAIN_METRICS:
            try:
                self.buffer.append(Metric(f"train/{key}", float(row[key]), now, step))
            except (KeyError, TypeError, ValueError):
                continue
        self.logged_upto = step
        if time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.active or not self.buffer:
            return
        batch, self.buffer = self.buffer, []
        self.last_flush = time.monotonic()
        self._safely("logging", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def grid(self, step: int, model, diffusion) -> None:
        """Every ``tracking.grid_every`` steps and at the last step: a grid sampled from ``model`` (the EMA UNet)
        with ``tracking.grid_sampler`` (``grid_steps`` evaluations) from the fixed seeds ``sample.grid_seed`` .. +``tracking.grid_samples``-1 (the same noise at every
        step and in every run with that grid seed; the final samples/grid.png starts from the same seeds), logged as
        stepped image ``train/samples``: a 4:1 strip, which MLflow's image card shows whole. Step 0 is the initial weights (the train loop reports it before the first update of a fresh training)."""
        tc = self.cfg.tracking if self.active else None
        if tc is None or not tc.grid_every or (step % tc.grid_every and step != self.cfg.train.steps):
            return
        if step <= self.images_upto:  # recomputed after a resume: the run has this grid
            return
        self.flush()
        self._safely("sample grid", self._grid, step, model, diffusion)

    def _grid(self, step: int, model, diffusion) -> None:
        import mlflow

        from ddpm.samplers import sample

        from tasks.lib.images import to_uint8

        tc = self.cfg.tracking
        seeds = list(range(self.cfg.sample.grid_seed, self.cfg.sample.grid_seed + tc.grid_samples))
        x = sample(model, diffusion, seeds, self.cfg.data.shape, sampler=tc.grid_sampler,
                   steps=min(tc.grid_steps, diffusion.num_timesteps),
                   timestep_spacing=self.cfg.sample.timestep_spacing)
        mlflow.log_image(card_image(to_uint8(x)), key=GRID_KEY, step=step, synchronous=True)

    def finish(self, step: int, model) -> None:
        """At the end of training: the pending metrics, the EMA UNet (when this call trained), the run ended."""
        if not self.active:
            return
        self.flush()
        if step > self.start_step:
            self._safely("model logging", self._log_model, step, model)
        self._close("FINISHED")

    def _log_model(self, step: int, model) -> None:
        """The EMA UNet as an MLflow model without pickle (tracking/unet_model.py: a "model from code" that rebuilds
        it from its config and a weights-only state dict); the library's code travels with it. The same network as
        a diffusers folder is the model's artifact ``diffusers`` (``artifacts/diffusers/`` in the model:
        ``DDPMPipeline.from_pretrained`` loads it, docs/diffusers.md)."""
        import json
        import tempfile

        import mlflow
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

        import ddpm
        from ddpm.diffusers_io import model_card
        from ddpm.pretrained import write_diffusers

        unet, diffusion = self.cfg.unet_config().to_dict(), self.cfg.diffusion.model_dump()
        state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        meta = {"unet_config": unet, "diffusion": diffusion, "train_step": step, "params_hash": params_hash(self.cfg),
                "inputs": "x [B, C, H, W] in [-1, 1], t [B] int64",
                "output": f"{self.cfg.diffusion.objective} prediction [B, C, H, W]"}
        with tempfile.TemporaryDirectory(prefix="ema_unet-") as tmp:
            weights, config = Path(tmp) / "weights.pt", Path(tmp) / "unet.json"
            torch.save(state, weights)
            config.write_text(json.dumps(meta, indent=2))
            s = self.cfg.sample
            card = model_card({"config": {"model": unet, "diffusion": diffusion, "params": self.cfg.to_dict()},
                               "step": step}, "the MLflow run's final EMA weights", None, s.variance)
            hub = write_diffusers(model, diffusion, Path(tmp) / "diffusers", variance=s.variance,
                                  clip_denoised=s.clip_denoised, card=card)
            c, h = unet["image_channels"], unet["image_size"]
            signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, h, h))]),
                                       params=ParamSchema([ParamSpec("t", "long", [0], (-1,))]))
            mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                signature=signature,
                input_example=(np.zeros((1, c, h, h), np.float32), {"t": [0]}),
                python_model=str(Path(__file__).with_name("unet_model.py")),
                artifacts={"weights": str(weights), "config": str(config), "diffusers": str(hub)},
                code_paths=[str(Path(ddpm.__file__).parent)],  # loadable without this project installed
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
                params={**{f"unet.{k}": v for k, v in unet.items()},
                        **{f"diffusion.{k}": v for k, v in diffusion.items()}, "train_step": step},
                metadata=meta,
                step=step,
                registered_model_name=self.cfg.tracking.register_model,
            )


