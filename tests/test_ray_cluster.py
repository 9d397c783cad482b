"""The train and sample command lines against an existing Ray cluster, joined through ``RAY_ADDRESS``.

The test starts a one-node cluster the way a user does (``ray start --head``), with its own temp dir, ports and
auth token, runs ``python -m tasks.fetch``, ``tasks.train`` and ``tasks.sample`` with ``RAY_ADDRESS`` set, and
then asks the cluster's GCS which drivers and actors it ran: the stage processes (by PID) must be among its jobs,
and Ray Train's workers and the sample stage's actors must belong to those jobs. A stage that started a local
Ray of its own would leave no trace there, and the test would fail.

The cluster is stopped by SIGTERM to its ``ray start --block`` process, which stops exactly the processes it
started; ``ray stop`` cannot be used here: it stops every Ray on the machine, other users' included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.lib.common import load_samples

pytestmark = pytest.mark.slow

HEAD_START_TIMEOUT_S = 150  # `ray start` on this busy 2-core machine: 10-30 s
STAGE_TIMEOUT_S = 300
STOP_TIMEOUT_S = 60

# Reads the cluster's job and actor tables straight from its GCS, as JSON on stdout. Ray's public state API
# (`ray list jobs`) goes through the dashboard, which this cluster does not start; the GCS client is Ray's own
# (ray is pinned to 2.60.0). Run in a subprocess: this pytest process may hold Ray state of other tests.
GCS_TABLES = r"""
import asyncio, json, sys
from ray._raylet import GcsClient

client = GcsClient(address=sys.argv[1])
jobs = [{"job_id": j.job_id.hex(), "driver_pid": j.driver_pid, "entrypoint": j.entrypoint, "is_dead": j.is_dead}
        for j in client.get_all_job_info(timeout=30).values()]

async def actors():
    return await client.async_get_all_actor_info(timeout=30)

