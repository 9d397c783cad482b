"""MLflow tracking of pipeline runs; the only module of the project that imports mlflow.

**One MLflow run per pipeline run.** A pipeline run is named by the hash of its resolved params
(:func:`params_hash`), kept in the run's ``params_hash`` tag. Every stage looks the run up by that tag in the
experiment (``tracking.experiment``, default: the dataset name) and logs into it, so a rerun with the same params
(a resume, more ``train.steps``, a DVC rerun) continues the run instead of scattering new ones. A training that
restarts from scratch where the run already holds a loss curve starts a new run (the newest one wins the look-up).

**Where.** ``MLFLOW_TRACKING_URI``, else ``tracking.uri``, else ``sqlite:///<project>/mlflow.db`` with artifacts
in ``<project>/mlruns/<experiment>``; the project is DVC's root under DVC (``DVC_ROOT``, which stays the real
project during ``dvc exp run --temp/--queue``), else the working directory when the stage starts. Local paths are
made absolute because Ray workers change directory.

**Who writes.** SQLite takes one writer at a time, so one process logs at a time: the train stage's driver creates
the run before Ray starts and then only the rank-0 worker logs (:class:`TrainTracker`); the sample and evaluate
stages log from their driver once their Ray work is done.

**Failures** of tracking (server unreachable, database locked, artifact store full) never fail a stage: they print
one warning and tracking is off for the rest of that stage.

What a run holds: params (the whole resolved params.yaml, dotted keys, logged when the run is created); tags
``params_hash``, ``dataset_sha256``, ``mlflow.source.git.commit``, ``prefect_flow_run_id`` (under Prefect),
``dvc_exp_name`` (under ``dvc exp run``), ``latest.<key>`` for a key that changed since the run was created;
metrics ``loss``, ``lr``, ``grad_norm``, ``images_per_s`` (every ``train.log_every`` steps), ``system/*``, the
``sample_*`` numbers, ``fid``, ``kid_mean``, ``kid_std``, ``isc_*``, ``precision``, ``recall``, ``floor_*``,
``fid_ratio``, ``classifier_accuracy``; images ``train_samples`` (stepped) and ``samples``; artifacts
``samples/grid.png``, ``samples/samples.json``, ``evaluate/eval.json``; the EMA UNet as logged model ``ema_unet``
(registered under ``tracking.register_model`` when set).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from tasks.config import Config

# Offline by design: no usage telemetry (MLflow ignores DO_NOT_TRACK=1, it wants "true").
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PARAMS_HASH_TAG = "params_hash"
DATASET_TAG = "dataset_sha256"
GIT_TAG = "mlflow.source.git.commit"  # MLflow's own name: the UI shows it as the run's commit
PREFECT_TAG = "prefect_flow_run_id"
DVC_EXP_TAG = "dvc_exp_name"
PREFECT_ENV = "DDPM_PREFECT_FLOW_RUN_ID"
# "flow": an orchestrator logs what the sample, evaluate, figures and sampler_table stages wrote, after them
# (flows/tracking_layer.py), so the stages skip their own MLflow logging. Unset: the stages log themselves.
TRACKING_BY_ENV = "DDPM_TRACKING_BY"
TRAIN_METRICS = ("loss", "lr", "grad_norm", "images_per_s")  # the loss log's columns
MODEL_NAME = "ema_unet"
GRID_KEY = "train_samples"
FLUSH_SECONDS = 5.0  # training metrics are sent in batches at most this often (and before grids and at the end)

# Sections and keys that change where, how fast or how long, or only what is reported, not what is computed:
# changing them keeps the run.
_UNHASHED_SECTIONS = ("ray", "tracking", "figures", "sampler_table")
_SAMPLE_EXECUTION_KEYS = frozenset({"num_workers", "use_gpu", "batch_size"})  # one seed per sample
_EVALUATE_EXECUTION_KEYS = frozenset({"batch_size"})
# The rank-0 worker gives up on an unreachable server after a few seconds rather than MLflow's minutes of retries.
_WORKER_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "KEY")


# -- identity, place and params ------------------------------------------------------------------------------------
def _execution_keys(cfg: Config) -> dict[str, frozenset]:
    from .runkey import resumable_keys

    return {"train": resumable_keys(cfg), "sample": _SAMPLE_EXECUTION_KEYS,
            "evaluate": _EVALUATE_EXECUTION_KEYS}


def params_hash(cfg: Config) -> str:
    """SHA-256 naming the pipeline run: every section but ``ray`` and ``tracking``, without the keys that only
    change how long or how fast (``train.steps``, worker counts, batch sizes of sampling and evaluation)."""
    import hashlib

    d = cfg.to_dict()
    skip = _execution_keys(cfg)
    blob = {s: {k: v for k, v in values.items() if k not in skip.get(s, ())}
            for s, values in d.items() if s not in _UNHASHED_SECTIONS}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def flat_params(cfg: Config) -> dict[str, str]:
    """The whole resolved params with dotted keys, values written as in params.yaml (``null``, ``true``, ``[1, 2]``)."""
    return {f"{section}.{key}": value if isinstance(value, str) else json.dumps(value)
            for section, values in cfg.to_dict().items() for key, value in values.items()}


def project_dir() -> Path:
    """DVC's root under DVC (also for ``dvc exp run --temp``), else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def resolve_uri(cfg: Config, root: Optional[Path] = None) -> str:
    """``MLFLOW_TRACKING_URI``, else ``tracking.uri``, else the project's SQLite store; local paths made absolute
    against ``root`` (default: :func:`project_dir`)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    base = Path(root).resolve() if root is not None else project_dir()
    if not uri:
        return f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and not path.startswith("/") and path != ":memory:":
            return f"sqlite:///{base / path}"
        return uri
    if uri.startswith(("/", ".", "~")):  # a folder: MLflow's file store
        return (base / uri).expanduser().resolve().as_uri()
    return uri


def _artifact_root(uri: str, experiment: str) -> Optional[str]:
    """Artifacts of a local SQLite store go to ``mlruns/<experiment>`` beside the database; a server decides."""
    if uri.startswith("sqlite:///"):
        folder = re.sub(r"[^A-Za-z0-9._-]", "_", experiment)
        return str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns" / folder)
    return None


def _dataset_sha_from_checkpoints(ckpt_dir: Path) -> Optional[str]:
    """The dataset hash a checkpoint folder was trained on (its ``run_key.json``, written by the train stage)."""
    try:
        return json.loads((ckpt_dir / "run_key.json").read_text()).get("data_sha256")
    except (OSError, ValueError):
        return None


def _git_commit() -> Optional[str]:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_dir(), capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


def _context_tags(dataset_sha256: Optional[str]) -> dict[str, str]:
    tags = {GIT_TAG: _git_commit(), DATASET_TAG: dataset_sha256, PREFECT_TAG: os.environ.get(PREFECT_ENV),
            DVC_EXP_TAG: os.environ.get("DVC_EXP_NAME")}
    return {k: v for k, v in tags.items() if v}


# -- failures ------------------------------------------------------------------------------------------------------
class TrackingSetupError(RuntimeError):
    """A tracking set-up problem the user can fix (a deleted experiment); reported as a warning like the others."""


def _tracking_errors() -> tuple[type[BaseException], ...]:
    """What a broken tracking backend raises: MLflow's errors, network and file errors (requests' are OSErrors),
    database errors."""
    from alembic.util.exc import CommandError  # a schema migration that failed
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return (MlflowException, OSError, SQLAlchemyError, CommandError)


def _warn(what: str, error: BaseException) -> None:
    text = str(error).strip().splitlines()
    print(f"warning: MLflow tracking {what} failed, tracking is off for the rest of this stage "
          f"({type(error).__name__}: {text[0] if text else ''})", file=sys.stderr)


def _reachable(uri: str) -> bool:
    """A fast check of an HTTP tracking server, so that a stopped server costs seconds, not MLflow's retries."""
    if not uri.startswith(("http://", "https://")):
        return True
    import warnings

    import requests

    try:
        with warnings.catch_warnings():  # only whether something answers: TLS is MLflow's to verify
            warnings.simplefilter("ignore")
            requests.get(uri.rstrip("/") + "/health", timeout=5, verify=False)
    except requests.RequestException as e:
        print(f"warning: MLflow tracking server {uri} unreachable ({type(e).__name__}); tracking is off for this "
              "stage", file=sys.stderr)
        return False
    return True


