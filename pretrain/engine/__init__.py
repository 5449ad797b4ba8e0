"""Engines: how a finished model is distributed, stepped and checkpointed.

This package is the one place that applies parallelism (and builds a DeepSpeed config). Every
engine is applied to a model built by `pretrain.models.build_model`, in a fixed order: the FP8
conversion of the blocks' linear layers (`engine.float8`, `float8.py`), activation
checkpointing, then `torch.compile` of each block (and of the cross-entropy), then sharding or
replication; or, with `compile_scope` "loss", the engine compiles the forward together
with the cross-entropy. The trainer drives all of them through `Engine`:

    loss = engine.forward_backward(batch, last_micro_batch)   # for each micro-batch
    grad_norm, skipped = engine.optimizer_step()               # once per step
    loss_sums, targets = engine.eval_row_losses(batch)         # evaluation: per row (sample)
    engine.save(directory) / engine.load(directory)            # collective

`skipped` is True when the gradient was not finite: the update is dropped (and counted by the
trainer), the same decision on every rank because the norm is computed after the all-reduce.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pretrain.models.loss import IGNORE_INDEX, collect_z_loss, cross_entropy, cross_entropy_terms

# engine.attention_backends: the names of torch's scaled_dot_product_attention backends
ATTENTION_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def language_model(model: nn.Module) -> nn.Module:
    """The model an engine wraps (DDP and DeepSpeed keep it as `.module`; FSDP2 wraps none)."""
    return getattr(model, "module", model)


def lm_loss(model: nn.Module, batch: dict[str, Tensor],
            loss: Callable[..., Tensor] = cross_entropy,
            z_terms: Callable[..., tuple[Tensor, Tensor]] = cross_entropy_terms) -> Tensor:  # fmt: skip
    """`loss` (the fp32 cross-entropy; compiled under compile_scope=blocks) of the model's
    logits against `labels`; in training with the model's `z_loss` set (`objective.z_loss`),
    `z_terms`'s cross-entropy plus z-loss instead, whose z-loss term it leaves in the model's
    `last_z_loss` (as the model's own loss does, `labelled_loss`)."""
    inputs = {key: value for key, value in batch.items() if key not in ("labels", "index")}
    logits = model(**inputs)
    inner = language_model(model)
    z_loss = getattr(inner, "z_loss", 0.0)
    if z_loss > 0 and inner.training:
        total, inner.last_z_loss = z_terms(logits, batch["labels"], z_loss)
        return total
    return loss(logits, batch["labels"])


def labelled_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The loss the model computes itself given `labels` (`engine.loss_chunk_tokens`: its head
    and cross-entropy in chunks, `pretrain.models.loss.linear_cross_entropy`)."""
    inputs = {key: value for key, value in batch.items() if key not in ("labels", "index")}
    return model(**inputs, labels=batch["labels"])


def lm_token_losses(model: nn.Module, batch: dict[str, Tensor],
                    loss: Callable[..., Tensor] = cross_entropy) -> Tensor:  # fmt: skip
    """`lm_loss` of each position: (B, T) fp32, 0 where there is no label."""
    inputs = {key: value for key, value in batch.items() if key not in ("labels", "index")}
    return loss(model(**inputs), batch["labels"], reduction="none")


def labelled_token_losses(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """`labelled_loss` of each position: (B, T) fp32, 0 where there is no label."""
    inputs = {key: value for key, value in batch.items() if key not in ("labels", "index")}
    return model(**inputs, labels=batch["labels"], reduction="none")


LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


def compute_loss(model: nn.Module, batch: dict[str, Tensor], lm: LossFn = lm_loss) -> Tensor:
    """`lm(model, batch)` (the cross-entropy, plus the z-loss with `objective.z_loss`; a
    compiled `lm_loss` under `compile_scope=loss`) plus, in training, the weighted
    load-balancing and router z-losses of MoE layers (if any). The MoE losses and the z-loss
    term are gathered here, outside any compiled region: the forward leaves them on the
    layers (the model) and `collect_moe_losses` (`collect_z_loss`) moves them into
    Python-side accumulators, which the trainer reads once per step to log them apart."""
    from pretrain.models.moe import collect_moe_losses

    loss = lm(model, batch)
    collect_z_loss(language_model(model))
    aux = collect_moe_losses(model)
    return loss if aux is None else loss + aux


def compile_scope(engine_cfg: Any) -> str:
    """What `engine.compile` compiles: "loss" (the whole forward and the cross-entropy as one
    function; DDP and one rank) or "blocks" (each transformer block; FSDP2 and DeepSpeed, which
    hook every block, and DDP under context parallelism). `engine.compile_scope=auto` picks."""
    scope = engine_cfg.compile_scope
    if scope != "auto":
        return scope
    if engine_cfg.kind == "ddp" and getattr(engine_cfg, "context_parallel", 1) == 1:
        return "loss"
    return "blocks"


class Engine(abc.ABC):
    """One training step's mechanics for a distributed model."""

    def __init__(self, model: nn.Module, accumulation: int, device: torch.device) -> None:
        self.model = model
        self.accumulation = accumulation
        self.device = device
        # replaced under engine.compile: compiled whole (compile_scope=loss), or with its
        # cross-entropy compiled (blocks)
        self.lm_loss: LossFn = lm_loss
        self.token_losses: LossFn = lm_token_losses  # evaluation's, computed as `lm_loss` is
        self.attention_backends: list[str] = []  # engine.attention_backends ([]: torch's choice)

    def compile_loss(self, mode: str = "default") -> None:
        """Compile the model's forward with the cross-entropy as one function: the fp32 logits
        are then never written out whole (the cast, log-softmax and gather fuse into the head's
        output), which on a GPU is most of the gain of compiling (bench/gpu_models.py: 1.24x
        over compiling the model alone, half the peak memory at gpt2_124m)."""
        self.lm_loss = torch.compile(self.lm_loss, mode=mode)
        self.token_losses = torch.compile(self.token_losses, mode=mode)

    def compile_cross_entropy(self, mode: str = "default") -> None:
        """Compile the cross-entropy over the model's logits (compile_scope=blocks, where the
        forward cannot be compiled whole): the fp32 cast, log-softmax and their gradient fuse
        into kernels that keep only the logits and their gradient (2 elements per logit, not
        the eager loss's 12 bytes), as torchtitan compiles its loss."""
        compiled = torch.compile(cross_entropy, mode=mode)
        terms = torch.compile(cross_entropy_terms, mode=mode)  # objective.z_loss: compiled if used
        self.lm_loss = functools.partial(lm_loss, loss=compiled, z_terms=terms)
        self.token_losses = functools.partial(lm_token_losses, loss=compiled)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The training loss of one micro-batch already on the device (forward only)."""
        with self.attention_context():
            return compute_loss(self.model, batch, self.lm_loss)

    def attention_context(self) -> Any:
        """The forward pass's choice of attention kernels (`engine.attention_backends`): the
        backends `scaled_dot_product_attention` may use, in this order of preference. Entered
        outside any compiled region (a compiled forward picks its kernel when it is traced);
        the backward pass follows the forward's kernel."""
        if not self.attention_backends:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [getattr(SDPBackend, ATTENTION_BACKENDS[n]) for n in self.attention_backends]
        return sdpa_kernel(backends, set_priority=True)

    @abc.abstractmethod
    def forward_backward(
        self, batch: dict[str, Tensor], last: bool, poison: bool = False
    ) -> Tensor:
        """Forward and backward one micro-batch; returns its (detached, unscaled) loss.

        `poison` multiplies the loss by NaN before the backward pass (fault-injection tests).
        """

    @abc.abstractmethod
    def optimizer_step(self) -> tuple[float, bool]:
        """Clip, check and apply the accumulated gradient. Returns (grad norm, skipped)."""

    @abc.abstractmethod
    def lr(self) -> float: ...

    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        """Write model, optimizer and scheduler state into `directory` (collective)."""

    def save_async(self, directory: Path, group: Any) -> Callable[[], None]:
        """`save` in two parts (`trainer.async_checkpoint`): copy the state into host memory
        now (collective) and return what writes those copies into `directory`, which a
        background thread calls while training goes on. `group` is a gloo process group only
        that thread uses (None at one rank)."""
        raise NotImplementedError(f"{type(self).__name__} writes no checkpoint in the background")

    @abc.abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what `save` wrote (collective)."""

    @abc.abstractmethod
    def full_state_dict(self) -> dict[str, Tensor] | None:
        """The whole model's state dict on rank 0 (None elsewhere), for export (collective)."""

    def compute_context(self) -> Any:
        """The context forward passes run in (autocast for engines that need it)."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def eval_row_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """One micro-batch in evaluation mode: per row, the sum of its labelled positions'
        fp32 losses and their number, both (B,) on the device. Their totals' ratio is the
        micro-batch's mean loss; grouped by row, the loss of each sample (each source)."""
        was_training = self.model.training
        self.model.eval()
        try:
            batch = self.to_device(batch)
            with self.compute_context(), self.attention_context():
                losses = self.token_losses(self.model, batch)  # (B, T)
            # summed at once: a CUDA-graph output (compile_mode=reduce-overhead) is overwritten
            # by the next call
            labelled = batch["labels"] != IGNORE_INDEX
            return losses.float().flatten(1).sum(1), labelled.flatten(1).sum(1)
        finally:
            self.model.train(was_training)

    def to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}


