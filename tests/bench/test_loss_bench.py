"""`bench/loss.py --smoke` runs on the CPU (tiny_decoder) and reports every target."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_loss_bench_smoke_mode(tmp_path: Path) -> None:
    markdown = tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [sys.executable, "bench/loss.py", "--smoke", "--steps", "1", "--markdown", str(markdown)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split(":")[0].strip() for line in done.stdout.splitlines() if "s/step" in line]
    assert rows == [f"{p} {r}" for p in ("fp32", "bf16")
                    for r in ("whole", "chunks 64", "chunks 16")]  # fmt: skip
    checks = [line for line in done.stdout.splitlines() if "target" in line]
    assert len(checks) == 8
    # the chunks' loss is the whole logits' (the timings on a busy CI machine are no target)
    for line in checks:
        if "loss difference" in line or "peak tensor bytes" in line:
            assert line.endswith("PASS"), line
    assert not markdown.exists()  # smoke mode writes nothing
