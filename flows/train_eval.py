"""The ``train-eval`` flow: the stages of dvc.yaml (fetch -> train_classifier -> train -> sample -> evaluate ->
figures, sampler_table) as Prefect tasks, each run by DVC.

dvc.yaml is the one declaration of the pipeline: its stages, their commands, deps, params and outputs. The flow
reads the stage list from it and runs each stage with ``dvc repro --single-item <stage>``, so a flow run leaves
its workspace exactly as ``dvc repro`` would: dvc.lock updated, outputs in the DVC cache, ``dvc status`` clean,
``dvc push`` ready. What the flow adds:

- One config, checked before any compute: the ``params`` file plus dotted ``overrides``
  (``{"train.steps": 2000}``); an invalid value, or a missing dataset or weights file of any stage, fails the run at
  once with one line.
- A workspace per set of params (flows/workspace.py). The project's own params.yaml runs in the project folder;
  other params (overrides, another preset) run in a git worktree under ``runs/`` (or ``out``), recorded at the end
  as a DVC experiment (``dvc exp show`` in the project lists it, with its params and metrics).
- "Cached" means DVC says the stage is up to date (or restored it from its run-cache). After a failure, a rerun
  starts at the stage that failed.
- Retries on the I/O-bound fetch. Training resumes from its newest checkpoint whenever it runs again.
- The ids tie together: the stages tag their MLflow run with the Prefect flow run and the DVC experiment, the
  experiment holds ``metrics/run.json`` (the flow run and MLflow run ids), and the flow run's summary artifact
  names both.
- Logs (every line of the stages' output) and artifacts: a markdown summary, a table of the evaluation metrics and,
  when the run was tracked, a link to its MLflow run.

Run it in this process, from the project folder (without a server Prefect starts a temporary local API, ~20 s)::

    python -m flows.train_eval [--params params.yaml] [--set train.steps=2000 ...] [--out DIR]

or through a deployment (prefect.yaml; ``python -m flows.serve``)::

    prefect deployment run 'train-eval/local' --param overrides='{"train.steps": 2000}' --watch

Runs in different workspaces may go side by side (they share only DVC's cache, which is safe for that); a second
run in the same workspace fails at once with a line naming the first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.states import Completed, Failed, State

from flows import artifacts
from flows import workspace as wsp
from tasks.lib.callbacks import TRACKING_BY_ENV, trackers
from tasks.lib.errors import StageError
from tasks.lib.config import Config, ConfigError, load_config, parse_override
from tasks.lib.dvcfile import check_order, downstream, producers, read_stages
from tasks.lib.inputs import EXTERNAL_PATH_KEYS
from tasks.lib.inputs import check as check_inputs
from tasks.lib.layout import LAYOUT, layout_paths, read_output
from tasks.lib.summary import Row, console, fmt, run_rows, stage_row

PROJECT = Path(__file__).resolve().parents[1]
FLOW_RUN_ENV = "DDPM_PREFECT_FLOW_RUN_ID"  # read by the MLflow tracking module to tag its run
RETRIES = {"fetch": (2, [2, 10])}  # (retries, delays in s): I/O-bound stages only

STAGES = read_stages(PROJECT / "dvc.yaml")
check_order(STAGES, PROJECT / "dvc.yaml")
PRODUCERS = producers(STAGES)  # the DAG: a stage starts once these are done (fetch -> train -> sample ...)
NUMBER = {name: i for i, name in enumerate(STAGES, 1)}
# The stages that join a Ray cluster: those whose code deps hold the module that connects to one. The flow starts a
# shared local Ray only when one of them will run.
RAY_MODULE = "tasks/lib/cluster.py"
RAY_STAGES = frozenset(name for name, st in STAGES.items() if RAY_MODULE in st.deps)


# -- the stages as tasks --------------------------------------------------------------------------------------------
class StageCrashed(RuntimeError):
    """A stage that failed without its one-line message (a bug, a killed process): the output's tail."""


WHY = {"up to date": "DVC: up to date", "restored": "DVC: restored from its run-cache"}


