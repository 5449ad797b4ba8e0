"""A real Ray head on 127.0.0.1 for tests, started with the ``ray`` CLI of this virtualenv.

``ray start --head --block`` runs in its own process group with its own short
temporary directory (Ray's unix socket paths must stay under ~107 bytes) and
free ports, so it never touches another Ray cluster on the machine. ``stop()``
ends exactly what that command started (its process group, plus the workers
Ray puts in sessions of their own) and never runs a machine-wide ``ray stop``.

Ray replaces 127.0.0.1 by the machine's primary address as the node IP (see
``ray._private.services.resolve_ip_for_localhost``), so ``ray status`` shows
that address; the GCS listens on all interfaces and ``address`` stays on
loopback.

Typical use::

    head = RayHead().start()
    ray.init(address=head.address)
    ...
    ray.shutdown()
    head.stop()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"
STARTED_MARKER = "Ray runtime started"


class RayHeadError(RuntimeError):
    """The Ray head could not start."""


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports that are free right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def ray_cli() -> Path:
    """Return the ``ray`` executable next to the running interpreter."""
    return Path(sys.executable).parent / "ray"


def parent_death_prefix() -> list[str]:
    """Command prefix that SIGTERMs the child when the thread that started it dies.

    Keeps a test process killed with SIGKILL (CI timeout, ^C twice) from leaving
    daemons behind. Uses util-linux's ``setpriv``; empty where it is missing.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def port_open(port: int, timeout: float = 0.5) -> bool:
    """Return whether something accepts TCP connections on HOST:port."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


class RayHead:
    """A single-node Ray cluster (the head only) listening on 127.0.0.1.

    Args:
        num_cpus: CPUs the head advertises (``ray.cluster_resources()["CPU"]``).
        start_timeout: seconds to wait until a driver can connect.
        object_store_memory: bytes for the object store (None: Ray's default).
    """

    def __init__(
        self,
        num_cpus: int = 2,
        start_timeout: float = 60.0,
        object_store_memory: int | None = None,
    ) -> None:
        self.num_cpus = num_cpus
        self.start_timeout = start_timeout
        self.object_store_memory = object_store_memory
        self.port: int | None = None
        self.temp_dir: Path | None = None
        self._process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """GCS address for ``ray.init(address=...)`` and ``ray start --address=...``."""
        if self.port is None:
            raise RayHeadError("Ray head not started")
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        """Output of ``ray start``; Ray's own logs are under ``temp_dir/session_latest/logs``."""
        if self.temp_dir is None:
            raise RayHeadError("Ray head not started")
        return self.temp_dir / "ray-start.log"

    def env(self) -> dict[str, str]:
        """Environment for subprocesses that use this head (``RAY_ADDRESS`` points at it)."""
        env = dict(os.environ)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # stay on 127.0.0.1
        env["RAY_AUTH_MODE"] = "disabled"
        env["RAY_ADDRESS"] = self.address
        return env

    def start(self) -> RayHead:
        """Start ``ray start --head --block`` and wait until a driver can connect."""
        if self._process is not None:
            raise RayHeadError(f"Ray head already running at {self.address}")
        cli = ray_cli()
        if not cli.exists():
            raise RayHeadError(
                f"no ray CLI at {cli}; install the project with `pip install -e '.[dev]'`"
            )
        # Short fixed prefix in /tmp: Ray puts unix sockets under temp_dir/session_*/sockets.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="kr-", dir="/tmp"))
        self.port, agent_port, runtime_env_port, metrics_port = free_ports(4)
        command = [
            *parent_death_prefix(),
            str(cli),
            "start",
            "--head",
            f"--node-ip-address={HOST}",
            f"--port={self.port}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            # Fixed defaults (52365, ...) would clash with another cluster on this machine.
            # (No --ray-client-server-port: it demands the ray[client] extra.)
            f"--dashboard-agent-listen-port={agent_port}",
            f"--runtime-env-agent-port={runtime_env_port}",
            f"--metrics-export-port={metrics_port}",
            "--block",
        ]
        if self.object_store_memory is not None:
            command.append(f"--object-store-memory={self.object_store_memory}")
        # No drain on SIGTERM: nothing to hand over in tests, and it delays stop().
        env = dict(
            os.environ,
            RAY_USAGE_STATS_ENABLED="0",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keep Ray on 127.0.0.1
            RAY_AUTH_MODE="disabled",  # loopback only; drivers in tests connect without a token
        )
        env.pop("RAY_ADDRESS", None)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, which stop() ends
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM ``ray start``, SIGKILL its process group after ``timeout``, delete temp_dir."""
        process, self._process = self._process, None
        if process is not None:
            # Ray workers run in sessions of their own: remember every descendant
            # now, to sweep any that outlive the graceful shutdown.
            started = descendants(process.pid)
            # `ray start --block` answers SIGTERM by stopping its children (GCS,
            # raylet, workers, agents) in order; signalling the whole group at once
            # would kill the GCS under it and stall its shutdown.
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
            deadline = time.monotonic() + 5
            while live_group_members(process.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if live_group_members(process.pid):
                signal_group(process.pid, signal.SIGKILL)
            for pid, start_time in started.items():
                if process_start_time(pid) == start_time:  # the same process, not a reused pid
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None
        self.port = None

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_until_ready(self) -> None:
        # "Ray runtime started" is printed once GCS and the raylet are up; the GCS
        # port accepting connections is then what ray.init(address=...) needs.
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise RayHeadError(f"ray start exited with {code}:\n{self._log_tail()}")
            if STARTED_MARKER in self.log_path.read_text(errors="replace") and port_open(self.port):
                return
            time.sleep(0.1)
        raise RayHeadError(
            f"Ray head at {self.address} not ready after {self.start_timeout:.0f}s:\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace")
        raylet = self.temp_dir / "session_latest" / "logs" / "raylet.out" if self.temp_dir else None
        if raylet is not None and raylet.exists():
            text += f"\n--- {raylet} ---\n" + raylet.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to a process group, ignoring a group that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def read_stat(pid: int | str) -> list[str] | None:
    """Return the fields of /proc/PID/stat after "(comm)": state, ppid, pgrp, ... (None if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def process_start_time(pid: int) -> str | None:
    """Return the start time (in clock ticks since boot) of a running process, None if gone."""
    fields = read_stat(pid)
    return None if fields is None or fields[0] == "Z" else fields[19]


def live_group_members(pgid: int) -> list[int]:
    """Return the pids of the group's processes that still run (zombies excluded)."""
    members = []
    for proc in Path("/proc").glob("[0-9]*"):
        fields = read_stat(proc.name)
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(proc.name))
    return members


def descendants(root: int) -> dict[int, str]:
    """Return {pid: start time} of every running descendant of ``root``."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        fields = read_stat(proc.name)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(proc.name))
    found: dict[int, str] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        start_time = process_start_time(pid)
        if start_time is not None:
            found[pid] = start_time
        stack.extend(children.get(pid, []))
    return found
