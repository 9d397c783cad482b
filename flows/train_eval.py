"""The ``train-eval`` flow: fetch -> train_classifier -> train -> sample -> evaluate as Prefect tasks, then the
optional figures and sampler_table (``figures.enabled``, ``sampler_table.enabled``; on in the demo's params).

Each task is a thin wrapper around a stage's ``run(cfg, paths…)`` in ``tasks/``: the same functions whose command
lines ``dvc repro`` runs, writing the same layout (``data/dataset``, ``models/``, ``checkpoints/``, ``samples/``,
``metrics/``, ``ref_stats/``) under one output root. What the flow adds:

- One config: the ``params`` file plus dotted ``overrides`` (``{"train.steps": 2000}``), validated before any
  compute; an invalid value fails the run at once with the config's one-line message.
- Skipping: a stage whose inputs (content hashes of the files and folders it reads, and of its code) and params
  sections are unchanged is not run again. That is Prefect's cache, persisted under ``<out>/.prefect-cache`` so it
  outlives the process; a cached result is trusted only while the stage's outputs are still the ones it
  recorded, so deleted or overwritten outputs (``rm -r samples``, a ``dvc repro`` with other params) make the
  stage run again. After a failure, a rerun starts at the stage that failed.
- Retries on the I/O-bound fetch. Training resumes from its newest checkpoint whenever it runs again.
- Logs through the run logger (the stages' own progress lines included) and artifacts: a markdown summary, a
  table of the evaluation metrics and, when the run was tracked, a link to its MLflow run.

Run it in this process (without a server Prefect starts a temporary local API, ~20 s)::

    python -m flows.train_eval [--params params.yaml] [--set train.steps=2000 ...] [--out DIR]

or through a deployment (prefect.yaml; ``python -m flows.serve``)::

    prefect deployment run 'train-eval/local' --param overrides='{"train.steps": 2000}' --watch
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.states import Failed, State

from tasks.config import Config, ConfigError, load_config, parse_override
from flows.fingerprint import fingerprint
from tasks.common import StageError
from tasks.inputs import check as check_inputs

PROJECT = Path(__file__).resolve().parents[1]
CACHE_DIR = ".prefect-cache"  # under the output root: a root's cache describes that root's outputs
FLOW_RUN_ENV = "DDPM_PREFECT_FLOW_RUN_ID"  # read by the MLflow tracking module to tag its run

# Every file and folder of a run, relative to the output root: dvc.yaml's layout.
LAYOUT = {
    "dataset": "data/dataset",
    "classifier": "models/classifier.pt",
    "classifier_metrics": "metrics/classifier.json",
    "checkpoints": "checkpoints",
    "train_log": "metrics/train_loss.tsv",
    "train_metrics": "metrics/train.json",
    "samples": "samples",
    "ref_stats": "ref_stats",
    "eval_metrics": "metrics/eval.json",
    "figures": "figures",
    "sampler_table": "metrics/sampler_table.json",
    "sampler_table_md": "metrics/sampler_table.md",
}


@dataclass(frozen=True)
class Stage:
    """What a stage's cache key covers, read from its dvc.yaml entry (the one declaration of the stages)."""

    params: tuple[str, ...]  # the params sections (or dotted keys) it reads
    code: tuple[str, ...]  # its source files and folders, relative to the project
    inputs: tuple[str, ...]  # LAYOUT names it reads
    outputs: tuple[str, ...]  # LAYOUT names it writes


def stages_from_dvc_yaml(path: Path = PROJECT / "dvc.yaml") -> dict[str, Stage]:
    """``{stage: Stage}`` in dvc.yaml's order: deps that are run outputs (LAYOUT) are inputs, the rest code."""
    import yaml

    names = {rel: name for name, rel in LAYOUT.items()}
    out = {}
    for name, st in yaml.safe_load(path.read_text())["stages"].items():
        deps = [str(d) for d in st.get("deps") or []]
        outs = [next(iter(o)) if isinstance(o, dict) else o
                for kind in ("outs", "metrics", "plots") for o in st.get(kind) or []]
        out[name] = Stage(tuple(str(p) for p in st.get("params") or []),
                          tuple(d for d in deps if d not in names), tuple(names[d] for d in deps if d in names),
                          tuple(names[o] for o in outs if o in names))
    return out


