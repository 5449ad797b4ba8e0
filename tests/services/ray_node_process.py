"""``python ray_node_process.py GCS_ADDRESS NUM_CPUS TEMP_DIR PORTS``: a Ray worker node on
127.0.0.1 that joins the head at GCS_ADDRESS and blocks until SIGTERM (``RayNode`` runs it).

What ``ray start --address=... --block`` does, minus the CLI's refusal: the CLI will not join a
cluster while ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, and with it set to 1 it swaps 127.0.0.1
(the head's address, the node's address) for the machine's outward address, where a head that
listens on loopback only cannot be reached. So this builds the node the way Ray's own
``ray.cluster_utils.Cluster.add_node`` does (``ray._private.node.Node(head=False)``), with the
flag at 0, and every address stays on loopback. SIGTERM (Ray's handler) stops the node's
processes, like ``ray start --block``.

Run by path (no package imports), with the environment ``RayNode`` sets.
"""

from __future__ import annotations

import sys
import time

STARTED_MARKER = "Ray runtime started"


def main(argv: list[str]) -> int:
    gcs_address, num_cpus, temp_dir, ports = argv
    node_manager, object_manager, agent, runtime_env_agent, metrics = map(int, ports.split(","))
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        gcs_address=gcs_address,
        node_ip_address="127.0.0.1",
        num_cpus=int(num_cpus),
        num_gpus=0,
        temp_dir=temp_dir,
        node_manager_port=node_manager,
        object_manager_port=object_manager,
        dashboard_agent_listen_port=agent,
        runtime_env_agent_port=runtime_env_agent,
        metrics_export_port=metrics,
    )
    # shutdown_at_exit: Ray's SIGTERM and atexit handlers stop the node's processes
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"{STARTED_MARKER}: node {node.node_id} at {node.node_ip_address}", flush=True)
    while True:
        time.sleep(1)
        deceased = [(kind, p) for kind, p in node.dead_processes() if p.returncode not in (0, -15)]
        if deceased:
            print(f"Ray node processes exited: {deceased}", flush=True)
            node.kill_all_processes(check_alive=False, allow_graceful=False)
            return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
