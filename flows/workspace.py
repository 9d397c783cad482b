"""The DVC side of a flow run: which workspace it runs in, its params.yaml, one stage through ``dvc repro``, and the
DVC experiment that records the run.

A *workspace* is a checkout of the project in which DVC runs the pipeline: dvc.yaml, params.yaml, dvc.lock and the
stages' outputs. The project folder itself is one (a run there is ``dvc repro``). A run with other params runs in
its own workspace, a git worktree of the project under ``runs/`` (or the folder ``out`` names), so that the
project's params.yaml, dvc.lock and outputs are never touched by it. That is what ``dvc exp run --temp`` does, with
the stages still visible one by one in Prefect. Every worktree shares the project's DVC cache, its remote and, being
a git worktree, its experiment refs: ``dvc exp show`` in the project lists the experiments run in any of them.

Only this module runs DVC or git for the flow. It hashes nothing itself: what is up to date is what DVC says.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

from ddpm.checkpoint import atomic_write_bytes
from tasks.lib.cli import STARTED_ENV
from tasks.lib.dvcfile import read_stages

PARAMS_FILE = "params.yaml"
RUNS_DIR = "runs"  # default home of the workspaces of runs with other params (git-ignored, dvc-ignored)
LOCK_FILE = ".dvc/tmp/train-eval.lock"
RUN_RECORD = "metrics/run.json"  # the ids of the last flow run in a workspace (dvc.yaml's top-level metrics)


class WorkspaceError(Exception):
    """A problem with the project or workspace the user can fix; its message is one line."""


def _last_line(r: subprocess.CompletedProcess) -> str:
    """What a failed git or DVC command said: its ERROR line when it has one (DVC ends with a support hint)."""
    lines = [ln for ln in (r.stderr or r.stdout or "").strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("ERROR", "error", "fatal"))]
    return (errors or lines)[-1] if lines else f"exit {r.returncode}"


def _git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise WorkspaceError(f"git {' '.join(args)} in {cwd}: {_last_line(r)}")
    return r


def _dvc_bin() -> str:
    """The dvc next to this interpreter (the project's virtual environment), else the one on PATH."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.is_file() else (shutil.which("dvc") or "dvc")


def find_project(start: Path) -> Path:
    """The DVC project around ``start``: the nearest folder up with dvc.yaml and .dvc/, inside a git repository."""
    start = start.resolve()
    for d in (start, *start.parents):
        if (d / "dvc.yaml").is_file() and (d / ".dvc").is_dir():
            if _git(d, "rev-parse", "--git-dir", check=False).returncode != 0:
                raise WorkspaceError(f"{d} is not a git repository; DVC versions the runs with git: use a git "
                                     "clone of the project (or git init && git add -A && git commit)")
            if _git(d, "rev-parse", "--verify", "-q", "HEAD", check=False).returncode != 0:
                raise WorkspaceError(f"{d}: the DVC project has no git commit yet; DVC records runs against one "
                                     "(git add -A && git commit)")
            return d
    raise WorkspaceError(f"{start} is not inside the project: run the flow from the folder that holds dvc.yaml "
                         "and .dvc/ (a clone of the project)")


@dataclass(frozen=True)
class Workspace:
    project: Path  # the project folder (the main git worktree), whose DVC cache, remote and refs are shared
    root: Path  # where DVC runs the stages: the project itself, or a worktree of it

    @property
    def separate(self) -> bool:
        return self.root != self.project

    def path(self, rel: str) -> Path:
        return self.root / rel


def default_out(project: Path, params: Path, overrides: dict[str, Any]) -> Path:
    """The project itself for its own params.yaml without overrides; else ``runs/exp-<hash>`` of the params text
    and the overrides, so that a run repeated with the same params resumes in the same workspace."""
    if not overrides and params.resolve() == (project / PARAMS_FILE).resolve():
        return project
    blob = json.dumps([params.read_text(), sorted(overrides.items())], default=str)
    return project / RUNS_DIR / f"exp-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def _common_dir(path: Path) -> Path:
    """The git folder shared by all worktrees of the repository that holds ``path``."""
    return (path / _git(path, "rev-parse", "--git-common-dir").stdout.strip()).resolve()


def open_workspace(project: Path, out: Path) -> Workspace:
    """The workspace at ``out``: the project, or a git worktree of it, created at the project's HEAD if missing and
    otherwise moved to it; the project's uncommitted edits of tracked files are copied in (as ``dvc exp run --temp``
    does), and DVC's cache and remote point at the project's."""
    out, project = out.resolve(), project.resolve()
    if out == project:
        return Workspace(project, project)
    head = _git(project, "rev-parse", "HEAD").stdout.strip()
    fresh = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    if fresh:
        out.parent.mkdir(parents=True, exist_ok=True)
        _git(project, "worktree", "add", "--detach", "-q", str(out), head)
    elif not (out / ".git").is_file() or _common_dir(out) != _common_dir(project):
        raise WorkspaceError(f"out: {out} exists and is not a workspace of {project} (a git worktree made by an "
                             "earlier run); name a new folder or remove it")
    elif _git(out, "rev-parse", "HEAD").stdout.strip() != head:
        lock = out / "dvc.lock"  # the workspace's record of its outputs outlives the code update
        saved = lock.read_bytes() if lock.is_file() else None
        _git(out, "checkout", "-q", "-f", "--detach", head)
        if saved is not None:
            atomic_write_bytes(lock, lambda f: f.write(saved))
    _copy_uncommitted(project, out)
    _dvc(out, "config", "--local", "cache.dir", str(project / ".dvc" / "cache"))
    # Outputs checked out from the shared cache are links, not copies; DVC unprotects (copies) a persistent output
    # before a stage that writes it runs, and the stages write new files atomically (a rename), never in place.
    _dvc(out, "config", "--local", "cache.type", "reflink,hardlink,symlink,copy")
    remote = _project_remote(project)
    if remote:
        name, url = remote
        _dvc(out, "remote", "modify", "--local", name, "url", url)
    ws = Workspace(project, out)
    if fresh:
        start_from_project_state(ws)
    return ws


def start_from_project_state(ws: Workspace) -> None:
    """A new workspace begins where the project is: its dvc.lock (committed or not), the outputs that lock records
    checked out from the shared cache, and the outputs DVC does not cache (metrics, the loss log) copied. Every
    stage whose deps and params the run does not change is then up to date there, as under ``dvc exp run``; a
    stage the project never ran, or whose outputs are no longer in the cache, runs."""
    lock = ws.project / "dvc.lock"
    if not lock.is_file():
        return
    atomic_copy(lock, ws.path("dvc.lock"))
    for stage in read_stages(ws.path("dvc.yaml")).values():
        for rel in stage.uncached:
            if (ws.project / rel).is_file():
                atomic_copy(ws.project / rel, ws.path(rel))
    _dvc(ws.root, "checkout", "--allow-missing", "--quiet")


def atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    atomic_write_bytes(dst, lambda f: f.write(data))


def _dvc(cwd: Path, *args: str) -> None:
    r = subprocess.run([_dvc_bin(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise WorkspaceError(f"dvc {' '.join(args)} in {cwd}: {_last_line(r)}")


def _copy_uncommitted(project: Path, out: Path) -> None:
    changed = [f for f in _git(project, "diff", "--name-only", "-z", "HEAD").stdout.split("\0") if f]
    for rel in changed:
        if rel in (PARAMS_FILE, "dvc.lock"):
            continue  # the run writes its own params; the workspace keeps its own lock
        src, dst = project / rel, out / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        elif dst.is_file():
            dst.unlink()


def _project_remote(project: Path) -> Optional[tuple[str, str]]:
    """The project's default DVC remote with a local URL made absolute (a worktree resolves it elsewhere).
    Read with ``dvc config`` (raw values): ``dvc remote list`` wraps long lines at the terminal's width."""
    def value(key: str) -> str:
        r = subprocess.run([_dvc_bin(), "config", key], cwd=project, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    name = value("core.remote")
    url = value(f"remote.{name}.url") if name else ""
    if not url:
        return None
    if "://" in url or Path(url).is_absolute():
        return name, url
    return name, str((project / ".dvc" / url).resolve())  # relative to the config file's folder


def write_params(ws: Workspace, base: Path, overrides: dict[str, Any]) -> bool:
    """The workspace's params.yaml: ``base`` with the dotted overrides set, comments and order kept (what
    ``dvc exp run -S`` writes). Rewritten atomically, and only when its text changes; True if it did."""
    from io import StringIO

    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    data = rt.load(base.read_text())
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if data.get(section) is None:
            data[section] = {}
        data[section][name] = value
    buf = StringIO()
    rt.dump(data, buf)
    text = buf.getvalue()
    target = ws.path(PARAMS_FILE)
    if target.is_file() and target.read_text() == text:
        return False
    atomic_write_bytes(target, lambda f: f.write(text.encode()))
    return True


def external_paths(ws: Workspace, values: dict[str, Any], base: Path) -> dict[str, str]:
    """Overrides that make relative paths to files from outside the pipeline (``values``: param -> path, relative
    to ``base``, the directory the run was launched from) absolute, for a separate workspace, which does not hold
    them (they are git-ignored or never in the project). Paths that exist in the workspace stay as they are."""
    if not ws.separate:
        return {}
    out = {}
    for key, value in values.items():
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            if (base / value).exists() and not (ws.root / value).exists():
                out[key] = str((base / value).resolve())
    return out


def params_changed_from_head(ws: Workspace) -> bool:
    return bool(_git(ws.root, "status", "--porcelain", "--", PARAMS_FILE).stdout.strip())


@contextmanager
def locked(ws: Workspace, holder: str) -> Iterator[None]:
    """One flow run at a time per workspace (DVC's own lock would stop a second one midway, at its first stage)."""
    path = ws.path(LOCK_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # a lock, not data: written in place on purpose
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another run"
            raise WorkspaceError(f"out: {ws.root} is in use by {other}; runs go side by side only in different "
                                 "workspaces (another out, or other overrides)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"flow run {holder} (pid {os.getpid()})".encode(), 0)
        yield
    finally:
        os.close(fd)


# -- one stage ------------------------------------------------------------------------------------------------------


def stale_stages(root: Path, env: Optional[dict[str, str]] = None) -> set[str]:
    """The stages DVC finds changed in the workspace ``root`` (``dvc status --json``: changed deps, params, outputs,
    or never run)."""
    r = subprocess.run([_dvc_bin(), "status", "--json"], cwd=root, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise WorkspaceError(f"dvc status in {root}: {_last_line(r)}")
    return {key.rpartition(":")[2] for key in json.loads(r.stdout or "{}")}


def _lock_entry(root: Path, stage: str) -> Any:
    try:
        return (yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages", {}).get(stage)
    except (OSError, yaml.YAMLError):
        return None


@dataclass
class ReproResult:
    status: str  # "ran" | "restored" (from DVC's run-cache) | "up to date" | "failed"
    returncode: int
    error: Optional[str]  # the stage's own one-line "error: ..." message, when it gave one
    tail: str  # the last lines of the output, for a failure without a message


def repro(root: Path, stage: str, env: dict[str, str], log: Callable[[str], None]) -> ReproResult:
    """``dvc repro --single-item <stage>`` in the workspace ``root``, its output passed line by line to ``log``
    (waiting for DVC's repository lock rather than failing when another ``dvc`` of this workspace holds it).

    What happened is read from data, not from DVC's messages: the stage's command ran if it created the file named by
    ``DDPM_STAGE_STARTED``; otherwise DVC restored its outputs from the run-cache if the stage's dvc.lock entry
    changed, and found it up to date if not."""
    started = root / ".dvc" / "tmp" / f"started-{stage}"
    started.parent.mkdir(parents=True, exist_ok=True)
    started.unlink(missing_ok=True)
    before = _lock_entry(root, stage)
    full_env = {**os.environ, **env, STARTED_ENV: str(started),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # --wait-for-lock: the flow runs independent stages at once, and each `dvc repro` holds the repository lock for
    # a moment at its start and end (not while the stage's command runs).
    proc = subprocess.Popen([_dvc_bin(), "--wait-for-lock", "repro", "--single-item", stage], cwd=root, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    error, lines = None, []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        del lines[:-60]
        if line.startswith("error: "):  # the stage's own one-line message (tasks/lib/cli.py run_cli)
            error = line[len("error: "):]
        log(line)
    rc = proc.wait()
    tail = "\n".join(lines[-30:])
    if rc != 0:
        return ReproResult("failed", rc, error, tail)
    if started.exists():
        started.unlink()
        return ReproResult("ran", rc, None, tail)
    return ReproResult("restored" if _lock_entry(root, stage) != before else "up to date", rc, None, tail)


# -- the experiment -------------------------------------------------------------------------------------------------
def untracked_records(ws: Workspace) -> list[str]:
    """Files a run writes that git does not ignore and the experiment commit must hold: dvc.lock, the stages'
    uncached metrics/plots/outs (from dvc.yaml) and the run record."""
    files = {"dvc.lock", RUN_RECORD}
    for stage in read_stages(ws.path("dvc.yaml")).values():
        files.update(stage.uncached)
    others = set(_git(ws.root, "ls-files", "--others", "--exclude-standard").stdout.split())
    return sorted(f for f in files if f in others)


def save_experiment(ws: Workspace, name: str, message: str) -> str:
    """``dvc exp save`` of the workspace as experiment ``name``; returns the experiment's commit (short)."""
    args = [_dvc_bin(), "exp", "save", "-n", name, "-m", message]
    for f in untracked_records(ws):
        args += ["--include-untracked", f]
    env = dict(os.environ)
    for who in ("name", "email"):  # an experiment is a git commit: without an identity, name the flow
        if not _git(ws.root, "config", f"user.{who}", check=False).stdout.strip():
            for role in ("AUTHOR", "COMMITTER"):
                env.setdefault(f"GIT_{role}_{who.upper()}", "train-eval flow" if who == "name" else
                               "train-eval@localhost")
    # `dvc exp save` works through refs every worktree of the repository shares (refs/exps/exec/EXEC_*, the
    # workspace stash): two at once in two workspaces of one project would take each other's. One at a time.
    lock = _common_dir(ws.project) / "train-eval-exp-save.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)  # a lock, not data
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = subprocess.run(args, cwd=ws.root, capture_output=True, text=True, timeout=300, env=env)
    finally:
        os.close(fd)
    if r.returncode != 0:
        raise WorkspaceError(f"dvc exp save in {ws.root}: {_last_line(r)}")
    refs = _git(ws.root, "for-each-ref", "refs/exps", "--format=%(refname) %(objectname:short)").stdout
    return next((sha for ref, sha in (line.split() for line in refs.splitlines()) if ref.endswith(f"/{name}")), "")


def experiment_name(ws: Workspace, flow_run_name: str) -> str:
    """``<workspace folder>-<flow run name>``, made a valid git ref name."""
    raw = f"{ws.root.name}-{flow_run_name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.")[:100]


def write_run_record(ws: Workspace, record: dict[str, Any]) -> None:
    text = json.dumps(record, indent=2) + "\n"
    atomic_write_bytes(ws.path(RUN_RECORD), lambda f: f.write(text.encode()))