STAGES = stages_from_dvc_yaml()
OPTIONAL_STAGES = ("figures", "sampler_table")


# -- cache keys -----------------------------------------------------------------------------------------------------
def param_inputs(stage: str, cfg: Config) -> dict[str, str]:
    """Input files named by params rather than by the layout: a file-based dataset's sources, Inception weights."""
    if stage == "fetch" and cfg.data.dataset != "digits":  # digits ship with scikit-learn
        return {"data.root": cfg.data.root}
    if stage == "evaluate" and cfg.evaluate.inception_weights:
        return {"evaluate.inception_weights": cfg.evaluate.inception_weights}
    return {}


def stage_key(stage: str, cfg: Config, paths: dict[str, str]) -> str:
    """``<stage>-<sha256>`` of the stage's params sections and the content of its inputs and code (no paths)."""
    spec = STAGES[stage]
    files = {name: paths[name] for name in spec.inputs} | param_inputs(stage, cfg)
    blob = {
        "params": cfg.section_hash(*spec.params),
        "inputs": {name: fingerprint(p) for name, p in files.items()},
        "code": {c: fingerprint(PROJECT / c) for c in spec.code},
    }
    return f"{stage}-{hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()}"


def outputs_fingerprint(stage: str, paths: dict[str, str]) -> dict[str, str]:
    return {name: fingerprint(paths[name]) for name in STAGES[stage].outputs}


def _cache_key_fn(stage: str) -> Callable[[Any, dict[str, Any]], str]:
    return lambda _context, parameters: stage_key(stage, parameters["cfg"], parameters["paths"])


# -- the stages as tasks --------------------------------------------------------------------------------------------
def _outcome(stage: str, paths: dict[str, str], call: Callable[[], Any]) -> Any:
    """Run the stage; return its result with its outputs' fingerprints (checked before a cached result is reused).

    A problem the user can fix (missing file, bad input) becomes a Failed state with the stage's one-line
    message rather than a traceback; anything else raises as usual.
    """
    from tasks.common import USER_ERRORS

    try:
        result = call()
    except USER_ERRORS as e:
        return Failed(message=f"{stage}: {e}")
    return {"result": result, "outputs": outputs_fingerprint(stage, paths)}


_PERSISTED = dict(persist_result=True, result_serializer="json", log_prints=True)


@task(name="fetch", cache_key_fn=_cache_key_fn("fetch"), retries=2, retry_delay_seconds=[2, 10], **_PERSISTED)
def fetch(cfg: Config, paths: dict[str, str]) -> dict[str, Any]:
    """Read the configured dataset into the dataset artifact. I/O-bound, so retried."""
    from tasks import fetch as stage

    return _outcome("fetch", paths, lambda: stage.run(cfg, paths["dataset"]))


@task(name="train_classifier", cache_key_fn=_cache_key_fn("train_classifier"), **_PERSISTED)
def train_classifier(cfg: Config, paths: dict[str, str]) -> dict[str, Any]:
    """The classifier whose features FID/KID use on labelled grayscale datasets."""
    from tasks import train_classifier as stage

    return _outcome("train_classifier", paths, lambda: stage.run(
        cfg, paths["dataset"], paths["classifier"], paths["classifier_metrics"]))


@task(name="train", cache_key_fn=_cache_key_fn("train"), **_PERSISTED)
def train(cfg: Config, paths: dict[str, str]) -> dict[str, Any]:
    """Ray Train; resumes from the newest checkpoint made with the same params."""
    from tasks import train as stage

    return _outcome("train", paths, lambda: stage.run(
        cfg, paths["dataset"], paths["checkpoints"], paths["train_log"], paths["train_metrics"]))


@task(name="sample", cache_key_fn=_cache_key_fn("sample"), **_PERSISTED)
def sample(cfg: Config, paths: dict[str, str]) -> dict[str, Any]:
    """Shards of samples over Ray actors; finished shards are kept."""
    from tasks import sample as stage

    return _outcome("sample", paths, lambda: stage.run(cfg, paths["checkpoints"], paths["samples"]))