# -- the pipeline run ----------------------------------------------------------------------------------------------
def _client(uri: str):
    from mlflow import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    # Two pipelines that create one new SQLite store at once would both run its schema migrations, and one would
    # fail: the client (whose constructor creates the store) is made under an exclusive lock beside the database.
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return MlflowClient(tracking_uri=uri)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _experiment_id(client, cfg: Config, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    name = cfg.tracking.experiment or cfg.data.dataset
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "active":
        return exp.experiment_id
    if exp is not None:
        raise TrackingSetupError(f"experiment {name!r} is deleted in {uri}; restore it or set tracking.experiment")
    try:
        return client.create_experiment(name, artifact_location=_artifact_root(uri, name))
    except MlflowException:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _newest_run(client, experiment_id: str, phash: str):
    found = client.search_runs([experiment_id], filter_string=f"tags.{PARAMS_HASH_TAG} = '{phash}'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def find_run(cfg: Config, root: Optional[Path] = None) -> Optional[dict[str, str]]:
    """Read-only look-up of the run the stages log into for these params: ``{"run_id", "experiment_id", "uri"}``
    plus ``"url"`` (the run's page) for a tracking server; None when tracking is off or there is no such run.
    ``root``: what relative store paths are relative to (:func:`resolve_uri`)."""
    if not cfg.tracking.enabled:
        return None
    uri = resolve_uri(cfg, root)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None  # opening would create an empty store
    if not _reachable(uri):
        return None
    try:
        client = _client(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment or cfg.data.dataset)
        run = _newest_run(client, exp.experiment_id, params_hash(cfg)) if exp is not None else None
    except _tracking_errors() as e:
        _warn("look-up", e)
        return None
    if run is None:
        return None
    info = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "uri": uri}
    if uri.startswith(("http://", "https://")):
        info["url"] = f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return info


def _open_run(cfg: Config, client, uri: str, dataset_sha256: Optional[str], fresh_training: bool = False) -> str:
    """Find the pipeline run of these params (or create it, logging the params); tag it; return its id."""
    from mlflow.entities import Param, RunTag

    exp_id = _experiment_id(client, cfg, uri)
    phash = params_hash(cfg)
    run = _newest_run(client, exp_id, phash)
    superseded = None
    if run is not None and fresh_training and "loss" in run.data.metrics:
        print(f"tracking: training starts from scratch; new MLflow run (run {run.info.run_id} keeps its curves)")
        superseded, run = run.info.run_id, None
    params, tags = flat_params(cfg), _context_tags(dataset_sha256)
    if run is None:
        name = os.environ.get("DVC_EXP_NAME") or f"{cfg.data.dataset}-{phash[:8]}"
        run = client.create_run(exp_id, run_name=name, tags={PARAMS_HASH_TAG: phash, **tags})
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        if superseded:
            client.set_tag(superseded, "superseded_by", run.info.run_id)
        print(f"tracking: MLflow run {run.info.run_id} ({name}) in experiment "
              f"{cfg.tracking.experiment or cfg.data.dataset!r} at {uri}")
        return run.info.run_id
    # Params are immutable in MLflow: keys new since the run began are logged, changed values become tags.
    logged = run.data.params
    new = [Param(k, v) for k, v in params.items() if k not in logged]
    changed = [RunTag(f"latest.{k}", v) for k, v in params.items() if k in logged and logged[k] != v]
    client.log_batch(run.info.run_id, params=new, tags=[RunTag(k, v) for k, v in tags.items()] + changed)
    print(f"tracking: continuing MLflow run {run.info.run_id} at {uri}")
    return run.info.run_id


def _end(client, run_id: str, status: str) -> None:
    try:
        client.set_terminated(run_id, status)
    except _tracking_errors():
        pass


def _forwarded_env() -> dict[str, str]:
    """MLflow settings of this process for the rank-0 worker (a Ray worker may run elsewhere); no credentials."""
    env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_") and k != "MLFLOW_TRACKING_URI"
           and not any(w in k for w in _SECRET_WORDS)}
    return {**_WORKER_HTTP_ENV, **env}


