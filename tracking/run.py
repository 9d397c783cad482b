"""The MLflow run of a pipeline run: where the store is, how the run is found again, how a failure is reported.

**One MLflow run per pipeline run.** A pipeline run is named by the hash of its resolved params
(:func:`params_hash`), kept in the run's ``params_hash`` tag. Every stage's report looks the run up by that tag in
the experiment (``tracking.experiment``, default: the dataset name) and logs into it, so a rerun with the same
params (a resume, more ``train.steps``, a DVC rerun) continues the run instead of scattering new ones. A training
that restarts from scratch where the run already holds a loss curve starts a new run (the newest one wins the
look-up).

**Where.** ``MLFLOW_TRACKING_URI``, else ``tracking.uri``, else ``sqlite:///<project>/mlflow.db`` with artifacts
in ``<project>/mlruns/<experiment>``; the project is DVC's root under DVC (``DVC_ROOT``, which stays the real
project during ``dvc exp run --temp/--queue``), else the working directory when the stage starts. Local paths are
made absolute because Ray workers change directory.

**Who writes.** SQLite takes one writer at a time, so one process logs at a time: the train stage's driver creates
the run before Ray starts and then only the rank-0 worker logs (tracking/training.py); what the other stages wrote
is logged after them (tracking/outputs.py), by the stage's command line or, under the flow, by the flow.

**Failures** of tracking (server unreachable, database locked, artifact store full) never fail a stage: they print
one warning and tracking is off for the rest of that stage.

What a run holds: params (the six fields marked ``shown``, logged when the run is created); tags ``config.<key>``
(:func:`config_tags`), ``params_hash``, ``dataset_sha256``, ``mlflow.source.git.commit``, ``prefect_flow_run_id``
(under Prefect), ``dvc_exp_name`` (under ``dvc exp run`` and the flow), ``latest.<key>`` for a key that changed since the run was
created; the training curves, grids and model (tracking/training.py) and what the stages wrote
(tracking/outputs.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from tasks.lib.config import Config, digest

# Offline by design: no usage telemetry (MLflow ignores DO_NOT_TRACK=1, it wants "true").
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PARAMS_HASH_TAG = "params_hash"
DATASET_TAG = "dataset_sha256"
GIT_TAG = "mlflow.source.git.commit"  # MLflow's own name: the UI shows it as the run's commit
PREFECT_TAG = "prefect_flow_run_id"
DVC_EXP_TAG = "dvc_exp_name"
PREFECT_ENV = "DDPM_PREFECT_FLOW_RUN_ID"
LOCAL_UI = "http://127.0.0.1:5000"  # `make mlflow-ui` over the project's local store
COMPARE_QUERY = "workflowType=machine_learning&compareRunsMode=CHART"

# The rank-0 worker gives up on an unreachable server after a few seconds rather than MLflow's minutes of retries.
_WORKER_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "KEY")


# -- identity, place and params ------------------------------------------------------------------------------------
def params_hash(cfg: Config) -> str:
    """SHA-256 naming the pipeline run: every result-defining field of the params (their identity marks,
    :meth:`tasks.lib.config.Config.identity`), so that how long, how many, how fast, where and what the reports show
    (``train.steps`` under a constant schedule, ``sample.num_samples``, worker counts, batch sizes of sampling and
    evaluation, the figures) keep the run."""
    return digest(cfg.identity())


def flat_params(cfg: Config) -> dict[str, str]:
    """The whole resolved params with dotted keys, values written as in params.yaml (``null``, ``true``, ``[1, 2]``)."""
    return {f"{section}.{key}": value if isinstance(value, str) else json.dumps(value)
            for section, values in cfg.to_dict().items() for key, value in values.items()}


# MLflow 3.17 prints every param of a run, with no cap, on each of its image cards, above the picture; the card's
# body is 250 px high. Measured in headless chromium (tests/test_browser.py): 23 params (~700 characters) push a
# training grid out of the card, six short ones leave room for a 4:1 strip (CARD_ASPECT). So the params are the six
# keys runs are compared by (marked ``shown`` where they are declared); the other keys that define a result are tags
# config.<key> (searchable, shown in the run's Overview), like where and on what it ran (the execution-only fields
# marked ``tagged``). The whole resolved config is the artifact config/params.yaml, and a run is found again by its
# params hash (tag ddpm.params_hash) over every key that changes the result.
# The pictures in image cards: MLflow shows a 256-px-wide thumbnail, and the full picture when the card is clicked.
CARD_ASPECT = 4.0  # grids logged as strips (16 images: 2 rows of 8), the shape that fits under the params
CARD_WIDTH = 1024  # px: nearest-neighbour upscaling, so the clicked picture is sharp
CONFIG_ARTIFACT = "config"  # the artifact folder of params.yaml: the whole resolved config


def result_params(cfg: Config) -> dict[str, str]:
    """The run's MLflow params: the fields marked ``shown`` (data.dataset, model.ch, train.steps, train.lr,
    sample.sampler, sample.steps), as :func:`flat_params` writes them."""
    flat = flat_params(cfg)
    return {k: flat[k] for k in _marked(cfg, lambda sec, key: sec.mark(key).get("shown"))}


def config_tags(cfg: Config) -> dict[str, str]:
    """Tags ``config.<key>``: the rest of what defines the result (result and count fields, under these settings),
    and where it ran (execution fields marked ``tagged``)."""
    flat = flat_params(cfg)

    def tagged(sec, key) -> bool:
        m = sec.mark(key)
        return (not m.get("shown") and sec.identity_of(key) in ("result", "count")) or bool(m.get("tagged"))

    return {f"config.{k}": flat[k] for k in _marked(cfg, tagged)}


def _marked(cfg: Config, keep) -> list[str]:
    return [f"{name}.{key}" for name, sec in cfg.sections().items() for key in type(sec).model_fields
            if keep(sec, key)]


def card_image(images) -> Any:
    """uint8 images [N, C, H, W] -> the RGB strip an MLflow image card shows whole (:data:`CARD_ASPECT`)."""
    from tasks.lib.images import grid_image

    return grid_image(images, min_side=CARD_WIDTH, aspect=CARD_ASPECT)


def log_config(client, run_id: str, cfg: Config) -> None:
    """The whole resolved config as the run's artifact ``config/params.yaml``."""
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory(prefix="ddpm-config-") as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        client.log_artifact(run_id, str(path), CONFIG_ARTIFACT)


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


