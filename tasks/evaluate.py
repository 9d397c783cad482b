"""Stage `evaluate`: FID / KID (and IS, precision/recall when enabled) of the samples against the training split,
each beside its real-vs-real floor (held-out real images against the same reference, at the same count).

Features are the dataset's own classifier's on labeled grayscale data and torch-fidelity's Inception-v3 otherwise
(``evaluate.feature_extractor``); the training split's statistics are a keyed entry of ``--ref-dir``; with
``evaluate.repeats: k`` each metric is reported over k disjoint seed ranges. The machinery is
:mod:`tasks.lib.scoring`; this stage adds the command line, which reports the scores to the trackers
(tasks/lib/callbacks.py).

    python -m tasks.evaluate --params params.yaml --data data/dataset --samples samples \\
        --classifier models/classifier.pt --classifier-metrics metrics/classifier.json \\
        --ref-dir ref_stats --out metrics/eval.json
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from tasks.lib.config import Config

from .lib.callbacks import after_stage
from .lib.common import run_cli, stage_parser
from .lib.inputs import stage_config
from .lib.scoring import score_samples


def run(cfg: Config, data_dir: os.PathLike | str, samples_dir: os.PathLike | str,
        classifier_path: os.PathLike | str | None, ref_dir: os.PathLike | str, metrics_path: os.PathLike | str,
        classifier_metrics_path: os.PathLike | str | None = None) -> dict[str, Any]:
    """Score ``samples_dir`` into ``metrics_path`` (:func:`tasks.lib.scoring.score_samples`, which documents the
    result)."""
    return score_samples(cfg, data_dir, samples_dir, classifier_path, ref_dir, metrics_path, classifier_metrics_path)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = stage_parser("FID/KID (IS, precision/recall) of the samples against the training set, with the "
                     "real-vs-real floor.")
    p.add_argument("--data", required=True, help="dataset folder (output of the fetch stage)")
    p.add_argument("--samples", required=True, help="samples folder (output of the sample stage)")
    p.add_argument("--classifier", default=None, help="classifier weights (train_classifier output)")
    p.add_argument("--classifier-metrics", default=None, help="classifier metrics JSON, for its accuracy")
    p.add_argument("--ref-dir", required=True, help="folder of the keyed training-set reference statistics")
    p.add_argument("--out", required=True, help="metrics JSON to write, e.g. metrics/eval.json")
    args = p.parse_args(argv)
    cfg = stage_config(args)
    result = run(cfg, args.data, args.samples, args.classifier, args.ref_dir, args.out, args.classifier_metrics)
    after_stage("evaluate", cfg, eval_metrics=args.out, samples=args.samples,
                samples_record=Path(args.samples) / "samples.json", dataset_record=Path(args.data) / "dataset.json")
    return result


if __name__ == "__main__":
    run_cli(main)
