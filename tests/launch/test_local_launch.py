"""`kiln launch cluster=local`: cluster.procs_per_node ranks under torchrun on this machine,
with the resolved config and the exact command recorded in the run directory."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pretrain"))
from test_loader import write_corpus  # noqa: E402 (a corpus writer shared with tests/pretrain)

KILN = Path(sys.executable).parent / "kiln"
pytestmark = pytest.mark.slow


def test_local_launch_runs_procs_per_node_ranks(tmp_path: Path) -> None:
    corpus = tmp_path / "shards"
    write_corpus(corpus, {"web": [120, 90]}, {"web": 1.0})
    run_dir = tmp_path / "run"
    args = [
        "cluster=local", "cluster.accelerator=cpu", "cluster.procs_per_node=2",
        "model=tiny_decoder", "objective=clm", "engine=ddp", "data=small",
        f"data.path={corpus}", "data.seq_len=32", "data.global_batch_size=8",
        "data.micro_batch_size=2", "data.shuffle_buffer=64", f"trainer.run_dir={run_dir}",
        "trainer.max_steps=6", "trainer.eval_every=0", "logger=none", "logger.log_every=1",
    ]  # fmt: skip
    result = subprocess.run([str(KILN), "launch", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in records if r.get("event") == "start"] == [2]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    invoked, runs = (run_dir / "command.txt").read_text().splitlines()[1::2]
    assert shlex.split(invoked) == ["kiln", "launch", *args]
    command = shlex.split(runs)
    assert command[1:3] == ["-m", "pretrain.torchrun"] and "--nproc_per_node=2" in command
    assert command[-1] == str(run_dir / "config.pkl")
    assert "gpus_per_node: 2\n" in (run_dir / "config.yaml").read_text()


def test_local_launch_checks_the_data_before_starting_ranks(tmp_path: Path) -> None:
    args = ["cluster=local", "cluster.accelerator=cpu", "cluster.procs_per_node=2",
            "model=tiny_decoder", "data.path=nowhere", f"trainer.run_dir={tmp_path}/run",
            "logger=none"]  # fmt: skip
    result = subprocess.run([str(KILN), "launch", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "kiln launch: nowhere/manifest.json: no manifest (run `kiln data output_dir=nowhere` first)"
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "config.pkl").exists()
