"""What the stages report, and to whom: the one interface between the stages and the tracking layer.

The stages never import the tracking layer (MLflow). They report through these hooks, and the trackers installed
under the entry-point group ``ddpm_pipeline.trackers`` listen. This project installs one, ``mlflow``
(tracking/plugin.py, declared in pyproject.toml); another (a W&B logger, a CSV writer) is a class with the two
methods of :class:`Tracker`, declared under that group by any installed package.

* **Training** reports through :class:`TrainCallback` objects, one per tracker: the driver calls
  :meth:`~TrainCallback.on_fit_start` before Ray starts and :meth:`~TrainCallback.on_fit_end` after; the callback
  then travels (pickled) to the Ray Train worker of rank 0, which calls the ``on_train_*``, ``on_log`` and
  ``on_step_end`` hooks as it trains. Other ranks call nothing.
* **The other stages** write their files, then their command line calls :func:`after_stage`, and each tracker reads
  what the stage wrote. Under the train-eval flow (``DDPM_TRACKING_BY=flow``) the flow calls the trackers after each
  stage itself, once per flow run's process, and :func:`after_stage` does nothing.

A tracker must never fail a stage: what a hook raises is printed as one warning and that tracker is off for the
rest of the stage (:class:`CallbackList`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol

if TYPE_CHECKING:  # only for the annotations: this module stays light for the stages that import it
    import torch

    from ddpm.diffusion import GaussianDiffusion
    from tasks.lib.config import Config

GROUP = "ddpm_pipeline.trackers"
# "flow": an orchestrator calls the trackers after each stage (flows/train_eval.py), so the stages do not.
TRACKING_BY_ENV = "DDPM_TRACKING_BY"


class TrainCallback:
    """The train stage's reports; every hook does nothing unless overridden."""

    def on_fit_start(self, cfg: "Config", dataset_sha256: str, fresh: bool) -> None:
        """Driver, before Ray starts. ``fresh``: no checkpoint to resume, training starts at step 0."""

    def on_train_start(self, cfg: "Config", step: int, rows: list[dict[str, Any]]) -> None:
        """Rank 0, once the model is built: ``step`` where training starts (0, or the resumed checkpoint's) and the
        loss log's rows up to there."""

    def on_log(self, row: dict[str, Any]) -> None:
        """Rank 0, every ``train.log_every`` steps and at the last: one row of the loss log (``step``, ``loss``,
        ``lr``, ``grad_norm``, ``images_per_s``, as the log writes them)."""

    def on_step_end(self, step: int, ema_model: "torch.nn.Module", diffusion: "GaussianDiffusion") -> None:
        """Rank 0, after every optimizer step (``step`` counts them), and once at step 0 before the first update of a
        fresh training: the EMA network and the diffusion, e.g. to sample a grid from."""

    def on_train_end(self, step: int, ema_model: "torch.nn.Module") -> None:
        """Rank 0, after the last step (also when the steps were already done)."""

    def on_fit_end(self, ok: bool) -> None:
        """Driver, after Ray: ``ok`` False when training failed (a user error or a crash)."""


class Tracker(Protocol):
    """What a ``ddpm_pipeline.trackers`` entry point names (an object or a module with these two functions)."""

    def train_callback(self, cfg: "Config") -> Optional[TrainCallback]:
        """The callback for one training (None: this tracker does not follow training)."""

    def after_stage(self, stage: str, cfg: "Config", root: Path, paths: Mapping[str, Path]) -> Optional[str]:
        """Read what ``stage`` wrote (``paths``: :data:`tasks.lib.layout.LAYOUT` names to files, relative paths in its
        records relative to ``root``) and report it; returns an id of what it reported to, or None."""


def _warn(what: str, error: BaseException) -> None:
    text = str(error).strip().splitlines()
    print(f"warning: {what} failed and is off for the rest of this stage ({type(error).__name__}: "
          f"{text[0] if text else ''})", file=sys.stderr)


def trackers(cfg: "Config") -> list[tuple[str, Tracker]]:
    """The installed trackers, by name; none when ``tracking.enabled`` is false. One that fails to load is a
    warning."""
    if not cfg.tracking.enabled:
        return []
    from importlib.metadata import entry_points

    found = []
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            found.append((ep.name, ep.load()))
        except Exception as e:  # a broken plugin must not stop the pipeline
            _warn(f"loading tracker {ep.name!r} ({ep.value})", e)
    return found


class CallbackList(TrainCallback):
    """Several callbacks as one; a callback whose hook raises is reported once and dropped."""

    def __init__(self, callbacks: list[TrainCallback]):
        self.callbacks = list(callbacks)

    def _call(self, hook: str, *args: Any) -> None:
        for cb in list(self.callbacks):
            try:
                getattr(cb, hook)(*args)
            except Exception as e:
                _warn(f"{type(cb).__name__}.{hook}", e)
                self.callbacks.remove(cb)

    def on_fit_start(self, *args: Any) -> None:
        self._call("on_fit_start", *args)

    def on_train_start(self, *args: Any) -> None:
        self._call("on_train_start", *args)

    def on_log(self, *args: Any) -> None:
        self._call("on_log", *args)

    def on_step_end(self, *args: Any) -> None:
        self._call("on_step_end", *args)

    def on_train_end(self, *args: Any) -> None:
        self._call("on_train_end", *args)

    def on_fit_end(self, *args: Any) -> None:
        self._call("on_fit_end", *args)


def train_callbacks(cfg: "Config") -> CallbackList:
    """One callback per installed tracker that follows training."""
    cbs = []
    for name, tracker in trackers(cfg):
        try:
            cb = tracker.train_callback(cfg)
        except Exception as e:
            _warn(f"tracker {name!r}", e)
            continue
        if cb is not None:
            cbs.append(cb)
    return CallbackList(cbs)


def after_stage(stage: str, cfg: "Config", **paths: Path | str | None) -> None:
    """Called by a stage's command line after it wrote its files (``paths``: its own output paths by layout name);
    every tracker reads and reports them. Nothing under the train-eval flow, which does this itself."""
    if os.environ.get(TRACKING_BY_ENV) == "flow":
        return
    from .layout import layout_paths

    root = Path.cwd()
    for name, tracker in trackers(cfg):
        try:
            tracker.after_stage(stage, cfg, root, layout_paths(root, **paths))
        except Exception as e:
            _warn(f"tracker {name!r} after {stage}", e)
