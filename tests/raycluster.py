"""Ray clusters on this machine, started the way a user starts them (``ray start``), for the tests.

- :class:`RayHead`: ``ray start --head --block`` with its own temp dir, ports and auth token.
- :class:`RayWorkerNode`: a second node joined with ``ray start --address``. With ``masked`` folders it starts in its
  own mount namespace (``unshare -m --propagation private``) with an empty tmpfs over each of them, so every process
  of that node, Ray's workers included, sees those folders empty while the rest of the machine (the code, the
  virtual environment) stays visible: a node that shares no file system for them with the driver.
- :func:`two_node_cluster`: a head with no CPUs (so every task and Ray Train worker lands on the second node) and
  such a node; the ``isolated_ray_cluster`` fixture of tests/conftest.py wraps it.
- :class:`Stage`: ``python -m tasks.<name>`` in a subprocess; :func:`gcs_tables` / :func:`wait_nodes`: the cluster's
  jobs, actors and nodes straight from its GCS.

A node is stopped by SIGTERM to its ``ray start --block`` process, which stops exactly the processes it started,
then every process whose command line names its temp dir is killed; ``ray stop`` cannot be used here: it stops
every Ray on the machine, other users' included. :meth:`RayHead.stop` fails the test if anything of the node
survives. A namespaced node's tmpfs mounts go with its last process.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pytest

from conftest import free_port

RAY_CLUSTERS = "ray-clusters"  # the xdist group of the tests that start clusters (fixed worker-port ranges)
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


def node_processes(temp_dir: str) -> list:
    """The processes of a node: every process whose command line names its temp dir (Ray's GCS, raylet, workers
    and agents all carry their session folder under it)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _stop_node(proc: subprocess.Popen, temp_dir: str) -> list[int]:
    """SIGTERM the ``ray start --block`` process (it stops its GCS, raylet and workers), SIGKILL its process group
    if it lingers, then kill whatever of this node is left. Returns the PIDs still alive after all that."""
    import psutil

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own process group (start_new_session)
            proc.wait(timeout=STOP_TIMEOUT_S)
    leftovers = node_processes(temp_dir)
    for p in leftovers:
        try:
            p.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(leftovers, timeout=STOP_TIMEOUT_S)
    return [p.pid for p in alive]


