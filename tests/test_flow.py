"""The ``train-eval`` Prefect flow (flows/): its deployment against a real Prefect server on loopback, served by
``python -m flows.serve`` and launched with ``prefect deployment run … --watch``; a failing stage, skipping on the
rerun, a flow run that leaves DVC's state as `dvc repro` would (and DVC carrying on from it), deployment runs as DVC
experiments, the command line; and what needs no server (prefect.yaml's entrypoints, the stage table)."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.lib.config import load_config
from tasks.lib.dvcfile import check_order, read_stages
from flows import serve as flows_serve
from flows import train_eval as te
from conftest import GIT_ENV, clone_project, free_port

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
STAGE_NAMES = list(te.STAGES)


# -- no server ------------------------------------------------------------------------------------------------------
def test_prefect_yaml_entrypoints_load_the_train_eval_flow():
    deployments = flows_serve.read_deployments(REPO / "prefect.yaml")
    by_name = {d["name"]: d for d in deployments}
    assert {"local", "cifar10"} <= set(by_name)
    for d in deployments:
        flow = flows_serve.load_flow(d["entrypoint"], REPO)  # a stale file or function name raises here
        assert flow.name == "train-eval", d["entrypoint"]
        params = d.get("parameters") or {}
        assert set(params) <= set(inspect.signature(flow.fn).parameters), d["name"]
        load_config(REPO / params.get("params", "params.yaml"), params.get("overrides"))  # its preset is valid
    assert by_name["local"].get("parameters") in (None, {})  # the default params
    assert by_name["cifar10"]["parameters"]["params"] == "configs/cifar10.yaml"
    assert [d.name for d in flows_serve.runner_deployments(REPO / "prefect.yaml")] == list(by_name)
    with pytest.raises(Exception):
        flows_serve.load_flow("flows/train_eval.py:no_such_flow", REPO)


def test_stage_table_is_read_from_dvc_yaml():
    """The flow's tasks are dvc.yaml's stages, in its order; no second list of deps, params or commands."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == STAGE_NAMES == list(te.STAGE_TASKS)
    assert te.STAGES["evaluate"].deps == tuple(dvc["evaluate"]["deps"])
    assert set(te.STAGES["train"].outs) == {"checkpoints", "metrics/train.json", "metrics/train_loss.tsv"}
    assert {name: t.retries for name, t in te.STAGE_TASKS.items()} == {n: 2 if n == "fetch" else 0 for n in dvc}


def test_the_dag_is_dvc_yamls_deps_and_outs():
    """Each stage starts once the stages whose outputs it reads are done; nothing else orders them."""
    assert te.PRODUCERS == {
        "fetch": (), "train_classifier": ("fetch",), "train": ("fetch",), "sample": ("train",),
        "evaluate": ("fetch", "sample", "train_classifier"), "figures": ("train", "fetch"),
        "sampler_table": ("train", "fetch", "train_classifier", "evaluate")}