def finite(value: float) -> bool:
    return math.isfinite(value)


BUILD_TIMEOUT = datetime.timedelta(hours=2)  # how long ranks wait for rank 0's weights


@contextlib.contextmanager
def host_threads() -> Any:
    """Every CPU this process may use for torch's intra-op threads, for a while (rank 0's
    build of the weights, while the other ranks of its node wait)."""
    before = torch.get_num_threads()
    affinity = getattr(os, "sched_getaffinity", None)  # Linux: the CPUs Slurm gave the task
    cpus = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    torch.set_num_threads(max(before, cpus))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sharded_build(engine_cfg: Any) -> str | None:
    """How the ranks build a model whose weights the engine shards: "meta" (FSDP2: on the meta
    device, no memory), "zero3" (DeepSpeed ZeRO-3: under `deepspeed.zero.Init`, each parameter
    partitioned as it is made), or None (DDP, ZeRO-1/2: every rank holds every weight, so
    every rank builds them)."""
    from pretrain.config import DeepSpeedEngineConfig, FSDPEngineConfig

    if isinstance(engine_cfg, FSDPEngineConfig):
        return "meta"
    if isinstance(engine_cfg, DeepSpeedEngineConfig) and engine_cfg.zero_stage == 3:
        return "zero3"
    return None


