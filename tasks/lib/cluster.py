"""The Ray connection: join the configured cluster, or start a local Ray sized to this machine."""

from __future__ import annotations

import os
from typing import Optional

from .errors import StageError

PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train's switch (ray.train.v2 constants)


def ensure_ray(cfg) -> str:
    """Connect to ``RAY_ADDRESS`` (or ``ray.address``) if set, else start a local Ray sized to this machine.

    Returns a short description. Safe to call when Ray is already initialised.
    """
    import ray

    if ray.is_initialized():
        return f"Ray already initialised in this process (at {ray.get_runtime_context().gcs_address})"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS") or cfg.ray.address
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:
            source = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "ray.address"
            raise StageError(_join_error(f"{source} {address}", e)) from None
        return f"joined Ray cluster at {address}"
    # A Ray started here has no node that a cloud could preempt: Ray Train's preemption watcher (an actor per worker
    # group, polling for draining nodes to log them; its start also logs an error line about its restart policy)
    # would be a process with nothing to watch. Ray's processes take the environment they start with; this process
    # keeps its own (a cluster it joins later keeps Ray's default), and a value the user set is left as it is.
    unset = PREEMPTION_WATCHER_ENV not in os.environ
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    try:
        ray.init(
            num_cpus=cfg.ray.num_cpus or os.cpu_count(),
            include_dashboard=False,
            object_store_memory=cfg.ray.object_store_mb * 1024 * 1024,
            log_to_driver=True,
            configure_logging=False,
            # Ray 2.60 still advertises the machine's address and binds its internal gRPC ports on all interfaces
            # (protected by its token authentication, on by default); the dashboard is off. docs/reliability.md.
            _node_ip_address="127.0.0.1",
        )
    finally:
        if unset:
            os.environ.pop(PREEMPTION_WATCHER_ENV, None)
    return (f"started a local Ray with {ray.cluster_resources().get('CPU', 0):.0f} CPUs at "
            f"{ray.get_runtime_context().gcs_address}")


def _join_error(where: str, e: BaseException) -> str:
    """One line for a failed ``ray.init(address=…)``. ``ray start`` (Ray 2.60) turns on token authentication when
    ``RAY_AUTH_MODE=token`` or a token exists (a local ``ray.init()`` writes ``~/.ray/auth_token``), and a driver
    given an explicit address sends its token only under ``RAY_AUTH_MODE=token`` (docs/scaling.md)."""
    from ray.exceptions import AuthenticationError

    cur: Optional[BaseException] = e
    for _ in range(10):  # ray.init's ConnectionError is caused by an AuthenticationError, or by a RuntimeError
        if cur is None:  # whose text holds the AuthenticationError's traceback
            break
        if isinstance(cur, AuthenticationError) or "AuthenticationError" in str(cur):
            return (f"{where}: the Ray cluster refused to let this process join (token authentication); export "
                    "RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN (or in ~/.ray/auth_token)")
        cur = cur.__cause__ or cur.__context__
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{where}: cannot join the Ray cluster ({text}); start it (`ray start --head`) or unset the address"


# -- what the other nodes of a cluster see ----------------------------------------------------------------------------
PROBE_TIMEOUT_S = 120.0  # a node that cannot run a zero-CPU task in this long is not one to train on


def worker_nodes_elsewhere() -> list[dict]:
    """The alive nodes of the Ray cluster, other than this driver's, that can run work (CPUs or GPUs): where workers
    may land without seeing this machine's disk. None under a local Ray or on a one-node cluster."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here
            and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)]


def _sha256_of(path: str) -> Optional[str]:
    """The SHA-256 of the file ``path`` on the node this runs on, or None when it cannot be read there."""
    import hashlib

    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def nodes_missing(path: os.PathLike | str, nodes: list[dict]) -> list[str]:
    """The addresses of ``nodes`` (:func:`worker_nodes_elsewhere`'s) where the small file ``path`` is not what this
    process reads there: a folder the node does not share with the driver. One zero-CPU task pinned to each node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    path = str(path)
    want = _sha256_of(path)
    probe = ray.remote(num_cpus=0)(_sha256_of)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path)
            for n in nodes]
    try:
        got = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise StageError(f"Ray nodes did not answer within {PROBE_TIMEOUT_S:.0f} s whether they see {path}") from None
    return [n.get("NodeManagerAddress", n["NodeID"]) for n, sha in zip(nodes, got) if sha is None or sha != want]
