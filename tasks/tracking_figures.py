"""MLflow logging of the figures and sampler_table stages, into the pipeline run of :mod:`tasks.tracking`.

Kept apart from tasks/tracking.py (owned by the tracking stages) but built on its run look-up, so the same rules
hold: one run per pipeline run, found by the params hash; a tracking failure prints one warning and never fails
the stage. What it adds to the run: artifacts ``figures/*`` (the PNGs, the GIF and ``figures.json``), images
``figures/progressive`` and ``figures/reconstruction_t<t>``; metrics ``table_fid_<row>``, ``table_kid_mean_<row>``,
``table_sampling_s_<row>``, ``table_wall_s_<row>`` (row = ``ddpm1000``, ``ddim10``, ...), artifacts
``sampler_table/sampler_table.json`` and ``sampler_table/sampler_table.md``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from tasks.config import Config

from .tracking import _dataset_sha_from_checkpoints, _log_stage, _metrics, _numbers


def _dataset_sha(checkpoint: Optional[str]) -> Optional[str]:
    return _dataset_sha_from_checkpoints(Path(checkpoint).parent) if checkpoint else None


def log_figures(cfg: Config, summary: dict[str, Any], out_dir: os.PathLike | str) -> Optional[str]:
    """After the figures stage: every figure file as an artifact under ``figures/``; the PNG figures also as
    images (shown in the run's Artifacts and, stepped at the checkpoint's step, as images). The run id or None."""
    out_dir = Path(out_dir)
    step = int(summary.get("checkpoint_step") or 0)
    files = [summary["progressive"]["file"], *(r["file"] for r in summary["reconstruction"]),
             summary["animation"]["file"], summary["loss"]["file"], "figures.json"]

    def body(client, run_id: str) -> None:
        from PIL import Image

        for name in files:
            if (out_dir / name).is_file():
                client.log_artifact(run_id, str(out_dir / name), "figures")
        for name in files:
            if name.endswith(".png") and name != "loss.png" and (out_dir / name).is_file():
                with Image.open(out_dir / name) as im:
                    client.log_image(run_id, im.convert("RGB"), key=f"figures/{Path(name).stem}", step=step,
                                     synchronous=True)

    return _log_stage(cfg, "of the figures", _dataset_sha(summary.get("checkpoint")), body)


def row_key(row: dict[str, Any]) -> str:
    """``ddpm1000``, ``ddim10``, ...: a sampler row's name in metric keys."""
    return f"{row['sampler']}{row['steps']}"


def log_sampler_table(cfg: Config, result: dict[str, Any], json_path: os.PathLike | str,
                      markdown_path: os.PathLike | str) -> Optional[str]:
    """After the sampler_table stage: per row ``table_<metric>_<row>`` (fid, kid_mean, kid_std, sampling_s, wall_s,
    images_per_s) at the checkpoint's step, the floor as ``table_floor_<metric>``, and both files as artifacts."""
    step = int(result.get("checkpoint_step") or 0)

    def body(client, run_id: str) -> None:
        values: dict[str, float] = {}
        for row in result.get("rows", []):
            for k, v in _numbers(row).items():
                if k in ("fid", "kid_mean", "kid_std", "sampling_s", "wall_s", "images_per_s"):
                    values[f"table_{k}_{row_key(row)}"] = v
        values.update(_numbers({k: v for k, v in (result.get("floor") or {}).items() if k in ("fid", "kid_mean")},
                               "table_floor_"))
        client.log_batch(run_id, metrics=_metrics(values, step))
        for path in (json_path, markdown_path):
            if Path(path).is_file():
                client.log_artifact(run_id, str(path), "sampler_table")

    return _log_stage(cfg, "of the sampler table", _dataset_sha(result.get("checkpoint")), body)
