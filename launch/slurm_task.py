"""One Slurm task of a `kiln launch cluster=slurm` job (`python -m launch.slurm_task
train|data CONFIG.pkl`): with `cluster.launch_mode=srun`, one task per rank, Slurm's
variables mapped to torch.distributed's (`launch.slurm.torch_env_from_slurm`); for
`job=data`, the data pipeline."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("train", "data"):
        print("usage: python -m launch.slurm_task train|data CONFIG.pkl", file=sys.stderr)
        return 2
    job, config_path = args
    cfg = pickle.loads(Path(config_path).read_bytes())  # noqa: S301 - written by kiln launch
    if job == "data":
        from data_pipeline.pipeline import run

        return run(cfg) or 0
    from launch.slurm import torch_env_from_slurm
    from pretrain.train import worker

    os.environ.update(torch_env_from_slurm(dict(os.environ)))
    return worker(cfg)


if __name__ == "__main__":
    code = main()
    if sys.argv[1:2] == ["train"]:
        from pretrain.train import end_rank

        end_rank(code)
    raise SystemExit(code)
