"""The arrows docs/architecture.md says must never exist, read from every import in the code (module level and
inside functions)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import psutil
import pytest
import yaml

from conftest import REPO
from test_stage_deps import imports_of

STAGES = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
# Stage -> stage imports that are still to be removed. The set may only shrink (it is empty).
KNOWN_STAGE_IMPORTS: set[tuple[str, str]] = set()
OUTSIDE_LIBRARY = ("ray", "prefect", "mlflow", "dvc", "tasks", "flows", "tracking", "torch_fidelity")


def _top_level_imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((REPO / "ddpm").glob("*.py")), ids=lambda p: p.name)
def test_the_library_imports_no_pipeline_part(path):
    assert not _top_level_imports(path) & set(OUTSIDE_LIBRARY), path.name


@pytest.mark.parametrize("path", sorted((REPO / "tasks").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_tasks_never_import_flows_nor_the_tracking_layer(path):
    """Stages and their support modules reach the tracking layer (MLflow) only through tasks/lib/callbacks.py's entry
    points, so a stage runs the same with tracking installed or not."""
    assert not _top_level_imports(path) & {"flows", "tracking", "mlflow"}, path.name
    assert not any(f.parent.name in ("flows", "tracking") for f in imports_of(path))


@pytest.mark.parametrize("path", sorted((REPO / "tracking").glob("*.py")), ids=lambda p: p.name)
def test_the_tracking_layer_never_imports_a_stage_or_the_flow(path):
    """tracking/ reads what stages wrote, from their files: it imports support modules, never a stage or flows/."""
    assert "flows" not in _top_level_imports(path)
    stages = {f.stem for f in imports_of(path) if f.parent.name == "tasks" and f.stem in STAGES}
    assert not stages, f"{path.name} imports the stage module(s) {sorted(stages)}"


def test_only_the_tracking_layer_imports_mlflow():
    users = sorted(str(f.relative_to(REPO)) for pkg in ("ddpm", "tasks", "flows", "tracking", "tools")
                   for f in (REPO / pkg).rglob("*.py") if "mlflow" in _top_level_imports(f))
    assert users and all(u.startswith("tracking/") for u in users), users


def test_no_stage_imports_another_stage_beyond_the_known_exceptions():
    found = {(stage, f.stem) for stage in STAGES for f in imports_of(REPO / "tasks" / f"{stage}.py")
             if f.parent.name == "tasks" and f.stem in STAGES and f.stem != stage}
    assert found <= KNOWN_STAGE_IMPORTS, found - KNOWN_STAGE_IMPORTS
    assert found == KNOWN_STAGE_IMPORTS, f"removed {KNOWN_STAGE_IMPORTS - found}: shrink KNOWN_STAGE_IMPORTS"


def test_no_import_cycle_among_project_modules():
    """Module-level and function-level imports together: no module reaches itself again."""
    files = [f for pkg in ("tasks", "ddpm", "tracking", "flows") for f in sorted((REPO / pkg).rglob("*.py"))]
    graph = {f: {g for g in imports_of(f) if g.name != "__init__.py"} for f in files}
    for start in files:
        seen, todo = set(), list(graph[start])
        while todo:
            f = todo.pop()
            assert f != start, f"import cycle through {start.relative_to(REPO)}"
            if f not in seen:
                seen.add(f)
                todo.extend(graph.get(f, ()))


def test_the_library_holds_no_pipeline_config():
    import ddpm.config as lib
    import tasks.lib.config as pipeline

    for name in ("DataConfig", "TrainConfig", "SampleConfig", "ClassifierConfig", "EvaluateConfig", "RayConfig",
                 "TrackingConfig", "FiguresConfig", "SamplerTableConfig", "Config", "load_config", "DATASETS"):
        assert not hasattr(lib, name), name
        assert hasattr(pipeline, name), name
    # The library keeps what describes the model, the diffusion and a sampler; the sample stage extends the last.
    sections = {n for n in dir(lib) if n.endswith("Config") and n != "ConfigDict"}
    assert sections == {"ModelConfig", "DiffusionConfig", "SamplerConfig"}, sections
    assert issubclass(pipeline.SampleConfig, lib.SamplerConfig)
    assert set(pipeline.Config.model_fields) >= {"ray", "tracking", "figures", "sampler_table", "model", "diffusion"}


def test_the_flow_runs_stages_only_through_dvc():
    """flows/ reads what the stages wrote and runs them with `dvc repro`; it never imports a stage module (which
    would run or format a stage's work a second way, beside dvc.yaml's command)."""
    for path in sorted((REPO / "flows").glob("*.py")):
        stages = {f.stem for f in imports_of(path) if f.parent.name == "tasks" and f.stem in STAGES}
        assert not stages, f"{path.name} imports the stage module(s) {sorted(stages)}"



# Small functions (design.md "Style"): none over this many lines, the docstring included. The one exception is the
# training loop, kept whole and flat on purpose (EDM's training_loop, design.md "One flat, readable training loop").
MAX_FUNCTION_LINES = 80
LONG_BY_DESIGN = {"tasks/train.py:train_loop"}
SMALL_FUNCTION_PACKAGES = ("ddpm", "tasks", "flows", "tracking")


def _function_lengths(packages) -> dict[str, int]:
    """``path:name`` -> lines from ``def`` to the last line of the body, for every function and method (nested ones
    too) in ``packages``."""
    found = {}
    for pkg in packages:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"{path.relative_to(REPO).as_posix()}:{node.name}"] = node.end_lineno - node.lineno + 1
    return found


def test_no_function_is_longer_than_80_lines():
    lengths = _function_lengths(SMALL_FUNCTION_PACKAGES)
    offenders = sorted(f"{name} ({n} lines)" for name, n in lengths.items()
                       if n > MAX_FUNCTION_LINES and name not in LONG_BY_DESIGN)
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(offenders)}"
    # the exception is real (a stale entry would hide nothing) and the check sees every module
    assert all(lengths.get(name, 0) > MAX_FUNCTION_LINES for name in LONG_BY_DESIGN)
    assert len(lengths) > 300


def _small_session(tmp_path, conftest: str, name: str, test: str, *args: str,
                   env: dict | None = None) -> subprocess.CompletedProcess:
    """A pytest session in a subprocess, in ``tmp_path``: a conftest (with tests/ importable) and one test file."""
    (tmp_path / "conftest.py").write_text(f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n{conftest}\n")
    (tmp_path / name).write_text(test)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, name], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def test_xdist_runs_the_tests_of_a_shared_fixture_on_one_worker(tmp_path):
    """`make test` runs the suite on xdist workers with --dist loadgroup; the tests that share an expensive fixture
    (conftest.SHARED_FIXTURES) join a group so one worker sets it up once. pytest 9.2 broke xdist 3.8's grouping
    silently (pyproject.toml pins pytest 9.1.1): a small session in a subprocess proves it holds."""
    r = _small_session(
        tmp_path, "from xdist_groups import pytest_itemcollected  # noqa", "test_group.py",
        "import os, pytest\n"
        "@pytest.fixture(scope='module')\ndef served():\n    return os.environ['PYTEST_XDIST_WORKER']\n"
        "@pytest.mark.parametrize('i', range(6))\ndef test_shared(served, i):\n"
        "    assert served == os.environ['PYTEST_XDIST_WORKER']\n"
        "    open(f'seen-{i}', 'w').write(served)\n"
        "@pytest.mark.parametrize('i', range(6))\ndef test_other(i):\n    pass\n",
        "-n", "3", "--dist", "loadgroup")
    assert r.returncode == 0, r.stdout[-2000:]
    workers = {(tmp_path / f"seen-{i}").read_text() for i in range(6)}
    assert len(workers) == 1, workers  # the six tests of the shared fixture ran on one worker


def test_a_process_left_running_fails_the_session_and_is_killed(tmp_path):
    """The session-wide leak check (tests/process_leaks.py) can fail: a small session whose test starts a process in
    a session of its own and leaves it running exits "tests failed", names the process, and kills it."""
    env = {k: v for k, v in os.environ.items() if k != "DDPM_TEST_SESSION"}  # its own session marker, not ours
    r = _small_session(
        tmp_path, "pytest_plugins = ['process_leaks']", "test_leak.py",
        "import subprocess\n"
        "def test_leaves_a_sleeper():\n"
        "    p = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "    open('pid', 'w').write(str(p.pid))\n",
        env={**env, "DDPM_TEST_LEAK_GRACE_S": "1"})
    pid = int((tmp_path / "pid").read_text())
    assert r.returncode == 1, r.stdout[-2000:]
    assert "1 passed" in r.stdout and "processes left running" in r.stdout and f"pid {pid} " in r.stdout
    assert "sleep 300" in r.stdout
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