def _open_from_driver(cfg: Config, what: str, dataset_sha256: Optional[str], fresh: bool,
                      status: Optional[str] = None) -> Optional[tuple[Any, str, str]]:
    """Find or create the pipeline run from a stage's driver process: ``(client, uri, run_id)``, or None (with a
    warning naming ``what``) when tracking is off, unreachable or failing. ``status`` is set on the run if given."""
    if not cfg.tracking.enabled:
        return None
    uri = resolve_uri(cfg)
    if not _reachable(uri):
        return None
    try:
        client = _client(uri)
        run_id = _open_run(cfg, client, uri, dataset_sha256, fresh_training=fresh)
        if status is not None:
            client.update_run(run_id, status=status)
    except _tracking_errors() + (TrackingSetupError,) as e:
        _warn(what, e)
        return None
    return client, uri, run_id


# -- the train stage -----------------------------------------------------------------------------------------------
def start_training(cfg: Config, dataset_sha256: str, fresh: bool) -> Optional[dict[str, Any]]:
    """Driver side of the train stage, before Ray starts: find or create the pipeline run.

    ``fresh``: no checkpoint to resume, training starts at step 0. Returns what the rank-0 worker needs (absolute
    URI, run id, MLflow settings), or None when tracking is off or failed.
    """
    opened = _open_from_driver(cfg, "set-up", dataset_sha256, fresh)
    if opened is None:
        return None
    _, uri, run_id = opened
    return {"uri": uri, "run_id": run_id, "env": _forwarded_env()}


