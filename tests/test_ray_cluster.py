"""The train and sample command lines against an existing Ray cluster, joined through ``RAY_ADDRESS``.

The test starts a one-node cluster the way a user does (``ray start --head``), with its own temp dir, ports and
auth token, runs ``python -m tasks.fetch``, ``tasks.train`` and ``tasks.sample`` with ``RAY_ADDRESS`` set, and
then asks the cluster's GCS which drivers and actors it ran: the stage processes (by PID) must be among its jobs,
and Ray Train's workers and the sample stage's actors must belong to those jobs. A stage that started a local
Ray of its own would leave no trace there, and the test would fail.

A second test builds a two-node cluster on this machine (a head and a node joined with ``ray start --address``,
1 CPU each) and checks, in the GCS's actor table, that the train stage's two Ray Train workers ran one per node.

The cluster is stopped by SIGTERM to its ``ray start --block`` process, which stops exactly the processes it
started; ``ray stop`` cannot be used here: it stops every Ray on the machine, other users' included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.lib.samples import load_samples
from conftest import free_port

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

acts = [{"class_name": a.class_name, "job_id": a.job_id.hex(), "state": a.state, "pid": a.pid,
         "node_id": a.node_id.hex(), "address_node_id": a.address.node_id.hex()}
        for a in asyncio.run(actors()).values()]
nodes = [{"node_id": n.node_id.hex(), "alive": n.state == 0, "is_head": n.is_head_node, "temp_dir": n.temp_dir,
          "cpus": n.resources_total.get("CPU", 0)}
         for n in client.get_all_node_info(timeout=30).values()]
print(json.dumps({"jobs": jobs, "actors": acts, "nodes": nodes}))
"""

