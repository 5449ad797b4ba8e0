"""PyTorch FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded as DTensors.

Each transformer block is one FSDP unit (all-gathered just before it runs, resharded after),
and the root takes what is left (embeddings, final norm, head). The mesh is 1-D over all ranks,
or with `engine.replicate_degree > 1` 2-D (replicate, shard): HSDP, sharding inside groups of
`world / replicate_degree` ranks and all-reducing across the groups.

On CUDA with `engine.precision` auto/bf16, parameters are gathered and computed in bf16 and
gradients reduced in `engine.reduce_dtype`; the sharded master weights and AdamW state stay
fp32. CPU runs are fp32 throughout.

Gradients are reduced once per step: the non-last micro-batches run with
`set_requires_gradient_sync(False)` and accumulate unreduced gradients locally. A NaN in any
micro-batch reaches the reduced gradient, so the global norm (an all-reduce over the shards) is
NaN on every rank and every rank drops the update together, as in DDP.

Checkpoints use `torch.distributed.checkpoint` (DCP): model and optimizer state dicts keyed by
parameter name, each rank writing its shards, plus the scheduler (tiny, written by rank 0).
DCP reshards on load, so a checkpoint resumes at any world size or mesh shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pretrain.checkpoint import host_copy, write_files
from pretrain.engine import Engine, finite
from pretrain.engine.float8 import float8_all_gathers, precompute_scales

SHARDS = "fsdp"  # DCP directory inside a checkpoint
SCHEDULER = "scheduler.pt"
META = "fsdp_engine.json"
REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_mesh(device_type: str, world: int, replicate_degree: int) -> Any:
    """A 1-D ("shard",) mesh, or 2-D ("replicate", "shard") for HSDP."""
    from torch.distributed.device_mesh import init_device_mesh

    if replicate_degree < 1 or world % replicate_degree:
        raise ValueError(
            f"engine.replicate_degree={replicate_degree} must be >= 1 and divide the {world} ranks"
        )
    if replicate_degree == 1:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (replicate_degree, world // replicate_degree),
                            mesh_dim_names=("replicate", "shard"))  # fmt: skip


def mixed_precision(cfg: Any, device_type: str) -> Any:
    """bf16 parameters and compute on CUDA (auto/bf16); a no-op policy (fp32) otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from pretrain.engine.deepspeed_engine import uses_bf16

    if not uses_bf16(cfg.engine.precision, device_type):
        return MixedPrecisionPolicy()
    if cfg.engine.reduce_dtype not in REDUCE_DTYPES:
        raise ValueError(
            f"engine.reduce_dtype={cfg.engine.reduce_dtype!r} is not one of {list(REDUCE_DTYPES)}"
        )
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                reduce_dtype=REDUCE_DTYPES[cfg.engine.reduce_dtype])  # fmt: skip


