"""What a train-eval flow run shows in Prefect: its summary (the rows of tasks/lib/summary.py as markdown), the
metrics beside the real-vs-real floor as a table, the figures and the sampler table, and a link to its MLflow run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from tasks.lib.summary import Row, markdown, markdown_metrics, metric_rows


def summary_markdown(title: str, runs: dict[str, dict[str, Any]], rows: Sequence[Row], ev: dict[str, Any]) -> str:
    """The flow run's summary: each stage's status and time, the run's rows, the metrics against the floor."""
    lines = [f"# {title}", "", "| stage | status | wall time |", "|---|---|---|"]
    lines += [f"| {name} | {r['status']} | {r['wall_s']:.1f} s |" for name, r in runs.items()]
    lines += ["", *markdown(rows)]
    if ev:
        lines += ["", *markdown_metrics(ev)]
    return "\n".join(lines) + "\n"


def publish(markdown_text: str, ev: dict[str, Any], mlflow: Optional[dict[str, str]]) -> None:
    create_markdown_artifact(markdown_text, key="train-eval-summary", description="train-eval: what this run produced")
    if ev:
        create_table_artifact(metric_rows(ev), key="train-eval-metrics",
                              description="FID/KID of the samples and the real-vs-real floor")
    if mlflow:
        after = " (after `make mlflow-ui`)" if mlflow.get("local") else ""
        create_link_artifact(mlflow["url"], link_text=f"MLflow run {mlflow['run_id']}", key="train-eval-mlflow",
                             description=f"the MLflow run of this pipeline run: curves, pictures, metrics{after}")


def figures_markdown(fig: Optional[dict[str, Any]], table: Optional[dict[str, Any]], figures: Path,
                     table_md: Path) -> str:
    """The figures (paths and links to the files) and the sampler table, as one markdown artifact."""
    lines = ["# Figures and sampler table", ""]
    if fig and fig.get("enabled"):
        lines += [f"Chains sampled with {fig['sampler']} from `{Path(fig['checkpoint']).name}`.", ""]
        entries = [("progressive generation (rows: x_t / predicted x_0 per seed; columns t = "
                    f"{', '.join(map(str, fig['progressive']['timesteps']))})", fig["progressive"]["file"])]
        entries += [(f"reconstruction from t = {r['t']} (original, diffused input, {r['cols'] - 2} reconstructions)",
                     r["file"]) for r in fig["reconstruction"]]
        entries += [(f"denoising animation ({fig['animation']['frames']} frames)", fig["animation"]["file"]),
                    ("training loss", fig["loss"]["file"])]
        lines += [f"- {what}: [{name}]({(figures / name).as_uri()}) `{figures / name}`" for what, name in entries]
        lines.append("")
    if table and table.get("enabled") and table_md.is_file():  # the stage's own markdown table
        lines += ["## Sampler table", "", table_md.read_text().strip()]
    return "\n".join(lines) + "\n"


def sampler_table_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [{"sampler": r["sampler"], "NFE": r["steps"], "FID": r.get("fid"), "FID_std": r.get("fid_std"),
             "vs_DDPM": r.get("ratio_to_ddpm"), "holds": r.get("holds"), "KID": r.get("kid_mean"),
             "sampling_s": r.get("sampling_s", r["wall_s"]), "images_per_s": r.get("images_per_s")}
            for r in table["rows"]]
    floor = table.get("floor") or {}
    rows.append({"sampler": "real held-out (floor)", "NFE": None, "FID": floor.get("fid"), "FID_std": None,
                 "vs_DDPM": None, "holds": None, "KID": floor.get("kid_mean"), "sampling_s": None,
                 "images_per_s": None})
    return rows


def publish_figures(fig: Optional[dict[str, Any]], table: Optional[dict[str, Any]], figures: Path,
                    table_md: Path) -> None:
    """Prefect artifacts of the optional stages: ``train-eval-figures`` (markdown with the files) and
    ``train-eval-sampler-table`` (a table); nothing for a disabled or skipped stage."""
    have_fig, have_table = bool(fig and fig.get("enabled")), bool(table and table.get("enabled"))
    if have_fig or have_table:
        create_markdown_artifact(figures_markdown(fig, table, figures, table_md), key="train-eval-figures",
                                 description="figures of the trained model and the fast-sampling table")
    if have_table:
        create_table_artifact(sampler_table_rows(table), key="train-eval-sampler-table",
                              description="FID/KID and wall time per sampler, same seeds")
