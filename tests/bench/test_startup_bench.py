"""`bench/startup.py --smoke` runs on the CPU: the three builds of tiny_decoder and the line with
its ratio and target (the ratio itself is a timing of a tiny model on a busy CI machine, where
fixed costs dominate: no assertion on it)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_startup_bench_smoke_mode(tmp_path: Path) -> None:
    markdown, results = tmp_path / "BENCHMARKS.md", tmp_path / "startup.json"
    done = subprocess.run(
        [sys.executable, "bench/startup.py", "--smoke", "--markdown", str(markdown),
         "--results", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    row = re.search(r"^\| tiny_decoder \| ([\d.]+)M \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|",
                    done.stdout, re.M)  # fmt: skip
    assert row, done.stdout
    assert float(row.group(1)) > 0.1  # the tiny decoder's parameters, in millions
    assert re.search(r"^tiny_decoder: empty / seeded build [\d.]+ / [\d.]+ s = [\d.]+x, "
                     r"target <= 0.05x: (PASS|FAIL)$", done.stdout, re.M)  # fmt: skip
    assert not markdown.exists() and not results.exists()  # smoke mode writes nothing
