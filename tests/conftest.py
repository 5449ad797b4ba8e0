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
    _ray_heads.append(head)
    try:
        head.start()
    except RayHeadError as error:
        pytest.fail(f"could not start the Ray test head: {error}", pytrace=False)
    yield head
    head.stop()


# -- order and workers -----------------------------------------------------------

# The modules whose tests use a service (the `ray` and `slurm` markers): each set is one unit of
# work for the test workers (see `pytest_xdist_make_scheduler`). Collection fails if a module
# with such tests is missing here.
SERVICE_MODULES = {
    "ray": ("tests/data_pipeline/test_pipeline.py", "tests/data_pipeline/test_shards.py",
            "tests/launch/test_ray_launch.py", "tests/launch/test_ray_smoke.py"),
    "slurm": ("tests/launch/test_slurm_launch.py", "tests/launch/test_slurm_smoke.py"),
}  # fmt: skip
UNIT_OF = {module: group for group, modules in SERVICE_MODULES.items() for module in modules}
_ray_heads: list[RayHead] = []


def unit(nodeid: str) -> str:
    """A test's unit of work: its module, or the service group its module belongs to."""
    module = nodeid.split("::", 1)[0]
    return UNIT_OF.get(module, module)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the units of work (see `unit`): the Ray unit first, then by their number of `slow`
    tests, most first, so that `make test`'s two workers (`pytest -n 2 --dist loadfile`) end
    together; a unit's tests keep their order.

    The shared Ray head is stopped as soon as the Ray unit's last test ends (see
    `pytest_runtest_teardown`): once started, the head (GCS, raylet, log monitor, dashboard
    agent) and the actors Ray Data leaves on it take about a fifth of a core while idle; measured
    on the 2-core CI machine, 474 s of CPU over a 35-minute suite.
    """
    for item in items:
        for group in SERVICE_MODULES:
            module = item.nodeid.split("::", 1)[0]
            if item.get_closest_marker(group) is not None and UNIT_OF.get(module) != group:
                raise pytest.UsageError(
                    f"{module} has `{group}` tests: add it to SERVICE_MODULES['{group}'] in "
                    "tests/conftest.py, so that one test worker runs all of them"
                )
    weight: dict[str, int] = {"ray": len(items)}  # first
    for item in items:
        name = unit(item.nodeid)
        weight[name] = weight.get(name, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -weight[unit(item.nodeid)])  # stable


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadfile`, with each service group one unit: a module's module-scoped fixtures
    (corpora, tokenizers) are built once, in one worker; each service is started by one worker
    only, and its tests, some of which fix ports (Slurm's rendezvous port), never run beside
    each other. The units are handed out in collection order (see above)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ServiceUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit(nodeid)

    config.option.loadscopereorder = False  # keep the order above
    return ServiceUnits(config, log)


@pytest.hookimpl(trylast=True)  # after the item's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the Ray head after the last test of the Ray unit (see above)."""
    if unit(item.nodeid) == "ray" and (nextitem is None or unit(nextitem.nodeid) != "ray"):
        for head in _ray_heads:
            head.stop()
