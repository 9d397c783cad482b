"""Where a run's files are, relative to its workspace (the paths dvc.yaml's commands write), and a lenient reader
of its JSON records. Shared by the flow (its summary), the tracking layer (what it logs after a stage) and the
tests that keep this table equal to dvc.yaml's outs (tests/test_stage_deps.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LAYOUT = {
    "dataset": "data/dataset",
    "dataset_record": "data/dataset/dataset.json",
    "classifier_metrics": "metrics/classifier.json",
    "checkpoints": "checkpoints",
    "train_metrics": "metrics/train.json",
    "samples": "samples",
    "samples_record": "samples/samples.json",
    "eval_metrics": "metrics/eval.json",
    "figures": "figures",
    "figures_record": "figures/figures.json",
    "sampler_table": "metrics/sampler_table.json",
    "sampler_table_md": "metrics/sampler_table.md",
}


def layout_paths(root: Path, **given: Path | str | None) -> dict[str, Path]:
    """Every :data:`LAYOUT` entry under ``root``, with the ``given`` ones (a stage's own command-line paths) instead
    of theirs; relative paths are relative to ``root``."""
    paths = {name: root / rel for name, rel in LAYOUT.items()}
    for name, path in given.items():
        if name not in LAYOUT:
            raise KeyError(f"{name!r} is not a file of a run's layout ({', '.join(LAYOUT)})")
        if path is not None:
            paths[name] = root / path
    return paths


def read_record(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} when it is missing or not a JSON object (a reader of results, never a reason
    to fail a run)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def read_output(root: Path, name: str) -> dict[str, Any]:
    """The JSON record ``LAYOUT[name]`` under the workspace ``root``, as :func:`read_record`."""
    return read_record(root / LAYOUT[name])