class RayHead:
    """A Ray head on this machine (``ray start --head --block``, 2 CPUs unless told; 0 is allowed), token-
    authenticated with a token of its own; ``env`` is what a stage process needs to join it (``RAY_ADDRESS`` and
    the token). ``worker_ports`` (first, last): the range its worker processes listen on (default: Ray's
    10002-19999). ``extra_env``: more variables for the node's processes, Ray's workers included (they inherit the
    raylet's environment), e.g. the object store's endpoint and credentials."""

    START_ATTEMPTS = 3
    KIND = "head"

    def __init__(self, folder: Path, num_cpus: int = 2, worker_ports: tuple[int, int] | None = None,
                 extra_env: Optional[dict] = None):
        self.folder, self.attempt, self.temp_dir = folder, 0, None
        self.num_cpus, self.worker_ports = num_cpus, worker_ports
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.base_env.update({
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # no drain wait when the head is stopped
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
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

    def _launcher(self, cmd: list[str]) -> list[str]:
        """The command that runs ``ray start`` (a subclass may wrap it)."""
        return cmd

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
            self.proc = subprocess.Popen(self._launcher(cmd), stdout=out, stderr=subprocess.STDOUT,
                                         env=self.base_env, start_new_session=True)

    def wait_ready(self) -> None:
        """Wait until ``ray start`` says the node is up. Ray 2.60 gives its raylet a fixed 30 s to register with
        the GCS (ray/_private/node.py), which a busy 2-core machine can miss: then a fresh start, up to
        START_ATTEMPTS in all."""
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
        """Stop the node and everything it started; fail the test if a process of it survives a SIGKILL."""
        alive = _stop_node(self.proc, self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        assert not alive, f"processes of the Ray {self.KIND} node outlived it: {alive}"


class RayWorkerNode(RayHead):
    """A second node of ``head``'s cluster on this machine (``ray start --address=<head> --block``): its own temp
    dir (Ray 2.60 takes one per node), ports and worker-port range, the head's token.

    ``masked``: folders this node must not see. The node then starts inside its own mount namespace
    (``unshare -m --propagation private``, root only) where an empty tmpfs is mounted over each folder before
    ``ray start`` runs, so that every process of the node, Ray's workers included, sees them empty, and what they
    write there stays in the namespace (gone when the node stops). Everything else (the code, the virtual
    environment, /tmp) is the machine's. The folders are created if missing (a mount point must exist)."""

    KIND = "worker"
    TMPFS_SIZE = "256m"  # per masked folder; what a node writes there lives in its memory

    def __init__(self, head: RayHead, folder: Path, num_cpus: int = 1, worker_ports: tuple[int, int] | None = None,
                 masked: Sequence[Path] = (), extra_env: Optional[dict] = None):
        self.head, self.masked, self.extra_env = head, [Path(m).resolve() for m in masked], extra_env or {}
        for m in self.masked:
            m.mkdir(parents=True, exist_ok=True)
        super().__init__(folder, num_cpus, worker_ports, extra_env)

    def _start(self) -> None:
        self.base_env = {**self.head.base_env, **self.extra_env}  # the head's token: the node joins with it
        super()._start()

    def _role_args(self) -> list[str]:
        self.address = self.head.address
        return ["--address", self.head.address]

    def _launcher(self, cmd: list[str]) -> list[str]:
        if not self.masked:
            return cmd
        # sh mounts, then execs ray start: the Popen's PID stays the `ray start --block` process.
        mounts = "".join(f'mount -t tmpfs -o size={self.TMPFS_SIZE},mode=0755 ddpm-masked "${i + 1}" && '
                         for i in range(len(self.masked)))
        script = f'{mounts}shift {len(self.masked)} && exec "$@"'
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                *[str(m) for m in self.masked], *cmd]


class Stage:
    """``python -m tasks.<name> …`` in a subprocess, started at once; the test knows its PID (the cluster records
    it) and collects it with ``result()``."""

    def __init__(self, name: str, args: list[str], env: dict, cwd: Path):
        self.name, self.t0 = name, time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", f"tasks.{name}", *args], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.proc.pid

    def result(self, timeout: float = None) -> subprocess.CompletedProcess:
        timeout = STAGE_TIMEOUT_S if timeout is None else timeout
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"tasks.{self.name} did not finish within {timeout} s:\n{err[-3000:]}")
        print(f"tasks.{self.name}: exit {self.proc.returncode} after {time.monotonic() - self.t0:.1f} s")
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


def registered_steps(storage: str) -> list[int]:
    """The steps of the checkpoints in Ray Train's record of the (one) run in ``storage`` (a folder, or a bucket URI
    whose endpoint and credentials are in this process's environment), read as the train stage reads them
    (tasks/lib/storage.py: ``run_checkpoints``): an upload is there only once Ray Train registered it, and only a
    registered one is resumed from. Ray rewrites the record in place at every checkpoint: one read mid-write (a
    ``StorageError``) is "none yet", as before the first checkpoint."""
    from pyarrow import fs

    from tasks.lib.storage import run_checkpoints

    filesystem, path = fs.FileSystem.from_uri(storage)
    runs = [i.base_name for i in filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
            if i.base_name.startswith("train-")]
    try:
        return [k.step for k in run_checkpoints(storage, runs[0])] if len(runs) == 1 else []
    except ValueError:
        return []


def gcs_tables(address: str, env: dict, cwd: Path) -> dict:
    """The cluster's jobs, actors and nodes (see GCS_TABLES)."""
    r = subprocess.run([sys.executable, "-c", GCS_TABLES, address], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def wait_nodes(address: str, count: int, env: dict, cwd: Path) -> list[dict]:
    """The GCS node table once it lists ``count`` alive nodes (fails the test after ``HEAD_START_TIMEOUT_S``)."""
    r = subprocess.run([sys.executable, "-c", WAIT_NODES, address, str(count), str(HEAD_START_TIMEOUT_S)], cwd=cwd,
                       env=env, capture_output=True, text=True, timeout=HEAD_START_TIMEOUT_S + 60)
    assert r.returncode == 0, f"not {count} alive nodes: {r.stdout[-3000:]}{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@dataclass
class TwoNodes:
    """A running two-node cluster: ``head`` (no CPUs: drivers connect here, no task runs here) and ``node`` (all
    the CPUs, ``masked`` folders hidden), their GCS node ids, and ``env``, what a stage needs to join it."""

    head: RayHead
    node: RayWorkerNode
    head_id: str
    node_id: str

    @property
    def address(self) -> str:
        return self.head.address

    @property
    def env(self) -> dict:
        return self.head.env


@contextmanager
def two_node_cluster(folder: Path, masked: Sequence[Path] = (), node_cpus: int = 2,
                     extra_env: Optional[dict] = None, cwd: Optional[Path] = None) -> Iterator[TwoNodes]:
    """A head started with ``--num-cpus 0`` and a second node with ``node_cpus`` CPUs that cannot see ``masked``
    (:class:`RayWorkerNode`). Every CPU task, actor and Ray Train worker runs on the second node. ``extra_env`` goes
    to both nodes (their workers inherit it) and to :attr:`TwoNodes.env`. Both nodes are stopped on exit, whatever
    happened; a process of either that survives fails the test."""
    # Disjoint worker-port ranges: two raylets of one machine with Ray's default range could hand out one port twice.
    head = RayHead(folder, num_cpus=0, worker_ports=(10002, 14999), extra_env=extra_env)
    node = None
    try:
        head.wait_ready()
        node = RayWorkerNode(head, folder, num_cpus=node_cpus, worker_ports=(15000, 19999), masked=masked,
                             extra_env=extra_env)
        node.wait_ready()
        alive = [n for n in wait_nodes(head.address, 2, head.env, cwd or folder) if n["alive"]]
        assert len(alive) == 2, alive
        head_id = next(n["node_id"] for n in alive if n["is_head"])
        node_id = next(n["node_id"] for n in alive if n["temp_dir"] == node.temp_dir)
        assert head_id != node_id and {n["node_id"]: n["cpus"] for n in alive} == {head_id: 0, node_id: node_cpus}
        yield TwoNodes(head, node, head_id, node_id)
    finally:
        try:
            if node is not None:
                node.stop()
        finally:
            head.stop()
