"""Shared pytest fixtures.

The service fixtures start a real single-node Slurm cluster / Ray head on first
use and stop it at the end of the session (see ``tests/services``). They fail,
never skip, when the machine cannot run them (not root, Slurm not installed):
CI must not pass by silently skipping the cluster tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

# Keep every Ray address on loopback: on Linux Ray otherwise swaps 127.0.0.1 for the machine's
# outward address. Set before anything imports ray (its constants are read at import).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Ray 2.5x turns token authentication on for a local cluster once ~/.ray/auth_token exists
# (the first `ray.init()` on a machine writes it); test clusters listen on loopback only, and a
# head and its drivers must agree on the mode, so every Ray in the test session runs without.
os.environ["RAY_AUTH_MODE"] = "disabled"

import pytest
from services import RayHead, RayHeadError, SlurmCluster, SlurmError

# -- services --------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running single-node Slurm cluster (partition ``debug``); pass ``.env()`` to subprocesses."""
    cluster = SlurmCluster()
    try:
        cluster.start()
    except SlurmError as error:
        pytest.fail(f"could not start the Slurm test cluster: {error}", pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """A running Ray head on 127.0.0.1 with 2 CPUs; connect with ``ray.init(address=ray_head.address)``."""
    head = RayHead(num_cpus=2)
    try:
        head.start()
    except RayHeadError as error:
        pytest.fail(f"could not start the Ray test head: {error}", pytrace=False)
    yield head
    head.stop()


# -- order -----------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the modules that use the Ray head last, each whole and in its usual order.

    Once started, the head (GCS, raylet, log monitor, dashboard agent) and the actors Ray Data
    leaves on it take about a fifth of a core while idle, until the session ends: measured on
    the 2-core CI machine, 474 s of CPU over a 35-minute suite. Last, it is up only while the
    Ray tests run.
    """
    ray_modules = {
        getattr(item, "module", None) for item in items if "ray_head" in item.fixturenames
    }
    ray_modules.discard(None)
    items.sort(key=lambda item: getattr(item, "module", None) in ray_modules)  # stable
