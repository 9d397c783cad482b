"""What makes two trainings the same run: the key a checkpoint must share to be resumed. Derived from the identity
marks of the fields (ddpm/config.py ``result``, ``count``, ``execution``): the dataset's content hash and the
result-defining fields of the model, diffusion and train sections. How long (``train.steps``, except under the
cosine schedule, which spans it), how often and on what it runs may change without invalidating checkpoints.
Shared by the train stage (resume) and the tracking layer (which MLflow run a pipeline run continues), so neither
imports the other for it."""

from __future__ import annotations

from typing import Any

from tasks.lib.config import Config, digest


def run_key(cfg: Config, data_sha: str) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed: data, model, diffusion, learning params."""
    train = cfg.train.identity()
    if train.get("pretrained") is None:
        # Named only when set (a published model's checkpoint is never resumed by a training): the run_key.json of
        # checkpoints stored before the key existed stays valid.
        del train["pretrained"]
    return {
        "data_sha256": data_sha,
        "model": cfg.model.identity(),
        "diffusion": cfg.diffusion.identity(),
        "train": train,
    }


def run_name(key: dict[str, Any]) -> str:
    """The name of a training in Ray Train's storage (``train-<12 hex>``): one per run key, so a rerun resumes it."""
    return f"train-{digest(key)[:12]}"
