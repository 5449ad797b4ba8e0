"""`bench/checkpoint.py --smoke` runs on the CPU: both engines, both ways of saving, every line
of the report (the stall ratios themselves are timings on a busy CI machine: no assertion)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_checkpoint_bench_smoke_mode(tmp_path: Path, smoke_data: Path) -> None:
    markdown, results = tmp_path / "BENCHMARKS.md", tmp_path / "checkpoint.json"
    done = subprocess.run(
        [sys.executable, "bench/checkpoint.py", "--smoke", "--data", str(smoke_data),
         "--markdown", str(markdown), "--results", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = re.findall(r"^\| (ddp|fsdp) \| (\d) \| (foreground|background) \|", done.stdout, re.M)
    assert rows == [("ddp", "1", "foreground"), ("ddp", "1", "background"),
                    ("fsdp", "2", "foreground"), ("fsdp", "2", "background")]  # fmt: skip
    stalls = re.findall(r"stall / foreground stall (\d+) / (\d+) ms = ([\d.]+)x, target <= "
                        r"0.25x: (PASS|FAIL)", done.stdout)  # fmt: skip
    assert len(stalls) == 2
    assert all(int(foreground) > 0 for _, foreground, _, _ in stalls)
    assert not markdown.exists() and not results.exists()  # smoke mode writes nothing
