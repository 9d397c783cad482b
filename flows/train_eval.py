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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.states import Completed, Failed, State

from flows import workspace as wsp
from tasks.lib.callbacks import TRACKING_BY_ENV, trackers
from tasks.lib.errors import StageError
from tasks.lib.config import Config, ConfigError, load_config, parse_override
from tasks.lib.inputs import EXTERNAL_PATH_KEYS, dvc_stages
from tasks.lib.inputs import check as check_inputs
from tasks.lib.layout import LAYOUT, layout_paths, read_output

PROJECT = Path(__file__).resolve().parents[1]
FLOW_RUN_ENV = "DDPM_PREFECT_FLOW_RUN_ID"  # read by the MLflow tracking module to tag its run
RETRIES = {"fetch": (2, [2, 10])}  # (retries, delays in s): I/O-bound stages only

# What each stage reports, read after it ran or was found up to date.
RECORDS = {"fetch": "dataset_record", "train_classifier": "classifier_metrics", "train": "train_metrics",
           "sample": "samples_record", "evaluate": "eval_metrics", "figures": "figures_record",
           "sampler_table": "sampler_table"}


@dataclass(frozen=True)
class Stage:
    """A stage as dvc.yaml declares it."""

    deps: tuple[str, ...]
    outs: tuple[str, ...]  # outs, metrics and plots


def _producer(dep: str, made: dict[str, str]) -> Optional[str]:
    """The stage whose output ``dep`` is, lies under or contains, if any (``made``: output -> stage)."""
    dep = dep.rstrip("/")
    return next((made[o] for o in made if dep == o or dep.startswith(o + "/") or o.startswith(dep + "/")), None)


def producers_of(stages: dict[str, Stage]) -> dict[str, tuple[str, ...]]:
    """For each stage, the stages whose outputs it reads: the DAG of dvc.yaml's deps and outs."""
    made = {o.rstrip("/"): name for name, st in stages.items() for o in st.outs}
    found: dict[str, tuple[str, ...]] = {}
    for name, st in stages.items():
        producers = [_producer(d, made) for d in st.deps]
        found[name] = tuple(dict.fromkeys(p for p in producers if p is not None and p != name))
    return found


def stages_from_dvc_yaml(path: Path = PROJECT / "dvc.yaml") -> dict[str, Stage]:
    """``{stage: Stage}`` in dvc.yaml's order, which must run each stage after every stage whose outputs it reads."""
    stages = {name: Stage(tuple(deps), tuple(outs)) for name, (deps, outs) in dvc_stages(path).items()}
    made = {o.rstrip("/"): name for name, st in stages.items() for o in st.outs}
    seen: set[str] = set()
    for name, st in stages.items():
        for d in st.deps:
            producer = _producer(d, made)
            if producer is not None and producer != name and producer not in seen:
                raise ValueError(f"{path}: stage {name} reads {d}, an output of {producer}, which comes after it")
        seen.add(name)
    return stages


STAGES = stages_from_dvc_yaml()
PRODUCERS = producers_of(STAGES)  # the DAG: a stage starts once these are done (fetch -> train -> sample ...)


def read_record(root: Path, stage: str) -> dict[str, Any]:
    return read_output(root, RECORDS[stage])


# -- the stages as tasks --------------------------------------------------------------------------------------------
class StageCrashed(RuntimeError):
    """A stage that failed without its one-line message (a bug, a killed process): the output's tail."""


def run_stage(stage: str, workspace: str, env: dict[str, str]) -> Any:
    """``dvc repro --single-item <stage>`` in the workspace; its output goes to the run's log line by line."""
    logger = get_run_logger()
    result = wsp.repro(Path(workspace), stage, env, logger.info)
    if result.status == "failed":
        if result.error:  # the stage's own message: something the user can fix
            return Failed(message=f"{stage}: {result.error}")
        raise StageCrashed(f"{stage}: dvc repro exited with {result.returncode}:\n{result.tail}")
    if result.status in ("up to date", "restored"):
        why = "DVC: up to date" if result.status == "up to date" else "DVC: restored from its run-cache"
        return Completed(name="Cached", message=why)
    return "ran"


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


