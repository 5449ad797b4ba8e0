"""Helpers shared by the scripts in `bench/`: the machine's description, the commit, the best of
repeated runs, and the writer that replaces one script's section of BENCHMARKS.md.

A script run as `python bench/NAME.py` drops bench/ from `sys.path` (its files would shadow the
repository's packages: `data_pipeline`, ...) and puts the repository first, so it imports this
module as `bench.common`.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

MD_HEADER = """# Benchmarks

Written by the scripts in `bench/` (see `bench/README.md`). Speed is compared with a baseline
measured in the same run on the same machine (a ratio, not a wall time; the GPU script also
with nanoGPT's published figure and the datasheet peak, named beside each), memory with `kiln
plan`'s estimate; the one wall-time target is `make demo`'s (issue #9 asks for it). Each script
replaces only its own section.
"""


def marks(section: str) -> tuple[str, str]:
    """The comments that open and close a script's section of BENCHMARKS.md."""
    return f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"


def machine(packages: Iterable[str] = ()) -> dict[str, Any]:
    """CPU, cores, RAM, OS, Python, the versions of `packages`, and the load average now."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / (1 << 20), 1)
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    os_name = platform.platform()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = f"{line.split('=', 1)[1].strip(chr(34))} ({platform.platform()})"
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_gib": ram_gib,
        "os": os_name,
        "python": platform.python_version(),
    }
    info |= {package: version(package) for package in packages}
    info["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    return info


def git_commit() -> str:
    """The short commit of the repository, flagged when tracked files have changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{commit}{' (with uncommitted changes)' if dirty else ''}" if commit else "unknown"


def best(runs: list[dict[str, Any]], key: str = "tokens_per_s") -> dict[str, Any]:
    """The fastest of repeated runs: load from elsewhere only ever slows a run down."""
    return max(runs, key=lambda run: run[key])


def write_markdown(path: Path, section: str, name: str) -> None:
    """Replace section `name` of the markdown file (appended if absent; file created if
    missing), leaving every other section as it is."""
    start_mark, end_mark = marks(name)
    text = path.read_text() if path.is_file() else MD_HEADER
    if start_mark in text and end_mark in text:
        head, rest = text.split(start_mark, 1)
        tail = rest.split(end_mark, 1)[1].lstrip("\n")
        text = head + section + (("\n" + tail) if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