acts = [{"class_name": a.class_name, "job_id": a.job_id.hex()} for a in asyncio.run(actors()).values()]
print(json.dumps({"jobs": jobs, "actors": acts}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the ``ray start --block`` process (it stops its GCS, raylet and workers), then make sure that
    nothing started under this cluster's temp dir is left."""
    import psutil

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own process group (start_new_session)
            proc.wait(timeout=STOP_TIMEOUT_S)
    leftovers = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
                leftovers.append(p)
                p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=STOP_TIMEOUT_S)


class RayHead:
    """A 2-CPU Ray head on this machine (``ray start --head --block``), token-authenticated with a token of its
    own; ``env`` is what a stage process needs to join it (``RAY_ADDRESS`` and the token)."""

    START_ATTEMPTS = 2

    def __init__(self, folder: Path):
        self.folder, self.attempt, self.temp_dir = folder, 0, None
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.base_env.update({
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # no drain wait when the head is stopped
            "PYTHONUNBUFFERED": "1",
        })
        self._start()

    @property
    def env(self) -> dict:
        return {**self.base_env, "RAY_ADDRESS": self.address}

    def _start(self) -> None:
        self.attempt += 1
        # Unix sockets live under the temp dir and must stay below ~107 characters: tmp_path is too deep for that.
        self.temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        # Every port the node opens is chosen here, so that two such clusters (or a local Ray) never clash.
        ports = {opt: str(_free_port()) for opt in ("--node-manager-port", "--object-manager-port",
                                                    "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                                    "--runtime-env-agent-port", "--metrics-export-port")}
        self.log = self.folder / f"ray-head-{self.attempt}.log"
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
               "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2", "--num-gpus", "0",
               "--include-dashboard", "false", "--temp-dir", self.temp_dir,
               "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats",
               *[x for kv in ports.items() for x in kv]]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.base_env,
                                         start_new_session=True)

    def wait_ready(self) -> None:
        """Wait until ``ray start`` says the node is up. Ray 2.60 gives its raylet a fixed 30 s to register with
        the GCS (ray/_private/node.py), which a busy 2-core machine can miss: then one more, fresh start."""
        while True:
            deadline = time.monotonic() + HEAD_START_TIMEOUT_S
            while "block forever" not in self.log.read_text(errors="replace"):
                if self.proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"ray start not up within {HEAD_START_TIMEOUT_S} s:\n"
                                f"{self.log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.5)
            else:
                return
            tail = self.log.read_text(errors="replace")[-3000:]
            self.stop()
            if self.attempt >= self.START_ATTEMPTS:
                pytest.fail(f"ray start exited with {self.proc.returncode} ({self.attempt} attempts):\n{tail}")
            print(f"ray start attempt {self.attempt} exited with {self.proc.returncode}; starting again")
            self._start()

    def stop(self) -> None:
        _stop_head(self.proc, self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_head(tmp_path):
    """A starting :class:`RayHead` (call ``wait_ready()`` before joining it), stopped at the end of the test."""
    head = RayHead(tmp_path)
    try:
        yield head
    finally:
        head.stop()


class Stage:
    """``python -m tasks.<name> …`` in a subprocess, started at once; the test knows its PID (the cluster records
    it) and collects it with ``result()``."""

    def __init__(self, name: str, args: list[str], env: dict, cwd: Path):
        self.name, self.t0 = name, time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", f"tasks.{name}", *args], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.proc.pid

    def result(self) -> subprocess.CompletedProcess:
        try:
            out, err = self.proc.communicate(timeout=STAGE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"tasks.{self.name} did not finish within {STAGE_TIMEOUT_S} s:\n{err[-3000:]}")
        print(f"tasks.{self.name}: exit {self.proc.returncode} after {time.monotonic() - self.t0:.1f} s")
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


def _gcs_tables(address: str, env: dict, cwd: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", GCS_TABLES, address], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_train_and_sample_run_on_an_existing_cluster(ray_head, tmp_path, tiny_params, repo_root):
    params = tmp_path / "params.yaml"
    tiny_params["ray"]["storage"] = str(tmp_path / "ray_results")  # one node: its disk is the shared storage
    tiny_params["train"]["steps"] = 4
    params.write_text(yaml.safe_dump(tiny_params))
    data, ckpts, samples = tmp_path / "data", tmp_path / "ckpt", tmp_path / "samples"
    p = ["--params", str(params)]

    # fetch needs no Ray: it runs while the head starts, and without RAY_ADDRESS.
    fetch = Stage("fetch", [*p, "--out", str(data)], ray_head.base_env, repo_root)
    r = fetch.result()
    assert r.returncode == 0, r.stderr[-3000:]
    ray_head.wait_ready()
    address, env = ray_head.address, ray_head.env

    # Without the cluster's token (RAY_AUTH_MODE unset: Ray sends none to an explicit address) joining is refused:
    # one line saying what to export, exit code 2, no traceback. It runs beside the real training.
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    denied = Stage("train", [*p, "--data", str(data), "--checkpoints", str(tmp_path / "ckpt_denied"),
                             "--log", str(tmp_path / "loss_denied.tsv"), "--metrics", str(tmp_path / "denied.json")],
                   no_token, repo_root)
    train = Stage("train", [*p, "--data", str(data), "--checkpoints", str(ckpts), "--log", str(tmp_path / "loss.tsv"),
                            "--metrics", str(tmp_path / "train.json")], env, repo_root)
    r = train.result()
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "train.json").read_text())
    assert summary["steps"] == 4 and summary["num_workers"] == 1
    assert summary["ray"] == f"joined Ray cluster at {address}"
    assert (ckpts / "ckpt_00000004.pt").is_file()
    r = denied.result()
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: RAY_ADDRESS {address}: ") and "RAY_AUTH_MODE=token" in last, last
    assert not (tmp_path / "denied.json").exists()

    sample = Stage("sample", [*p, "--checkpoints", str(ckpts), "--out", str(samples)], env, repo_root)
    r = sample.result()
    assert r.returncode == 0, r.stderr[-3000:]
    images, seeds = load_samples(samples)
    assert images.shape == (24, 1, 8, 8) and images.dtype == np.uint8
    assert seeds.tolist() == list(range(24))

    # The cluster ran both stages: each stage process is one of its drivers, finished by now, and the work ran
    # in actors of that driver's job (Ray Train's worker, the sample stage's ShardSampler). The refused process
    # never became a driver.
    tables = _gcs_tables(address, env, repo_root)
    jobs = {j["driver_pid"]: j for j in tables["jobs"]}
    assert train.pid in jobs and sample.pid in jobs, (train.pid, sample.pid, tables["jobs"])
    assert denied.pid not in jobs
    train_job, sample_job = jobs[train.pid], jobs[sample.pid]
    assert "tasks.train" in train_job["entrypoint"] and "tasks.sample" in sample_job["entrypoint"]
    assert train_job["is_dead"] and sample_job["is_dead"]
    classes_of = lambda job: {a["class_name"] for a in tables["actors"] if a["job_id"] == job["job_id"]}  # noqa: E731
    assert "ShardSampler" in classes_of(sample_job), tables["actors"]
    assert any("TrainWorker" in c for c in classes_of(train_job)), tables["actors"]