def training_failed(info: Optional[dict[str, Any]]) -> None:
    """Driver side, after Ray reported a failed training: mark the run FAILED."""
    if info:
        try:
            _end(_client(info["uri"]), info["run_id"], "FAILED")
        except _tracking_errors():
            pass


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


class TrainTracker:
    """Rank 0's MLflow logging inside the training loop. Every method is a no-op when tracking is off (other ranks,
    ``tracking.enabled: false``) and after a tracking failure, which is reported once and never stops training.

    Metric rows are buffered and sent as one batch at most every ``FLUSH_SECONDS``; steps the run already holds
    are skipped, so a resumed training adds each step once, and rows of the loss log the run lacks (lost in a
    crash) are sent when the tracker opens.
    """

    def __init__(self) -> None:
        self.active = False

    @classmethod
    def open(cls, info: Optional[dict[str, Any]], cfg: Config, step: int, rows: list[dict[str, Any]]) -> "TrainTracker":
        """``info`` from :func:`start_training` (None: a no-op tracker); ``step``/``rows``: where training resumes
        and the loss log up to there."""
        tracker = cls()
        if info:
            tracker._safely("start", tracker._open, info, cfg, step, rows)
        return tracker

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
        self.client = _client(info["uri"])
        self.logged_upto = max((m.step for m in self.client.get_metric_history(self.run_id, "loss")), default=0)
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
        except _tracking_errors() as e:
            _warn(what, e)
            self._close("FAILED")
            return None

    def _close(self, status: str) -> None:
        if not self.active:
            return
        self.active = False
        import mlflow

        try:
            mlflow.end_run(status)
        except _tracking_errors():
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
                self.buffer.append(Metric(key, float(row[key]), now, step))
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
        with DDIM from the fixed seeds ``sample.grid_seed`` .. +``tracking.grid_samples``-1 (the same noise at every
        step and in every run with that grid seed; the final samples/grid.png starts from the same seeds), logged as
        stepped image ``train_samples``. Step 0 (before any update) is logged when the caller asks for it."""
        tc = self.cfg.tracking if self.active else None
        if tc is None or not tc.grid_every or (step % tc.grid_every and step != self.cfg.train.steps):
            return
        if step <= self.images_upto:  # recomputed after a resume: the run has this grid
            return
        self.flush()
        self._safely("sample grid", self._grid, step, model, diffusion)

    def _grid(self, step: int, model, diffusion) -> None:
        import mlflow

        from ddpm.samplers import ddim_sample

        from .common import grid_image, to_uint8

        tc = self.cfg.tracking
        seeds = list(range(self.cfg.sample.grid_seed, self.cfg.sample.grid_seed + tc.grid_samples))
        x = ddim_sample(model, diffusion, seeds, self.cfg.data.shape,
                        steps=min(tc.grid_steps, diffusion.num_timesteps))
        mlflow.log_image(grid_image(to_uint8(x)), key=GRID_KEY, step=step, synchronous=True)

    def finish(self, step: int, model) -> None:
        """At the end of training: the pending metrics, the EMA UNet (when this call trained), the run ended."""
        if not self.active:
            return
        self.flush()
        if step > self.start_step:
            self._safely("model logging", self._log_model, step, model)
        self._close("FINISHED")

    def _log_model(self, step: int, model) -> None:
        import mlflow.pytorch

        import ddpm

        unet, diffusion = self.cfg.unet_config().to_dict(), self.cfg.diffusion.model_dump()
        if any(p.device.type != "cpu" for p in model.parameters()):
            model = copy.deepcopy(model).to("cpu")
        mlflow.pytorch.log_model(
            model,
            name=MODEL_NAME,
            serialization_format="pickle",  # forward(x, t) has two inputs; pt2 would fix the batch size
            code_paths=[str(Path(ddpm.__file__).parent)],  # loadable without this project installed
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),  # no slow inference subprocess
            params={**{f"unet.{k}": v for k, v in unet.items()}, **{f"diffusion.{k}": v for k, v in diffusion.items()},
                    "train_step": step},
            metadata={"unet_config": unet, "diffusion": diffusion, "train_step": step,
                      "params_hash": params_hash(self.cfg), "inputs": "x [B, C, H, W] in [-1, 1], t [B] int64",
                      "output": f"{self.cfg.diffusion.objective} prediction [B, C, H, W]"},
            step=step,
            registered_model_name=self.cfg.tracking.register_model,
        )


# -- the sample and evaluate stages --------------------------------------------------------------------------------
def logged_by_stage() -> bool:
    """Whether a stage logs its own outputs: not when the train-eval flow's tracking layer does it after the stage."""
    return os.environ.get(TRACKING_BY_ENV, "stage") != "flow"


