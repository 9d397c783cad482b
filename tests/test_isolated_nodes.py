"""A Ray node that shares no output folder with the driver, on one machine (tests/raycluster.py).

The second node of the cluster runs in its own mount namespace with an empty tmpfs over the masked folders; the
head has no CPUs, so every task lands on that node. This proves the set-up that the stages' multi-node tests rely on
(docs/scaling.md, "Object storage only"): a task pinned to the node sees the masked folder empty while the driver
sees its files, what the task writes there never reaches the driver's disk, and the code and the virtual
environment stay visible to it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from raycluster import RAY_CLUSTERS

# One xdist worker runs every test that starts a `ray start` cluster (tests/raycluster.py), one after another: their
# nodes take fixed, disjoint worker-port ranges, which two clusters at once would share.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(RAY_CLUSTERS)]

# Runs as a driver of the cluster (RAY_ADDRESS in its environment): one task pinned to the node argv[1] lists the
# folders argv[2:] and writes a file into the first, then prints what it saw as JSON.
LOOK = r"""
import json, os, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

@ray.remote(num_cpus=1)
def look(folders):
    seen = {f: sorted(os.listdir(f)) for f in folders}
    with open(os.path.join(folders[0], "written-by-the-task.txt"), "w") as out:
        out.write("only in the node's tmpfs")
    return {"node_id": ray.get_runtime_context().get_node_id(), "seen": seen, "pid": os.getpid(),
            "python": os.path.exists(sys.executable),
            "tasks_importable": __import__("importlib").util.find_spec("tasks.train") is not None}

ray.init(address="auto", log_to_driver=False)
strategy = NodeAffinitySchedulingStrategy(node_id=sys.argv[1], soft=False)
print(json.dumps(ray.get(look.options(scheduling_strategy=strategy).remote(sys.argv[2:]), timeout=120)))
"""


def test_a_task_on_the_second_node_sees_the_masked_folders_empty(isolated_ray_cluster, tmp_path, repo_root):
    project = tmp_path / "project"
    masked, visible = project / "checkpoints", project / "code"
    for folder, name in ((masked, "ckpt_00000003.pt"), (visible, "module.py")):
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"written by the driver's side")

    cluster = isolated_ray_cluster([masked])
    r = subprocess.run([sys.executable, "-c", LOOK, cluster.node_id, str(masked), str(visible)], cwd=repo_root,
                       env=cluster.env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])

    assert found["node_id"] == cluster.node_id != cluster.head_id
    assert found["seen"] == {str(masked): [], str(visible): ["module.py"]}  # the driver's file is not there
    assert found["python"] and found["tasks_importable"]  # the virtual environment and the code are
    # What the task wrote went to the node's tmpfs: the driver's folder holds only its own file.
    assert sorted(p.name for p in masked.iterdir()) == ["ckpt_00000003.pt"]