@task(name="evaluate", cache_key_fn=_cache_key_fn("evaluate"), **_PERSISTED)
def evaluate(cfg: Config, paths: dict[str, str]) -> dict[str, Any]:
    """FID/KID (IS, precision/recall) with torch-fidelity, and the real-vs-real floor."""
    from tasks import evaluate as stage

    return _outcome("evaluate", paths, lambda: stage.run(
        cfg, paths["dataset"], paths["samples"], paths["classifier"], paths["ref_stats"], paths["eval_metrics"],
        paths["classifier_metrics"]))


@task(name="figures", cache_key_fn=_cache_key_fn("figures"), **_PERSISTED)
def figures(cfg: Config, paths: dict[str, str]) -> dict[str, Any]:
    """Progressive generation, reconstructions from partial diffusion, the denoising GIF and the loss curve."""
    from tasks import figures as stage

    return _outcome("figures", paths, lambda: stage.run(
        cfg, paths["checkpoints"], paths["dataset"], paths["train_log"], paths["figures"]))


@task(name="sampler_table", cache_key_fn=_cache_key_fn("sampler_table"), **_PERSISTED)
def sampler_table(cfg: Config, paths: dict[str, str]) -> dict[str, Any]:
    """FID/KID and wall time of DDPM-T and DDIM at several step counts on the same seeds."""
    from tasks import sampler_table as stage

    return _outcome("sampler_table", paths, lambda: stage.run(
        cfg, paths["checkpoints"], paths["dataset"], paths["classifier"], paths["ref_stats"],
        paths["sampler_table"], paths["sampler_table_md"]))


STAGE_TASKS = {"fetch": fetch, "train_classifier": train_classifier, "train": train, "sample": sample,
               "evaluate": evaluate, "figures": figures, "sampler_table": sampler_table}


def run_stage(name: str, stage_task, cfg: Config, paths: dict[str, str], logger) -> tuple[State, str]:
    """Run one stage task; reuse a cached result only while the outputs it recorded are still in place."""
    state = stage_task(cfg, paths, return_state=True)
    if state.name != "Cached":
        return state, "ran"
    cached = state.result()
    recorded = cached.get("outputs", {}) if isinstance(cached, dict) else {}
    current = outputs_fingerprint(name, paths)
    if recorded == current:
        return state, "cached"
    changed = ", ".join(LAYOUT[k] for k in current if recorded.get(k) != current[k])
    logger.info(f"{name}: inputs and params unchanged, but its outputs ({changed}) were deleted or changed "
                "since it ran; running it again")
    return stage_task.with_options(refresh_cache=True)(cfg, paths, return_state=True), "reran"


def planned_stages(cfg: Config) -> list[str]:
    """The stages this flow runs under ``cfg``, in order (the optional ones only when enabled)."""
    return [name for name in STAGE_TASKS if name not in OPTIONAL_STAGES or getattr(cfg, name).enabled]


def resolve_config(params: str, overrides: Optional[dict[str, Any]], root: Path) -> Config:
    """The params file with the overrides applied; Ray Train's run folder (an output) goes under the root."""
    cfg = load_config(params, overrides or {})
    storage = cfg.ray.storage
    if "://" not in storage and not Path(storage).is_absolute():
        cfg = load_config(params, {**(overrides or {}), "ray.storage": str(root / storage)})
    return cfg


