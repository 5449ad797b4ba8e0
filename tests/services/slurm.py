"""A real single-node Slurm cluster for tests (Debian's munged, slurmctld, slurmd).

Everything lives in one temporary directory: slurm.conf, a munge key and socket,
state, spool, logs and pid files. Client commands find the cluster through
``SLURM_CONF`` (see ``SlurmCluster.env``); the daemons listen on free ports, so a
leftover cluster or a system Slurm on the same machine does not interfere.

Typical use::

    cluster = SlurmCluster().start()
    job_id = cluster.sbatch("#!/bin/bash\\nsrun hostname\\n", "--ntasks=2")
    assert cluster.wait(job_id) == "COMPLETED"
    cluster.stop()
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
from pathlib import Path

CONF_TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "test-cluster.conf"

# Job states after which a job never runs again (REQUEUED is followed by PENDING).
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
REQUIRED_COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue")
INSTALL_HINT = (
    "run `sudo bash scripts/install-services.sh` (installs slurmctld slurmd slurm-client munge)"
)


class SlurmError(RuntimeError):
    """The cluster could not start, or a Slurm command failed."""


def find_command(name: str) -> str | None:
    """Return the path of a Slurm/munge executable, also looking in the sbin dirs."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
    return shutil.which(name, path=path)


