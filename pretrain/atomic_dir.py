"""A directory written whole or not at all: built under a staging name beside its target, then
renamed over it, the target it replaces moved aside first and removed last (`run_dir/final`
of a run, a `kiln export` directory).

A process killed part way leaves a staging directory, or, between the two renames, the
previous target aside and none in its place. Both names carry the writer's pid, so the next
writer of the same target (`recover`) removes a dead writer's staging directory and puts a
previous target it finds aside back where it was (or removes it when a newer one is in
place). Nothing here is specific to checkpoints: no library does this for directories
(`os.replace` does not replace a non-empty one).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path


def aside(target: Path, kind: str) -> Path:
    """A fresh hidden name beside `target` (`kind`: "tmp" for staging, "old" for the replaced)."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _writer_alive(name: str, prefix: str) -> bool:
    pid = name[len(prefix) :].split("-", 1)[0]
    if not pid.isdigit():
        return True  # not one of ours: leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def recover(target: Path) -> list[str]:
    """Before writing `target`: clean up after its writers killed part way (on this machine:
    a pid that is gone). Returns what was done, one line each, for the caller to say."""
    target = Path(target)
    done: list[str] = []
    if not target.parent.is_dir():
        return done
    for kind in ("old", "tmp"):  # an old one first: it may be the only complete copy
        prefix = f".{target.name}.{kind}-"
        for path in sorted(target.parent.glob(f"{prefix}*")):
            if not path.is_dir() or _writer_alive(path.name, prefix):
                continue
            if kind == "old" and not target.exists():
                path.rename(target)
                done.append(f"restored {target} from {path.name} (a replacement cut short)")
            else:
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {path} (left by a writer that was stopped)")
    return done


def readable_as_umask_allows(path: Path) -> None:
    """Give `path` the mode a newly created file gets (0666 less the umask). safetensors
    writes its files 0600, so a checkpoint or export was unreadable to the group and to
    serving containers running as another user, beside 0644 config files."""
    os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting
    it, which would race with other threads' file creation) where Linux reports it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def say_recovered(target: Path) -> None:
    """`recover(target)`, each thing done said on stderr."""
    for line in recover(target):
        print(f"kiln: {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def staged(target: Path) -> Iterator[Path]:
    """Yield a staging directory to fill; on success it replaces `target` (an existing
    `target` is moved aside, then removed); on an exception it is removed. What a killed
    writer of `target` left is dealt with first (`recover`), and said on stderr."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a directory")
    say_recovered(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = aside(target, "tmp")
    staging.mkdir()
    try:
        yield staging
        old = None
        if target.exists():
            old = aside(target, "old")
            target.rename(old)
        staging.rename(target)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
