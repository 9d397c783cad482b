"""Nothing the test suite starts may outlive it: a pytest plugin (loaded by conftest.py) that fails the session when
one does.

Every process the suite starts inherits the environment variable ``DDPM_TEST_SESSION``, set once by the process that
runs the session (the xdist controller, or pytest alone), whatever starts it: a test, a fixture, a stage's
subprocess, a Ray worker, a server, a browser. When the session ends (after xdist's workers are gone), any process
still carrying this session's value is a leak, even one that was re-parented to PID 1 after its parent died: it is
listed, killed, and the session's exit status becomes "tests failed". Processes winding down get a bounded grace
period first, polled rather than slept.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest

SESSION_ENV = "DDPM_TEST_SESSION"
# For processes that are exiting when the last test ends (Ray's, after ray.shutdown()); the plugin's own test sets less.
GRACE_S = float(os.environ.get("DDPM_TEST_LEAK_GRACE_S", "30"))

# Set at import, before xdist starts its workers: they, and everything they start, inherit it.
os.environ.setdefault(SESSION_ENV, f"{os.getpid()}-{time.time_ns()}")


# The helpers Python's multiprocessing starts for the process that uses it (a test that ran a stage in-process): they
# end with that process, so in a run without xdist they are still there when this session's check runs.
MP_HELPERS = ("from multiprocessing.forkserver import main", "from multiprocessing.resource_tracker import main")


def _own_helper(p: psutil.Process) -> bool:
    return p.ppid() == os.getpid() and any(h in " ".join(p.cmdline()) for h in MP_HELPERS)


def session_processes(marker: str) -> list[psutil.Process]:
    """Live processes (not zombies) that carry ``marker``, other than this process, its ancestors and its own
    multiprocessing helpers."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for p in psutil.process_iter(["pid"]):
        if p.pid in mine:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE or p.environ().get(SESSION_ENV) != marker or _own_helper(p):
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        found.append(p)
    return found


def _describe(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())[:200] or p.name()
        return f"pid {p.pid} (parent {p.ppid()}, up {time.time() - p.create_time():.0f} s): {cmd}"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return f"pid {p.pid} (gone while listed)"


@pytest.hookimpl(trylast=True)  # after xdist has shut its workers down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):  # a worker: the controller checks once all of them are gone
        return
    marker = os.environ[SESSION_ENV]
    deadline = time.monotonic() + GRACE_S
    left = session_processes(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = session_processes(marker)
    if not left:
        return
    lines = [_describe(p) for p in left]
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = (f"{len(lines)} process(es) started by this test session outlived it by {GRACE_S:.0f} s (now killed); "
               "a test or fixture did not stop them:\n" + "\n".join(f"  {line}" for line in lines))
    if reporter is not None:
        reporter.write_line("")
        reporter.write_sep("=", "processes left running", red=True)
        reporter.write_line(message)
    else:
        print(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