WEIGHTS_FROM = ("seed", "init_from", "checkpoint")


def build_model_for_engine(cfg: Any, *, device: torch.device, accumulation: int, seed: int,
                           weights_from: str = "seed") -> tuple[nn.Module, nn.Module | None]:  # fmt: skip
    """The model this rank hands to `build_engine`, and the weights the engine gives it.

    `weights_from`: "seed" (a new run: initialised from `seed`), "init_from" (a new run whose
    weights `trainer.init_from` loads) or "checkpoint" (a resumed run, which the engine's load
    fills). Only "seed" spends time initialising; the others build the model empty
    (`empty_model`): no draws, whose values would be overwritten.

    DDP and ZeRO-1/2 keep every weight on every rank: each rank builds the model whole, seeded
    alike, on `device`; the second value is None.

    FSDP2 and ZeRO-3 keep a shard of each weight per rank. Building the whole fp32 model on
    every GPU first would need 4 bytes per parameter on each of them at start-up (a 46.7B MoE:
    174 GiB, more than an H200 holds, for a run that then needs 35 GiB per GPU). Instead rank 0
    alone builds the weights in host memory (seeded: the same weights a whole build gives, or
    empty for `trainer.init_from` to load into; returned second, None on the other ranks and
    when resuming), and every rank builds an empty model (see `sharded_build`). The engine then
    copies rank 0's weights into the shards one tensor at a time (`FSDPEngine`,
    `DeepSpeedEngine`, `scatter=True`), so a GPU holds its shards plus one whole tensor.
    """
    import torch.distributed as dist

    from pretrain.models import build_model, empty_model

    if weights_from not in WEIGHTS_FROM:
        raise ValueError(f"weights_from={weights_from!r} is not one of {WEIGHTS_FROM}")
    torch.manual_seed(seed)
    seeded = weights_from == "seed"
    kind = sharded_build(cfg.engine)
    if kind is None:
        if seeded:
            return build_model(cfg.model).to(device), None
        return empty_model(cfg.model, device), None
    rank = dist.get_rank() if dist.is_initialized() else 0
    weights = None
    if seeded:
        several = dist.is_initialized() and dist.get_world_size() > 1
        # The other ranks wait for rank 0's build (minutes at tens of billions of parameters:
        # its init draws some 150M normal values a second per thread) on a gloo group of their
        # own, whose timeout, unlike NCCL's 10 minutes, allows for that.
        waiting = dist.new_group(backend="gloo", timeout=BUILD_TIMEOUT) if several else None
        if rank == 0:
            with host_threads():  # the values do not depend on the thread count
                weights = build_model(cfg.model)
        if several:
            # every rank goes on from the random state rank 0's build left (a whole build's)
            state = torch.get_rng_state()
            dist.broadcast(state, src=0, group=waiting)
            torch.set_rng_state(state)
            dist.destroy_process_group(waiting)
    elif weights_from == "init_from" and rank == 0:
        weights = empty_model(cfg.model, "cpu")
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # the empty model's own init draws nothing
        if kind == "meta":
            with torch.device("meta"):
                return build_model(cfg.model), weights
        from pretrain.engine.deepspeed_engine import zero3_init

        with zero3_init(cfg, accumulation, device):
            return build_model(cfg.model), weights


