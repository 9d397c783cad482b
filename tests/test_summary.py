"""tasks/lib/summary.py: a run's summary is rows of data built once from the stages' records, rendered by the console,
the Prefect artifact and the MLflow description alike."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.lib import summary
from tasks.lib.layout import LAYOUT

DATASET = {"dataset": "digits", "source": "scikit-learn", "count": {"train": 1437, "holdout": 360}, "shape": [1, 8, 8],
           "sha256": "24485c44c5bf560c0000", "skipped": {"count": 0, "files": []}}
EVAL = {"fid": 0.6315, "fid_ratio": 1.2192, "kid_mean": 0.0637, "floor": {"fid": 0.518, "kid_mean": -0.0756},
        "feature_extractor": "ddpm-classifier", "num_generated": 360, "num_reference": 1437, "repeats": 3,
        "per_repeat": {"fid": {"std": 0.158}}}


def _write(root: Path, name: str, record: dict) -> None:
    path = root / LAYOUT[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_rows_say_what_each_stage_produced(tmp_path):
    _write(tmp_path, "dataset_record", DATASET)
    _write(tmp_path, "classifier_metrics", {"skipped": True, "reason": "not needed: Inception features"})
    _write(tmp_path, "samples_record", {"count": 360, "sampler": "dpm++2m-sde", "steps": 20, "use_ema": True,
                                        "checkpoint": "checkpoints/ckpt_00001500.pt", "grid": "samples/grid.png",
                                        "wall_s": 17.2})
    _write(tmp_path, "eval_metrics", EVAL)
    rows = {r.key: r for r in summary.run_rows(tmp_path)}
    assert list(rows) == ["fetch", "train_classifier", "sample", "evaluate"]  # what was written, in stage order
    # fetch ran: its row says what it made (dataset.json's "skipped" is a count of unreadable images, not a flag)
    assert rows["fetch"].text == ("digits (scikit-learn), 1437 train + 360 held-out images [1, 8, 8], sha256 "
                                  "24485c44c5bf")
    assert rows["train_classifier"].text == "not trained: not needed: Inception features"
    assert rows["sample"].link == str(tmp_path / "samples/grid.png")  # record paths are the workspace's
    assert rows["evaluate"].text.startswith("FID 0.6315 ± 0.158 over 3 seed ranges (real-vs-real floor 0.518, "
                                            "FID / floor 1.22), KID 0.0637 (floor -0.0756)")


def test_one_row_three_renderings(tmp_path):
    _write(tmp_path, "eval_metrics", EVAL)
    rows = summary.run_rows(tmp_path)
    (line,) = summary.console(rows)
    (bullet,) = summary.markdown(rows)
    assert line == f"evaluation: {rows[0].text}" and bullet == f"- **Evaluation**: {rows[0].text}"
    assert summary.markdown_metrics(EVAL)[2:] == ["| FID | 0.6315 | 0.518 |", "| KID | 0.0637 | -0.0756 |"]
    assert summary.fmt(None) == summary.fmt(True) == "–" and summary.fmt(2 / 3) == "0.6667"


def test_sampler_table_row_names_the_cheapest_sampler_that_holds():
    table = {"enabled": True, "rows": [{}, {}], "answer": {"cheapest": {
        "sampler": "dpm++2m-sde", "nfe": 20, "ratio_to_ddpm": 1.04, "by": "tolerance", "speedup_in_nfe": 50.0}}}
    assert summary.sampler_table_row(table).text == ("dpm++2m-sde at 20 network evaluations holds DDPM-1000's FID "
                                                     "(1.04x, by the tolerance), 50x fewer evaluations")
    assert summary.sampler_table_row({**table, "answer": {}}).text == "2 rows; none holds DDPM's FID within the tolerance"
    assert summary.sampler_table_row({"enabled": False}).text == "off (sampler_table.enabled: false)"
    assert summary.sampler_table_row({}) is None
