"""What makes two training runs the same run: the key a checkpoint must share to be resumed, and the train keys
that may change without invalidating checkpoints. Shared by the train stage (resume) and the tracking layer (which
MLflow run a pipeline run continues), so neither imports the other for it."""

from __future__ import annotations

from typing import Any

from tasks.lib.config import Config

# Keys that may change without invalidating checkpoints: how long and how often, not what is learned.
RESUMABLE_KEYS = frozenset({"steps", "checkpoint_every", "keep_checkpoints", "log_every", "num_workers", "use_gpu",
                            "gpus_per_worker", "channels_last", "compile", "adam_impl",  # speed switches: same numbers
                            "max_failures"})


def resumable_keys(cfg: Config) -> frozenset[str]:
    """``RESUMABLE_KEYS``, less ``steps`` under a cosine lr schedule: its decay is laid over ``train.steps``, so a
    longer run is a different curve from step 0, not a continuation."""
    return RESUMABLE_KEYS - {"steps"} if cfg.train.lr_schedule == "cosine" else RESUMABLE_KEYS


def run_key(cfg: Config, data_sha: str) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed: data, model, diffusion, learning params."""
    d = cfg.to_dict()
    return {
        "data_sha256": data_sha,
        "model": d["model"],
        "diffusion": d["diffusion"],
        "train": {k: v for k, v in d["train"].items() if k not in resumable_keys(cfg)},
    }
