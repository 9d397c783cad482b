"""Real DVC in a project clone (tests/conftest.py ``clone_project``): its command line, and which stages a
`dvc repro` ran."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import GIT_ENV


def dvc(dest: Path, *args: str) -> subprocess.CompletedProcess:
    """``dvc <args>`` in ``dest`` with this environment's DVC; fails the test (with DVC's output) on a non-zero exit."""
    env = {**os.environ, **GIT_ENV, "DVC_NO_ANALYTICS": "true", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=dest, capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def ran(output: str) -> list[str]:
    """The stages a `dvc repro` ran, in its order."""
    return re.findall(r"Running stage '([^']+)'", output)