def dataset_sha_from_checkpoints(ckpt_dir: Path) -> Optional[str]:
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


def tracking_errors() -> tuple[type[BaseException], ...]:
    """What a broken tracking backend raises: MLflow's errors, network and file errors (requests' are OSErrors),
    database errors."""
    from alembic.util.exc import CommandError  # a schema migration that failed
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return (MlflowException, OSError, SQLAlchemyError, CommandError)


def warn(what: str, error: BaseException) -> None:
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
def client_for(uri: str):
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
    """Read-only look-up of the run the stages log into for these params: ``{"run_id", "experiment_id", "uri",
    "url", "compare_url"}``, the run's page and the experiment's chart view in the MLflow UI (for a local store, the
    UI ``make mlflow-ui`` serves, and ``"local": True``); None when tracking is off or there is no such run.
    ``root``: what relative store paths are relative to (:func:`resolve_uri`)."""
    if not cfg.tracking.enabled:
        return None
    uri = resolve_uri(cfg, root)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None  # opening would create an empty store
    if not _reachable(uri):
        return None
    try:
        client = client_for(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment or cfg.data.dataset)
        run = _newest_run(client, exp.experiment_id, params_hash(cfg)) if exp is not None else None
    except tracking_errors() as e:
        warn("look-up", e)
        return None
    if run is None:
        return None
    info = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "uri": uri}
    served = uri.startswith(("http://", "https://"))
    server = uri.rstrip("/") if served else LOCAL_UI
    info["url"] = f"{server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    if not served:
        info["local"] = True
    # the experiment's runs in the chart view (a fresh browser otherwise opens the GenAI view: "No data available")
    info["compare_url"] = f"{server}/#/experiments/{run.info.experiment_id}/runs?{COMPARE_QUERY}"
    return info


