"""dvc.yaml, read in one place: each stage's command, deps, params and outputs, and the graph they make.

dvc.yaml is the one declaration of the pipeline. The flow (flows/) reads its stages and their order from here, a
stage under ``dvc repro`` reads which stages come after it (tasks/lib/inputs.py), and the flow's workspaces read which
outputs are not in DVC's cache (``cache: false``: the metrics and plots git keeps).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[2]
DVC_YAML = PROJECT / "dvc.yaml"


@dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml."""

    name: str
    cmd: str
    deps: tuple[str, ...]
    params: tuple[str, ...]  # sections or dotted keys of params.yaml
    outs: tuple[str, ...]  # outs, metrics and plots
    uncached: tuple[str, ...]  # the outputs with ``cache: false`` (kept by git, not by DVC's cache)


def _outputs(spec: dict[str, Any]) -> tuple[list[str], list[str]]:
    outs, uncached = [], []
    for kind in ("outs", "metrics", "plots"):
        for entry in spec.get(kind) or []:
            path, opts = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
            outs.append(str(path))
            if (opts or {}).get("cache") is False:
                uncached.append(str(path))
    return outs, uncached


def read_stages(path: os.PathLike | str = DVC_YAML) -> dict[str, Stage]:
    """``{name: Stage}`` in dvc.yaml's order."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    stages = {}
    for name, spec in (doc.get("stages") or {}).items():
        outs, uncached = _outputs(spec)
        params = [next(iter(p)) if isinstance(p, dict) else p for p in spec.get("params") or []]
        cmd = spec.get("cmd") or ""
        stages[name] = Stage(name, " ".join(cmd) if isinstance(cmd, list) else str(cmd),
                             tuple(str(d) for d in spec.get("deps") or []), tuple(str(p) for p in params),
                             tuple(outs), tuple(uncached))
    return stages


def _overlap(a: str, b: str) -> bool:
    """Whether two paths are the same, or one lies under the other."""
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def producers(stages: dict[str, Stage]) -> dict[str, tuple[str, ...]]:
    """For each stage, the stages whose outputs it reads (its deps at, under or above their outputs): the DAG."""
    found: dict[str, tuple[str, ...]] = {}
    for name, st in stages.items():
        made = [other for d in st.deps for other, o in stages.items() if other != name and
                any(_overlap(d, out) for out in o.outs)]
        found[name] = tuple(dict.fromkeys(made))
    return found


def check_order(stages: dict[str, Stage], path: os.PathLike | str = DVC_YAML) -> None:
    """Raise ValueError when a stage reads the output of a stage listed after it: dvc.yaml's order is the order in
    which the stages are numbered and reported."""
    seen: set[str] = set()
    for name, before in producers(stages).items():
        late = [p for p in before if p not in seen]
        if late:
            out = next(d for d in stages[name].deps if any(_overlap(d, o) for o in stages[late[0]].outs))
            raise ValueError(f"{path}: stage {name} reads {out}, an output of {late[0]}, which comes after it")
        seen.add(name)


def downstream(stage: str, stages: dict[str, Stage]) -> list[str]:
    """``stage`` and every stage that reads its outputs, directly or not, in dvc.yaml's order."""
    graph = producers(stages)
    seen = {stage}
    changed = True
    while changed:
        changed = False
        for name in stages:
            if name not in seen and seen & set(graph[name]):
                seen.add(name)
                changed = True
    return [name for name in stages if name in seen]
