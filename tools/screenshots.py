"""README's screenshots, taken as a person sees the pages: headless Debian chromium (tools/browser.py) at 1600x1000
over this project's own stores, served on loopback for the time of the shots.

    python -m tools.screenshots --out docs/screenshots          # `make screenshots`
    python -m tools.screenshots --mlflow-store /path/to/project --prefect-home ~/.prefect --out /tmp/shots

It writes, from the newest run of the newest experiment and the newest ``train-eval`` flow run:

* ``mlflow-run.png``: the run page's charts (Model metrics tab), the training strip moved to its last step;
* ``mlflow-compare.png``: the experiment's runs in the chart view (the demo's compare URL), every run shown;
* ``prefect-flow-run.png``: the Prefect flow run page (task runs per stage, states, logs; ``--prefect-home`` or
  PREFECT_HOME holds the database), and ``prefect-artifacts.png``, its Artifacts tab.

MLflow's assistant panel is closed first (one click, which the UI remembers), so the charts get the whole width.
Every wait is bounded; a page that does not show what is expected stops the script with one line naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from tools.browser import Browser, BrowserError

VIEWPORT = (1600, 1000)
CARD = '[data-testid="experiment-view-compare-runs-card"]'
ASSISTANT_CLOSE = 'button[data-component-id="mlflow.assistant.chat_panel.close"]'


class ShotError(RuntimeError):
    pass


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ShotError(f"{what} exited with {proc.returncode} before answering at {url}")
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except OSError:
            time.sleep(0.5)
    raise ShotError(f"{what} did not answer at {url} within {timeout:.0f} s")


def stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a process started in its own session and everything it started: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def server(cmd: list[str], env: dict[str, str], health: str, what: str, log: Path) -> Iterator[None]:
    """A server process in its own session on loopback, stopped (SIGTERM, then SIGKILL) on exit."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(health, proc, what)
            yield
        finally:
            stop_group(proc)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def newest_mlflow_run(uri: str, experiment: Optional[str]) -> tuple[str, str, int]:
    """(experiment id, newest run id, number of runs) of ``experiment`` or of the newest run's experiment, through
    the server's REST API (MLflow's client stays the tracking layer's)."""
    exps = _post(f"{uri}/api/2.0/mlflow/experiments/search", {"max_results": 1000}).get("experiments", [])
    ids = [e["experiment_id"] for e in exps if experiment is None or e["name"] == experiment]
    runs = _post(f"{uri}/api/2.0/mlflow/runs/search", {"experiment_ids": ids, "max_results": 1000,
                                                       "order_by": ["attributes.start_time DESC"]}).get("runs", [])
    if not runs:
        raise ShotError(f"no MLflow runs at {uri}{f' in experiment {experiment!r}' if experiment else ''}; "
                        "run `make demo` first")
    newest = runs[0]["info"]
    count = sum(r["info"]["experiment_id"] == newest["experiment_id"] for r in runs)
    return newest["experiment_id"], newest["run_id"], count


def newest_flow_run(api: str) -> str:
    runs = _post(f"{api}/flow_runs/filter",
                 {"flows": {"name": {"any_": ["train-eval"]}}, "sort": "START_TIME_DESC", "limit": 1})
    if not runs:
        raise ShotError(f"no train-eval flow run in the Prefect database at {api}; run `make demo` first")
    return runs[0]["id"]


