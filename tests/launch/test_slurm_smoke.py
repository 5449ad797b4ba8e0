"""The Slurm test cluster runs multi-task jobs, and its client tools answer."""

from __future__ import annotations

import os
import subprocess

import pytest

pytestmark = pytest.mark.slurm

TASK_SCRIPT = """\
#!/bin/bash
srun bash -c 'echo "task $SLURM_PROCID of $SLURM_NTASKS on $(hostname -s)"'
"""


def test_sbatch_runs_two_tasks(slurm_cluster, tmp_path):
    output = tmp_path / "job.out"
    job_id = slurm_cluster.sbatch(
        TASK_SCRIPT, "--ntasks=2", "--cpus-per-task=1", f"--output={output}", "--job-name=smoke"
    )

    assert slurm_cluster.wait(job_id, timeout=60) == "COMPLETED"
    lines = sorted(output.read_text().splitlines())
    node = slurm_cluster.node_name
    assert lines == [f"task 0 of 2 on {node}", f"task 1 of 2 on {node}"]


def test_scontrol_expands_hostnames(slurm_cluster):
    node = slurm_cluster.node_name
    result = subprocess.run(
        ["scontrol", "show", "hostnames", f"{node},{node}-extra[1-2]"],
        env=slurm_cluster.env(),
        capture_output=True,
        text=True,
        check=True,
    )

    assert result.stdout.split() == [node, f"{node}-extra1", f"{node}-extra2"]


def test_debug_partition_has_the_node_with_all_cpus(slurm_cluster):
    result = slurm_cluster.run("sinfo", "--noheader", "--partition=debug", "--format=%P %D %N %c")

    cpus = os.cpu_count()
    assert result.stdout.split() == ["debug*", "1", slurm_cluster.node_name, str(cpus)]
