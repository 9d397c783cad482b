"""What a pipeline run produced, as rows of data built once from the files its stages wrote, and rendered by each
place that shows it: the console (``python -m tasks.lib.summary``, the train-eval flow's last lines), the flow run's
markdown artifact in Prefect, and the MLflow run's description (tracking/outputs.py).

    python -m tasks.lib.summary [--root .]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .layout import LAYOUT, read_output


def fmt(x: Any) -> str:
    """The one number format of summaries: four significant digits; '–' for a missing value."""
    return f"{x:.4g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "–"


@dataclass(frozen=True)
class Row:
    """One line of a summary: ``key`` names what it is about (a stage, or "mlflow", "dvc", ...), ``label`` is what a
    reader sees, ``text`` one line of plain text, ``link`` an optional URL or file the text is about."""

    key: str
    label: str
    text: str
    link: Optional[str] = None


# -- one row per stage, from the record it wrote ----------------------------------------------------------------------
def _under(root: Path, path: Any) -> Optional[str]:
    """A path from a record (relative to the workspace the stage ran in, or absolute) as an absolute path."""
    return str(path if Path(str(path)).is_absolute() else root / str(path)) if path else None


def dataset_row(ds: dict[str, Any], root: Path) -> Optional[Row]:
    if not ds:
        return None
    c, h, w = ds["shape"]
    skipped = (ds.get("skipped") or {}).get("count") or 0
    text = (f"{ds['dataset']} ({ds.get('source')}), {ds['count']['train']} train + {ds['count']['holdout']} held-out "
            f"images [{c}, {h}, {w}], sha256 {ds['sha256'][:12]}" + (f"; {skipped} unreadable left out" if skipped else ""))
    return Row("fetch", "dataset", text)


def classifier_row(clf: dict[str, Any], root: Path) -> Optional[Row]:
    if not clf:
        return None
    if clf.get("skipped"):
        return Row("train_classifier", "classifier", f"not trained: {clf.get('reason')}")
    return Row("train_classifier", "classifier", f"held-out accuracy {fmt(clf.get('accuracy'))} "
                                                 f"({clf.get('num_classes')} classes, {clf.get('steps')} steps)")


def train_row(tr: dict[str, Any], root: Path) -> Optional[Row]:
    if not tr:
        return None
    ckpt = _under(root, tr.get("checkpoint"))
    if tr.get("pretrained"):  # train.pretrained: a published model imported instead of training
        n = tr.get("parameters")
        return Row("train", "training", f"none: the published model {tr['pretrained']} "
                                        f"({f'{n:,}' if isinstance(n, int) else '–'} parameters) imported as "
                                        f"checkpoint {ckpt}", ckpt)
    if tr.get("already_trained"):  # nothing was left to train: no Ray started (tasks/train.py already_trained)
        return Row("train", "training", f"{tr.get('steps')} steps, all trained before this run (Ray not started), "
                                        f"final loss {fmt(tr.get('final_loss'))}; checkpoint {ckpt}", ckpt)
    resumed = f", resumed from step {tr['resumed_from_step']}" if tr.get("resumed_from_step") else ""
    return Row("train", "training", f"{tr.get('steps')} steps{resumed}, final loss {fmt(tr.get('final_loss'))}, "
                                    f"{fmt(tr.get('images_per_s'))} images/s on {tr.get('num_workers')} Ray worker(s); "
                                    f"Ray start-up {fmt(tr.get('ray_startup_s'))} s, fit {fmt(tr.get('fit_wall_s'))} s; "
                                    f"checkpoint {ckpt}", ckpt)


def samples_row(sm: dict[str, Any], root: Path) -> Optional[Row]:
    if not sm:
        return None
    ckpt = Path(str(sm.get("checkpoint"))).name
    grid = _under(root, sm.get("grid"))
    return Row("sample", "samples", f"{sm.get('count')} images, {sm.get('sampler')}-{sm.get('steps')} from "
                                    f"{'EMA' if sm.get('use_ema') else 'raw'} weights of {ckpt}, in "
                                    f"{fmt(sm.get('wall_s'))} s; grid {grid}", grid)


def evaluation_row(ev: dict[str, Any], root: Optional[Path] = None) -> Optional[Row]:
    """FID and KID against the real-vs-real floor: the headline of a run."""
    if not ev:
        return None
    floor = ev.get("floor") or {}
    per = (ev.get("per_repeat") or {}).get("fid") or {}
    spread = f" ± {fmt(per['std'])} over {ev.get('repeats')} seed ranges" if per.get("std") is not None else ""
    ratio = f", FID / floor {ev['fid_ratio']:.2f}" if isinstance(ev.get("fid_ratio"), (int, float)) else ""
    return Row("evaluate", "evaluation", f"FID {fmt(ev.get('fid'))}{spread} (real-vs-real floor {fmt(floor.get('fid'))}"
                                         f"{ratio}), KID {fmt(ev.get('kid_mean'))} (floor {fmt(floor.get('kid_mean'))}); "
                                         f"{ev.get('feature_extractor')} features, {ev.get('num_generated')} samples "
                                         f"against {ev.get('num_reference')} training images")


def figures_row(fig: dict[str, Any], root: Path) -> Optional[Row]:
    if not fig:
        return None
    if not fig.get("enabled"):
        return Row("figures", "figures", "off (figures.enabled: false)")
    folder = root / LAYOUT["figures"]
    return Row("figures", "figures", f"progressive generation, reconstructions, denoising animation and the loss "
                                     f"curve in {folder}", str(folder))


def sampler_table_row(table: dict[str, Any], root: Optional[Path] = None) -> Optional[Row]:
    """The sampler table's answer: the cheapest sampler that holds DDPM-1000's quality."""
    if not table:
        return None
    if not table.get("enabled"):
        return Row("sampler_table", "sampler table", "off (sampler_table.enabled: false)")
    cheapest = (table.get("answer") or {}).get("cheapest")
    if not cheapest:
        return Row("sampler_table", "sampler table", f"{len(table.get('rows') or [])} rows; none holds DDPM's FID "
                                                     "within the tolerance")
    return Row("sampler_table", "sampler table",
               f"{cheapest['sampler']} at {cheapest['nfe']} network evaluations holds DDPM-1000's FID "
               f"({fmt(cheapest.get('ratio_to_ddpm'))}x, by the {cheapest.get('by')}), "
               f"{fmt(cheapest.get('speedup_in_nfe'))}x fewer evaluations")


def stage_row(stage: str, root: Path) -> Optional[Row]:
    """What ``stage`` produced, from its record under the workspace ``root``; None when it wrote none (yet)."""
    return ROW_OF[stage](read_output(root, RECORDS[stage]), root)


# The record each stage writes (tasks/lib/layout.py), and its row.
RECORDS = {"fetch": "dataset_record", "train_classifier": "classifier_metrics", "train": "train_metrics",
           "sample": "samples_record", "evaluate": "eval_metrics", "figures": "figures_record",
           "sampler_table": "sampler_table"}
ROW_OF = {"fetch": dataset_row, "train_classifier": classifier_row, "train": train_row, "sample": samples_row,
          "evaluate": evaluation_row, "figures": figures_row, "sampler_table": sampler_table_row}


def run_rows(root: Path) -> list[Row]:
    """Every stage's row, in the pipeline's order, for the stages that wrote their record."""
    return [row for stage in RECORDS if (row := stage_row(stage, root)) is not None]


# -- the metrics table ------------------------------------------------------------------------------------------------
METRIC_NAMES = {"fid": "FID", "kid_mean": "KID", "kid_std": "KID std", "isc_mean": "IS", "isc_std": "IS std",
                "precision": "precision", "recall": "recall", "f_score": "F-score"}


def metric_rows(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluation's metrics beside the real-vs-real floor, one dict per metric."""
    floor = ev.get("floor", {})
    return [{"metric": label, "samples": ev[k], "real-vs-real floor": floor.get(k),
             "n": ev.get("num_generated"), "features": ev.get("feature_extractor")}
            for k, label in METRIC_NAMES.items() if isinstance(ev.get(k), (int, float))]


