"""The ``mlflow`` tracker: what pyproject.toml declares under the entry-point group ``ddpm_pipeline.trackers``, so
that the stages report to MLflow through tasks/lib/callbacks.py without importing it. MLflow itself is imported only
when a hook runs."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from tasks.lib.callbacks import TrainCallback
from tasks.lib.config import Config


class MlflowTracker:
    """Training through :class:`tracking.training.MlflowTrainCallback`; the other stages through
    :func:`tracking.outputs.log_stage`. Off when ``tracking.enabled`` is false."""

    def train_callback(self, cfg: Config) -> Optional[TrainCallback]:
        if not cfg.tracking.enabled:
            return None
        from .training import MlflowTrainCallback

        return MlflowTrainCallback()

    def after_stage(self, stage: str, cfg: Config, root: Path, paths: Mapping[str, Path]) -> Optional[str]:
        from .outputs import log_stage

        return log_stage(stage, cfg, root, paths)


MLFLOW = MlflowTracker()