def run_stage(stage: str, workspace: str, env: dict[str, str], stale: bool,
              upstream: Sequence[dict[str, Any]]) -> Any:
    """One stage, once the stages whose outputs it reads are done (``upstream``: what they did). DVC is asked
    (``dvc repro --single-item``) when the stage was stale when the run began, or when a stage it reads ran or was
    restored; otherwise it is up to date without asking. Its output goes to the run's log line by line."""
    t0 = time.perf_counter()
    if not stale and all(u["dvc"] == "up to date" for u in upstream):
        return Completed(name="Cached", message=WHY["up to date"], data={"dvc": "up to date", "wall_s": 0.0})
    logger = get_run_logger()
    logger.info(f"[{NUMBER[stage]}/{len(STAGES)}] {stage} ...")
    result = wsp.repro(Path(workspace), stage, env, logger.info)
    if result.status == "failed":
        if result.error:  # the stage's own message: something the user can fix
            return Failed(message=f"{stage}: {result.error}")
        raise StageCrashed(f"{stage}: dvc repro exited with {result.returncode}:\n{result.tail}")
    done = {"dvc": result.status, "wall_s": round(time.perf_counter() - t0, 2)}
    return done if result.status == "ran" else Completed(name="Cached", message=WHY[result.status], data=done)


STAGE_TASKS = {
    name: task(run_stage, name=name, cache_policy=NO_CACHE, retries=RETRIES.get(name, (0, 0))[0],
               retry_delay_seconds=RETRIES.get(name, (0, 0))[1] or 0,
               description=f"dvc repro --single-item {name}")
    for name in STAGES
}


def save_experiment(project: str, workspace: str, name: str, message: str) -> str:
    """The workspace as DVC experiment ``name``; returns its commit."""
    return wsp.save_experiment(wsp.Workspace(Path(project), Path(workspace)), name, message)


SAVE_EXPERIMENT = task(save_experiment, name="dvc-exp-save", cache_policy=NO_CACHE,
                       description="dvc exp save: the workspace's params, dvc.lock and metrics as a DVC experiment")


@contextmanager
def shared_ray(cfg: Config) -> Iterator[dict[str, str]]:
    """One local Ray for all the stages of this run, as a Ray cluster they join through ``RAY_ADDRESS``: each
    stage is a process of its own, and starting and stopping a Ray per stage costs seconds each time. With
    ``RAY_ADDRESS`` or ``ray.address`` set the stages join that cluster instead, and nothing is started here."""
    if os.environ.get("RAY_ADDRESS") or cfg.ray.address:
        yield {}
        return
    import ray

    from tasks.lib.cluster import ensure_ray

    ensure_ray(cfg)
    try:
        env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        if os.environ.get("RAY_AUTH_MODE", "") != "disabled":
            env["RAY_AUTH_MODE"] = "token"  # a driver given an address sends the local token only in this mode
        yield env
    finally:
        ray.shutdown()


@contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """``env`` in this process's environment for a while, then the environment as it was."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tracking_env(cfg: Config, project: Path) -> dict[str, str]:
    """The MLflow store every workspace of the project logs to: MLFLOW_TRACKING_URI, else ``tracking.uri``, else
    the project's SQLite store, local paths resolved against the project (not the workspace)."""
    from tracking.run import resolve_uri

    return {"MLFLOW_TRACKING_URI": resolve_uri(cfg, root=project)}


def mlflow_run(cfg: Config, project: Path) -> Optional[dict[str, str]]:
    """The MLflow run the stages logged into for these params: {"run_id", "url", "compare_url", "local"?} or None.

    The tracking layer (tracking/) logs into it and tags it with this flow run's id (``DDPM_PREFECT_FLOW_RUN_ID``)
    and the DVC experiment (``DVC_EXP_NAME``); its read-only ``find_run`` gives the run (url: the run's page in the
    MLflow UI, for a tracking server).
    """
    if not cfg.tracking.enabled:
        return None
    from tracking.run import find_run

    try:
        info = find_run(cfg, root=project)
    except Exception as e:  # a convenience for the summary: never fail a finished run over it
        print(f"warning: MLflow run look-up failed ({type(e).__name__}: {e})")
        return None
    if not info or not info.get("run_id"):
        return None
    return {"run_id": str(info["run_id"]), "url": str(info["url"]), "compare_url": str(info["compare_url"]),
            **({"local": "true"} if info.get("local") else {})}


# -- the flow -------------------------------------------------------------------------------------------------------
def _fail(logger, message: str) -> State:
    logger.error(message)
    return Failed(message=message)


