"""`engine.float8`: the transformer blocks' matmuls in FP8, through torchao's float8 training.

`apply_float8(model, engine_cfg, fsdp=...)` swaps each `nn.Linear` inside the transformer
blocks whose widths are multiples of 16 (what FP8 matmuls take) for torchao's `Float8Linear`:
its forward casts the input and the weight to float8 e4m3 with a scale per tensor (recipe
`tensorwise`) or per row (`rowwise`, `rowwise_with_gw_hp`), multiplies them with
`torch._scaled_mm` (Hopper's FP8 tensor cores: twice the bf16 peak) and returns the input's
dtype; its backward casts the output gradient to e5m2. The parameters stay what they were
(same names, fp32 master weights), so checkpoints, resumption and `kiln export` see no
difference. Left in the compute dtype: the embeddings, the output head and the cross-entropy,
the MoE experts (stacked parameters, not `nn.Linear`) and routers, and any linear layer with a
width not divisible by 16.

Under FSDP2 with the tensorwise recipe (`engine.float8_all_gather`), each weight is
all-gathered already cast to FP8 (half the bytes of bf16), and after every optimizer step one
all-reduce computes every layer's scale for the next step's all-gather (torchao's
`precompute_float8_dynamic_scale_for_fsdp`). The conversion runs before activation
checkpointing, compilation and sharding, as torchtitan applies it.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn


def float8_targets(model: nn.Module) -> tuple[list[str], int]:
    """(names of the linear layers `apply_float8` converts, linear layers in the blocks other
    than MoE routers)."""
    from pretrain.models import transformer_blocks
    from pretrain.models.loss import OutputHead

    block_ids = {id(block) for blocks in transformer_blocks(model) for block in blocks}
    names, total = [], 0
    for name, module in model.named_modules():
        if id(module) not in block_ids:
            continue
        for sub_name, sub in module.named_modules():
            if not isinstance(sub, nn.Linear) or isinstance(sub, OutputHead):
                continue
            if sub_name.rsplit(".", 1)[-1] == "router":  # routing decisions stay precise
                continue
            total += 1
            if sub.in_features % 16 == 0 and sub.out_features % 16 == 0:
                names.append(f"{name}.{sub_name}")
    return names, total


def quiet_torchao_import() -> None:
    """torchao's import logs each optional CUDA extension it cannot load (none is used here)
    and torch a deprecation notice about how torchao registers an enum with pytree."""
    for name in ("torchao", "torchao.utils", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def apply_float8(model: nn.Module, engine_cfg: Any, *, fsdp: bool) -> tuple[int, int]:
    """Convert the blocks' linear layers in place (see the module docstring); returns
    (converted, linear layers in the blocks)."""
    quiet_torchao_import()
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if engine_cfg.float8_recipe == "tensorwise":
        config = Float8LinearConfig(
            enable_fsdp_float8_all_gather=fsdp and engine_cfg.float8_all_gather
        )
    else:
        config = Float8LinearConfig.from_recipe_name(engine_cfg.float8_recipe)
    targets, total = float8_targets(model)
    wanted = set(targets)
    convert_to_float8_training(
        model, config=config, module_filter_fn=lambda module, fqn: fqn in wanted
    )
    return len(targets), total


def float8_all_gathers(engine_cfg: Any) -> bool:
    """Whether FSDP2 all-gathers the converted weights in FP8 (then their scales are
    precomputed after each optimizer step)."""
    return (
        getattr(engine_cfg, "float8", False)
        and engine_cfg.float8_recipe == "tensorwise"
        and engine_cfg.float8_all_gather
    )


def precompute_scales(model: nn.Module) -> None:
    """One all-reduce for every FP8-all-gathered weight's scale (after the optimizer step)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
