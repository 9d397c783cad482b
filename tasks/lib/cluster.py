"""The Ray connection: join the configured cluster, or start a local Ray sized to this machine."""

from __future__ import annotations

import os
from typing import Optional

from .errors import StageError


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