@flow(name="train-eval", log_prints=True)
def train_eval(params: str = "params.yaml", overrides: Optional[dict[str, Any]] = None,
               out: Optional[str] = None) -> dict[str, Any]:
    """Fetch, train the FID classifier, train the DDPM (Ray Train), sample (Ray actors), evaluate (FID/KID), the
    figures and the sampler table: dvc.yaml's stages, each through ``dvc repro``.

    Args:
        params: the params file (relative paths are relative to the working directory, the project folder).
        overrides: dotted keys to override, e.g. {"train.steps": 2000, "sample.sampler": "ddim"}.
        out: the workspace. Default: the project folder for its own params.yaml without overrides (a run there is
            ``dvc repro``), else ``runs/exp-<hash of the params and overrides>``, a git worktree of the project
            whose run is saved as a DVC experiment. A new workspace starts from the project's DVC state, so only
            the stages whose params or deps the run changes compute anything.
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    flow_run_id, flow_run_name = str(flow_run.get_id()), str(flow_run.get_name())
    overrides = dict(overrides or {})
    try:
        project = wsp.find_project(Path.cwd())
        cfg = load_config(params, overrides)
        check_inputs(cfg, STAGES)  # every file from outside that a stage reads, before the first stage starts
        base = Path(params).resolve()
        ws = wsp.open_workspace(project, Path(out).expanduser() if out else wsp.default_out(project, base, overrides))
        with wsp.locked(ws, flow_run_id):
            return _run_pipeline(logger, cfg, params, base, overrides, ws, flow_run_id, flow_run_name)
    except (ConfigError, StageError, wsp.WorkspaceError) as e:
        return _fail(logger, str(e))


def training(cfg: Config) -> str:
    """What the train stage does, in words: '1500 training steps', or the published model it imports instead."""
    return f"the published model {cfg.train.pretrained} (not trained)" if cfg.train.pretrained else \
        f"{cfg.train.steps} training steps"


def _prepare_workspace(logger, cfg: Config, params: str, base: Path, overrides: dict[str, Any],
                       ws: wsp.Workspace, flow_run_name: str) -> tuple[Optional[str], Config]:
    """The workspace's params.yaml (the params with the overrides and the outside inputs made absolute); returns the
    DVC experiment's name (None for the project's own `dvc repro` state) and the config the stages will read."""
    values = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in EXTERNAL_PATH_KEYS}
    localized = wsp.external_paths(ws, values, Path.cwd())
    if localized:
        logger.info("in the workspace, inputs from outside the pipeline are named by absolute path: "
                    + ", ".join(f"{k}={v}" for k, v in localized.items()))
    overrides = {**overrides, **localized}
    if overrides or base != ws.path(wsp.PARAMS_FILE).resolve():
        wsp.write_params(ws, base, overrides)
    experiment = (wsp.experiment_name(ws, flow_run_name)
                  if ws.separate or wsp.params_changed_from_head(ws) else None)
    where = "the project folder" if not ws.separate else f"workspace {ws.root}"
    logger.info(f"params {params}{f' with {overrides}' if overrides else ''}: {cfg.data.dataset}, "
                f"{training(cfg)}, {cfg.sample.num_samples} samples; in {where}"
                + (f", saved as DVC experiment {experiment}" if experiment else ""))
    return experiment, load_config(ws.path(wsp.PARAMS_FILE))


def _run_pipeline(logger, cfg: Config, params: str, base: Path, overrides: dict[str, Any], ws: wsp.Workspace,
                  flow_run_id: str, flow_run_name: str) -> Any:
    experiment, ws_cfg = _prepare_workspace(logger, cfg, params, base, overrides, ws, flow_run_name)
    tags = {FLOW_RUN_ENV: flow_run_id, **tracking_env(cfg, ws.project)}
    if experiment:
        tags["DVC_EXP_NAME"] = experiment  # what `dvc exp run` sets: the MLflow run is named and tagged with it
    env = {**tags, TRACKING_BY_ENV: "flow"}  # the stages leave reporting their outputs to the flow's track()
    stale = wsp.stale_stages(ws.root, env)
    will_run = {s for st in stale for s in downstream(st, STAGES)}
    logger.info(f"DVC: {', '.join(s for s in STAGES if s in stale) or 'no stage'} changed"
                + (f"; up to date: {', '.join(s for s in STAGES if s not in will_run)}" if stale else ""))
    installed = trackers(ws_cfg)  # loaded once per flow run, not once per stage process

    def track(stage: str) -> None:
        """The trackers read what ``stage`` wrote in the workspace, in this process, with the tags and store the
        stage itself would have used (and DVC_ROOT, what the store's relative paths are relative to)."""
        with environ({**tags, "DVC_ROOT": str(ws.root)}):
            for name, tracker in installed:
                try:
                    tracker.after_stage(stage, ws_cfg, ws.root, layout_paths(ws.root))
                except Exception as e:  # tracking never fails a stage that ran (as in the stages themselves)
                    logger.warning(f"tracking: {name} reporting what {stage} wrote failed ({type(e).__name__}: "
                                   f"{e}); its outputs are in place")

    with shared_ray(cfg) if will_run & RAY_STAGES else nullcontext({}) as ray_env:
        runs = _run_stages(logger, {**env, **ray_env}, ws, stale, track)
    if isinstance(runs, State):
        return runs
    return _finish(logger, ws_cfg, ws, runs, experiment, flow_run_id, flow_run_name)


def _run_stages(logger, env: dict[str, str], ws: wsp.Workspace, stale: set[str],
                track: Callable[[str], None]) -> dict[str, dict[str, Any]] | State:
    """Every stage of dvc.yaml as a Prefect task that waits for the stages whose outputs it reads
    (:data:`PRODUCERS`), so independent ones run at the same time (train_classifier beside train, figures beside
    sample -> evaluate -> sampler_table). DVC releases its repository lock while a stage's command runs, and each
    ``dvc repro`` waits for the moments another holds it. Each stage that ran is followed by ``track(stage)``, in
    this thread.

    Returns {stage: {status, dvc, wall_s}} in dvc.yaml's order, or the Failed state of the first stage that failed:
    the stages that read its outputs never start (Prefect's NotReady), the others finish."""
    futures: dict[str, Any] = {}
    for name in STAGES:  # dvc.yaml's order: every producer is submitted before the stages that wait for it
        futures[name] = STAGE_TASKS[name].submit(name, str(ws.root), env, name in stale,
                                                 [futures[p] for p in PRODUCERS[name]])
    runs: dict[str, dict[str, Any]] = {}
    failure: Optional[State] = None
    error: Optional[BaseException] = None  # an unexpected exception of a task: raised once the others are done
    for future in as_completed(list(futures.values())):
        future.wait()  # the task's own final state (Cached ...), not the API's copy, which may lag behind
        name = next(k for k, f in futures.items() if f is future)
        state, tag = future.state, f"[{NUMBER[name]}/{len(STAGES)}] {name}"
        if state.is_failed():
            result = state.result(raise_on_failure=False)
            if isinstance(result, BaseException) and not isinstance(result, StageCrashed):
                error = error or result
            message = state.message if not isinstance(result, StageCrashed) else str(result).splitlines()[0]
            logger.error(f"{tag} failed: {message}")
            failure = failure or Failed(message=message)
            continue
        if not state.is_completed():  # NotReady: a stage it reads failed
            logger.info(f"{tag}: not started, a stage whose outputs it reads failed")
            continue
        done = future.result()
        if done["dvc"] == "ran":
            track(name)
        runs[name] = {"status": "ran" if done["dvc"] == "ran" else "cached", **done}
        row = stage_row(name, ws.root)
        logger.info(f"{tag}: {WHY.get(done['dvc'], 'ran')} ({done['wall_s']:.1f} s)"
                    + (f"; {row.label}: {row.text}" if row else ""))
    if error is not None:
        raise error
    if failure is not None:
        return failure
    return {name: runs[name] for name in STAGES}


def _finish(logger, cfg: Config, ws: wsp.Workspace, runs: dict[str, dict[str, Any]], experiment: Optional[str],
            flow_run_id: str, flow_run_name: str) -> dict[str, Any]:
    """After the stages: the run record, the DVC experiment, the summary rows and the Prefect artifacts."""
    mlflow = mlflow_run(cfg, ws.project)
    wsp.write_run_record(ws, {"prefect_flow_run_id": flow_run_id, "prefect_flow_run_name": flow_run_name,
                              "mlflow_run_id": (mlflow or {}).get("run_id"), "dvc_experiment": experiment,
                              "workspace": str(ws.root)})
    commit = None
    if experiment:
        commit = SAVE_EXPERIMENT(str(ws.project), str(ws.root), experiment,
                                 f"train-eval flow run {flow_run_name} ({flow_run_id})"
                                 + (f", MLflow run {mlflow['run_id']}" if mlflow else ""))
        logger.info(f"DVC experiment {experiment} ({commit}): `dvc exp show` in {ws.project} lists it")
    rows = [Row("stages", "stages", ", ".join(f"{n} {r['status']} ({r['wall_s']:.1f} s)" for n, r in runs.items())),
            *run_rows(ws.root), *where_rows(cfg, ws, experiment, commit, mlflow, flow_run_id)]
    ev = read_output(ws.root, "eval_metrics")
    title = f"train-eval: {cfg.data.dataset}, {training(cfg)}"
    artifacts.publish(artifacts.summary_markdown(title, runs, rows[1:], ev), ev, mlflow)
    artifacts.publish_figures(read_output(ws.root, "figures_record"), read_output(ws.root, "sampler_table"),
                              ws.path(LAYOUT["figures"]), ws.path(LAYOUT["sampler_table_md"]))
    logger.info("FID %s (floor %s), KID %s (floor %s)", fmt(ev.get("fid")), fmt(ev.get("floor", {}).get("fid")),
                fmt(ev.get("kid_mean")), fmt(ev.get("floor", {}).get("kid_mean")))
    return {"flow_run_id": flow_run_id, "out": str(ws.root), "stages": runs, "rows": [r.__dict__ for r in rows],
            "dvc": {"workspace": str(ws.root), "experiment": experiment, "commit": commit}, "mlflow": mlflow,
            "metrics": {k: v for k, v in ev.items() if k in ("fid", "kid_mean", "kid_std", "isc_mean", "isc_std",
                                                             "precision", "recall", "f_score", "floor", "fid_ratio")}}


def where_rows(cfg: Config, ws: wsp.Workspace, experiment: Optional[str], commit: Optional[str],
               mlflow: Optional[dict[str, str]], flow_run_id: str) -> list[Row]:
    """Where the run is recorded: DVC, MLflow, Prefect."""
    if experiment:
        dvc = Row("dvc", "DVC experiment", f"{experiment} ({commit}) in {ws.root}; `dvc exp show` lists it, "
                                           "`dvc exp apply` brings it here")
    else:
        dvc = Row("dvc", "DVC", f"dvc.lock updated in {ws.root}; `dvc status` is clean, `dvc push` sends the outputs "
                                "to the remote")
    rows = [dvc]
    after = " (after `make mlflow-ui`)" if (mlflow or {}).get("local") else ""
    if mlflow:
        rows += [Row("mlflow", "MLflow run", f"{mlflow['url']}{after}", mlflow["url"]),
                 Row("mlflow_compare", "compare runs", f"{mlflow['compare_url']}{after}", mlflow["compare_url"])]
    elif cfg.tracking.enabled:
        rows.append(Row("mlflow", "MLflow", f"experiment {cfg.tracking.experiment or cfg.data.dataset}; the stages that "
                                            f"ran tagged their run prefect_flow_run_id={flow_run_id}"))
    else:
        rows.append(Row("mlflow", "MLflow", "tracking off (tracking.enabled: false)"))
    return rows + [Row("prefect", "Prefect flow run", flow_run_id)]


# -- command line ---------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Run the train-eval flow in this process (no server needed), from the "
                                            "project folder.")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key, e.g. --set train.steps=2000 (repeatable)")
    p.add_argument("--out", default=None,
                   help="the workspace (default: the project folder for params.yaml without overrides, else "
                        "runs/exp-<hash>, a git worktree saved as a DVC experiment)")
    args = p.parse_args(argv)
    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        # Bad input stops here, before Prefect starts anything: the params, then every file from outside the
        # pipeline that one of the stages will read (dataset sources, Inception weights, a reference), then the
        # project the run is versioned in.
        cfg = load_config(args.params, overrides)
        check_inputs(cfg, STAGES)
        wsp.find_project(Path.cwd())
    except (ConfigError, StageError, wsp.WorkspaceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        state = train_eval(params=args.params, overrides=overrides, out=args.out, return_state=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if not state.is_completed():  # Failed, or Crashed/Cancelled
        error = state.result(raise_on_failure=False)
        print(f"error: {state.message}", file=sys.stderr)
        return 1 if isinstance(error, BaseException) and not isinstance(error, StageCrashed) else 2
    print("\n".join(console([Row(**r) for r in state.result()["rows"]])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