# Waits until the cluster's GCS lists argv[2] alive nodes, then prints its node table as JSON (exit 1 on timeout).
WAIT_NODES = r"""
import json, sys, time
from ray._raylet import GcsClient

client, want, deadline = GcsClient(address=sys.argv[1]), int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while True:
    nodes = [{"node_id": n.node_id.hex(), "alive": n.state == 0, "is_head": n.is_head_node, "temp_dir": n.temp_dir,
              "cpus": n.resources_total.get("CPU", 0)}
             for n in client.get_all_node_info(timeout=30).values()]
    if sum(n["alive"] for n in nodes) >= want or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps(nodes))
sys.exit(0 if sum(n["alive"] for n in nodes) >= want else 1)
"""


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
    """A Ray head on this machine (``ray start --head --block``, 2 CPUs unless told), token-authenticated with a
    token of its own; ``env`` is what a stage process needs to join it (``RAY_ADDRESS`` and the token).
    ``worker_ports`` (first, last): the range its worker processes listen on (default: Ray's 10002-19999)."""

    START_ATTEMPTS = 2
    KIND = "head"

    def __init__(self, folder: Path, num_cpus: int = 2, worker_ports: tuple[int, int] | None = None):
        self.folder, self.attempt, self.temp_dir = folder, 0, None
        self.num_cpus, self.worker_ports = num_cpus, worker_ports
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

    def _role_args(self) -> list[str]:
        """What makes it a head: its GCS port (``self.address``) and no dashboard."""
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        return ["--head", "--port", str(port), "--include-dashboard", "false"]

    def _start(self) -> None:
        self.attempt += 1
        # Unix sockets live under the temp dir and must stay below ~107 characters: tmp_path is too deep for that.
        self.temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
        # Every port the node opens is chosen here, so that two such clusters (or a local Ray) never clash.
        ports = {opt: str(free_port()) for opt in ("--node-manager-port", "--object-manager-port",
                                                    "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                                    "--runtime-env-agent-port", "--metrics-export-port")}
        if self.worker_ports:
            ports.update({"--min-worker-port": str(self.worker_ports[0]),
                          "--max-worker-port": str(self.worker_ports[1])})
        self.log = self.folder / f"ray-{self.KIND}-{self.attempt}.log"
        cmd = [str(Path(sys.executable).with_name("ray")), "start", *self._role_args(), "--block",
               "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.num_cpus), "--num-gpus", "0",
               "--temp-dir", self.temp_dir,
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


class RayWorkerNode(RayHead):
    """A second node of ``head``'s cluster on this machine (``ray start --address=<head> --block``): its own temp
    dir (Ray 2.60 takes one per node), ports and worker-port range, the head's token."""

    KIND = "worker"

    def __init__(self, head: RayHead, folder: Path, num_cpus: int = 1, worker_ports: tuple[int, int] | None = None):
        self.head = head
        super().__init__(folder, num_cpus, worker_ports)

    def _start(self) -> None:
        self.base_env = self.head.base_env  # the head's token: the node joins with it
        super()._start()

    def _role_args(self) -> list[str]:
        self.address = self.head.address
        return ["--address", self.head.address]


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


def _wait_nodes(address: str, count: int, env: dict, cwd: Path) -> list[dict]:
    """The GCS node table once it lists ``count`` alive nodes (fails the test after ``HEAD_START_TIMEOUT_S``)."""
    r = subprocess.run([sys.executable, "-c", WAIT_NODES, address, str(count), str(HEAD_START_TIMEOUT_S)], cwd=cwd,
                       env=env, capture_output=True, text=True, timeout=HEAD_START_TIMEOUT_S + 60)
    assert r.returncode == 0, f"not {count} alive nodes: {r.stdout[-3000:]}{r.stderr[-3000:]}"
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


def test_train_spreads_its_workers_over_two_nodes(tmp_path, tiny_params, repo_root):
    """Two nodes of one cluster on this machine, 1 CPU each: the train stage joins through RAY_ADDRESS, and its two
    Ray Train workers (1 CPU each) run one per node, each reading its part of the epoch from the same shards."""
    steps = 6
    params = tmp_path / "params.yaml"
    tiny_params["ray"]["storage"] = str(tmp_path / "ray_results")  # both nodes are on this machine: its disk is shared
    params.write_text(yaml.safe_dump(tiny_params))
    data, ckpts, metrics = tmp_path / "data", tmp_path / "ckpt", tmp_path / "train.json"
    p = ["--params", str(params)]

    # Disjoint worker-port ranges: each raylet hands its workers ports from its own pool, and two raylets of this
    # machine with Ray's default range (10002-19999) could hand out the same port at the same time.
    head = RayHead(tmp_path, num_cpus=1, worker_ports=(10002, 14999))
    node = None
    try:
        fetch = Stage("fetch", [*p, "--out", str(data)], head.base_env, repo_root)  # no Ray: while the head starts
        r = fetch.result()
        assert r.returncode == 0, r.stderr[-3000:]
        head.wait_ready()
        node = RayWorkerNode(head, tmp_path, num_cpus=1, worker_ports=(15000, 19999))
        node.wait_ready()
        address, env = head.address, head.env
        nodes = [n for n in _wait_nodes(address, 2, env, repo_root) if n["alive"]]
        assert len(nodes) == 2 and sum(n["cpus"] for n in nodes) == 2, nodes
        head_id = next(n["node_id"] for n in nodes if n["is_head"])
        node_id = next(n["node_id"] for n in nodes if n["temp_dir"] == node.temp_dir)
        assert head_id != node_id, nodes

        train = Stage("train", [*p, "--data", str(data), "--checkpoints", str(ckpts),
                                "--log", str(tmp_path / "loss.tsv"), "--metrics", str(metrics),
                                "--set", "train.num_workers=2", "--set", "train.use_gpu=false",
                                "--set", f"train.steps={steps}", "--set", f"train.checkpoint_every={steps}"],
                      env, repo_root)
        r = train.result()
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads(metrics.read_text())
        assert summary["steps"] == steps and summary["num_workers"] == 2 and summary["use_gpu"] is False, summary
        assert summary["ray"] == f"joined Ray cluster at {address}"
        assert isinstance(summary["final_loss"], float) and np.isfinite(summary["final_loss"]), summary
        assert (ckpts / f"ckpt_{steps:08d}.pt").is_file()
        assert summary["checkpoint"] == str(ckpts / f"ckpt_{steps:08d}.pt")

        # The GCS's actor table: the train stage's job ran exactly two Ray Train workers (no restarts), one on each
        # node, in two processes.
        tables = _gcs_tables(address, env, repo_root)
        jobs = {j["driver_pid"]: j for j in tables["jobs"]}
        assert train.pid in jobs, (train.pid, tables["jobs"])
        workers = [a for a in tables["actors"]
                   if a["job_id"] == jobs[train.pid]["job_id"] and "TrainWorker" in a["class_name"]]
        print("train workers (pid, node):", [(a["pid"], a["node_id"][:8]) for a in workers],
              f"head {head_id[:8]}, second node {node_id[:8]}")
        assert len(workers) == 2, tables["actors"]
        assert all(a["node_id"] == a["address_node_id"] for a in workers), workers
        assert sorted(a["node_id"] for a in workers) == sorted([head_id, node_id]), (workers, nodes)
        assert len({a["pid"] for a in workers}) == 2, workers
    finally:
        if node is not None:
            node.stop()
        head.stop()
