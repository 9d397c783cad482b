"""The suite on several workers (`make test`: pytest-xdist, --dist loadgroup): a pytest plugin, loaded by conftest.py.

Tests that share an expensive module- or session-scoped fixture run on one worker, which sets it up once: every test
that uses one of these fixtures joins its xdist group. The slow (end-to-end) tests start first.
"""

from __future__ import annotations

import pytest

SHARED_FIXTURES = {
    "prefect_api": "prefect-deployments",  # tests/test_flow.py: a Prefect server, for the flow run in a clone
    "served": "prefect-deployments",  # tests/test_flow.py: the same server + `flows.serve` in one project clone
    "mlflow_server": "mlflow-server",  # tests/test_tracking.py, tests/test_browser.py
    "two_pipelines": "two-pipelines",  # tests/test_faults.py: two train -> sample pipelines run together
    "measured": "memory-flat",  # tests/test_memory_flat.py: the stages measured at N and 4 N images
}

# One group per fixture, with no second copy of one on another worker: on 2 cores the suite is CPU-bound, and a
# second Prefect server, `flows.serve` and project clone only added CPU. (tests/test_flow.py on one worker, alone on
# 2 Intel cores: 8:18, 553 busy CPU-s.)


def pytest_itemcollected(item):
    """Join the groups above as each test is collected, before xdist reads the groups from the marks."""
    for fixture, group in SHARED_FIXTURES.items():
        if fixture in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group(group))
            break


def pytest_collection_modifyitems(config, items):
    """The slow (end-to-end) tests first: the workers then end together instead of one of them finishing a long test
    alone. The order is the same on every worker, as xdist requires."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