def materialise(model: nn.Module, weights: nn.Module | None, device: torch.device, *,
                scatter: bool) -> None:  # fmt: skip
    """Allocate the shards of `model`, sharded while on the meta device, on `device`, compute
    its buffers (`reset_buffers`) and, with `scatter`, fill them with rank 0's whole `weights`
    (None on the other ranks): each tensor is broadcast from rank 0 and each rank keeps its
    shard (`set_model_state_dict` with `broadcast_from_rank0`), so a rank never holds more
    than its shards and one whole tensor. Without `scatter` (a resumed run) the checkpoint's
    load fills them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from pretrain.models import reset_buffers

    model.to_empty(device=device)
    reset_buffers(model)
    if not scatter:
        return
    if weights is None and (not dist.is_initialized() or dist.get_rank() == 0):
        raise ValueError("an FSDP2 model built on the meta device needs rank 0's weights")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights.state_dict() if weights is not None else {},
                         options=options)  # fmt: skip


class FSDPEngine(Engine):
    """Fully sharded data parallel (FSDP2), optionally hybrid (HSDP)."""

    def __init__(self, cfg: Any, model: nn.Module, accumulation: int, max_steps: int,
                 device: torch.device, weights: nn.Module | None = None,
                 scatter: bool = False) -> None:  # fmt: skip
        from torch.distributed.fsdp import fully_shard

        from pretrain.models import transformer_blocks
        from pretrain.optim import build_optimizer, build_scheduler

        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.mesh = build_mesh(device.type, self.world, cfg.engine.replicate_degree)
        policy = mixed_precision(cfg, device.type)
        reshard = cfg.engine.reshard_after_forward
        for blocks in transformer_blocks(model):
            for block in blocks:
                fully_shard(block, mesh=self.mesh, reshard_after_forward=reshard, mp_policy=policy)
        fully_shard(model, mesh=self.mesh, reshard_after_forward=reshard, mp_policy=policy)
        if any(p.is_meta for p in model.parameters()):  # built empty (`build_model_for_engine`)
            materialise(model, weights if scatter else None, device, scatter=scatter)
        super().__init__(model, accumulation, device)
        self.optimizer = build_optimizer(model, cfg.optim, device_type=device.type)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, max_steps)
        self.grad_clip = cfg.optim.grad_clip
        self.float8_scales = float8_all_gathers(cfg.engine)

    def forward_backward(
        self, batch: dict[str, Tensor], last: bool, poison: bool = False
    ) -> Tensor:
        self.model.set_requires_gradient_sync(last)  # reduce-scatter once, on the last one
        loss = self.loss(self.to_device(batch))
        if poison:
            loss = loss * float("nan")
        (loss / self.accumulation).backward()
        return loss.detach()

    def optimizer_step(self) -> tuple[float, bool]:
        from torch.distributed.tensor import DTensor

        parameters = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # the global norm, the same on every rank
        norm = float(norm)
        skipped = not finite(norm)
        if not skipped:
            self.optimizer.step()
            if self.float8_scales:  # the FP8 all-gathers' scales for the next forward
                precompute_scales(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm, skipped

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def save(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        directory = Path(directory)
        (directory / SHARDS).mkdir(parents=True, exist_ok=True)
        dcp.save(self._state(), checkpoint_id=str(directory / SHARDS))
        write_files(self._small_files(directory))

    def save_async(self, directory: Path, group: Any) -> Callable[[], None]:
        """DCP's `async_save` copies this rank's shards into host memory before it returns and
        writes them in its own thread, whose collectives (the plan, the metadata) go over
        `group`, not the training's process group."""
        import torch.distributed.checkpoint as dcp

        directory = Path(directory)
        (directory / SHARDS).mkdir(parents=True, exist_ok=True)
        shards = dcp.async_save(self._state(), checkpoint_id=str(directory / SHARDS),
                                process_group=group)  # fmt: skip
        small = host_copy(self._small_files(directory))

        def write() -> None:
            shards.result()
            write_files(small)

        return write

    def _small_files(self, directory: Path) -> dict[Path, Any]:
        if self.rank != 0:
            return {}
        meta = {"world_size": self.world, "mesh": list(self.mesh.shape)}
        return {
            directory / SCHEDULER: self.scheduler.state_dict(),
            directory / META: json.dumps(meta),
        }

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        directory = Path(directory)
        if not (directory / SHARDS).is_dir():
            raise FileNotFoundError(f"{directory}: not an FSDP engine checkpoint (no {SHARDS}/)")
        state = self._state()  # this run's layout: DCP reshards what was saved into it
        dcp.load(state, checkpoint_id=str(directory / SHARDS))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])  # fmt: skip
        self.scheduler.load_state_dict(torch.load(directory / SCHEDULER, weights_only=True))

    def full_state_dict(self) -> dict[str, Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)  # collective
        return state if self.rank == 0 else None


def read_model_state(directory: Path, template: dict[str, Tensor]) -> dict[str, Tensor]:
    """The whole model's weights in a checkpoint this engine wrote, read by one process on the
    CPU: `template` (the unwrapped model's own state dict: names, shapes, dtypes) is filled
    from the DCP shards, whatever the mesh that wrote them; the optimizer's entries are left."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    state = {"model": template}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(Path(directory) / SHARDS),
                 planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)  # fmt: skip
    return state["model"]
