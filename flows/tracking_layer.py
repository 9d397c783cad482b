"""The flow's tracking layer: after a stage ran, what it wrote goes to the run's MLflow run, read back from its
files in the workspace (the same functions the stages call when they run alone, under ``dvc repro`` or by hand).

Under the flow the stages leave that to this layer (the flow sets ``DDPM_TRACKING_BY=flow`` for them): MLflow is
imported and its store opened once per flow run instead of once per stage process. Training is the exception: its
curves and stepped sample grids are logged while it runs, by its rank-0 worker.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from flows.workspace import LAYOUT, read_output
from tasks.config import Config

def _absolute_checkpoint(record: dict[str, Any], root: Path) -> dict[str, Any]:
    """A record's checkpoint path, relative to the workspace it was written in, made absolute."""
    ckpt = record.get("checkpoint")
    if isinstance(ckpt, str) and ckpt and not Path(ckpt).is_absolute():
        return {**record, "checkpoint": str(root / ckpt)}
    return record


def _sample(cfg: Config, root: Path) -> Optional[str]:
    from tasks import tracking

    summary = read_output(root, "samples_record")
    if not summary:
        return None
    return tracking.log_samples(cfg, _absolute_checkpoint(summary, root), root / LAYOUT["samples"])


def _evaluate(cfg: Config, root: Path) -> Optional[str]:
    from tasks import tracking

    result = read_output(root, "eval_metrics")
    if not result:
        return None
    return tracking.log_evaluation(cfg, result, read_output(root, "dataset_record").get("sha256"),
                                   root / LAYOUT["samples"], root / LAYOUT["eval_metrics"])


def _figures(cfg: Config, root: Path) -> Optional[str]:
    from tasks import tracking_figures

    summary = read_output(root, "figures_record")
    if not summary.get("enabled"):  # figures.enabled: false writes only a note, as the stage logs nothing then
        return None
    return tracking_figures.log_figures(cfg, _absolute_checkpoint(summary, root), root / LAYOUT["figures"])


def _sampler_table(cfg: Config, root: Path) -> Optional[str]:
    from tasks import tracking_figures

    result = read_output(root, "sampler_table")
    if not result.get("enabled"):
        return None
    return tracking_figures.log_sampler_table(cfg, _absolute_checkpoint(result, root), root / LAYOUT["sampler_table"],
                                              root / LAYOUT["sampler_table_md"])


LOGGERS: dict[str, Callable[[Config, Path], Optional[str]]] = {
    "sample": _sample, "evaluate": _evaluate, "figures": _figures, "sampler_table": _sampler_table}


@contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
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


def log_stage(stage: str, cfg: Config, root: Path, env: dict[str, str]) -> Optional[str]:
    """Log what ``stage`` wrote under the workspace ``root`` to the MLflow run of ``cfg`` (the workspace's params),
    with the tags the stage itself would have set (``env``: the flow run, the DVC experiment, the store). Returns
    the MLflow run id, or None (tracking off, nothing to log, or a tracking problem, printed as a warning)."""
    log = LOGGERS.get(stage)
    if log is None or not cfg.tracking.enabled:
        return None
    with _environ({**env, "DVC_ROOT": str(root)}):
        return log(cfg, root)
