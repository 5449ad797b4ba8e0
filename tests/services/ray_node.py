"""One more Ray node on 127.0.0.1 that joins a running head (``RayHead``), for multi-node tests.

The node is ``ray_node_process.py`` (what ``ray start --address=HEAD --block`` does; that file
says why not the CLI itself), run like the head (see ``ray_head.py``): its own process group,
its own short temporary directory, free ports (so the default agent and metrics ports never
clash with another node or cluster on the machine), no token authentication, loopback only.
``stop()`` ends exactly what it started and never runs a machine-wide ``ray stop``.

Typical use::

    head = RayHead(num_cpus=1).start()
    node = RayNode(head.address, num_cpus=1).start()
    ...
    node.stop()
    head.stop()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .ray_head import (
    STARTED_MARKER,
    RayHeadError,
    descendants,
    free_ports,
    live_group_members,
    parent_death_prefix,
    process_start_time,
    signal_group,
)


class RayNode:
    """A worker node (not a head) of the cluster at ``head_address``, on 127.0.0.1.

    Args:
        head_address: the head's GCS address, ``host:port`` (``RayHead.address``).
        num_cpus: CPUs this node advertises.
        start_timeout: seconds to wait until the node's raylet runs.
    """

    def __init__(self, head_address: str, num_cpus: int = 1, start_timeout: float = 60.0) -> None:
        self.head_address = head_address
        self.num_cpus = num_cpus
        self.start_timeout = start_timeout
        self.temp_dir: Path | None = None
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        """Pid of the node process (``ray_node_process.py``, the root of all this node runs)."""
        if self._process is None:
            raise RayHeadError("Ray node not started")
        return self._process.pid

    @property
    def log_path(self) -> Path:
        if self.temp_dir is None:
            raise RayHeadError("Ray node not started")
        return self.temp_dir / "ray-start.log"

    def start(self) -> RayNode:
        """Start the node process; return once its raylet runs (registered with the head)."""
        if self._process is not None:
            raise RayHeadError("Ray node already running")
        self.temp_dir = Path(tempfile.mkdtemp(prefix="kn-", dir="/tmp"))
        ports = free_ports(5)
        command = [
            *parent_death_prefix(),
            sys.executable,
            str(Path(__file__).with_name("ray_node_process.py")),
            self.head_address,
            str(self.num_cpus),
            str(self.temp_dir),
            ",".join(map(str, ports)),
        ]
        env = dict(
            os.environ,
            RAY_USAGE_STATS_ENABLED="0",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # every address on loopback
            RAY_AUTH_MODE="disabled",  # as the head: loopback only
        )
        env.pop("RAY_ADDRESS", None)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def worker_pids(self, title: str) -> list[int]:
        """Pids of this node's live processes whose command line contains ``title`` (Ray sets a
        worker's title to ``ray::ClassName.method``); only processes this node started."""
        if self._process is None:
            return []
        found = []
        for pid in descendants(self._process.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if title.encode() in cmdline:
                found.append(pid)
        return sorted(found)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the node process (Ray's handler stops the raylet and its workers), SIGKILL what
        is left of it after ``timeout``, delete temp_dir."""
        process, self._process = self._process, None
        if process is not None:
            started = descendants(process.pid)
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
                if process_start_time(pid) == start_time:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def __enter__(self) -> RayNode:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise RayHeadError(f"Ray node process exited with {code}:\n{self._log_tail()}")
            if STARTED_MARKER in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise RayHeadError(
            f"Ray node joining {self.head_address} not ready after {self.start_timeout:.0f}s:\n"
            f"{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace")
        raylet = self.temp_dir / "session_latest" / "logs" / "raylet.out" if self.temp_dir else None
        if raylet is not None and raylet.exists():
            text += f"\n--- {raylet} ---\n" + raylet.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])