def test_stage_order_must_follow_the_data(tmp_path):
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages = spec["stages"]
    spec["stages"] = {"train": stages["train"], **{k: v for k, v in stages.items() if k != "train"}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(ValueError, match="stage train reads data/dataset, an output of fetch, which comes after it"):
        check_order(read_stages(tmp_path / "dvc.yaml"), tmp_path / "dvc.yaml")


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    r = subprocess.run([sys.executable, "-m", "flows.train_eval", "--params", str(REPO / "params.yaml"),
                        "--set", "train.lr=-1", "--out", str(tmp_path / "out")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_base_env())
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == ["error: train.lr: input should be greater than 0, got -1"]
    assert r.stdout == "" and not (tmp_path / "out").exists()
    # The same frame in-process, for the other kinds of bad input.
    assert te.main(["--params", str(tmp_path / "nope.yaml")]) == 2
    assert te.main(["--params", str(REPO / "params.yaml"), "--set", "nokey"]) == 2
    assert te.main(["--params", str(REPO / "params.yaml"), "--set", "train.nope=1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == [f"error: {tmp_path / 'nope.yaml'}: params file not found",
                       "error: nokey: an override must look like section.key=value"]
    assert err[2].startswith("error: train.nope: unknown key; known keys of train: steps, ") and len(err) == 3


# -- a real Prefect server on loopback, the deployments served by `python -m flows.serve` ----------------------------
def _base_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", te.FLOW_RUN_ENV):
        env.pop(name, None)
    env.update(extra)
    return env


def _sigint_default() -> None:
    """For a child process: SIGINT at its default action, as in a terminal's job. (A test run started in the
    background by a non-interactive shell inherits SIGINT ignored, and Python keeps an ignored SIGINT: the servers
    would then outlive _stop's SIGINT by its 30 s.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with a temporary PREFECT_HOME (its SQLite database), once per module."""
    home = tmp_path_factory.mktemp("prefect_home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = _base_env(PREFECT_HOME=str(home), PREFECT_API_URL=url, PREFECT_RUNNER_POLL_FREQUENCY="1")
    log = home / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=f, stderr=subprocess.STDOUT, preexec_fn=_sigint_default)
    try:
        deadline = time.monotonic() + 180
        while not flows_serve.api_healthy(url):
            assert proc.poll() is None, f"prefect server exited with {proc.returncode}:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"prefect server not healthy after 180 s:\n{_tail(log)}"
            time.sleep(1.0)
        yield {"url": url, "home": home, "env": env}
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def served(prefect_api, tmp_path_factory):
    """`python -m flows.serve` in a fresh clone of the project: prefect.yaml's deployments, runs executed there."""
    work = clone_project(tmp_path_factory.mktemp("work"))
    log = work / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "flows.serve"], cwd=work, env=prefect_api["env"],
                                stdout=f, stderr=subprocess.STDOUT, preexec_fn=_sigint_default)
    try:
        deadline = time.monotonic() + 180
        while not all(_deployment_exists(prefect_api["url"], n) for n in ("local", "cifar10")):
            assert proc.poll() is None, f"flows.serve exited with {proc.returncode}:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"deployments not registered after 180 s:\n{_tail(log)}"
            time.sleep(1.0)
        yield {**prefect_api, "work": work, "log": log}
    finally:
        _stop(proc)


def _deployment_exists(url: str, name: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/deployments/name/train-eval/{name}", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _deployment_run(api: dict, name: str, **params) -> tuple[subprocess.CompletedProcess, str, float]:
    """`prefect deployment run 'train-eval/<name>' --param k=v … --watch`: the result, flow-run id, seconds."""
    args = [PREFECT, "deployment", "run", f"train-eval/{name}", "--watch", "--watch-timeout", "900"]
    for key, value in params.items():
        args += ["--param", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    t0 = time.monotonic()
    r = subprocess.run(args, cwd=api["work"], env=api["env"], capture_output=True, text=True, timeout=960)
    seconds = time.monotonic() - t0
    found = re.search(r"UUID: ([0-9a-f-]{36})", r.stdout)
    assert found, f"no flow run created:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    print(f"prefect deployment run train-eval/{name} {params}: exit {r.returncode} after {seconds:.1f} s")
    return r, found.group(1), seconds


@contextmanager
def _settings(api: dict):
    """This process talks to the test's server (flows run in-process report there too)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with temporary_settings({PREFECT_API_URL: api["url"], PREFECT_HOME: str(api["home"])}):
        try:
            yield
        finally:  # flush this process's log and event senders while the server still answers
            APILogWorker.drain_all(timeout=10, at_exit=False)
            EventsWorker.drain_all(timeout=10, at_exit=False)


@contextmanager
def _client(api: dict):
    from prefect.client.orchestration import get_client

    with _settings(api), get_client(sync_client=True) as client:
        yield client


def _task_runs(client, flow_run_id: str) -> dict[str, list]:
    """The flow run's task runs by stage, oldest first."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    by_stage: dict[str, list] = {}
    for tr in sorted(runs, key=lambda t: t.expected_start_time or t.created):
        by_stage.setdefault(tr.name.rsplit("-", 1)[0], []).append(tr)
    return by_stage


def _states(client, flow_run_id: str) -> dict[str, str]:
    return {stage: runs[-1].state.name for stage, runs in _task_runs(client, flow_run_id).items()}


def _flow_run_page(api: dict, flow_run_id: str) -> tuple[dict[str, str], set[str]]:
    """The flow run's page in the Prefect UI, in headless chromium: {stage: state} as its Task Runs tab lists them,
    and the artifact keys its Artifacts tab shows."""
    from tools.browser import Browser, BrowserError, chromium_path

    try:
        chromium_path()
    except BrowserError as e:
        pytest.fail(str(e))
    with Browser(1600, 1000) as b:
        b.goto(f"{api['url'].removesuffix('/api')}/runs/flow-run/{flow_run_id}")
        b.wait_for("!!document.querySelector('li.p-tab#task-runs')", 120, "the flow run page's tabs")
        b.click("li.p-tab#task-runs")
        b.wait_for("document.body.innerText.includes('sampler_table-')", 60, "the flow run's task runs")
        listed = re.findall(r"^([\w-]+?)-[0-9a-f]{3}\n(\w+)$", b.evaluate("document.body.innerText"), re.M)
        b.click("li.p-tab#artifacts")
        b.wait_for("document.body.innerText.includes('train-eval-summary')", 60, "the flow run's artifacts")
        artifacts = set(re.findall(r"^(train-eval-[\w-]+)$", b.evaluate("document.body.innerText"), re.M))
    return dict(listed), artifacts


def _output(r: subprocess.CompletedProcess) -> str:
    return f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"


def _stage_statuses(stdout: str) -> dict[str, str]:
    """``{stage: "ran" | "cached"}`` from the command line's ``stages:`` line."""
    line = next(l for l in stdout.splitlines() if l.startswith("stages:"))
    return dict(re.findall(r"(\w+) (ran|cached) \(", line))


def _flow_cli(work: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "flows.train_eval", *args], cwd=work, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, _output(r)
    return r


def _exp_rows(work: Path, env: dict) -> dict[str, dict[str, str]]:
    """``dvc exp show`` in the project: {experiment name: its row}, rows as DVC's CSV writes them."""
    import csv
    import io

    r = subprocess.run([str(Path(sys.executable).parent / "dvc"), "exp", "show", "--csv"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, _output(r)
    return {row["Experiment"]: row for row in csv.DictReader(io.StringIO(r.stdout)) if row["Experiment"]}


@pytest.mark.slow
def test_a_flow_run_leaves_dvc_as_dvc_repro_would(prefect_api, tmp_path, tiny_params):
    """`python -m flows.train_eval` (what `make demo` runs) in a fresh clone runs every stage through DVC: afterwards
    DVC knows every output (`dvc status` clean, `dvc repro` runs nothing), a second flow run computes nothing, and
    DVC carries on from the flow's state as from its own: an edit of the library or of a param makes stale exactly
    the stages that read it, `dvc repro` reruns those in order, and `dvc push` / `dvc pull` version the outputs."""
    from dvcproject import dvc, ran

    tiny = tiny_params
    work = clone_project(tmp_path / "proj", params=tiny)
    env = {**prefect_api["env"], **GIT_ENV}
    first = _flow_cli(work, env)
    assert _stage_statuses(first.stdout) == {name: "ran" for name in STAGE_NAMES}, first.stdout
    record = json.loads((work / "metrics" / "run.json").read_text())
    assert f"Prefect flow run: {record['prefect_flow_run_id']}" in first.stdout
    # Independent stages ran at the same time: train_classifier beside train, as Prefect recorded them.
    with _client(prefect_api) as c:
        runs = {stage: trs[-1] for stage, trs in _task_runs(c, record["prefect_flow_run_id"]).items()}
    clf, train = runs["train_classifier"], runs["train"]
    assert clf.start_time < train.end_time and train.start_time < clf.end_time, (clf, train)
    assert runs["sample"].start_time >= train.end_time  # ... and a stage only after what it reads
    assert record["dvc_experiment"] is None and record["workspace"] == str(work)  # the project: `dvc repro`'s state

    # What the stages wrote (figures and sampler_table are off in the tiny params: they ran and recorded only that).
    ev = json.loads((work / "metrics/eval.json").read_text())
    assert ev["num_generated"] == tiny["sample"]["num_samples"]
    assert ev["fid"] > 0 and np.isfinite(ev["fid"]) and ev["floor"]["fid"] >= 0
    assert ev["fid"] > ev["floor"]["fid"]  # a 6-step model is worse than real data
    assert json.loads((work / "metrics/classifier.json").read_text())["accuracy"] > 0.5
    assert (work / "samples/grid.png").stat().st_size > 0
    assert (work / "checkpoints/ckpt_00000006.pt").is_file() and (work / "dvc.lock").is_file()
    for resolved in ("data/dataset/config.json", "models/classifier.config.json", "checkpoints/config.json",
                     "samples/config.json", "metrics/eval.config.json"):  # each stage's resolved config beside it
        assert json.loads((work / resolved).read_text())["train"]["steps"] == tiny["train"]["steps"], resolved
    loss_rows = (work / "metrics/train_loss.tsv").read_text().splitlines()
    assert loss_rows[0].split("\t")[:2] == ["step", "loss"] and len(loss_rows) == 1 + tiny["train"]["steps"]

    assert "Data and pipelines are up to date." in dvc(work, "status").stdout
    assert ran(dvc(work, "repro").stdout) == []
    # A second flow run reads the same project state: nothing to do, every stage cached.
    second = _flow_cli(work, env)
    assert _stage_statuses(second.stdout) == {name: "cached" for name in STAGE_NAMES}, second.stdout

    # Each library file in turn: editing it makes stale exactly the stages whose deps cover it, which include every
    # stage whose code imports it (tests/test_stage_deps.py), and nothing else.
    from test_stage_deps import code_closure, covered

    stages = yaml.safe_load((work / "dvc.yaml").read_text())["stages"]
    from dvc.repo import Repo  # `dvc status` in this process: one DVC start-up, not one per file

    with Repo(str(work)) as repo:
        for f in sorted((work / "ddpm").glob("*.py")):
            rel, original = f"ddpm/{f.name}", f.read_bytes()
            f.write_bytes(original + b"\n# an edit\n")
            try:
                stale = {k.rpartition(":")[2] for k in repo.status()}
            finally:
                f.write_bytes(original)
            assert stale == {n for n, st in stages.items() if covered(rel, st["deps"])}, rel
            assert {n for n in stages if rel in code_closure(n)} <= stale, rel
    assert json.loads(dvc(work, "status", "--json").stdout) == {}

    # Editing the library (a comment in ddpm/diffusion.py, where p_sample and ddim_step live) makes every stage that
    # runs the model stale; `dvc repro` reruns them in order: train finds its checkpoint complete and keeps it, the
    # samples are drawn again (their key covers the sampling code) and so everything after them reruns.
    shard = (work / "samples" / "shard_00000.npz").read_bytes()
    with open(work / "ddpm" / "diffusion.py", "a") as f:
        f.write("\n# an edit\n")
    status = json.loads(dvc(work, "status", "--json").stdout)
    assert {k.rpartition(":")[2] for k in status} == {"train", "sample", "figures", "sampler_table"}, status
    edited = ran(dvc(work, "repro").stdout)
    assert edited[:3] == ["train", "sample", "evaluate"], edited
    assert sorted(edited[3:]) == ["figures", "sampler_table"], edited
    assert (work / "samples" / "shard_00000.npz").read_bytes() != shard  # drawn again under the new code's key
    assert (work / "checkpoints/ckpt_00000006.pt").is_file()

    # A changed param makes stale the stage that reads it, and no other: what reads its outputs follows when they
    # change (as the repro above showed for the samples).
    changed = json.loads(json.dumps(tiny))
    changed["train"]["lr"] = 5e-4
    (work / "params.yaml").write_text(yaml.safe_dump(changed))
    assert {k.rpartition(":")[2] for k in json.loads(dvc(work, "status", "--json").stdout)} == {"train"}

    # Outputs are versioned: push to the default local remote, drop the cache and workspace copy, pull back.
    dvc(work, "push")
    assert len([p for p in (work / ".dvc-remote").rglob("*") if p.is_file()]) >= 10
    grid = (work / "samples/grid.png").read_bytes()
    shutil.rmtree(work / "samples")
    shutil.rmtree(work / ".dvc" / "cache")
    dvc(work, "pull")
    assert (work / "samples/grid.png").read_bytes() == grid


@pytest.mark.slow
def test_deployment_run_fails_at_a_stage_then_rerun_skips_what_completed(served, tiny_params):
    work = served["work"]
    params = work / "params.yaml"
    tiny_params["tracking"] = {"enabled": True}  # the MLflow run must carry the flow-run id (part 3)
    params.write_text(yaml.safe_dump(tiny_params))
    out = work / "run"
    missing, wrong = work / "no-such-weights.pth", work / "wrong-weights.pth"
    wrong.write_bytes(b"not torch-fidelity's Inception weights")

    # 0. A missing input of a later stage (Inception weights): Failed before any stage ran, nothing written.
    r0, run0, _ = _deployment_run(served, "local", params=str(params), out=str(out), overrides={
        "evaluate.feature_extractor": "inception-v3-compat", "evaluate.inception_weights": str(missing)})
    assert r0.returncode == 1, _output(r0) + _tail(served["log"])
    with _client(served) as c:
        state = c.read_flow_run(run0).state
        assert state.type.value == "FAILED"
        assert state.message.startswith(f"evaluate.inception_weights: {missing} not found"), state.message
        assert state.message.endswith("(read by evaluate); this run stopped before any stage ran"), state.message
        assert _states(c, run0) == {}
    assert not out.exists()

    # 1. The weights file exists but is not the pinned one: only evaluate can tell (its SHA-256), so the stages
    # before it run and evaluate fails with its one-line message. figures, which reads none of evaluate's inputs,
    # ran beside sample and evaluate; sampler_table, which reads evaluate's reference statistics, never started
    # (Prefect's NotReady: it waits for evaluate).
    r1, run1, _ = _deployment_run(served, "local", params=str(params), out=str(out), overrides={
        "evaluate.feature_extractor": "inception-v3-compat", "evaluate.inception_weights": str(wrong)})
    assert r1.returncode == 1, _output(r1) + _tail(served["log"])
    with _client(served) as c:
        state = c.read_flow_run(run1).state
        assert state.type.value == "FAILED"
        assert state.message.startswith(f"evaluate: evaluate.inception_weights: {wrong} has SHA-256 "), state.message
        # With Inception features nothing reads a classifier: its stage runs but trains nothing.
        assert _states(c, run1) == {"fetch": "Completed", "train_classifier": "Completed", "train": "Completed",
                                    "sample": "Completed", "evaluate": "Failed", "figures": "Completed",
                                    "sampler_table": "NotReady"}
    assert json.loads((out / "metrics" / "classifier.json").read_text())["skipped"] is True
    ckpts = sorted((out / "checkpoints").glob("ckpt_*.pt"))
    assert [p.name for p in ckpts][-1] == f"ckpt_{tiny_params['train']['steps']:08d}.pt"
    stamps = {p: p.stat().st_mtime_ns for p in [*ckpts, out / "samples" / "grid.png"]}

    # 2. Cause fixed (the default, classifier features): the classifier is needed now and trains (its params
    # changed: evaluate.feature_extractor), evaluate runs, the rest comes from the cache.
    r2, run2, seconds = _deployment_run(served, "local", params=str(params), out=str(out))
    assert r2.returncode == 0, _output(r2) + _tail(served["log"])
    assert "Flow run finished successfully in 'Completed'" in r2.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing upstream was rewritten
    metrics = json.loads((out / "metrics" / "eval.json").read_text())
    assert metrics["feature_extractor"] == "ddpm-classifier" and metrics["num_generated"] == 24
    with _client(served) as c:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        assert c.read_flow_run(run2).state.name == "Completed"
        # sampler_table comes after the stage that failed: it runs for the first time; figures ran in run 1.
        assert _states(c, run2) == {"fetch": "Cached", "train_classifier": "Completed", "train": "Cached",
                                    "sample": "Cached", "evaluate": "Completed", "figures": "Cached",
                                    "sampler_table": "Completed", "dvc-exp-save": "Completed"}
        artifacts = {a.key: a for a in c.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run2])))}
    assert {"train-eval-summary", "train-eval-metrics", "train-eval-mlflow"} <= set(artifacts)
    # what the Prefect UI shows of it: one task run per stage with its state, and the artifacts
    shown_states, shown_artifacts = _flow_run_page(served, run2)
    with _client(served) as c:
        assert shown_states == _states(c, run2)
    assert shown_artifacts == set(artifacts), (shown_artifacts, sorted(artifacts))
    summary = artifacts["train-eval-summary"]
    assert summary.type == "markdown"
    assert "| evaluate | ran |" in summary.data and "| train | cached |" in summary.data
    assert f"| FID | {metrics['fid']:.4g} | {metrics['floor']['fid']:.4g} |" in summary.data
    assert str(out / "samples" / "grid.png") in summary.data and run2 in summary.data
    table = artifacts["train-eval-metrics"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    fid = next(row for row in rows if row["metric"] == "FID")
    assert fid["samples"] == pytest.approx(metrics["fid"]) and fid["real-vs-real floor"] == pytest.approx(
        metrics["floor"]["fid"])
    print(f"rerun after the fix: `prefect deployment run` to Completed in {seconds:.1f} s")

    # 3. The MLflow run the evaluate stage logged into carries this flow run's id.
    from mlflow import MlflowClient

    ml = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = ml.get_experiment_by_name("digits")
    tagged = ml.search_runs([exp.experiment_id], filter_string=f"tags.prefect_flow_run_id = '{run2}'")
    assert tagged and tagged[0].data.metrics["trained/fid"] == pytest.approx(metrics["fid"])
    # the flow run's link artifact opens that run's page in `make mlflow-ui` (a local store)
    link = f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{tagged[0].info.run_id}"
    assert link in artifacts["train-eval-mlflow"].data and "make mlflow-ui" in artifacts["train-eval-mlflow"].description

    # 4. The run is a DVC experiment of the project, carrying both ids; its MLflow run names it.
    rows = [row for row in _exp_rows(work, served["env"]).values() if row.get("prefect_flow_run_id") == run2]
    assert len(rows) == 1 and rows[0]["mlflow_run_id"] == tagged[0].info.run_id, rows
    assert rows[0]["Experiment"].startswith("run-") and rows[0]["evaluate.feature_extractor"] == "auto"
    assert tagged[0].data.tags["dvc_exp_name"] == rows[0]["Experiment"]
    assert f"**DVC experiment**: {rows[0]['Experiment']} (" in summary.data


@pytest.mark.slow
def test_experiments_rerun_only_what_their_params_change(served, tiny_params):
    """`prefect deployment run 'train-eval/local'` as after `make demo`: first in the project itself, then with
    overrides, each a DVC experiment in its own workspace under runs/ that starts from the project's DVC state (its
    dvc.lock, its outputs linked from the cache): `figures.frames` reruns figures alone, `train.lr` train and what
    reads its outputs. `dvc exp show` in the project lists both, with their params, metrics and MLflow run; the
    project's own state is left as it was."""
    work = served["work"]
    tiny_params["tracking"] = {"enabled": True}
    tiny_params["figures"] = {"enabled": True, "seeds": 2, "frames": 4, "recon_images": 2, "recon_seeds": 1,
                              "recon_fractions": [1.0, 0.5], "gif_samples": 4, "gif_frames": 3}
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    r, first, _ = _deployment_run(served, "local")
    assert r.returncode == 0, _output(r) + _tail(served["log"])
    with _client(served) as c:  # (fetch and train_classifier may come from the run-cache: an earlier test ran them)
        assert _states(c, first)["train"] == "Completed" and len(_states(c, first)) == len(STAGE_NAMES) + 1
    lock = (work / "dvc.lock").read_bytes()  # the project's own state: `dvc repro`'s (a params edit: saved too)

    flow_runs = {}
    for overrides, ran in (({"figures.frames": 5}, {"figures"}),
                           ({"train.lr": 5e-4}, {"train", "sample", "evaluate", "figures", "sampler_table"})):
        r, run_id, seconds = _deployment_run(served, "local", overrides=overrides)
        assert r.returncode == 0, _output(r) + _tail(served["log"])
        with _client(served) as c:
            states = _states(c, run_id)
        assert states == {**{n: "Completed" if n in ran else "Cached" for n in STAGE_NAMES},
                          "dvc-exp-save": "Completed"}, (overrides, states)
        print(f"{overrides}: reran {sorted(ran)} in {seconds:.1f} s")
        flow_runs[next(iter(overrides))] = run_id
    assert (work / "dvc.lock").read_bytes() == lock  # the experiments did not touch the project's own state

    rows = _exp_rows(work, served["env"])
    by_run = {row["prefect_flow_run_id"]: (name, row) for name, row in rows.items()
              if row.get("prefect_flow_run_id") in flow_runs.values()}
    assert len(by_run) == 2, rows
    from mlflow import MlflowClient

    ml = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    frames_name, frames = by_run[flow_runs["figures.frames"]]
    lr_name, lr = by_run[flow_runs["train.lr"]]
    assert frames_name.startswith("exp-") and lr_name.startswith("exp-") and frames_name != lr_name
    assert int(frames["figures.frames"]) == 5 and float(frames["train.lr"]) == tiny_params["train"]["lr"]
    assert float(lr["train.lr"]) == 5e-4 and float(lr["fid"]) > 0
    assert float(frames["fid"]) == float(json.loads((work / "metrics" / "eval.json").read_text())["fid"])  # reused
    for name, row in ((frames_name, frames), (lr_name, lr)):
        run = ml.get_run(row["mlflow_run_id"])
        assert run.data.tags["prefect_flow_run_id"] == row["prefect_flow_run_id"]
        assert run.data.tags["dvc_exp_name"] == name
    assert ml.get_run(lr["mlflow_run_id"]).data.metrics["trained/fid"] == pytest.approx(float(lr["fid"]))


@pytest.mark.slow
def test_invalid_override_fails_the_flow_before_any_stage(served, tiny_params, tmp_path, monkeypatch):
    monkeypatch.delenv(te.FLOW_RUN_ENV, raising=False)  # the flow sets it in this process; restored after
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params))
    with _client(served) as c:
        state = te.train_eval(params=str(params), overrides={"train.lr": -1}, out=str(tmp_path / "out"),
                              return_state=True)
        assert state.is_failed() and state.message == "train.lr: input should be greater than 0, got -1"
        assert _task_runs(c, state.state_details.flow_run_id) == {}
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_stage_failure_is_one_line_after_fetch_retries(served, tiny_params, tmp_path, capfd, monkeypatch):
    """`python -m flows.train_eval` (here its main, in this process) with an image folder that does not exist (caught
    before Prefect starts), then with one that holds no image (only fetch can tell: retried, then one line)."""
    monkeypatch.delenv(te.FLOW_RUN_ENV, raising=False)
    monkeypatch.chdir(served["work"])  # a run needs a project to run in; the workspace at `out` is a worktree of it
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params))
    missing, empty, out = tmp_path / "no-such-images", tmp_path / "no-images", tmp_path / "out"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    folder = ["--set", "data.dataset=image-folder", "--set", "data.image_size=8", "--set", "data.channels=1"]
    code = te.main(["--params", str(params), "--out", str(out), *folder, "--set", f"data.root={missing}"])
    stdout, stderr = capfd.readouterr()
    assert code == 2, stderr[-3000:]
    assert stderr.splitlines() == [f"error: data.root: image-folder: {missing} is not a folder (set data.root to "
                                   "the folder of PNG/JPEG images) (read by fetch); this run stopped before any "
                                   "stage ran"]
    assert not out.exists()
    with _settings(served):
        code = te.main(["--params", str(params), "--out", str(out), *folder, "--set", f"data.root={empty}"])
    stdout, stderr = capfd.readouterr()
    assert code == 2, stderr[-3000:]
    assert stderr.splitlines()[-1] == (f"error: fetch: image-folder: no PNG or JPEG images under {empty} "
                                       "(searched recursively)")
    assert "Traceback" not in stdout + stderr
    with _client(served) as c:
        from prefect.client.schemas.sorting import FlowRunSort

        run = next(fr for fr in c.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=20)
                   if fr.parameters.get("out") == str(out))
        assert run.state.type.value == "FAILED" and run.state.message.startswith("fetch: image-folder:")
        task_runs = _task_runs(c, str(run.id))
    assert task_runs["fetch"][-1].run_count == 3 and task_runs["fetch"][-1].state.name == "Failed"  # 2 retries
    # every other stage reads fetch's output, directly or not: none started (Prefect's NotReady)
    assert {s: r[-1].state.name for s, r in task_runs.items() if s != "fetch"} == {
        s: "NotReady" for s in STAGE_NAMES if s != "fetch"}


