"""dvc.yaml's code deps are complete by construction: every project module a stage's command can import, at the
top or inside a function, directly or through another module, lies under one of that stage's deps. Editing any
of them makes the stage stale under `dvc status` and under the flow, whose cache keys read the same deps."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from flows import train_eval as te

# Modules whose effects are outside the stage's outputs, so editing them must not rerun a stage:
NOT_OUTPUT_CODE = {
    "tasks/inputs.py": "the check of external inputs before a run; it writes nothing",
    "tasks/tracking.py": "MLflow logging: side effects in the tracking store, not in the stage's outputs",
    "tasks/tracking_figures.py": "MLflow logging of the figures and sampler_table outputs",
    "tasks/summary.py": "the console summary of a finished run",
}
PACKAGES = ("ddpm", "tasks", "flows")


def _module_file(name: str) -> Path | None:
    """The project file of a dotted module name, or None for a module from outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO / Path(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imports_of(path: Path) -> set[Path]:
    """Project files imported anywhere in ``path`` (module level and inside functions), relative imports resolved."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parent = package.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (parent, node.module or "") if p)
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]  # `from . import tracking` names a module
        for name in names:
            f = _module_file(name)
            if f is not None and f != path:
                found.add(f)
    return found


def code_closure(stage: str) -> set[str]:
    """Every project file (relative path) the stage's module can run, not following modules of NOT_OUTPUT_CODE."""
    todo, seen = [REPO / "tasks" / f"{stage}.py"], set()
    while todo:
        f = todo.pop()
        rel = f.relative_to(REPO).as_posix()
        if rel in seen or rel in NOT_OUTPUT_CODE:
            continue
        seen.add(rel)
        todo.extend(imports_of(f))
    return {f for f in seen if not f.endswith("__init__.py") or f.startswith("ddpm/")}


def covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items())


@pytest.mark.parametrize("name,stage", STAGES, ids=[n for n, _ in STAGES])
def test_every_imported_module_is_a_dep(name, stage):
    missing = sorted(f for f in code_closure(name) if not covered(f, stage["deps"]))
    assert not missing, f"dvc.yaml stage {name} runs {missing} but does not depend on them"


@pytest.mark.parametrize("name,stage", STAGES, ids=[n for n, _ in STAGES])
def test_no_stage_depends_on_a_module_it_does_not_run(name, stage):
    """The tasks/ deps are exactly the closure: a stale extra dep would rerun a stage for nothing."""
    closure = code_closure(name)
    extra = sorted(d for d in stage["deps"] if d.startswith("tasks/") and d not in closure)
    assert not extra, f"dvc.yaml stage {name} depends on {extra}, which it never imports"


@pytest.mark.parametrize("name", ["train", "sample", "figures", "sampler_table"])
def test_stages_that_run_the_model_depend_on_all_of_ddpm(name):
    deps = dict(STAGES)[name]["deps"]
    assert "ddpm" in deps, name


def test_the_closure_sees_imports_inside_functions():
    # sampler_table imports the sampling and scoring machinery inside a function, and scoring imports refstats.
    assert {"tasks/sampling.py", "tasks/scoring.py", "tasks/refstats.py", "tasks/classifier.py",
            "ddpm/samplers.py"} <= code_closure("sampler_table")
    assert "tasks/sample.py" not in code_closure("sampler_table")  # the machinery, not the stage
    assert "tasks/sample.py" not in code_closure("figures")  # figures samples through the library
    assert "tasks/tracking.py" not in code_closure("train")


def test_flow_cache_keys_read_the_same_deps():
    """The flow derives each stage's params and code from dvc.yaml: no second list to drift."""
    for name, stage in STAGES:
        spec = te.STAGES[name]
        assert spec.params == tuple(stage["params"]), name
        assert set(spec.code) == {d for d in stage["deps"] if d not in te.LAYOUT.values()}, name
        assert {te.LAYOUT[i] for i in spec.inputs} == {d for d in stage["deps"] if d in te.LAYOUT.values()}, name


def test_editing_a_library_file_makes_the_model_stages_stale_in_the_flow(tmp_path, tiny_config, monkeypatch):
    """The flow's cache keys (te.stage_key) over a copy of the project: appending a comment to ddpm/diffusion.py
    changes the keys of exactly the stages that run the model."""
    import shutil

    copy = tmp_path / "proj"
    for part in ("ddpm", "tasks"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(te, "PROJECT", copy)
    cfg = tiny_config()
    paths = {k: str(tmp_path / "out" / v) for k, v in te.LAYOUT.items()}
    before = {name: te.stage_key(name, cfg, paths) for name in te.STAGES}
    with open(copy / "ddpm" / "diffusion.py", "a") as f:
        f.write("\n# an edit\n")
    after = {name: te.stage_key(name, cfg, paths) for name in te.STAGES}
    assert {n for n in te.STAGES if before[n] != after[n]} == {"train", "sample", "figures", "sampler_table"}
    with open(copy / "tasks" / "datasets.py", "a") as f:
        f.write("\n# an edit\n")
    again = {name: te.stage_key(name, cfg, paths) for name in te.STAGES}
    assert {n for n in te.STAGES if after[n] != again[n]} == {"fetch"}