def missing_requirements() -> list[str]:
    """Return why this machine cannot run the cluster (empty when it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append(f"must run as root (euid {os.geteuid()}): slurmd and munged run as root")
    missing = [name for name in REQUIRED_COMMANDS if find_command(name) is None]
    if missing:
        problems.append(f"missing commands {', '.join(missing)}; {INSTALL_HINT}")
    return problems


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports that are free right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def parent_death_prefix() -> list[str]:
    """Command prefix that SIGTERMs the child when the thread that started it dies.

    Keeps a test process killed with SIGKILL (CI timeout, ^C twice) from leaving
    daemons behind. Uses util-linux's ``setpriv``; empty where it is missing.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def tail(path: Path, lines: int = 30) -> str:
    """Return the last ``lines`` lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"<{path}: {error.strerror}>"
    return "\n".join(text.splitlines()[-lines:]) or "<empty>"


class SlurmCluster:
    """A single-node Slurm cluster (partition ``debug``) in its own temporary directory.

    Args:
        start_timeout: seconds to wait for the node to become idle.
        base_dir: where to create the temporary directory (default: the system tmp).
    """

    partition = "debug"

    def __init__(self, start_timeout: float = 60.0, base_dir: str | None = None) -> None:
        self.start_timeout = start_timeout
        self.base_dir = base_dir
        self.node_name = subprocess.run(
            ["hostname", "-s"], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.root: Path | None = None
        self._processes: dict[str, subprocess.Popen] = {}

    # -- paths -----------------------------------------------------------------
    def _path(self, *parts: str) -> Path:
        if self.root is None:
            raise SlurmError("cluster not started")
        return self.root.joinpath(*parts)

    @property
    def conf_path(self) -> Path:
        return self._path("etc", "slurm.conf")

    @property
    def munge_socket(self) -> Path:
        return self._path("munge", "munge.socket")

    @property
    def log_dir(self) -> Path:
        return self._path("log")

    @property
    def jobs_dir(self) -> Path:
        """Default working directory of submitted jobs (and their default output files)."""
        return self._path("jobs")

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> SlurmCluster:
        """Write the configuration, start munged, slurmctld and slurmd, wait for an idle node."""
        problems = missing_requirements()
        if problems:
            raise SlurmError("cannot start a Slurm cluster: " + "; ".join(problems))
        if self.root is not None:
            raise SlurmError(f"cluster already started in {self.root}")
        self.root = Path(tempfile.mkdtemp(prefix="kiln-slurm-", dir=self.base_dir))
        self.root.chmod(0o755)  # see _write_files: munged checks the socket's parents
        try:
            self._write_files()
            self._start_munged()
            self._spawn("slurmctld", ["-D", "-c", "-f", str(self.conf_path)])
            self._spawn("slurmd", ["-D", "-f", str(self.conf_path), "-N", self.node_name])
            self._wait_until_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel remaining jobs, stop the daemons this object started, delete its directory."""
        if self.root is None:
            return
        if self._processes.get("slurmctld") is not None and self._alive("slurmctld"):
            self._cancel_all_jobs()
        for name in ("slurmd", "slurmctld", "munged"):
            process = self._processes.pop(name, None)
            if process is not None:
                stop_process(process)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- client helpers --------------------------------------------------------
    def env(self) -> dict[str, str]:
        """Environment for subprocesses that talk to this cluster (os.environ + SLURM_CONF)."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf_path)
        # A cluster from an outer Slurm job must not leak into ours.
        for key in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_CLUSTERS"):
            env.pop(key, None)
        return env

    def run(
        self, *args: str, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run a Slurm client command (e.g. ``run("scontrol", "show", "node")``) against this cluster."""
        result = subprocess.run(
            list(args), env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise SlurmError(
                f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def sbatch(
        self, script: str | os.PathLike, *args: str, cwd: str | os.PathLike | None = None
    ) -> int:
        """Submit a batch job and return its id.

        Args:
            script: a path to a batch script, or the script's text (starting with ``#!``).
            *args: extra sbatch options, e.g. ``"--ntasks=2"``, ``"--output=/path/%j.out"``.
            cwd: where sbatch runs, which is the job's working directory and where a
                relative ``--output`` lands; defaults to ``jobs_dir`` in the temp dir.
        """
        if isinstance(script, str) and script.startswith("#!"):
            script_path = Path(tempfile.mkstemp(suffix=".sh", dir=self.jobs_dir)[1])
            script_path.write_text(script)
        else:
            script_path = Path(script)
        result = subprocess.run(
            ["sbatch", "--parsable", *args, str(script_path)],
            env=self.env(),
            cwd=str(cwd or self.jobs_dir),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise SlurmError(f"sbatch {' '.join(args)} failed: {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """Return ``scontrol show job`` as a dict (JobState, Reason, Restarts, ExitCode, ...)."""
        output = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", output))

    def job_state(self, job_id: int) -> str:
        """Return the current JobState, e.g. ``PENDING``, ``RUNNING``, ``COMPLETED``."""
        return self.job_info(job_id)["JobState"]

    def wait(self, job_id: int, timeout: float = 60.0, poll: float = 0.2) -> str:
        """Wait until a job reaches a terminal state and return it (``COMPLETED``, ``FAILED``, ...).

        Relies on ``scontrol show job``: finished jobs stay visible for MinJobAge=600 s
        (there is no slurmdbd, hence no ``sacct``).
        """
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in TERMINAL_STATES:
                return state
            if time.monotonic() > deadline:
                info = self.job_info(job_id)
                raise SlurmError(
                    f"job {job_id} still {state} (Reason={info.get('Reason')}) after {timeout:.0f}s"
                )
            time.sleep(poll)

    # -- internals -------------------------------------------------------------
    def _write_files(self) -> None:
        for sub in ("etc", "munge", "log", "run", "state", "spool", "jobs"):
            self._path(sub).mkdir()
        # munged insists on a key only its user can read, in a directory whose
        # parents are searchable by everyone (for the socket next to it).
        key = os.open(self._path("munge", "munge.key"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(key, "wb") as key_file:
            key_file.write(os.urandom(1024))
        self._path("munge").chmod(0o755)
        self.conf_path.write_text(self._render_conf())

    def _render_conf(self) -> str:
        ctld_port, slurmd_port = free_ports(2)
        cpus = os.cpu_count() or 1
        memory_mib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
        real_memory = max(1, int(memory_mib * 0.9))
        node, path = self.node_name, self._path
        return string.Template(CONF_TEMPLATE.read_text()).substitute(
            node=node,
            ctld_port=ctld_port,
            slurmd_port=slurmd_port,
            munge_socket=self.munge_socket,
            cpus=cpus,
            real_memory=real_memory,
            partition=self.partition,
            state_dir=path("state"),
            spool_dir=path("spool"),
            run_dir=path("run"),
            log_dir=path("log"),
        )

    def _start_munged(self) -> None:
        # A dedicated munged on its own socket and key: independent of any system
        # munged (which may be absent, or use another key), and stopped with us.
        # In the foreground it logs to stderr, i.e. log/munged.out.
        munge = self._path("munge")
        self._spawn(
            "munged",
            [
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={munge / 'munge.key'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
        )
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if not self._alive("munged") or time.monotonic() > deadline:
                raise SlurmError(f"munged did not start:\n{self._log_tails()}")
            time.sleep(0.05)

    def _spawn(self, name: str, args: list[str]) -> None:
        output = open(self.log_dir / f"{name}.out", "ab")  # noqa: SIM115 - kept by the child
        env = self.env()
        try:
            self._processes[name] = subprocess.Popen(
                [*parent_death_prefix(), find_command(name) or name, *args],
                env=env,
                cwd=str(self.root),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            output.close()

    def _alive(self, name: str) -> bool:
        process = self._processes.get(name)
        return process is not None and process.poll() is None

    def _wait_until_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        state = "<no answer>"
        while time.monotonic() < deadline:
            for name in ("munged", "slurmctld", "slurmd"):
                if not self._alive(name):
                    code = self._processes[name].returncode
                    raise SlurmError(
                        f"{name} exited with {code} during start-up\n{self._log_tails()}"
                    )
            result = self.run(
                "sinfo", "--noheader", "--Node", f"--nodes={self.node_name}",
                f"--partition={self.partition}", "--format=%T",
                check=False, timeout=10,
            )  # fmt: skip
            state = result.stdout.strip() or result.stderr.strip() or state
            if result.returncode == 0 and state == "idle":
                return
            time.sleep(0.2)
        node = self.run("scontrol", "show", "node", self.node_name, check=False).stdout.strip()
        raise SlurmError(
            f"node {self.node_name} not idle after {self.start_timeout:.0f}s "
            f"(sinfo: {state})\n{node}\n{self._log_tails()}"
        )

    def _cancel_all_jobs(self) -> None:
        jobs = self.run("squeue", "--noheader", "--format=%i", check=False).stdout.split()
        if not jobs:
            return
        self.run("scancel", *jobs, check=False)
        deadline = time.monotonic() + 30  # KillWait=10 plus margin
        while time.monotonic() < deadline:
            if not self.run("squeue", "--noheader", "--format=%i", check=False).stdout.split():
                return
            time.sleep(0.2)

    def _log_tails(self) -> str:
        sections = []
        for name in ("munged", "slurmctld", "slurmd"):
            for log in (self.log_dir / f"{name}.log", self.log_dir / f"{name}.out"):
                if log.exists():
                    sections.append(f"--- {log} ---\n{tail(log)}")
        return "\n".join(sections)


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM one process, SIGKILL it after ``timeout`` seconds, and reap it."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
