"""One training run at a time in a run directory: rank 0 holds an exclusive lock on
`RUN_DIR/.lock` while it trains, and `kiln train` refuses, before starting a rank, a run
directory whose lock is held. Two runs in one directory (a job submitted twice, a rerun while
the first still trains) would write the same checkpoints, `latest` and metrics.

The lock is `flock(2)`: the kernel releases it when the holding process ends however it ends,
so a killed run leaves no stale lock to clear by hand (on NFS, once the server sees the
client gone). A file system without locks (some Lustre mounts) gets no check. No library
adds to this what kiln needs: the holder named in the refusal.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"
# how long rank 0 waits for a lock held elsewhere: a requeued job's predecessor on another node
# may hold it until its file server notices (an NFSv4 lease: 90 s); KILN_RUN_LOCK_WAIT=S sets
# it for a file system with another lease time
WAIT_ENV = "KILN_RUN_LOCK_WAIT"
WAIT_SECONDS = 120.0


class RunDirBusy(ValueError):
    """The run directory's lock is held by another run; the message names its holder."""


def _message(run_dir: Path, holder: str) -> str:
    return (
        f"trainer.run_dir={run_dir} is in use by another training run ({holder}); stop it "
        "first, or train in another trainer.run_dir"
    )


def _holder(handle: object) -> str:
    handle.seek(0)  # type: ignore[attr-defined]
    text = handle.read().strip()  # type: ignore[attr-defined]
    return text or "a process that has just started"


def busy(run_dir: str | Path) -> str | None:
    """Why `run_dir` cannot be trained in now (its lock is held: the holder named), or None.
    Takes and drops the lock when it is free; None too where the file system has no locks."""
    holder = holder_of(run_dir)
    return None if holder is None else _message(Path(run_dir), holder)


def holder_of(run_dir: str | Path) -> str | None:
    """Who holds `run_dir`'s lock (a run training there now), or None (see `busy`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    try:
        with open(run_dir / LOCK_FILE, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return _holder(handle)
    except OSError:  # no locks here, or no permission: the ranks find out
        return None
    return None


@contextlib.contextmanager
def hold(run_dir: str | Path, wait_seconds: float | None = None) -> Iterator[None]:
    """Hold `run_dir`'s lock for the `with` block (rank 0, while it trains); waits up to
    `wait_seconds` (default: $KILN_RUN_LOCK_WAIT, else WAIT_SECONDS) for another holder to
    let go, then raises RunDirBusy."""
    if wait_seconds is None:
        wait_seconds = float(os.environ.get(WAIT_ENV) or WAIT_SECONDS)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(run_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held for the block
    except OSError:
        yield  # a read-only or lockless place: the run's own writes will say so
        return
    try:
        deadline = time.monotonic() + wait_seconds
        said = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(handle)
                if time.monotonic() >= deadline:
                    raise RunDirBusy(_message(run_dir, holder)) from None
                if not said:
                    print(f"kiln train: waiting up to {wait_seconds:.0f} s for {run_dir / LOCK_FILE}, "
                          f"held by {holder}", file=sys.stderr, flush=True)  # fmt: skip
                    said = True
                time.sleep(1.0)
            except OSError:  # a file system without locks: no check
                break
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n")
        handle.flush()
        yield
    finally:
        # unlocked here, not only by the close: a DataLoader worker forked meanwhile shares it
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
