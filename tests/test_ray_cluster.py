"""The train and sample command lines against an existing Ray cluster, joined through ``RAY_ADDRESS``.

The test builds a two-node cluster on this machine the way a user does (``ray start --head``, then a node joined
with ``ray start --address``; 1 CPU each, its own temp dirs, ports and auth token), runs ``python -m tasks.fetch``,
``tasks.train`` (two Ray Train workers) and ``tasks.sample`` with ``RAY_ADDRESS`` set, and then asks the cluster's
GCS which drivers and actors it ran: the stage processes (by PID) must be among its jobs, Ray Train's workers and the
sample stage's actors must belong to those jobs, and the two training workers ran one per node. A stage that
started a local Ray of its own would leave no trace there, and the test would fail. A train stage without the
cluster's token is refused in one line.

The clusters are started and stopped by tests/raycluster.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tasks.lib.samples import load_samples
from raycluster import RAY_CLUSTERS, RayHead, RayWorkerNode, Stage, gcs_tables, wait_nodes

# One xdist worker runs every test that starts a `ray start` cluster (tests/raycluster.py), one after another: their
# nodes take fixed, disjoint worker-port ranges, which two clusters at once would share.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(RAY_CLUSTERS)]


def test_train_and_sample_run_on_an_existing_two_node_cluster(tmp_path, tiny_params, repo_root):
    steps = 6
    params = tmp_path / "params.yaml"
    tiny_params["ray"]["storage"] = str(tmp_path / "ray_results")  # both nodes are on this machine: its disk is shared
    tiny_params["train"].update(steps=steps, checkpoint_every=steps, num_workers=2, use_gpu=False)
    params.write_text(yaml.safe_dump(tiny_params))
    data, ckpts, samples, metrics = tmp_path / "data", tmp_path / "ckpt", tmp_path / "samples", tmp_path / "train.json"
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
        nodes = [n for n in wait_nodes(address, 2, env, repo_root) if n["alive"]]
        assert len(nodes) == 2 and sum(n["cpus"] for n in nodes) == 2, nodes
        head_id = next(n["node_id"] for n in nodes if n["is_head"])
        node_id = next(n["node_id"] for n in nodes if n["temp_dir"] == node.temp_dir)
        assert head_id != node_id, nodes

        # Without the cluster's token (RAY_AUTH_MODE unset: Ray sends none to an explicit address) joining is
        # refused: one line saying what to export, exit code 2, no traceback. It runs beside the real training.
        no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        denied = Stage("train", [*p, "--data", str(data), "--checkpoints", str(tmp_path / "ckpt_denied"), "--log",
                                 str(tmp_path / "loss_denied.tsv"), "--metrics", str(tmp_path / "denied.json")],
                       no_token, repo_root)
        train = Stage("train", [*p, "--data", str(data), "--checkpoints", str(ckpts),
                                "--log", str(tmp_path / "loss.tsv"), "--metrics", str(metrics)], env, repo_root)
        r = train.result()
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads(metrics.read_text())
        assert summary["steps"] == steps and summary["num_workers"] == 2 and summary["use_gpu"] is False, summary
        assert summary["ray"] == f"joined Ray cluster at {address}"
        assert isinstance(summary["final_loss"], float) and np.isfinite(summary["final_loss"]), summary
        newest = ckpts / f"ckpt_{steps:08d}.pt"
        assert summary["checkpoint"] == str(newest) and newest.is_file()
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

        # The cluster ran both stages: each stage process is one of its drivers, finished by now, and the work ran in
        # actors of that driver's job: the train stage's two Ray Train workers (no restarts), one on each node, in
        # two processes; the sample stage's ShardSampler. The refused process never became a driver.
        tables = gcs_tables(address, env, repo_root)
        jobs = {j["driver_pid"]: j for j in tables["jobs"]}
        assert train.pid in jobs and sample.pid in jobs, (train.pid, sample.pid, tables["jobs"])
        assert denied.pid not in jobs
        train_job, sample_job = jobs[train.pid], jobs[sample.pid]
        assert "tasks.train" in train_job["entrypoint"] and "tasks.sample" in sample_job["entrypoint"]
        assert train_job["is_dead"] and sample_job["is_dead"]
        assert "ShardSampler" in {a["class_name"] for a in tables["actors"] if a["job_id"] == sample_job["job_id"]}
        workers = [a for a in tables["actors"]
                   if a["job_id"] == train_job["job_id"] and "TrainWorker" in a["class_name"]]
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