def _log_stage(cfg: Config, what: str, dataset_sha256: Optional[str], body) -> Optional[str]:
    """Open the pipeline run from this (driver) process, run ``body(client, run_id)``, end it; the run id or None."""
    opened = _open_from_driver(cfg, f"{what} set-up", dataset_sha256, False, status="RUNNING")
    if opened is None:
        return None
    client, _, run_id = opened
    try:
        body(client, run_id)
    except _tracking_errors() as e:
        _warn(what, e)
        _end(client, run_id, "FAILED")
        return None
    except BaseException:
        _end(client, run_id, "FAILED")
        raise
    _end(client, run_id, "FINISHED")
    return run_id


def _numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _metrics(values: dict[str, float], step: int) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, v, now, step) for k, v in values.items()]


def log_samples(cfg: Config, summary: dict[str, Any], out_dir: os.PathLike | str) -> Optional[str]:
    """After the sample stage: the grid (artifact ``samples/grid.png`` and image ``samples``), the manifest, the
    count and speed (``sample_*``, at the checkpoint's training step) and the sampler (tags ``sample.*``)."""
    out_dir = Path(out_dir)
    step = int(summary.get("checkpoint_step") or 0)
    ckpt = summary.get("checkpoint")

    def body(client, run_id: str) -> None:
        from mlflow.entities import RunTag

        values = {f"sample_{k}": v for k, v in _numbers(summary).items()
                  if k in ("count", "steps", "eta", "wall_s", "ray_startup_s", "images_per_s", "shards_reused")}
        tags = {"sample.sampler": f"{summary.get('sampler')}-{summary.get('steps')}",
                "sample.checkpoint": str(ckpt), "sample.checkpoint_step": str(step)}
        client.log_batch(run_id, metrics=_metrics(values, step), tags=[RunTag(k, v) for k, v in tags.items()])
        grid = out_dir / "grid.png"
        if grid.is_file():
            client.log_artifact(run_id, str(grid), "samples")
            from PIL import Image

            with Image.open(grid) as im:
                client.log_image(run_id, im.convert("RGB"), key="samples", step=step, synchronous=True)
        if (out_dir / "samples.json").is_file():
            client.log_artifact(run_id, str(out_dir / "samples.json"), "samples")

    sha = _dataset_sha_from_checkpoints(Path(ckpt).parent) if ckpt else None
    return _log_stage(cfg, "of the samples", sha, body)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> dotted keys with values as JSON text (strings as they are), for tags."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)
    return out


