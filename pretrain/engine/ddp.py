"""Plain data parallel: PyTorch DDP (or the bare model on one rank), torch AdamW."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.engine import Engine, compute_loss, finite


class DDPEngine(Engine):
    """Every rank holds full weights, gradients and optimizer state."""

    def __init__(self, cfg: Any, model: nn.Module, accumulation: int, max_steps: int,
                 device: torch.device) -> None:  # fmt: skip
        from pretrain.optim import build_optimizer, build_scheduler

        self.module = model
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            model = DistributedDataParallel(model, bucket_cap_mb=cfg.engine.bucket_cap_mb)
        super().__init__(model, accumulation, device)
        self.optimizer = build_optimizer(self.module, cfg.optim, device_type=device.type)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, max_steps)
        self.grad_clip = cfg.optim.grad_clip

    def forward_backward(
        self, batch: dict[str, Tensor], last: bool, poison: bool = False
    ) -> Tensor:
        sync = contextlib.nullcontext()
        if isinstance(self.model, DistributedDataParallel) and not last:
            sync = self.model.no_sync()  # all-reduce once per step, on the last micro-batch
        with sync:
            loss = compute_loss(self.model, self.to_device(batch))
            if poison:
                loss = loss * float("nan")
            (loss / self.accumulation).backward()
        return loss.detach()

    def optimizer_step(self) -> tuple[float, bool]:
        parameters = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        skipped = not finite(norm)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm, skipped

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, directory: Path) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            state = {
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            }
            torch.save(state, directory / "engine.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "engine.pt", map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict[str, Tensor] | None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return {key: value.detach().cpu() for key, value in self.module.state_dict().items()}
