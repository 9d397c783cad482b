"""`dvc repro` end to end in a temporary git clone: outputs, a no-op second run, a param change rerunning the
right stages. Real DVC, real Ray, tiny params."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

from conftest import GIT_ENV, clone_project


def _clone(repo: Path, dest: Path) -> Path:
    return clone_project(dest, repo=repo)


def _params(dest: Path, base: dict, **changes) -> None:
    p = json.loads(json.dumps(base))
    p["ray"]["storage"] = str(dest / ".ray_results")
    for key, value in changes.items():
        section, name = key.split(".")
        p[section][name] = value
    (dest / "params.yaml").write_text(yaml.safe_dump(p))


def _dvc(dest: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **GIT_ENV, "DVC_NO_ANALYTICS": "true", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dvc = Path(sys.executable).parent / "dvc"
    r = subprocess.run([str(dvc), *args], cwd=dest, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def test_dvc_repro_end_to_end(tmp_path, repo_root, tiny_params):
    TINY = tiny_params
    dest = _clone(repo_root, tmp_path / "proj")
    _params(dest, TINY)

    first = _dvc(dest, "repro")
    ran = _ran(first.stdout)
    # figures and sampler_table are disabled in the tiny params: they run, but only record that.
    assert ran[:5] == ["fetch", "train_classifier", "train", "sample", "evaluate"]
    assert sorted(ran[5:]) == ["figures", "sampler_table"]
    ev = json.loads((dest / "metrics/eval.json").read_text())
    assert ev["num_generated"] == TINY["sample"]["num_samples"]
    assert ev["fid"] > 0 and np.isfinite(ev["fid"]) and ev["floor"]["fid"] >= 0
    assert ev["fid"] > ev["floor"]["fid"]  # a 6-step model is worse than real data
    assert json.loads((dest / "metrics/classifier.json").read_text())["accuracy"] > 0.5
    assert (dest / "samples/grid.png").stat().st_size > 0
    assert (dest / "checkpoints/ckpt_00000006.pt").is_file()
    assert (dest / "dvc.lock").is_file()
    # Every stage writes its resolved config beside its outputs.
    for resolved in ("data/dataset/config.json", "models/classifier.config.json", "checkpoints/config.json",
                     "samples/config.json", "metrics/eval.config.json"):
        assert json.loads((dest / resolved).read_text())["train"]["steps"] == TINY["train"]["steps"], resolved
    loss_rows = (dest / "metrics/train_loss.tsv").read_text().splitlines()
    assert loss_rows[0].split("\t")[:2] == ["step", "loss"] and len(loss_rows) == 1 + TINY["train"]["steps"]

    second = _dvc(dest, "repro")
    assert _ran(second.stdout) == []

    # Each library file in turn: editing it makes stale exactly the stages whose deps cover it, which include every
    # stage whose code imports it (tests/test_stage_deps.py), and nothing else.
    from test_stage_deps import code_closure, covered

    stages = yaml.safe_load((dest / "dvc.yaml").read_text())["stages"]
    from dvc.repo import Repo  # `dvc status --json` in this process: one DVC start-up, not one per file

    with Repo(str(dest)) as repo:
        for f in sorted((dest / "ddpm").glob("*.py")):
            rel, original = f"ddpm/{f.name}", f.read_bytes()
            f.write_bytes(original + b"\n# an edit\n")
            try:
                stale = {k.rpartition(":")[2] for k in repo.status()}
            finally:
                f.write_bytes(original)
            assert stale == {n for n, st in stages.items() if covered(rel, st["deps"])}, rel
            assert {n for n in stages if rel in code_closure(n)} <= stale, rel
    assert json.loads(_dvc(dest, "status", "--json").stdout) == {}

    # Editing the library (here a comment in ddpm/diffusion.py, where p_sample and ddim_step live) makes every stage
    # that runs the model stale; train finds its checkpoint complete and keeps it, the samples are drawn again (their
    # key covers the sampling code) and so everything after them reruns.
    shard = (dest / "samples" / "shard_00000.npz").read_bytes()
    with open(dest / "ddpm" / "diffusion.py", "a") as f:
        f.write("\n# an edit\n")
    status = json.loads(_dvc(dest, "status", "--json").stdout)
    assert {k.rpartition(":")[2] for k in status} == {"train", "sample", "figures", "sampler_table"}, status
    edited = _ran(_dvc(dest, "repro").stdout)
    assert edited[:3] == ["train", "sample", "evaluate"], edited
    assert sorted(edited[3:]) == ["figures", "sampler_table"], edited
    assert (dest / "samples" / "shard_00000.npz").read_bytes() != shard  # drawn again under the new code's key
    assert (dest / "checkpoints/ckpt_00000006.pt").is_file()

    # A changed param makes stale the stage that reads it, and no other: what reads its outputs follows when they
    # change (as the repro above showed for the samples).
    _params(dest, TINY, **{"train.lr": 5e-4})
    assert {k.rpartition(":")[2] for k in json.loads(_dvc(dest, "status", "--json").stdout)} == {"train"}

    # Outputs are versioned: push to the default local remote, drop the cache and workspace copy, pull back.
    _dvc(dest, "push")
    grid = (dest / "samples/grid.png").read_bytes()
    shutil.rmtree(dest / "samples")
    shutil.rmtree(dest / ".dvc" / "cache")
    _dvc(dest, "pull")
    assert (dest / "samples/grid.png").read_bytes() == grid