@pytest.mark.slow
def test_ctrl_c_stops_make_serve_and_the_server_it_started(tmp_path):
    """A terminal's Ctrl-C sends SIGINT to the foreground process group: here, `make serve`'s
    `python -m flows.serve --start-server` (its own group, as a shell job). The serving process and the Prefect server
    it started are both gone within 15 s, and neither prints a traceback."""
    import psutil

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "serve.log"
    env = _base_env(PREFECT_HOME=str(tmp_path / "home"))
    with open(log, "w") as f:
        # A terminal's job: its own process group, SIGINT at its default action.
        proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "--start-server", "--port", str(port)],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_sigint_default)
    family: list[int] = []
    try:
        deadline = time.monotonic() + 240
        # serving: the deployments are registered and the runner has started (it says so once it polls)
        while not (_deployment_exists(url, "local") and "being served" in log.read_text(errors="replace")):
            assert proc.poll() is None, f"flows.serve exited with {proc.returncode}:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"not serving after 240 s:\n{_tail(log)}"
            time.sleep(1.0)
        time.sleep(2.0)  # past the runner's start-up: a SIGINT before its handlers exist can be lost (see flows/serve.py)
        family = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert family, "the Prefect server should be a child of flows.serve"
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
        t0 = time.monotonic()
        proc.wait(timeout=15)

        def alive(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        while any(alive(p) for p in family) and time.monotonic() - t0 < 15:
            time.sleep(0.2)
        left = [p for p in family if alive(p)]
        assert not left, f"still running {time.monotonic() - t0:.0f} s after Ctrl-C: {left}\n{_tail(log)}"
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]
        assert "serving stopped; stopping the Prefect server" in text and proc.returncode == 0, text[-3000:]
    finally:
        for pid in [proc.pid, *family]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
