"""Plain data parallel: PyTorch DDP (or the bare model on one rank), torch AdamW.

With `model.moe.expert_parallel` (and more than one rank) the MoE layers' experts are split over
the ranks (`pretrain.models.moe.enable_expert_parallel`): DDP all-reduces everything else and
leaves the rank-local expert weights alone; the gradient-norm clip adds every rank's expert
gradients to the (replicated) dense norm with one all-reduce, so all ranks clip and skip alike.
Checkpoints then hold the whole model in `engine.pt` (experts gathered to rank 0) and each
rank's optimizer state (`optimizer_rank{r}.pt`, with its experts' Adam moments); they resume
at the same world size.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.checkpoint import host_copy, write_files
from pretrain.engine import Engine, finite

EXPERT_PARALLEL = "expert_parallel.json"


class DDPEngine(Engine):
    """Every rank holds full weights, gradients and optimizer state."""

    def __init__(self, cfg: Any, model: nn.Module, accumulation: int, max_steps: int,
                 device: torch.device) -> None:  # fmt: skip
        from pretrain.optim import build_optimizer, build_scheduler

        self.module = model
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.world, self.rank = world, dist.get_rank() if dist.is_initialized() else 0
        self.expert_names: list[str] = []
        if world > 1 and getattr(cfg.model.moe, "expert_parallel", False):
            from pretrain.models.moe import enable_expert_parallel

            self.expert_names = enable_expert_parallel(model)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, self.expert_names
            )
        if world > 1:
            # gradients as views into DDP's all-reduce buckets: no second copy of every gradient
            model = DistributedDataParallel(model, bucket_cap_mb=cfg.engine.bucket_cap_mb,
                                            gradient_as_bucket_view=True)  # fmt: skip
        super().__init__(model, accumulation, device)
        self.optimizer = build_optimizer(self.module, cfg.optim, device_type=device.type)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, max_steps)
        self.grad_clip = cfg.optim.grad_clip
        from pretrain.engine.deepspeed_engine import uses_bf16

        self.bf16 = uses_bf16(getattr(cfg.engine, "precision", "auto"), device.type)

    def compute_context(self) -> Any:
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(
        self, batch: dict[str, Tensor], last: bool, poison: bool = False
    ) -> Tensor:
        sync = contextlib.nullcontext()
        if isinstance(self.model, DistributedDataParallel) and not last:
            sync = self.model.no_sync()  # all-reduce once per step, on the last micro-batch
        with sync:
            with self.compute_context():
                loss = self.loss(self.to_device(batch))
            if poison:
                loss = loss * float("nan")
            (loss / self.accumulation).backward()
        # a copy: under compile_mode=reduce-overhead the compiled loss lives in a CUDA graph's
        # output buffer, which the next micro-batch overwrites before the step reads it
        return loss.detach().clone()

    def optimizer_step(self) -> tuple[float, bool]:
        parameters = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        if self.expert_names:
            norm = self._clip_expert_parallel(max_norm)
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        skipped = not finite(norm)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm, skipped

    def _clip_expert_parallel(self, max_norm: float) -> float:
        """`clip_grad_norm_` over the whole model when the experts are spread over the ranks:
        the replicated parameters' squared norm (the same on every rank) plus the sum over the
        ranks of their local experts' squared norms."""
        local = set(self.expert_names)
        dense, experts = [], []
        for name, param in self.module.named_parameters():
            if param.grad is not None:
                (experts if name in local else dense).append(param.grad)
        device = self.device

        def squares(grads: list[Tensor]) -> Tensor:
            total = torch.zeros((), dtype=torch.float32, device=device)
            for grad in grads:
                total = total + grad.detach().float().square().sum()
            return total

        expert_sq = squares(experts)
        dist.all_reduce(expert_sq)
        total = (squares(dense) + expert_sq).sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in dense + experts:
            grad.mul_(coef.to(grad.dtype))
        return float(total)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _model_state(self) -> dict[str, Tensor]:
        """The whole model's state dict (collective under expert parallelism)."""
        state = self.module.state_dict()
        if self.expert_names:
            from pretrain.models.moe import gather_experts

            state = gather_experts(self.module, state)
        return state

    def _files(self, directory: Path) -> dict[Path, Any]:
        """What this rank's checkpoint holds: file -> object (text, or what `torch.save` takes)."""
        model = self._model_state()  # collective under expert parallelism
        files: dict[Path, Any] = {}
        if self.expert_names:  # every rank's optimizer holds the moments of its own experts
            if self.rank != 0:
                files[directory / f"optimizer_rank{self.rank}.pt"] = self.optimizer.state_dict()
            else:
                meta = {"world_size": self.world, "parameters": self.expert_names}
                files[directory / EXPERT_PARALLEL] = json.dumps(meta, indent=1)
        if self.rank == 0:
            files[directory / "engine.pt"] = {
                "model": model,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            }
        return files

    def save(self, directory: Path) -> None:
        write_files(self._files(directory))

    def save_async(self, directory: Path, group: Any) -> Callable[[], None]:
        return functools.partial(write_files, host_copy(self._files(directory)))

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "engine.pt", map_location=self.device, weights_only=True)
        meta_file = directory / EXPERT_PARALLEL
        saved_world = json.loads(meta_file.read_text())["world_size"] if meta_file.is_file() else 1
        if self.expert_names or saved_world > 1:
            if saved_world != self.world or not self.expert_names:
                raise ValueError(
                    f"{directory} was written with model.moe.expert_parallel on {saved_world} "
                    f"ranks; resume it with expert_parallel on {saved_world} ranks (this run: "
                    f"{self.world} ranks, expert_parallel="
                    f"{'on' if self.expert_names else 'off'})"
                )
            from pretrain.models.moe import local_experts

            self.module.load_state_dict(local_experts(self.module, state["model"]))
            if self.rank != 0:
                state["optimizer"] = torch.load(directory / f"optimizer_rank{self.rank}.pt",
                                                map_location=self.device, weights_only=True)  # fmt: skip
        else:
            self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict[str, Tensor] | None:
        state = self._model_state()  # collective under expert parallelism
        if self.rank != 0:
            return None
        return {key: value.detach().cpu() for key, value in state.items()}


def read_model_state(directory: Path) -> dict[str, Tensor]:
    """The whole model's weights in a checkpoint this engine wrote, read by one process on the
    CPU (`engine.pt` holds them whole, experts gathered under expert parallelism)."""
    return torch.load(Path(directory) / "engine.pt", map_location="cpu", weights_only=True)["model"]
