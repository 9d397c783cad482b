"""flows/workspace.py on a small real project (git + DVC, no stage run): where a flow run happens, its params.yaml,
the one-run-per-workspace lock and the files an experiment commit must hold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import GIT_ENV
from flows import workspace as wsp

DVC = str(Path(sys.executable).parent / "dvc")
PARAMS = """# the project's params
train:
  lr: 0.001  # Adam's step size
  steps: 10
sample:
  steps: 5
"""
DVC_YAML = {"stages": {"a": {"cmd": "echo a", "params": ["train"], "outs": ["out"],
                             "metrics": [{"metrics/a.json": {"cache": False}}]}}}


def _run(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV, "DVC_NO_ANALYTICS": "true"}
    return subprocess.run(list(args), cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    _run(root, "git", "init", "-q")
    _run(root, DVC, "init", "-q")
    _run(root, DVC, "remote", "add", "-d", "local", ".dvc-remote")  # stored as ../.dvc-remote, as in the project
    (root / "params.yaml").write_text(PARAMS)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (root / "code.py").write_text("x = 1\n")
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-qm", "init")
    return root


def test_find_project_names_what_is_missing(tmp_path, project):
    assert wsp.find_project(project / ".dvc") == project  # from a folder inside it
    with pytest.raises(wsp.WorkspaceError, match=r"is not inside the project: run the flow from the folder that "
                                                 r"holds dvc\.yaml"):
        wsp.find_project(tmp_path)
    unpacked = tmp_path / "unpacked"  # a copy of the files without git (a tarball)
    (unpacked / ".dvc").mkdir(parents=True)
    (unpacked / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(wsp.WorkspaceError, match="is not a git repository; DVC versions the runs with git"):
        wsp.find_project(unpacked)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _run(fresh, "git", "init", "-q")
    _run(fresh, DVC, "init", "-q")
    (fresh / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(wsp.WorkspaceError, match="has no git commit yet"):
        wsp.find_project(fresh)


def test_default_workspace_follows_the_params(project, tmp_path):
    params = project / "params.yaml"
    assert wsp.default_out(project, params, {}) == project
    a = wsp.default_out(project, params, {"train.lr": 0.002})
    assert a.parent == project / "runs" and a.name.startswith("exp-") and len(a.name) == len("exp-") + 8
    assert wsp.default_out(project, params, {"train.lr": 0.002}) == a  # the same params: the same workspace
    assert wsp.default_out(project, params, {"train.lr": 0.003}) != a
    other = tmp_path / "other.yaml"
    other.write_text(PARAMS)
    assert wsp.default_out(project, other, {}).parent == project / "runs"  # another params file


def test_a_separate_workspace_is_a_worktree_with_the_projects_edits_and_cache(project, tmp_path):
    (project / "code.py").write_text("x = 2\n")  # an uncommitted edit of a tracked file travels along
    ws = wsp.open_workspace(project, project / "runs" / "w")
    assert ws.separate and ws.root == project / "runs" / "w"
    assert (ws.root / "code.py").read_text() == "x = 2\n"
    assert _run(ws.root, "git", "rev-parse", "HEAD") == _run(project, "git", "rev-parse", "HEAD")
    assert _run(ws.root, DVC, "cache", "dir").strip() == str(project / ".dvc" / "cache")
    # The project's remote, not one beside the worktree (what .dvc/config's relative URL would give there).
    assert _run(ws.root, DVC, "config", "--local", "remote.local.url").strip() == str(project / ".dvc-remote")

    # A new commit in the project moves the workspace to it; the workspace keeps its own dvc.lock.
    (ws.root / "dvc.lock").write_text("schema: '2.0'\n")
    _run(project, "git", "commit", "-qam", "x = 2")
    again = wsp.open_workspace(project, ws.root)
    assert again == ws
    assert _run(ws.root, "git", "rev-parse", "HEAD") == _run(project, "git", "rev-parse", "HEAD")
    assert (ws.root / "dvc.lock").read_text() == "schema: '2.0'\n"

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(wsp.WorkspaceError, match=r"out: .*stranger exists and is not a workspace of"):
        wsp.open_workspace(project, stranger)
    assert (stranger / "notes.txt").read_text() == "mine"  # untouched
    assert wsp.open_workspace(project, project) == wsp.Workspace(project, project)


def test_params_are_written_with_comments_kept_and_only_when_they_change(project, tmp_path):
    ws = wsp.open_workspace(project, project / "runs" / "w")
    assert wsp.write_params(ws, project / "params.yaml", {"train.lr": 0.002, "sample.steps": 7})
    text = (ws.root / "params.yaml").read_text()
    assert "# the project's params" in text and "# Adam's step size" in text
    assert yaml.safe_load(text) == {"train": {"lr": 0.002, "steps": 10}, "sample": {"steps": 7}}
    stamp = (ws.root / "params.yaml").stat().st_mtime_ns
    assert not wsp.write_params(ws, project / "params.yaml", {"train.lr": 0.002, "sample.steps": 7})
    assert (ws.root / "params.yaml").stat().st_mtime_ns == stamp
    assert wsp.params_changed_from_head(ws)
    assert wsp.write_params(ws, project / "params.yaml", {})
    assert not wsp.params_changed_from_head(ws)  # back to the committed text
    assert list((ws.root).glob(".params.yaml.*")) == []  # no temporary left behind


def test_one_run_per_workspace(project):
    ws = wsp.Workspace(project, project)
    with wsp.locked(ws, "run-1"):
        with pytest.raises(wsp.WorkspaceError, match=r"is in use by flow run run-1 \(pid \d+\); runs go side by "
                                                     r"side only in different workspaces"):
            with wsp.locked(ws, "run-2"):
                pass
    with wsp.locked(ws, "run-3"):  # released when the first run ends
        pass


def test_the_experiment_commit_holds_the_untracked_records(project):
    ws = wsp.Workspace(project, project)
    (project / "metrics").mkdir()
    for f in ("metrics/a.json", "metrics/run.json", "dvc.lock", "metrics/unrelated.txt"):
        (project / f).write_text("{}")
    assert wsp.untracked_records(ws) == ["dvc.lock", "metrics/a.json", "metrics/run.json"]
    assert wsp.experiment_name(ws, "happy otter/1") == "proj-happy-otter-1"


def test_inputs_from_outside_are_named_by_absolute_path_in_a_separate_workspace(project, tmp_path):
    (project / "raw").mkdir()  # e.g. a dataset's sources, git-ignored: not in a worktree
    (project / "w.pth").write_bytes(b"weights")
    values = {"data.root": "raw", "evaluate.inception_weights": "w.pth", "evaluate.reference": None,
              "other": str(tmp_path)}
    assert wsp.external_paths(wsp.Workspace(project, project), values, project) == {}  # the project holds them
    ws = wsp.open_workspace(project, project / "runs" / "w")
    assert wsp.external_paths(ws, values, project) == {"data.root": str(project / "raw"),
                                                       "evaluate.inception_weights": str(project / "w.pth")}
    from tasks.lib.inputs import EXTERNAL_PATH_KEYS

    assert set(EXTERNAL_PATH_KEYS) == {"data.root", "evaluate.inception_weights", "evaluate.reference", "train.pretrained"}



# A pipeline of two stages whose commands do what the project's stages' command lines do: say that they started
# (tasks/lib/cli.py run_cli touches $DDPM_STAGE_STARTED under the flow) and write their outputs.
PIPELINE = {"stages": {
    "a": {"cmd": "sh -c 'touch \"$DDPM_STAGE_STARTED\"; mkdir -p out; echo a > out/a.txt'", "params": ["train"],
          "outs": ["out"]},
    "b": {"cmd": "sh -c 'touch \"$DDPM_STAGE_STARTED\"; mkdir -p metrics; cat out/a.txt > metrics/b.json'",
          "deps": ["out"], "params": ["sample"], "metrics": [{"metrics/b.json": {"cache": False}}]},
}}


def test_a_new_workspace_starts_from_the_projects_dvc_state(project):
    """A run with other params starts where the project is (its uncommitted dvc.lock, the cached outputs as links,
    the uncached ones copied): only the stage whose params changed is stale, as under `dvc exp run`."""
    (project / "dvc.yaml").write_text(yaml.safe_dump(PIPELINE))
    _run(project, "git", "commit", "-qam", "two stages")
    assert wsp.stale_stages(project) == {"a", "b"}  # never run
    lines = []
    env = {"DVC_NO_ANALYTICS": "true"}
    assert [wsp.repro(project, s, env, lines.append).status for s in ("a", "b")] == ["ran", "ran"]
    assert wsp.repro(project, "b", env, lines.append).status == "up to date"
    assert wsp.stale_stages(project) == set() and (project / "dvc.lock").is_file()  # not committed

    ws = wsp.open_workspace(project, project / "runs" / "w")
    assert (ws.root / "dvc.lock").read_text() == (project / "dvc.lock").read_text()
    assert (ws.root / "metrics" / "b.json").read_text() == "a\n"  # uncached: copied
    linked = ws.root / "out" / "a.txt"  # cached: a link into the shared cache, not a copy
    assert linked.read_text() == "a\n" and (linked.stat().st_nlink > 1 or linked.is_symlink())
    assert wsp.stale_stages(ws.root) == set()
    wsp.write_params(ws, project / "params.yaml", {"sample.steps": 7})
    assert wsp.stale_stages(ws.root) == {"b"}
    assert wsp.repro(ws.root, "b", env, lines.append).status == "ran"
    assert wsp.stale_stages(ws.root) == set()
    assert (project / "out" / "a.txt").read_text() == "a\n" and wsp.stale_stages(project) == set()  # untouched

    # Params that come back to values run before: DVC restores the stage's outputs from its run-cache, and its
    # command does not run.
    ws2 = wsp.open_workspace(project, project / "runs" / "w2")
    wsp.write_params(ws2, project / "params.yaml", {"train.lr": 0.5})
    assert wsp.stale_stages(ws2.root) == {"a"}
    assert wsp.repro(ws2.root, "a", env, lines.append).status == "ran"
    wsp.write_params(ws2, project / "params.yaml", {})  # back to the project's params: a's run is in the run-cache
    assert wsp.stale_stages(ws2.root) == {"a"}
    assert wsp.repro(ws2.root, "a", env, lines.append).status == "restored"


def test_experiments_saved_at_once_from_two_workspaces_keep_their_own_state(project):
    """Two flow runs that end together save their experiments at once. `dvc exp save` goes through git refs all
    worktrees share (refs/stash, refs/exps/exec/*) under a lock of each worktree's own, so two unserialised saves fail
    ("failed to lock file .git/refs/stash.lock") or take each other's state (one worktree ends with the other's
    files); save_experiment runs one at a time per project. Each round: both saves succeed, each commit and each
    worktree hold their own params and records, and the project is untouched."""
    from concurrent.futures import ThreadPoolExecutor

    spaces = [wsp.open_workspace(project, project / "runs" / name) for name in ("a", "b")]
    for round_ in range(3):
        lrs = [0.01 * (round_ + 1) + i for i in range(len(spaces))]
        for ws, lr in zip(spaces, lrs):
            wsp.write_params(ws, project / "params.yaml", {"train.lr": lr})
            (ws.root / "metrics").mkdir(exist_ok=True)
            (ws.root / "metrics" / "a.json").write_text(f'{{"lr": {lr}}}')
            (ws.root / "out").write_text(f"{lr}\n")  # stage a's output, as if it ran (the save commits it)
        names = [f"{ws.root.name}-{round_}" for ws in spaces]
        with ThreadPoolExecutor(2) as pool:
            commits = list(pool.map(lambda a: wsp.save_experiment(*a, "test"), zip(spaces, names)))
        for ws, commit, lr, name in zip(spaces, commits, lrs, names):
            assert commit, name
            assert yaml.safe_load((ws.root / "params.yaml").read_text())["train"]["lr"] == lr
            assert (ws.root / "metrics" / "a.json").read_text() == f'{{"lr": {lr}}}'
            saved = _run(project, "git", "show", f"{commit}:params.yaml")
            assert yaml.safe_load(saved)["train"]["lr"] == lr
            assert _run(project, "git", "show", f"{commit}:metrics/a.json") == f'{{"lr": {lr}}}'
    assert (project / "params.yaml").read_text() == PARAMS and not (project / "dvc.lock").exists()
    assert _run(project, "git", "status", "--porcelain", "--untracked-files=no") == ""
