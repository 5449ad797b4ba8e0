"""Is anything listening at a Ray address? Checked before `ray.init`, which, given a host:port
where no cluster runs, retries the GCS for minutes (printing "Failed to get cluster ID" every
35 s) before it gives up; a refused or silent TCP connection says the same in a second."""

from __future__ import annotations

import socket

PROBE_SECONDS = 5.0


def unreachable(address: str | None) -> str | None:
    """Why nothing can answer at Ray `address` ("host:port" or "ray://host:port"), or None:
    the port takes a TCP connection, or `address` is None, "auto" or "local" (Ray finds or
    starts the cluster itself), or names no port."""
    if address is None or address in ("auto", "local"):
        return None
    host_port = address.removeprefix("ray://")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = host.strip("[]") or "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_SECONDS):
            return None
    except OSError as error:
        why = error.strerror or type(error).__name__
        if isinstance(error, TimeoutError):
            why = f"no answer in {PROBE_SECONDS:.0f} s"
        return (
            f"nothing listens at {host}:{port} ({why}): start the cluster there "
            f"(`ray start --head --port={port}` on its head node) or correct the address"
        )
