"""A stage's command line: the shared arguments, and user errors turned into one line and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ddpm.checkpoint import CheckpointError
from ddpm.config import ConfigError

from .errors import StageError

USER_ERRORS = (ConfigError, CheckpointError, StageError)
DEBUG_ENV = "DDPM_DEBUG"  # set to 1 (or pass --debug) to see the traceback behind an error message


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (no usage block), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def stage_parser(description: str) -> argparse.ArgumentParser:
    """``--params`` (the params file), ``--set KEY=VALUE`` (repeatable overrides) and ``--debug``; a stage adds its
    paths. The stage reads its config with ``load_config(args.params, args.overrides)``."""
    p = _OneLineParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted key, e.g. --set train.steps=100 (repeatable)",
    )
    p.add_argument("--debug", action="store_true", help="on an error, print the full traceback too")
    return p


def _os_error_line(e: OSError) -> str:
    """An OSError as "path: what went wrong", with a hint for the common unwritable-output case."""
    where = e.filename if e.filename is not None else "file system"
    what = e.strerror or str(e) or type(e).__name__
    unwritable = "; choose a folder you can write to"
    hint = {1: unwritable, 13: unwritable, 30: "; choose a folder on a writable file system", 28: "; free some space",
            20: "; a path component is a file, not a folder"}.get(e.errno or 0, "")
    return f"{where}: {what}{hint}"


# Set by the train-eval flow for a stage's `dvc repro` (flows/workspace.py repro): the file this command creates when it
# starts, so the flow knows from the stage itself whether DVC ran it or restored its outputs from the run-cache.
STARTED_ENV = "DDPM_STAGE_STARTED"


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> None:
    """Run a stage's ``main``; turn user errors into one line on stderr and exit code 2.

    User errors are the project's own (:class:`ConfigError`, :class:`CheckpointError`, :class:`StageError`) and
    file-system errors (an output folder that is not writable, a full disk). ``--debug`` (or ``DDPM_DEBUG=1``)
    prints the traceback before the line; anything else is a bug and keeps Python's traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    started = os.environ.pop(STARTED_ENV, "")  # the train-eval flow learns that this command ran (not run-cached)
    if started:
        Path(started).touch()
    try:
        main(argv)
    except USER_ERRORS + (OSError,) as e:
        if debug:
            import traceback

            traceback.print_exc()
        line = _os_error_line(e) if isinstance(e, OSError) else str(e)
        print(f"error: {' '.join(line.split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