# -- renderings -------------------------------------------------------------------------------------------------------
def console(rows: Sequence[Row]) -> list[str]:
    """One line per row: ``label:`` padded to a column, then the text."""
    width = max((len(r.label) for r in rows), default=0) + 2
    return [f"{r.label + ':':<{width}}{r.text}" for r in rows]


def markdown(rows: Sequence[Row]) -> list[str]:
    """One bullet per row, the label in bold; a row about a local file links to it."""
    out = []
    for r in rows:
        text = r.text
        if r.link and "://" not in r.link and Path(r.link).is_absolute():
            text += f" ([open]({Path(r.link).as_uri()}))"
        elif r.link and "://" in r.link:
            text += f" ([open]({r.link}))"
        out.append(f"- **{r.label[:1].upper() + r.label[1:]}**: {text}")
    return out


def markdown_metrics(ev: dict[str, Any]) -> list[str]:
    lines = ["| metric | samples | real-vs-real floor |", "|---|---|---|"]
    return lines + [f"| {m['metric']} | {fmt(m['samples'])} | {fmt(m['real-vs-real floor'])} |"
                    for m in metric_rows(ev)]


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=".", type=Path, help="the workspace whose outputs to summarize (default: here)")
    args = p.parse_args(argv)
    rows = run_rows(args.root)
    print("\n".join(console(rows)) if rows else "no pipeline outputs yet: run `make demo` or `dvc repro`")


if __name__ == "__main__":
    main()