# -- MLflow ---------------------------------------------------------------------------------------------------------
def mlflow_run(cfg: Config) -> Optional[dict[str, str]]:
    """The MLflow run of this pipeline run for the summary and the link artifact: {"run_id", "url"?} or None.

    The stages log to MLflow through tasks/tracking.py (the only module that imports mlflow; it tags the run with
    this flow run's id from ``DDPM_PREFECT_FLOW_RUN_ID``); its read-only ``find_run(cfg)`` gives the run they logged
    into for these params (url: the run's page in the MLflow UI, when one is known).
    """
    try:
        from tasks import tracking
    except ImportError:
        return None
    find = getattr(tracking, "find_run", None)
    if find is None or not cfg.tracking.enabled:
        return None
    try:
        info = find(cfg)
    except Exception as e:  # a convenience for the summary: never fail a finished run over it
        print(f"warning: MLflow run look-up failed ({type(e).__name__}: {e})")
        return None
    if not info or not info.get("run_id"):
        return None
    return {"run_id": str(info["run_id"]), **({"url": str(info["url"])} if info.get("url") else {})}


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
                     paths: dict[str, str], mlflow: Optional[dict[str, str]], flow_run_id: str) -> str:
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
        link = f"[{mlflow['run_id']}]({mlflow['url']})" if mlflow.get("url") else f"`{mlflow['run_id']}`"
        ml = f"run {link}"
    else:
        exp = cfg.tracking.experiment or cfg.data.dataset
        ml = (f"experiment `{exp}`; the stages that ran tagged their run `prefect_flow_run_id={flow_run_id}`"
              if cfg.tracking.enabled else "tracking off (tracking.enabled: false)")
    lines += ["", f"- **Sample grid**: `{sm['grid']}`",
              f"- **Checkpoints**: `{paths['checkpoints']}` (newest `{Path(tr['checkpoint']).name}`)"
              if tr.get("checkpoint") else f"- **Checkpoints**: `{paths['checkpoints']}`",
              f"- **Metrics**: `{paths['eval_metrics']}`",
              f"- **MLflow**: {ml}",
              f"- **Prefect flow run**: `{flow_run_id}`"]
    return "\n".join(lines) + "\n"


def publish(markdown: str, ev: dict[str, Any], mlflow: Optional[dict[str, str]]) -> None:
    create_markdown_artifact(markdown, key="train-eval-summary", description="train-eval: what this run produced")
    create_table_artifact(metrics_table(ev), key="train-eval-metrics",
                          description="FID/KID of the samples and the real-vs-real floor")
    if mlflow and mlflow.get("url"):
        create_link_artifact(mlflow["url"], link_text=f"MLflow run {mlflow['run_id']}", key="train-eval-mlflow",
                             description="the MLflow run of this pipeline run")


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
    if table and table.get("enabled"):
        from tasks.sampler_table import markdown_table

        lines += ["## Sampler table", "", markdown_table(table)]
    return "\n".join(lines) + "\n"


