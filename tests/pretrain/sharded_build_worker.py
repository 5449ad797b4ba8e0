"""Run under torchrun (2 CPU ranks, gloo) by test_engines.py: FSDP2 and ZeRO-3 models built
the sharded way (`build_model_for_engine`: rank 0 builds the weights in host memory, every rank
an empty model) against a model built whole from the same seed. Writes what it found to
OUT/rank{r}.json.

    python -m torch.distributed.run --nproc_per_node 2 sharded_build_worker.py OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402

from pretrain.config import build_config, register_configs  # noqa: E402
from pretrain.engine import build_engine, build_model_for_engine, sharded_build  # noqa: E402
from pretrain.engine.deepspeed_engine import strip_wrappers  # noqa: E402
from pretrain.models import build_model, parameter_numel  # noqa: E402

CASES = {
    "fsdp_decoder": ["model=tiny_decoder", "engine=fsdp"],
    "fsdp_t5_checkpointed": [
        "model=tiny_encoder_decoder",
        "objective=span",
        "engine=fsdp",
        "engine.activation_checkpointing=true",
    ],  # fmt: skip
    "fsdp_encoder_alibi": [
        "model=tiny_encoder",
        "objective=mlm",
        "engine=fsdp",
        "model.position=alibi",
    ],  # fmt: skip
    "zero3_decoder": ["model=tiny_decoder", "engine=zero3"],
    "zero3_t5": ["model=tiny_encoder_decoder", "objective=span", "engine=zero3"],
    "zero3_moe_checkpointed": [
        "model=tiny_moe",
        "engine=zero3",
        "engine.activation_checkpointing=true",
    ],  # fmt: skip
    "ddp_decoder": ["model=tiny_decoder", "engine=ddp"],
}
SEED = 1234


def run(overrides: list[str], rank: int) -> dict:
    with initialize_config_module("hydra_conf", version_base="1.3"):
        cfg = build_config(compose("train", overrides=["cluster=local_cpu", "data=small",
                                                        "data.path=/nonexistent", *overrides]))  # fmt: skip
    device = torch.device("cpu")
    model, weights = build_model_for_engine(cfg, device=device, accumulation=1, seed=SEED)
    after_build = torch.rand(4).tolist()  # the random state a whole build leaves
    torch.manual_seed(SEED)
    reference = build_model(cfg.model)
    reference_after = torch.rand(4).tolist()
    total = sum(p.numel() for p in reference.parameters())
    found = {
        "weights_held": weights is not None,
        "meta": sum(p.numel() for p in model.parameters() if p.is_meta) / total,
        # element count the rank holds before the engine (0 for a partitioned ZeRO-3 model)
        "held": sum(p.numel() for p in model.parameters() if not p.is_meta) / total,
        "numel": sum(parameter_numel(p) for p in model.parameters()) / total,
        "random_state_equal": after_build == reference_after,
    }
    engine = build_engine(cfg, model, accumulation=1, max_steps=4, device=device,
                          weights=weights, scatter=sharded_build(cfg.engine) is not None)  # fmt: skip
    state = engine.full_state_dict()  # collective
    if rank == 0:
        expected = reference.state_dict()
        found["keys_equal"] = sorted(state) == sorted(expected)
        found["max_difference"] = max((state[k] - expected[k]).abs().max().item() for k in expected)
    buffers = dict(reference.named_buffers())
    found["buffers"] = len(buffers)
    found["buffers_equal"] = all(
        torch.equal(buffer.cpu(), buffers[strip_wrappers(name)])
        for name, buffer in getattr(engine, "module", engine.model).named_buffers()
    )
    return found


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    register_configs()
    results = {name: run(overrides, rank) for name, overrides in CASES.items()}
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()  # no collective in flight at exit (see expert_parallel_worker.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