def mlflow_shots(b: Browser, ui: str, exp_id: str, run_id: str, out: Path) -> list[Path]:
    b.goto(f"{ui}/#/experiments/{exp_id}/runs/{run_id}/model-metrics")
    b.wait_for(f"document.querySelectorAll('{CARD} img').length > 0", 120, "an image card on the MLflow run page")
    b.click(ASSISTANT_CLOSE)
    b.settle(1.0)
    # the training strip at its last step (the card opens on step 0, the initial weights' noise): a click at the
    # right end of its slider's track
    thumb = (f"[...document.querySelectorAll('{CARD}')].find(c => c.innerText.startsWith('train/samples'))"
             "?.querySelector('[role=slider]')")
    track = b.evaluate(f"(t => {{ for (let e = t; e; e = e.parentElement) {{ const r = e.getBoundingClientRect(); "
                       f"if (e.dataset.orientation === 'horizontal' && r.width > 50) "
                       f"return [r.right - 2, (r.top + r.bottom) / 2]; }} return null; }})({thumb})")
    if track:
        b.click_at(*track)
        b.wait_for(f"{thumb}.getAttribute('aria-valuenow') === {thumb}.getAttribute('aria-valuemax')", 20,
                   "the training strip's slider at its last step")
    b.settle(1.5)
    shots = [b.screenshot(out / "mlflow-run.png")]
    b.goto(f"{ui}/#/experiments/{exp_id}/runs?workflowType=machine_learning&compareRunsMode=CHART")
    b.wait_for(f"document.querySelectorAll('{CARD}').length > 0", 120, "the charts of the MLflow compare view")
    b.click(ASSISTANT_CLOSE)
    b.settle(2.0)
    shots.append(b.screenshot(out / "mlflow-compare.png"))
    return shots


def prefect_shots(b: Browser, ui: str, flow_run: str, out: Path) -> list[Path]:
    b.goto(f"{ui}/runs/flow-run/{flow_run}")
    b.wait_for("!!document.querySelector('li.p-tab#artifacts') && document.body.innerText.includes('Task run')", 120,
               "the Prefect flow run page")
    b.settle(3.0)  # the timeline of task runs draws after the page
    shots = [b.screenshot(out / "prefect-flow-run.png")]
    b.click("li.p-tab#artifacts")
    b.wait_for("document.body.innerText.includes('train-eval-summary')", 60, "the flow run's artifacts")
    b.settle(2.0)
    shots.append(b.screenshot(out / "prefect-artifacts.png"))
    return shots


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mlflow-store", default=".", help="folder with mlflow.db and mlruns/ (default: here)")
    p.add_argument("--experiment", help="MLflow experiment (default: the newest run's)")
    p.add_argument("--prefect-home", default=os.environ.get("PREFECT_HOME", str(Path.home() / ".prefect")),
                   help="PREFECT_HOME holding the Prefect database (default: $PREFECT_HOME or ~/.prefect)")
    p.add_argument("--no-prefect", action="store_true", help="MLflow pages only")
    p.add_argument("--out", default="docs/screenshots", help="folder for the PNGs")
    args = p.parse_args(argv)
    store, out = Path(args.mlflow_store).resolve(), Path(args.out)
    if not (store / "mlflow.db").is_file():
        print(f"screenshots: {store / 'mlflow.db'} does not exist; run `make demo` first or pass --mlflow-store",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    mport, pport = free_port(), free_port()
    mlflow_ui = f"http://127.0.0.1:{mport}"
    exe = Path(sys.executable).parent
    try:
        with server([str(exe / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mport), "--workers", "1",
                     "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                     "--default-artifact-root", str(store / "mlruns")],
                    clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), f"{mlflow_ui}/health", "mlflow server",
                    out / ".mlflow-server.log"):
            exp_id, run_id, count = newest_mlflow_run(mlflow_ui, args.experiment)
            with Browser(*VIEWPORT) as b:
                shots = mlflow_shots(b, mlflow_ui, exp_id, run_id, out)
        print(f"MLflow: run {run_id} of experiment {exp_id} ({count} run(s) in the compare view)")
        if not args.no_prefect:
            prefect_ui = f"http://127.0.0.1:{pport}"
            with server([str(exe / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(pport)],
                        clean_env(PREFECT_HOME=str(Path(args.prefect_home).resolve()),
                                  PREFECT_API_URL=f"{prefect_ui}/api"),  # the UI's API: this port, not 4200
                        f"{prefect_ui}/api/health",
                        "prefect server", out / ".prefect-server.log"):
                flow_run = newest_flow_run(f"{prefect_ui}/api")
                with Browser(*VIEWPORT) as b:
                    shots += prefect_shots(b, prefect_ui, flow_run, out)
            print(f"Prefect: flow run {flow_run}")
    except (ShotError, BrowserError) as e:
        print(f"screenshots: {e}", file=sys.stderr)
        return 1
    for log in out.glob(".*-server.log"):
        log.unlink()
    print("\n".join(str(s) for s in shots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
