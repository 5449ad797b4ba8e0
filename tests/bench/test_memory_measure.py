"""bench/memory.py's measure: the peak of live tensor bytes, counted on every thread.

Runs in a child process: the allocator flag it sets stays on for the life of the process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import json, threading
import torch
from bench.memory import count_tensors_on_every_thread, start_memory_events, stop_memory_events

MB = 2**20
before = torch.empty(8 * MB, dtype=torch.uint8)  # allocated before counting: never counted
every_thread = count_tensors_on_every_thread()
start_memory_events()
a = torch.empty(4 * MB, dtype=torch.uint8)
b = torch.empty(2 * MB, dtype=torch.uint8)
del b  # freed: the peak stays 6 MB
kept = [a]
del a
threading.Thread(target=kept.clear).start()  # freed on another thread, as gloo does
threading.Event().wait(0.2)
c = torch.empty(1 * MB, dtype=torch.uint8)
del before  # a block from before counting is not subtracted
totals = stop_memory_events()
print(json.dumps({"every_thread": every_thread, "peak": max(t for _, t in totals),
                  "last": totals[-1][1]}))
"""


def test_tensor_peak_counts_every_thread() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    mb = 2**20
    assert result["every_thread"] is True
    assert result["peak"] == 6 * mb
    # the 4 MB freed on the other thread left the total: only the last 1 MB is live
    assert result["last"] == 1 * mb
