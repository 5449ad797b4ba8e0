"""`kiln launch cluster=local`: this machine, `cluster.procs_per_node` ranks under torchrun
(`job=train`), or the data pipeline on a local Ray (`job=data`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from launch.launcher import write_command, write_config


def launch(cfg: Any, directory: Path) -> int:
    if cfg.job == "data":
        from data_pipeline.pipeline import run as run_data

        config_path = write_config(cfg, directory)
        # it runs in this process; the line runs the same pipeline on the same config
        write_command(directory, [sys.executable, "-m", "launch.slurm_task", "data",
                                  str(config_path)],
                      note="the data pipeline, in the kiln process")  # fmt: skip
        return run_data(cfg) or 0
    from pretrain.preflight import preflight
    from pretrain.train import USER_ERROR_EXIT_CODE, local_torchrun_command, run_torchrun, worker

    cluster = cfg.cluster
    if cluster.nodes != 1:
        print("kiln launch cluster=local: one node only (cluster.nodes=1); use cluster=slurm "
              "or cluster=ray for several", file=sys.stderr)  # fmt: skip
        return 1
    problems = preflight(cfg)  # the data and checkpoint are on this machine: check them once
    for problem in problems:
        print(f"kiln launch: {problem}", file=sys.stderr)
    if problems:
        return USER_ERROR_EXIT_CODE
    if cluster.procs_per_node:
        cluster.gpus_per_node = cluster.procs_per_node
    config_path = write_config(cfg, directory)
    world = cluster.gpus_per_node
    if world == 1:
        write_command(directory, [sys.executable, "-m", "pretrain.train", str(config_path)],
                      note="one rank, in the kiln process")  # fmt: skip
        return worker(cfg)
    command = local_torchrun_command(world, config_path)
    write_command(directory, command, note=f"{world} ranks")
    return run_torchrun(cfg, command)
