"""Serve the deployments declared in prefect.yaml from this process, without a work pool.

    python -m flows.serve [--file prefect.yaml] [--start-server] [--port 4200] [--limit N]

Each deployment of prefect.yaml (``train-eval/local``, ``train-eval/cifar10``) is registered with the Prefect API
at ``PREFECT_API_URL``, and its flow runs execute here, each in a subprocess in this working directory, until
Ctrl-C. ``--start-server`` first starts a local Prefect server on 127.0.0.1 (its SQLite database under
``PREFECT_HOME``), unless one already answers at the API URL, and stops it on exit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_FILE = PROJECT / "prefect.yaml"
SERVER_START_TIMEOUT_S = 180


def read_deployments(path: os.PathLike | str = DEFAULT_FILE) -> list[dict[str, Any]]:
    """The ``deployments`` entries of a prefect.yaml."""
    spec = yaml.safe_load(Path(path).read_text()) or {}
    deployments = spec.get("deployments") or []
    if not deployments:
        raise ValueError(f"{path}: no deployments")
    return deployments


def load_flow(entrypoint: str, base: Path = PROJECT):
    """The flow an entrypoint (``path/to/file.py:function``, relative to ``base``) names."""
    from prefect.flows import load_flow_from_entrypoint

    file, _, name = entrypoint.rpartition(":")
    return load_flow_from_entrypoint(f"{base / file}:{name}")


def runner_deployments(path: os.PathLike | str = DEFAULT_FILE) -> list:
    """prefect.yaml's deployments as objects ``prefect.serve`` takes."""
    path = Path(path).resolve()
    out = []
    for d in read_deployments(path):
        flow = load_flow(d["entrypoint"], path.parent)
        out.append(flow.to_deployment(name=d["name"], parameters=d.get("parameters") or {},
                                      description=d.get("description"), tags=d.get("tags") or []))
    return out


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def start_server(port: int) -> tuple[subprocess.Popen, str]:
    """``prefect server start`` on 127.0.0.1:``port`` in a child process; returns it once its API answers."""
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    # Its own session: a terminal's Ctrl-C (SIGINT to the foreground process group) reaches only this process, which
    # stops serving first and then the server. A server that died first left the runner reconnecting to nothing
    # (ConnectionClosedError: 1012, service restart) and still running.
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, start_new_session=True)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if api_healthy(api_url):
            return proc, api_url
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode} before answering at {api_url}")
        time.sleep(1.0)
    proc.terminate()
    raise RuntimeError(f"prefect server did not answer at {api_url} within {SERVER_START_TIMEOUT_S} s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Serve prefect.yaml's deployments of train-eval (no work pool).")
    p.add_argument("--file", default=str(DEFAULT_FILE), help="the prefect.yaml to read (default: the project's)")
    p.add_argument("--start-server", action="store_true",
                   help="start a local Prefect server on 127.0.0.1 first, unless one answers at PREFECT_API_URL")
    p.add_argument("--port", type=int, default=4200, help="port of the server --start-server starts (4200)")
    p.add_argument("--limit", type=int, default=None, help="at most this many flow runs at once")
    args = p.parse_args(argv)

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    server, serving = None, False
    if args.start_server:
        api_url = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{args.port}/api"
        if api_healthy(api_url):
            print(f"Prefect server already answering at {api_url}")
        else:
            print(f"starting a Prefect server on 127.0.0.1:{args.port} (about 30 s) ...", flush=True)
            try:
                server, api_url = start_server(args.port)
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
        os.environ["PREFECT_API_URL"] = api_url  # before Prefect is imported: its settings are read once
        print(f"Prefect UI: {api_url.removesuffix('/api')}   (in other shells: export PREFECT_API_URL={api_url})")
    try:
        from prefect import serve
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            print("error: no Prefect API to serve to: start a server (`prefect server start --host 127.0.0.1`) and "
                  "export PREFECT_API_URL=http://127.0.0.1:4200/api, or pass --start-server", file=sys.stderr)
            return 2
        try:
            deployments = runner_deployments(args.file)
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {args.file}: {e}", file=sys.stderr)
            return 2
        # Until Ctrl-C: Prefect's runner catches it and returns. A Ctrl-C in the second or so between the deployments'
        # registration and the runner's start can go unanswered (seen once under load); press it again.
        serving = True
        serve(*deployments, limit=args.limit)
    except KeyboardInterrupt:  # a Ctrl-C before or after the runner's own handling
        pass
    finally:
        if serving:  # (not after an error line: that one line is all a refused start prints)
            print("serving stopped" + ("; stopping the Prefect server" if server is not None else ""), flush=True)
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