def _open_run(cfg: Config, client, uri: str, dataset_sha256: Optional[str], fresh_training: bool = False) -> str:
    """Find the pipeline run of these params (or create it, logging the params); tag it; return its id."""
    from mlflow.entities import Param, RunTag

    exp_id = _experiment_id(client, cfg, uri)
    phash = params_hash(cfg)
    run = _newest_run(client, exp_id, phash)
    superseded = None
    if run is not None and fresh_training and ({"train/loss", "loss"} & set(run.data.metrics)):  # (or the old key)
        print(f"tracking: training starts from scratch; new MLflow run (run {run.info.run_id} keeps its curves)")
        superseded, run = run.info.run_id, None
    params, tags = result_params(cfg), _context_tags(dataset_sha256)
    tags.update(config_tags(cfg))
    if run is None:
        name = os.environ.get("DVC_EXP_NAME") or f"{cfg.data.dataset}-{phash[:8]}"
        run = client.create_run(exp_id, run_name=name, tags={PARAMS_HASH_TAG: phash, **tags})
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        log_config(client, run.info.run_id, cfg)
        if superseded:
            client.set_tag(superseded, "superseded_by", run.info.run_id)
        print(f"tracking: MLflow run {run.info.run_id} ({name}) in experiment "
              f"{cfg.tracking.experiment or cfg.data.dataset!r} at {uri}")
        return run.info.run_id
    # Params are immutable in MLflow: keys new since the run began are logged, changed values become tags (a run of an
    # older layout holds every key as a param: the same subset is compared), and the config artifact is rewritten.
    logged = run.data.params
    new = [Param(k, v) for k, v in params.items() if k not in logged]
    changed = [RunTag(f"latest.{k}", v) for k, v in params.items() if k in logged and logged[k] != v]
    client.log_batch(run.info.run_id, params=new, tags=[RunTag(k, v) for k, v in tags.items()] + changed)
    log_config(client, run.info.run_id, cfg)
    print(f"tracking: continuing MLflow run {run.info.run_id} at {uri}")
    return run.info.run_id


def end_run(client, run_id: str, status: str) -> None:
    try:
        client.set_terminated(run_id, status)
    except tracking_errors():
        pass


def forwarded_env() -> dict[str, str]:
    """MLflow settings of this process for the rank-0 worker (a Ray worker may run elsewhere); no credentials."""
    env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_") and k != "MLFLOW_TRACKING_URI"
           and not any(w in k for w in _SECRET_WORDS)}
    return {**_WORKER_HTTP_ENV, **env}


def open_from_driver(cfg: Config, what: str, dataset_sha256: Optional[str], fresh: bool,
                      status: Optional[str] = None) -> Optional[tuple[Any, str, str]]:
    """Find or create the pipeline run from a stage's driver process: ``(client, uri, run_id)``, or None (with a
    warning naming ``what``) when tracking is off, unreachable or failing. ``status`` is set on the run if given."""
    if not cfg.tracking.enabled:
        return None
    uri = resolve_uri(cfg)
    if not _reachable(uri):
        return None
    try:
        client = client_for(uri)
        run_id = _open_run(cfg, client, uri, dataset_sha256, fresh_training=fresh)
        if status is not None:
            client.update_run(run_id, status=status)
    except tracking_errors() + (TrackingSetupError,) as e:
        warn(what, e)
        return None
    return client, uri, run_id


# -- logging from a stage's driver -------------------------------------------------------------------------------
def log_into_run(cfg: Config, what: str, dataset_sha256: Optional[str], body) -> Optional[str]:
    """Open the pipeline run from this (driver) process, run ``body(client, run_id)``, end it; the run id or None."""
    opened = open_from_driver(cfg, f"{what} set-up", dataset_sha256, False, status="RUNNING")
    if opened is None:
        return None
    client, _, run_id = opened
    try:
        body(client, run_id)
    except tracking_errors() as e:
        warn(what, e)
        end_run(client, run_id, "FAILED")
        return None
    except BaseException:
        end_run(client, run_id, "FAILED")
        raise
    end_run(client, run_id, "FINISHED")
    return run_id


def numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def metric_list(values: dict[str, float], step: int) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, v, now, step) for k, v in values.items()]


def flat_tags(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> dotted keys with values as JSON text (strings as they are), for tags."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_tags(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)
    return out
