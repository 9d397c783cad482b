"""What the sample, evaluate, figures and sampler_table stages wrote, logged into the pipeline's MLflow run.

Each ``log_*`` function reads a stage's files and logs them; :func:`log_stage` picks the stage's and finds its files
in a run's layout (tasks/lib/layout.py). It is called after the stage: by the stage's own command line through the
``mlflow`` tracker (run alone: ``dvc repro``, by hand), or by the train-eval flow in its own process.

What a run gets:

Metric keys carry sections (the prefix before the last ``/``, which MLflow's charts group by). MLflow 3.17 orders a
run's sections by name, so everything measured after training sorts after ``train/`` (the training callback's: the
run page opens on the loss curve and the training strips): ``trained/`` (the trained model's headline numbers and
samples), ``trained/floor/``, ``trained/perf/``, ``trained/repeats/`` and ``trained/sampler/``. Counts and settings
are tags.

* sample: artifacts ``samples/grid.png`` and ``samples/samples.json``, image ``trained/samples`` (the training
  strips' seeds, from the final samples), metrics ``trained/perf/sample_wall_s``, ``_images_per_s``,
  ``_ray_startup_s``, tags ``sample.*`` (sampler, count, steps, eta, spacing, checkpoint, shards reused);
* evaluate: ``trained/<metric>`` for :data:`EVAL_HEADLINE` (FID, KID, IS, precision/recall, ``fid_ratio``,
  ``classifier_accuracy``), the real-vs-real floor as ``trained/floor/<metric>``, per repeat
  ``trained/repeats/<metric>_r<i>`` and ``_mean``/``_std``/``_min``; counts and the provenance as tags ``eval.*``;
  artifact ``evaluate/eval.json``;
* figures: artifacts ``figures/*`` (the PNGs, the GIF and ``figures.json``), which the Artifacts tab shows at full
  size (not image cards: a card cuts a square picture off under the params);
* sampler_table: metrics ``trained/sampler/<metric>_<row>`` (row = ``ddpm1000``, ``ddim10``, ``dpmpp2m_sde10``,
  ...), the floor as ``trained/sampler/floor_<metric>``, artifacts ``sampler_table/sampler_table.json`` and ``.md``.

A store written before the sections (``loss``, ``fid``, ``floor_fid``, ``table_*``) or with the first section names
(``eval/``, ``floor/``, ...) still opens: its runs keep their keys, and a resumed training finds its curve under
``train/loss`` or ``loss``.

Every number is logged at the training step of the checkpoint the stage read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from ddpm.config import setting_key

from tasks.lib.config import Config
from tasks.lib.layout import read_record
from tasks.lib.summary import evaluation_row, sampler_table_row

from .run import card_image, dataset_sha_from_checkpoints, flat_tags, log_into_run, metric_list, numbers

# The sections after training (see above): each sorts after "train" in MLflow's charts.
EVAL, FLOOR, PERF, REPEATS, SAMPLER = "trained", "trained/floor", "trained/perf", "trained/repeats", "trained/sampler"
SAMPLES_KEY = f"{EVAL}/samples"  # the final samples of the training strips' seeds, beside the headline metrics
# the evaluation's headline numbers (section trained/); counts and settings are tags
EVAL_HEADLINE = ("fid", "kid_mean", "kid_std", "isc_mean", "isc_std", "precision", "recall", "f_score", "fid_ratio",
                 "classifier_accuracy")
COUNTS = ("num_generated", "num_reference", "num_holdout", "repeats", "kid_subset_size")


def log_samples(cfg: Config, summary: dict[str, Any], out_dir: os.PathLike | str) -> Optional[str]:
    """After the sample stage: the grid (artifact ``samples/grid.png``), the final strip (image ``trained/samples``),
    the manifest, the speed (``trained/perf/sample_*``, at the checkpoint's training step), the sampler and count
    (tags ``sample.*``)."""
    out_dir = Path(out_dir)
    step = int(summary.get("checkpoint_step") or 0)
    ckpt = summary.get("checkpoint")

    def body(client, run_id: str) -> None:
        from mlflow.entities import RunTag

        values = {f"{PERF}/sample_{k}": v for k, v in numbers(summary).items()
                  if k in ("wall_s", "ray_startup_s", "images_per_s")}
        tags = {"sample.sampler": f"{summary.get('sampler')}-{summary.get('steps')}",
                "sample.checkpoint": str(ckpt), "sample.checkpoint_step": str(step),
                **{f"sample.{k}": str(summary[k]) for k in ("count", "eta", "timestep_spacing", "network_evaluations",
                                                            "shards_reused") if summary.get(k) is not None}}
        client.log_batch(run_id, metrics=metric_list(values, step), tags=[RunTag(k, v) for k, v in tags.items()])
        grid = out_dir / "grid.png"
        if grid.is_file():
            client.log_artifact(run_id, str(grid), "samples")
        strip = _final_strip(cfg, out_dir)
        if strip is not None:
            client.log_image(run_id, strip, key=SAMPLES_KEY, step=step, synchronous=True)
        if (out_dir / "samples.json").is_file():
            client.log_artifact(run_id, str(out_dir / "samples.json"), "samples")

    sha = dataset_sha_from_checkpoints(Path(ckpt).parent) if ckpt else None
    return log_into_run(cfg, "of the samples", sha, body)


def _final_strip(cfg: Config, out_dir: Path) -> Optional[np.ndarray]:
    """The samples of the training strips' seeds (``sample.grid_seed`` .. +``tracking.grid_samples``-1; the first
    samples when the shards lack them) as a card strip; None without samples."""
    from tasks.lib.errors import DataError
    from tasks.lib.samples import SampleShards, seed_positions

    try:
        samples = SampleShards(out_dir)
        seeds = samples.seeds
    except (OSError, DataError):
        return None
    if len(seeds) == 0:
        return None
    want = np.arange(cfg.sample.grid_seed, cfg.sample.grid_seed + cfg.tracking.grid_samples)
    pos = seed_positions(seeds, want)
    if pos is None:
        pos = np.arange(min(len(seeds), len(want)))
    return card_image(np.stack([samples[int(i)] for i in pos]))


def log_evaluation(cfg: Config, result: dict[str, Any], dataset_sha256: Optional[str],
                   samples_dir: os.PathLike | str, metrics_path: os.PathLike | str) -> Optional[str]:
    """After the evaluate stage: every number of ``eval.json`` (FID, KID mean/std, IS, precision/recall,
    ``fid_ratio``, ``classifier_accuracy``, under ``trained/``; the real-vs-real floor under ``trained/floor/``; with
    repeats ``trained/repeats/<metric>_mean``, ``_std``, ``_min`` and ``_r<i>`` per seed range) at the training step
    the samples came from, the
    provenance block as tags ``eval.<key>`` (counts, seed ranges, sampler, checkpoint, extractor and weights hash,
    library versions) and ``eval.json`` as artifact ``evaluate/eval.json``."""
    try:
        step = int(json.loads((Path(samples_dir) / "samples.json").read_text()).get("checkpoint_step") or 0)
    except (OSError, ValueError):
        step = 0

    def body(client, run_id: str) -> None:
        from mlflow.entities import RunTag

        values = {f"{EVAL}/{k}": v for k, v in numbers(result).items() if k in EVAL_HEADLINE}
        floor = result.get("floor") or {}
        values.update({f"{FLOOR}/{k}": v for k, v in numbers(floor).items() if k not in COUNTS})
        for metric, s in (result.get("per_repeat") or {}).items():
            values.update(numbers({k: s.get(k) for k in ("mean", "std", "min")}, f"{REPEATS}/{metric}_"))
            values.update({f"{REPEATS}/{metric}_r{i}": float(v) for i, v in enumerate(s.get("values") or [])})
        counts = {**{f"eval.{k}": str(result[k]) for k in COUNTS if result.get(k) is not None},
                  **{f"eval.floor_{k}": str(floor[k]) for k in COUNTS if floor.get(k) is not None}}
        tags = {"evaluate.feature_extractor": str(result.get("feature_extractor")),
                "evaluate.reference_key": str(result.get("reference_key")), **counts,
                **{f"eval.{k}": v for k, v in flat_tags(result.get("provenance") or {}).items()}}
        client.log_batch(run_id, metrics=metric_list(values, step), tags=[RunTag(k, v) for k, v in tags.items()])
        write_note(client, run_id, cfg, "ddpm.note.eval", evaluation_note(cfg, result, step))
        if Path(metrics_path).is_file():
            client.log_artifact(run_id, str(metrics_path), "evaluate")

    return log_into_run(cfg, "of the evaluation", dataset_sha256, body)


NOTE_TAG = "mlflow.note.content"  # the run page's Description
NOTE_PARTS = ("ddpm.note.eval", "ddpm.note.sampler_table")  # its parts, each written by the stage it describes


def evaluation_note(cfg: Config, result: dict[str, Any], step: int) -> str:
    """The evaluation's part of the run description: its summary row (FID/KID against the real-vs-real floor,
    tasks/lib/summary.py), and where the pictures are."""
    row = evaluation_row(result)
    return "\n".join([
        f"**{row.text if row else 'no evaluation'}**; checkpoint step {step}.",
        "",
        f"Pictures: the training strips `train/samples` beside the loss curve, the final samples `{SAMPLES_KEY}` "
        "(all of the grid: artifact `samples/grid.png`), the figures in the artifacts under `figures/`."])


def table_note(result: dict[str, Any]) -> str:
    """The sampler table's part: its summary row, the cheapest sampler that holds DDPM-1000's quality."""
    row = sampler_table_row({"enabled": True, **result})
    return f"Sampler table (artifact `sampler_table/sampler_table.md`): **{row.text if row else 'none'}**."


def write_note(client, run_id: str, cfg: Config, part: str, text: str) -> None:
    """Set one part of the run description and rewrite ``mlflow.note.content`` from the header and every part."""
    from .run import params_hash

    tags = client.get_run(run_id).data.tags
    parts = {k: tags.get(k) for k in NOTE_PARTS}
    parts[part] = text
    head = (f"**{cfg.data.dataset}** diffusion model, params hash `{params_hash(cfg)[:12]}` "
            f"({tags.get('dvc_exp_name') or 'workspace'}).")
    note = "\n\n".join([head, *[p for k in NOTE_PARTS if (p := parts.get(k))]])
    client.set_tag(run_id, part, text)
    client.set_tag(run_id, NOTE_TAG, note)


def _dataset_sha(checkpoint: Optional[str]) -> Optional[str]:
    return dataset_sha_from_checkpoints(Path(checkpoint).parent) if checkpoint else None


def log_figures(cfg: Config, summary: dict[str, Any], out_dir: os.PathLike | str) -> Optional[str]:
    """After the figures stage: every figure file as an artifact under ``figures/`` (the Artifacts tab shows them at
    full size; as image cards they would be cut off under the params). The run id or None."""
    out_dir = Path(out_dir)
    files = [summary["progressive"]["file"], *(r["file"] for r in summary["reconstruction"]),
             summary["animation"]["file"], summary["loss"]["file"], "figures.json"]

    def body(client, run_id: str) -> None:
        for name in files:
            if (out_dir / name).is_file():
                client.log_artifact(run_id, str(out_dir / name), "figures")

    return log_into_run(cfg, "of the figures", _dataset_sha(summary.get("checkpoint")), body)


def log_sampler_table(cfg: Config, result: dict[str, Any], json_path: os.PathLike | str,
                      markdown_path: os.PathLike | str) -> Optional[str]:
    """After the sampler_table stage: per row ``trained/sampler/<metric>_<row>`` (fid, fid_std, kid_mean, kid_std, sampling_s,
    wall_s, images_per_s) at the checkpoint's step, the floor as ``trained/sampler/floor_<metric>``, and both files as
    artifacts."""
    step = int(result.get("checkpoint_step") or 0)

    def body(client, run_id: str) -> None:
        values: dict[str, float] = {}
        for row in result.get("rows", []):
            for k, v in numbers(row).items():
                if k in ("fid", "fid_std", "kid_mean", "kid_std", "sampling_s", "wall_s", "images_per_s"):
                    values[f"{SAMPLER}/{k}_{setting_key(row['sampler'], row['steps'])}"] = v
        values.update(numbers({k: v for k, v in (result.get("floor") or {}).items() if k in ("fid", "kid_mean")},
                               f"{SAMPLER}/floor_"))
        client.log_batch(run_id, metrics=metric_list(values, step))
        write_note(client, run_id, cfg, "ddpm.note.sampler_table", table_note(result))
        for path in (json_path, markdown_path):
            if Path(path).is_file():
                client.log_artifact(run_id, str(path), "sampler_table")

    return log_into_run(cfg, "of the sampler table", _dataset_sha(result.get("checkpoint")), body)


def _absolute_checkpoint(record: dict[str, Any], root: Path) -> dict[str, Any]:
    """A record's checkpoint path, relative to the workspace it was written in, made absolute."""
    ckpt = record.get("checkpoint")
    if isinstance(ckpt, str) and ckpt and not Path(ckpt).is_absolute():
        return {**record, "checkpoint": str(root / ckpt)}
    return record


