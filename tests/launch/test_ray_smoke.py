"""A driver connects to the Ray test head and runs remote tasks on it."""

from __future__ import annotations

import pytest
import ray

pytestmark = pytest.mark.ray


@ray.remote
def sum_below(x: int) -> int:
    return sum(range(x))


def test_remote_tasks_return_exact_values(ray_head):
    ray.init(address=ray_head.address)
    try:
        inputs = [0, 1, 10, 100, 1000, 12345]
        results = ray.get([sum_below.remote(x) for x in inputs], timeout=60)

        assert results == [0, 0, 45, 4950, 499500, 76193340]
        assert ray.cluster_resources()["CPU"] == 2
        # Everything stays on loopback: the node and the driver both use 127.0.0.1.
        assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]
        assert ray.util.get_node_ip_address() == "127.0.0.1"
    finally:
        ray.shutdown()
