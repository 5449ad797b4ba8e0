"""Context parallelism: one long sequence split across ranks, for rows too long for one device.

Rank r of a context-parallel group of W ranks holds tokens [r * T, (r + 1) * T) of every
W * T-token row (`shard_sequence`). Each attention layer all-gathers the keys and values of the
whole row and attends from its own queries (Llama 3's all-gather form of context parallelism):
activations, the feed-forwards and the loss stay sharded, attention memory is (T, W * T) per
head instead of (W * T, W * T), and the backward pass sums the key/value gradients over the
group. Masks (causal, documents, windows, global tokens, ALiBi) are built from the gathered
row, so the outputs equal the unsharded model's (tested on 2 CPU ranks with gloo).

Why not `torch.distributed.tensor.experimental.context_parallel`: in torch 2.13 it dispatches
only the CUDA SDPA kernels (flash, memory-efficient, cuDNN); on CPU it fails with
"aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding strategy
registered", and it takes no attention mask (causal only, so no document masks). Its ring
attention on GPU is left to the benchmark (issue #9).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pretrain.models.layers import Attention, SequenceShard


class _GatherSequence(torch.autograd.Function):
    """All-gather along `dim`; the backward sums the gradient over the group and keeps this
    rank's slice (all_reduce instead of reduce_scatter, which gloo lacks)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, dim: int, group: Any) -> Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        ctx.dim, ctx.group, ctx.rank, ctx.size = dim, group, rank, tensor.shape[dim]
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size), None, None


def gather_sequence(tensor: Tensor, dim: int, group: Any = None) -> Tensor:
    """Every rank's part of `tensor`, concatenated along `dim` (differentiable)."""
    if not tensor.is_floating_point():
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=dim)
    return _GatherSequence.apply(tensor, dim, group)


def apply_context_parallel(model: nn.Module, group: Any = None) -> nn.Module:
    """Make `model` (a `Decoder`) run on this rank's part of each sequence; returns it."""
    from pretrain.models.decoder import Decoder

    if not isinstance(model, Decoder):
        raise ValueError(f"context parallelism supports decoders, not {type(model).__name__}")
    shard = SequenceShard(
        rank=dist.get_rank(group),
        world=dist.get_world_size(group),
        gather=lambda tensor, dim: gather_sequence(tensor, dim, group),
    )
    model.sequence_shard = shard
    for module in model.modules():
        if isinstance(module, Attention):
            module.sequence_shard = shard
    return model


def shard_sequence(batch: dict[str, Tensor], rank: int, world: int) -> dict[str, Tensor]:
    """This rank's contiguous part of every (B, W * T, ...) tensor of a micro-batch."""
    sharded = {}
    for key, tensor in batch.items():
        if tensor.dim() < 2:
            sharded[key] = tensor
            continue
        if tensor.shape[1] % world:
            raise ValueError(f"{key}: length {tensor.shape[1]} is not a multiple of {world} ranks")
        sharded[key] = tensor.chunk(world, dim=1)[rank]
    return sharded