def _sample(cfg: Config, root: Path, paths: Mapping[str, Path]) -> Optional[str]:
    summary = read_record(paths["samples_record"])
    if not summary:
        return None
    return log_samples(cfg, _absolute_checkpoint(summary, root), paths["samples"])


def _evaluate(cfg: Config, root: Path, paths: Mapping[str, Path]) -> Optional[str]:
    result = read_record(paths["eval_metrics"])
    if not result:
        return None
    return log_evaluation(cfg, result, read_record(paths["dataset_record"]).get("sha256"), paths["samples"],
                          paths["eval_metrics"])


def _figures(cfg: Config, root: Path, paths: Mapping[str, Path]) -> Optional[str]:
    summary = read_record(paths["figures_record"])
    if not summary.get("enabled"):  # figures.enabled: false writes only a note: nothing to log
        return None
    return log_figures(cfg, _absolute_checkpoint(summary, root), paths["figures"])


def _sampler_table(cfg: Config, root: Path, paths: Mapping[str, Path]) -> Optional[str]:
    result = read_record(paths["sampler_table"])
    if not result.get("enabled"):
        return None
    return log_sampler_table(cfg, _absolute_checkpoint(result, root), paths["sampler_table"],
                             paths["sampler_table_md"])


LOGGERS: dict[str, Callable[[Config, Path, Mapping[str, Path]], Optional[str]]] = {
    "sample": _sample, "evaluate": _evaluate, "figures": _figures, "sampler_table": _sampler_table}


def log_stage(stage: str, cfg: Config, root: Path, paths: Mapping[str, Path]) -> Optional[str]:
    """Log what ``stage`` wrote (``paths``: the run's files by layout name; relative checkpoint paths in its records
    are relative to ``root``) to the MLflow run of ``cfg``. Returns the MLflow run id, or None (tracking off, a
    stage with nothing to log, a missing record, or a tracking problem, printed as a warning)."""
    log = LOGGERS.get(stage)
    if log is None or not cfg.tracking.enabled:
        return None
    return log(cfg, Path(root), paths)
