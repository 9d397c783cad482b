"""dvc.yaml's code deps are complete by construction: every project module a stage's command can import, at the
top or inside a function, directly or through another module, lies under one of that stage's deps. Editing any
of them makes the stage stale under `dvc status`, and so under the flow, which runs each stage through DVC
(tests/test_flow.py::test_a_flow_run_leaves_dvc_as_dvc_repro_would edits every ddpm/ file in a clone after a
flow run, then ddpm/diffusion.py for a `dvc repro`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from flows import train_eval as te
from tasks.lib.layout import LAYOUT
from tasks.lib.summary import RECORDS

# Modules whose effects are outside the stage's outputs, so editing them must not rerun a stage:
NOT_OUTPUT_CODE = {
    "tasks/lib/inputs.py": "the check of external inputs before a run; it writes nothing",
    "tasks/lib/callbacks.py": "what a stage reports to the trackers (tracking/): side effects outside its outputs",
    "tasks/lib/layout.py": "where a run's files are, for the trackers that read them after a stage",
    "tasks/lib/summary.py": "the console summary of a finished run",
    "tasks/lib/dvcfile.py": "dvc.yaml read for the check of the external inputs of the stages after this one",
}
PACKAGES = ("ddpm", "tasks", "flows", "tracking")


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
    assert {"tasks/lib/sampling.py", "tasks/lib/scoring.py", "tasks/lib/refstats.py", "tasks/lib/classifier.py",
            "ddpm/samplers.py"} <= code_closure("sampler_table")
    assert "tasks/sample.py" not in code_closure("sampler_table")  # the machinery, not the stage
    assert "tasks/sample.py" not in code_closure("figures")  # figures samples through the library
    for name, _ in STAGES:  # the tracking layer (MLflow) is reached through an entry point, never imported
        assert not any(m.startswith("tracking/") for m in code_closure(name)), name


def test_the_flow_reads_what_the_stages_write():
    """The flow's tasks are dvc.yaml's stages; each file it reads back lies at or under an output of its stage."""
    assert list(te.STAGE_TASKS) == [name for name, _ in STAGES] == list(RECORDS)
    outs = {name: [next(iter(o)) if isinstance(o, dict) else o for kind in ("outs", "metrics", "plots")
                   for o in stage.get(kind) or []] for name, stage in STAGES}
    for stage, key in RECORDS.items():
        assert covered(LAYOUT[key], outs[stage]), (stage, LAYOUT[key])
    for rel in LAYOUT.values():
        assert any(covered(rel, o) for o in outs.values()), rel