# -- MLflow ---------------------------------------------------------------------------------------------------------
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


# -- artifacts ------------------------------------------------------------------------------------------------------
METRIC_NAMES = {"fid": "FID", "kid_mean": "KID", "kid_std": "KID std", "isc_mean": "IS", "isc_std": "IS std",
                "precision": "precision", "recall": "recall", "f_score": "F-score"}


def metrics_table(ev: dict[str, Any]) -> list[dict[str, Any]]:
    floor = ev.get("floor", {})
    return [{"metric": label, "samples": ev[k], "real-vs-real floor": floor.get(k),
             "n": ev.get("num_generated"), "features": ev.get("feature_extractor")}
            for k, label in METRIC_NAMES.items() if isinstance(ev.get(k), (int, float))]


def _g(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else "–"


def summary_markdown(cfg: Config, results: dict[str, Any], runs: dict[str, dict[str, Any]],
                     paths: dict[str, str], mlflow: Optional[dict[str, str]], flow_run_id: str,
                     dvc: dict[str, Any]) -> str:
    ds, tr, sm, ev = results["fetch"], results["train"], results["sample"], results["evaluate"]
    clf = results["train_classifier"]
    c, h, w = ds["shape"]
    lines = [f"# train-eval: {ds['dataset']}, {tr['steps']} steps", "",
             "| stage | status | wall time |", "|---|---|---|"]
    lines += [f"| {name} | {r['status']} | {r['wall_s']:.1f} s |" for name, r in runs.items()]
    lines += ["", f"- **Dataset**: {ds['dataset']} ({ds['source']}), {ds['count']['train']} train + "
                  f"{ds['count']['holdout']} held-out images [{c}, {h}, {w}], sha256 `{ds['sha256'][:12]}`",
              f"- **Training**: {tr['steps']} steps, final loss {_g(tr.get('final_loss'))}, "
              f"{tr.get('num_workers')} Ray worker(s), fit {_g(tr.get('fit_wall_s'))} s",
              f"- **Samples**: {sm['count']} ({sm['sampler']}-{sm['steps']}, "
              f"{'EMA' if sm.get('use_ema') else 'raw'} weights) from `{Path(sm['checkpoint']).name}`",
              f"- **Evaluation**: {ev.get('num_generated')} samples vs {ev.get('num_reference')} training images, "
              f"{ev.get('feature_extractor')} features; " + (f"classifier {clf['reason']}" if clf.get("skipped") else
                                                 f"classifier held-out accuracy {_g(clf.get('accuracy'))}"), "",
              "| metric | samples | real-vs-real floor |", "|---|---|---|"]
    lines += [f"| {r['metric']} | {_g(r['samples'])} | {_g(r['real-vs-real floor'])} |" for r in metrics_table(ev)]
    if ev.get("fid_ratio") is not None:
        lines += ["", f"FID / floor = {ev['fid_ratio']:.2f}"]
    if mlflow:
        ml = (f"run [{mlflow['run_id']}]({mlflow['url']}), [compare runs]({mlflow['compare_url']})"
              + (" (after `make mlflow-ui`)" if mlflow.get("local") else ""))
    else:
        exp = cfg.tracking.experiment or cfg.data.dataset
        ml = (f"experiment `{exp}`; the stages that ran tagged their run `prefect_flow_run_id={flow_run_id}`"
              if cfg.tracking.enabled else "tracking off (tracking.enabled: false)")
    grid = Path(sm["grid"]) if Path(sm["grid"]).is_absolute() else Path(dvc["workspace"]) / sm["grid"]
    lines += ["", f"- **Sample grid**: [{grid.name}]({grid.as_uri()}) `{sm['grid']}`",
              f"- **Checkpoints**: `{paths['checkpoints']}` (newest `{Path(tr['checkpoint']).name}`)"
              if tr.get("checkpoint") else f"- **Checkpoints**: `{paths['checkpoints']}`",
              f"- **Metrics**: `{paths['eval_metrics']}`",
              f"- **MLflow**: {ml}",
              "- **DVC**: " + (f"experiment `{dvc['experiment']}` (`{dvc['commit']}`), workspace `{dvc['workspace']}`"
                                if dvc.get("experiment") else f"`dvc repro` state of `{dvc['workspace']}` (dvc.lock)"),
              f"- **Prefect flow run**: `{flow_run_id}`"]
    return "\n".join(lines) + "\n"


def publish(markdown: str, ev: dict[str, Any], mlflow: Optional[dict[str, str]]) -> None:
    create_markdown_artifact(markdown, key="train-eval-summary", description="train-eval: what this run produced")
    create_table_artifact(metrics_table(ev), key="train-eval-metrics",
                          description="FID/KID of the samples and the real-vs-real floor")
    if mlflow:
        after = " (after `make mlflow-ui`)" if mlflow.get("local") else ""
        create_link_artifact(mlflow["url"], link_text=f"MLflow run {mlflow['run_id']}", key="train-eval-mlflow",
                             description=f"the MLflow run of this pipeline run: curves, pictures, metrics{after}")


def figures_markdown(fig: Optional[dict[str, Any]], table: Optional[dict[str, Any]], paths: dict[str, str]) -> str:
    """The figures (paths and links to the files) and the sampler table, as one markdown artifact."""
    lines = ["# Figures and sampler table", ""]
    if fig and fig.get("enabled"):
        folder = Path(paths["figures"])
        lines += [f"Chains sampled with {fig['sampler']} from `{Path(fig['checkpoint']).name}`.", ""]
        entries = [("progressive generation (rows: x_t / predicted x_0 per seed; columns t = "
                    f"{', '.join(map(str, fig['progressive']['timesteps']))})", fig["progressive"]["file"])]
        entries += [(f"reconstruction from t = {r['t']} (original, diffused input, {r['cols'] - 2} reconstructions)",
                     r["file"]) for r in fig["reconstruction"]]
        entries += [(f"denoising animation ({fig['animation']['frames']} frames)", fig["animation"]["file"]),
                    ("training loss", fig["loss"]["file"])]
        lines += [f"- {what}: [{name}]({(folder / name).as_uri()}) `{folder / name}`" for what, name in entries]
        lines.append("")
    md = Path(paths["sampler_table_md"]) if paths.get("sampler_table_md") else None
    if table and table.get("enabled") and md is not None and md.is_file():  # the stage's own markdown table
        lines += ["## Sampler table", "", md.read_text().strip()]
    return "\n".join(lines) + "\n"


def sampler_table_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [{"sampler": r["sampler"], "NFE": r["steps"], "FID": r.get("fid"), "FID_std": r.get("fid_std"),
             "vs_DDPM": r.get("ratio_to_ddpm"), "holds": r.get("holds"), "KID": r.get("kid_mean"),
             "sampling_s": r.get("sampling_s", r["wall_s"]), "images_per_s": r.get("images_per_s")}
            for r in table["rows"]]
    floor = table.get("floor") or {}
    rows.append({"sampler": "real held-out (floor)", "NFE": None, "FID": floor.get("fid"), "FID_std": None,
                 "vs_DDPM": None, "holds": None, "KID": floor.get("kid_mean"), "sampling_s": None,
                 "images_per_s": None})
    return rows


def publish_figures(fig: Optional[dict[str, Any]], table: Optional[dict[str, Any]], paths: dict[str, str]) -> None:
    """Prefect artifacts of the optional stages: ``train-eval-figures`` (markdown with the files) and
    ``train-eval-sampler-table`` (a table); nothing for a disabled or skipped stage."""
    have_fig, have_table = bool(fig and fig.get("enabled")), bool(table and table.get("enabled"))
    if have_fig or have_table:
        create_markdown_artifact(figures_markdown(fig, table, paths), key="train-eval-figures",
                                 description="figures of the trained model and the fast-sampling table")
    if have_table:
        create_table_artifact(sampler_table_rows(table), key="train-eval-sampler-table",
                              description="FID/KID and wall time per sampler, same seeds")


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
            whose run is saved as a DVC experiment.
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    flow_run_id, flow_run_name = str(flow_run.get_id()), str(flow_run.get_name())
    overrides = dict(overrides or {})
    try:
        project = wsp.find_project(Path.cwd())
        cfg = load_config(params, overrides)
        check_inputs(cfg, STAGES)  # every file from outside that a stage reads, before the first stage starts
    except (ConfigError, StageError, wsp.WorkspaceError) as e:
        return _fail(logger, str(e))
    base = Path(params).resolve()
    try:
        ws = wsp.open_workspace(project, Path(out).expanduser() if out else wsp.default_out(project, base, overrides))
    except wsp.WorkspaceError as e:
        return _fail(logger, str(e))
    try:
        with wsp.locked(ws, flow_run_id):
            return _run_pipeline(logger, cfg, params, base, overrides, ws, flow_run_id, flow_run_name)
    except wsp.WorkspaceError as e:
        return _fail(logger, str(e))


def _run_pipeline(logger, cfg: Config, params: str, base: Path, overrides: dict[str, Any], ws: wsp.Workspace,
                  flow_run_id: str, flow_run_name: str) -> Any:
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
    tags = {FLOW_RUN_ENV: flow_run_id, **tracking_env(cfg, ws.project)}
    if experiment:
        tags["DVC_EXP_NAME"] = experiment  # what `dvc exp run` sets: the MLflow run is named and tagged with it
    env = {**tags, TRACKING_BY_ENV: "flow"}  # the stages leave reporting their outputs to the flow's track()
    where = "the project folder" if not ws.separate else f"workspace {ws.root}"
    logger.info(f"params {params}{f' with {overrides}' if overrides else ''}: {cfg.data.dataset}, "
                f"{cfg.train.steps} training steps, {cfg.sample.num_samples} samples; in {where}"
                + (f", saved as DVC experiment {experiment}" if experiment else ""))

    ws_cfg = load_config(ws.path(wsp.PARAMS_FILE))  # what the stages read: the params with the overrides
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

    with shared_ray(cfg) as ray_env:
        runs = _run_stages(logger, {**env, **ray_env}, ws, track)
    if isinstance(runs, State):
        return runs

    results = {name: read_record(ws.root, name) for name in STAGES}
    mlflow = mlflow_run(ws_cfg, ws.project)
    wsp.write_run_record(ws, {"prefect_flow_run_id": flow_run_id, "prefect_flow_run_name": flow_run_name,
                              "mlflow_run_id": (mlflow or {}).get("run_id"), "dvc_experiment": experiment,
                              "workspace": str(ws.root)})
    commit = None
    if experiment:
        commit = SAVE_EXPERIMENT(str(ws.project), str(ws.root), experiment,
                                 f"train-eval flow run {flow_run_name} ({flow_run_id})"
                                 + (f", MLflow run {mlflow['run_id']}" if mlflow else ""))
        logger.info(f"DVC experiment {experiment} ({commit}): `dvc exp show` in {ws.project} lists it")
    paths = {name: str(ws.path(rel)) for name, rel in LAYOUT.items()}
    dvc = {"workspace": str(ws.root), "experiment": experiment, "commit": commit}
    markdown = summary_markdown(cfg, results, runs, paths, mlflow, flow_run_id, dvc)
    publish(markdown, results["evaluate"], mlflow)
    publish_figures(results.get("figures"), results.get("sampler_table"), paths)
    ev = results["evaluate"]
    logger.info("FID %s (floor %s), KID %s (floor %s); sample grid %s", _g(ev.get("fid")),
                _g(ev.get("floor", {}).get("fid")), _g(ev.get("kid_mean")), _g(ev.get("floor", {}).get("kid_mean")),
                results["sample"].get("grid"))
    return {
        "flow_run_id": flow_run_id,
        "out": str(ws.root),
        "dvc": dvc,
        "stages": runs,
        "metrics": {k: v for k, v in ev.items() if k in METRIC_NAMES or k in ("floor", "fid_ratio")},
        "grid": results["sample"].get("grid"),
        "checkpoint": results["train"].get("checkpoint"),
        "figures": paths["figures"] if (results.get("figures") or {}).get("enabled") else None,
        "sampler_table": paths["sampler_table_md"] if (results.get("sampler_table") or {}).get("enabled") else None,
        "mlflow": mlflow,
    }


def _run_stages(logger, env: dict[str, str], ws: wsp.Workspace,
                track: Callable[[str], None]) -> dict[str, dict[str, Any]] | State:
    """Every stage of dvc.yaml, each as soon as the stages whose outputs it reads are done (:data:`PRODUCERS`), so
    independent ones run at the same time (train_classifier beside train, figures beside sample -> evaluate ->
    sampler_table): DVC releases its repository lock while a stage's command runs, and each ``dvc repro`` waits for
    the moments another holds it. Each stage that ran is followed by ``track(stage)``, in this thread.

    Returns {stage: {status, wall_s}} in dvc.yaml's order, or the Failed state of the first stage that failed:
    stages already running then finish, and none starts after it."""
    runs: dict[str, dict[str, Any]] = {}
    n, number = len(STAGE_TASKS), {name: i for i, name in enumerate(STAGE_TASKS, 1)}
    pending = list(STAGE_TASKS)
    running: dict[str, tuple[Any, float]] = {}  # stage -> (its Prefect future, start)
    failure: Optional[State] = None
    error: Optional[BaseException] = None  # an unexpected exception of a task: raised once the others are done
    while pending or running:
        for name in [s for s in pending if failure is None and all(p in runs for p in PRODUCERS[s])]:
            logger.info(f"[{number[name]}/{n}] {name} ...")
            running[name] = (STAGE_TASKS[name].submit(name, str(ws.root), env), time.perf_counter())
            pending.remove(name)
        if not running:
            break
        future = next(as_completed([f for f, _ in running.values()]))
        future.wait()  # the task's own final state (Cached ...), not the API's copy, which may lag behind
        name = next(k for k, (f, _) in running.items() if f is future)
        _, t0 = running.pop(name)
        state, tag = future.state, f"[{number[name]}/{n}] {name}"
        wall = time.perf_counter() - t0
        if state.is_failed():
            result = state.result(raise_on_failure=False)
            if isinstance(result, BaseException) and not isinstance(result, StageCrashed):
                error = error or result
            message = state.message if not isinstance(result, StageCrashed) else str(result).splitlines()[0]
            logger.error(f"{tag} failed after {wall:.1f} s: {message}")
            failure = failure or Failed(message=message)
            continue
        status = "cached" if state.name == "Cached" else "ran"
        if status == "ran":
            track(name)
            wall = time.perf_counter() - t0
        runs[name] = {"status": status, "wall_s": round(wall, 2)}
        logger.info(f"{tag}: {status} in {wall:.1f} s"
                    + (f" ({state.message})" if status == "cached" and state.message else ""))
        record = read_record(ws.root, name)
        if record.get("skipped"):  # train_classifier, when unread
            logger.info(f"{tag}: nothing computed, {record.get('reason')}")
    if error is not None:
        raise error
    if failure is not None:
        return failure
    return {name: runs[name] for name in STAGE_TASKS}


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
    summary = state.result()
    from tasks.lib.summary import summarize

    root = Path(summary["out"])
    stages = ", ".join(f"{name} {r['status']} ({r['wall_s']:.1f} s)" for name, r in summary["stages"].items())
    lines = [f"stages:     {stages}", *summarize(root / "metrics", root / "samples")]
    if summary["checkpoint"]:
        lines.append(f"checkpoint: {summary['checkpoint']}")
    if summary.get("figures"):
        lines.append(f"figures:    {summary['figures']}")
    if summary.get("sampler_table"):
        lines.append(f"sampler table: {summary['sampler_table']}")
    dvc = summary["dvc"]
    if dvc["experiment"]:
        lines.append(f"DVC experiment: {dvc['experiment']} ({dvc['commit']}) in {dvc['workspace']}; "
                     "`dvc exp show` lists it, `dvc exp apply` brings it here")
    else:
        lines.append(f"DVC:        dvc.lock updated in {dvc['workspace']}; `dvc status` is clean, `dvc push` "
                     "sends the outputs to the remote")
    if summary["mlflow"]:
        local = " (after `make mlflow-ui`)" if summary["mlflow"].get("local") else ""
        lines.append(f"MLflow run: {summary['mlflow']['url']}{local}")
        lines.append(f"compare runs: {summary['mlflow']['compare_url']}{local}")
    lines.append(f"Prefect flow run: {summary['flow_run_id']}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