def sampler_table_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [{"sampler": r["sampler"], "steps": r["steps"], "FID": r.get("fid"), "KID": r.get("kid_mean"),
             "sampling_s": r.get("sampling_s", r["wall_s"]), "images_per_s": r.get("images_per_s")}
            for r in table["rows"]]
    floor = table.get("floor") or {}
    rows.append({"sampler": "real held-out (floor)", "steps": None, "FID": floor.get("fid"),
                 "KID": floor.get("kid_mean"), "sampling_s": None, "images_per_s": None})
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
@flow(name="train-eval", log_prints=True)
def train_eval(params: str = "params.yaml", overrides: Optional[dict[str, Any]] = None,
               out: str = ".") -> dict[str, Any]:
    """Fetch, train the FID classifier, train the DDPM (Ray Train), sample (Ray actors), evaluate (FID/KID).

    Args:
        params: the params file (relative paths are relative to the working directory).
        overrides: dotted keys to override, e.g. {"train.steps": 2000, "sample.sampler": "ddim"}.
        out: the output root; data/, models/, checkpoints/, samples/, metrics/, ref_stats/ go under it.
            Two runs with different roots share nothing.
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    flow_run_id = str(flow_run.get_id())
    os.environ[FLOW_RUN_ENV] = flow_run_id
    root = Path(out).expanduser().resolve()
    try:
        cfg = resolve_config(params, overrides, root)
    except ConfigError as e:
        logger.error(f"invalid params: {e}")
        return Failed(message=str(e))
    try:  # every file from outside that a stage of this run reads, before the first stage starts
        check_inputs(cfg, planned_stages(cfg))
    except StageError as e:
        logger.error(str(e))
        return Failed(message=str(e))
    paths = {name: str(root / rel) for name, rel in LAYOUT.items()}
    logger.info(f"params {params}{f' with {overrides}' if overrides else ''}: {cfg.data.dataset}, "
                f"{cfg.train.steps} training steps, {cfg.sample.num_samples} samples; outputs under {root}")

    results: dict[str, Any] = {}
    runs: dict[str, dict[str, Any]] = {}
    for i, (name, stage_task) in enumerate(STAGE_TASKS.items(), 1):
        if name in OPTIONAL_STAGES and not getattr(cfg, name).enabled:
            logger.info(f"[{i}/{len(STAGE_TASKS)}] {name}: skipped ({name}.enabled is false)")
            continue
        logger.info(f"[{i}/{len(STAGE_TASKS)}] {name} ...")
        t0 = time.perf_counter()
        state, status = run_stage(name, stage_task.with_options(result_storage=root / CACHE_DIR), cfg, paths, logger)
        wall = time.perf_counter() - t0
        if state.is_failed():
            error = state.result(raise_on_failure=False)
            if isinstance(error, BaseException):  # not a user error: keep the traceback
                raise error
            logger.error(f"[{i}/{len(STAGE_TASKS)}] {name} failed after {wall:.1f} s: {state.message}")
            return Failed(message=state.message)
        results[name] = state.result()["result"]
        runs[name] = {"status": status, "wall_s": round(wall, 2)}
        logger.info(f"[{i}/{len(STAGE_TASKS)}] {name}: {status} in {wall:.1f} s"
                    + (" (inputs and params unchanged)" if status == "cached" else ""))
        if isinstance(results[name], dict) and results[name].get("skipped"):  # train_classifier, when unread
            logger.info(f"[{i}/{len(STAGE_TASKS)}] {name}: nothing computed, {results[name].get('reason')}")

    mlflow = mlflow_run(cfg)
    markdown = summary_markdown(cfg, results, runs, paths, mlflow, flow_run_id)
    publish(markdown, results["evaluate"], mlflow)
    publish_figures(results.get("figures"), results.get("sampler_table"), paths)
    ev = results["evaluate"]
    logger.info("FID %s (floor %s), KID %s (floor %s); sample grid %s", _g(ev.get("fid")),
                _g(ev.get("floor", {}).get("fid")), _g(ev.get("kid_mean")), _g(ev.get("floor", {}).get("kid_mean")),
                results["sample"]["grid"])
    return {
        "flow_run_id": flow_run_id,
        "out": str(root),
        "stages": runs,
        "metrics": {k: v for k, v in ev.items() if k in METRIC_NAMES or k in ("floor", "fid_ratio")},
        "grid": results["sample"]["grid"],
        "checkpoint": results["train"].get("checkpoint"),
        "figures": paths["figures"] if (results.get("figures") or {}).get("enabled") else None,
        "sampler_table": paths["sampler_table_md"] if (results.get("sampler_table") or {}).get("enabled") else None,
        "mlflow": mlflow,
    }


# -- command line ---------------------------------------------------------------------------------------------------
def _shutdown_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Run the train-eval flow in this process (no server needed).")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key, e.g. --set train.steps=2000 (repeatable)")
    p.add_argument("--out", default=".", help="output root (default: the working directory, dvc.yaml's layout)")
    args = p.parse_args(argv)
    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        # Bad input stops here, before Prefect starts anything: the params, then every file from outside the
        # pipeline that one of the stages to run will read (dataset sources, Inception weights, a reference).
        cfg = load_config(args.params, overrides)
        check_inputs(cfg, planned_stages(cfg))
    except (ConfigError, StageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        state = train_eval(params=args.params, overrides=overrides, out=args.out, return_state=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _shutdown_ray()
    if not state.is_completed():  # Failed, or Crashed/Cancelled
        error = state.result(raise_on_failure=False)
        print(f"error: {state.message}", file=sys.stderr)
        return 1 if isinstance(error, BaseException) else 2
    summary = state.result()
    from tasks.summary import summarize

    root = Path(summary["out"])
    stages = ", ".join(f"{name} {r['status']} ({r['wall_s']:.1f} s)" for name, r in summary["stages"].items())
    lines = [f"stages:     {stages}", *summarize(root / "metrics", root / "samples")]
    if summary["checkpoint"]:
        lines.append(f"checkpoint: {summary['checkpoint']}")
    if summary.get("figures"):
        lines.append(f"figures:    {summary['figures']}")
    if summary.get("sampler_table"):
        lines.append(f"sampler table: {summary['sampler_table']}")
    if summary["mlflow"]:
        lines.append(f"MLflow run: {summary['mlflow'].get('url') or summary['mlflow']['run_id']}")
    lines.append(f"Prefect flow run: {summary['flow_run_id']}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