def build_engine(cfg: Any, model: nn.Module, *, accumulation: int, max_steps: int,
                 device: torch.device, weights: nn.Module | None = None,
                 scatter: bool = False) -> Engine:  # fmt: skip
    """The engine `cfg.engine` names, wrapping `model` (from `build_model_for_engine`: on
    `device`, or empty; with `scatter`, the engine fills it with rank 0's `weights`)."""
    from pretrain.models import apply_activation_checkpointing

    if cfg.engine.float8:
        _convert_to_float8(cfg, model, device)
    if cfg.engine.activation_checkpointing:
        apply_activation_checkpointing(model, cfg.engine.activation_checkpointing_every)
    scope = compile_scope(cfg.engine)
    if cfg.engine.compile and scope == "blocks" and getattr(cfg.engine, "zero_stage", 0) == 3:
        # ZeRO-3 hooks every submodule (to gather its parameters): a compiled block would be
        # cut at each of them and traced again as the gathered state changes
        from pretrain.checkpoint import rank_and_world

        if rank_and_world()[0] == 0:
            print("kiln train: engine.compile with ZeRO-3 compiles the cross-entropy only; "
                  "the blocks stay eager (DeepSpeed hooks every submodule)", file=sys.stderr)  # fmt: skip
    elif cfg.engine.compile and scope == "blocks":
        from pretrain.models import transformer_blocks

        for blocks in transformer_blocks(model):
            for block in blocks:
                # the block's forward, in place: not wrapped in an OptimizedModule, so the
                # parameter names (which checkpoints and exports carry) stay the model's own,
                # and not its `__call__`, so an engine's hooks on the block (FSDP2's
                # all-gathers) stay outside the compiled code
                block.forward = torch.compile(block.forward, mode=cfg.engine.compile_mode)
    if cfg.objective.z_loss > 0:  # the training loss's z-loss (before sharding, as below)
        model.z_loss = cfg.objective.z_loss
    chunked = cfg.engine.loss_chunk_tokens > 0
    if chunked:  # before sharding: FSDP2 and DeepSpeed keep the module's attributes
        model.loss_chunk_tokens = cfg.engine.loss_chunk_tokens
        # outside a forward compiled whole, each chunk's softmax and gradient compiled apart
        model.loss_chunk_compiled = cfg.engine.compile and scope != "loss"
    engine = _engine(
        cfg, model, accumulation, max_steps, device, weights if scatter else None, scatter
    )
    engine.attention_backends = list(cfg.engine.attention_backends)
    if chunked:
        engine.lm_loss, engine.token_losses = labelled_loss, labelled_token_losses
    if cfg.engine.compile and scope == "loss":
        engine.compile_loss(cfg.engine.compile_mode)
    elif cfg.engine.compile and not chunked:
        engine.compile_cross_entropy(cfg.engine.compile_mode)
    return engine


def _convert_to_float8(cfg: Any, model: nn.Module, device: torch.device) -> None:
    """`engine.float8`: the blocks' linear layers as torchao's Float8Linear (`float8.py`)."""
    from pretrain.checkpoint import rank_and_world
    from pretrain.config import FSDPEngineConfig
    from pretrain.engine.float8 import apply_float8, float8_all_gathers

    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(
            f"engine.float8=true needs FP8 tensor cores (compute capability 8.9 or later: Ada, "
            f"Hopper, Blackwell); {name} has {torch.cuda.get_device_capability(device)}"
        )
    fsdp = isinstance(cfg.engine, FSDPEngineConfig)
    converted, total = apply_float8(model, cfg.engine, fsdp=fsdp)
    if rank_and_world()[0] == 0:
        gathered = ", all-gathered in FP8" if fsdp and float8_all_gathers(cfg.engine) else ""
        print(f"kiln train: engine.float8 ({cfg.engine.float8_recipe}{gathered}): {converted} of "
              f"the blocks' {total} linear layers run as FP8 matmuls", file=sys.stderr)  # fmt: skip


def _engine(cfg: Any, model: nn.Module, accumulation: int, max_steps: int,
            device: torch.device, weights: nn.Module | None, scatter: bool) -> Engine:  # fmt: skip
    from pretrain.config import DDPEngineConfig, DeepSpeedEngineConfig, FSDPEngineConfig

    if isinstance(cfg.engine, DeepSpeedEngineConfig):
        from pretrain.engine.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, accumulation, max_steps, device, weights, scatter)
    if isinstance(cfg.engine, FSDPEngineConfig):
        from pretrain.engine.fsdp import FSDPEngine

        return FSDPEngine(cfg, model, accumulation, max_steps, device, weights, scatter)
    if isinstance(cfg.engine, DDPEngineConfig):
        from pretrain.engine.ddp import DDPEngine

        return DDPEngine(cfg, model, accumulation, max_steps, device)
    raise TypeError(f"no engine for {type(cfg.engine).__name__}")