def log_evaluation(cfg: Config, result: dict[str, Any], dataset_sha256: Optional[str],
                   samples_dir: os.PathLike | str, metrics_path: os.PathLike | str) -> Optional[str]:
    """After the evaluate stage: every number of ``eval.json`` (FID, KID mean/std, IS, precision/recall,
    ``fid_ratio``, ``classifier_accuracy``; the real-vs-real floor as ``floor_*``; with repeats ``<metric>_mean``,
    ``_std``, ``_min`` and ``<metric>_r<i>`` per seed range) at the training step the samples came from, the
    provenance block as tags ``eval.<key>`` (counts, seed ranges, sampler, checkpoint, extractor and weights hash,
    library versions) and ``eval.json`` as artifact ``evaluate/eval.json``."""
    try:
        step = int(json.loads((Path(samples_dir) / "samples.json").read_text()).get("checkpoint_step") or 0)
    except (OSError, ValueError):
        step = 0

    def body(client, run_id: str) -> None:
        from mlflow.entities import RunTag

        values = {**_numbers(result), **_numbers(result.get("floor") or {}, "floor_")}
        for metric, s in (result.get("per_repeat") or {}).items():
            values.update(_numbers({k: s.get(k) for k in ("mean", "std", "min")}, f"{metric}_"))
            values.update({f"{metric}_r{i}": float(v) for i, v in enumerate(s.get("values") or [])})
        tags = {"evaluate.feature_extractor": str(result.get("feature_extractor")),
                "evaluate.reference_key": str(result.get("reference_key")),
                **{f"eval.{k}": v for k, v in _flat(result.get("provenance") or {}).items()}}
        client.log_batch(run_id, metrics=_metrics(values, step), tags=[RunTag(k, v) for k, v in tags.items()])
        if Path(metrics_path).is_file():
            client.log_artifact(run_id, str(metrics_path), "evaluate")

    return _log_stage(cfg, "of the evaluation", dataset_sha256, body)
