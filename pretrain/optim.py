"""AdamW with weight-decay groups, and the learning-rate schedules of `optim.schedule`.

Weight decay goes on the weight matrices of linear layers only. Biases, norm gains and
embedding tables are left undecayed (GPT-3, LLaMA and T5 practice): decaying a norm gain pulls
it towards zero, and decaying an embedding row shrinks it on every step whether or not its token
was seen. `optim.decay_norms_biases_embeddings=true` decays everything.

Parameters are classified by the *type of the module that owns them*, not by name patterns, so
the rule survives the wrappers the engines add:

* `torch.compile` (`OptimizedModule` holds the model as `_orig_mod`) and `checkpoint_wrapper`
  (`_checkpoint_wrapped_module`) are ordinary parent modules: the walk goes through them.
* FSDP2 (`fully_shard`) swaps a module's class for a subclass of the original and its
  parameters for DTensors, so `isinstance` and parameter identity still hold.
* FSDP1 must use `use_orig_params=True`; a `FlatParameter` has no owning layer to classify.
* DeepSpeed takes the groups at `deepspeed.initialize`, before it wraps anything.

Parameters owned by an embedding (`nn.Embedding`, including T5's relative position bias) or a
normalisation layer are exempt; everything else is decided by shape: matrices and larger are
decayed (linear weights, and expert weights stored as one 3-D tensor should MoE arrive), vectors
and scalars are not (linear biases, the encoder's MLM output bias). A parameter shared by
several modules (a head tied to the embedding) appears once, and a parameter owned by an
embedding is exempt wherever else it is used (e.g. as a tied `nn.Linear` head's weight).

Schedules are pure functions of the step (see `lr_lambda`), so a resumed run's learning rate is
the uninterrupted run's, and a run resumed with a longer `trainer.max_steps` follows the new
schedule from where it stands.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from pretrain.config import OptimConfig, use_fused
from pretrain.models import parameter_shape

# Normalisation layers whose affine parameters are never decayed. `_NormBase` covers
# BatchNorm and InstanceNorm; nn.RMSNorm exists from torch 2.4 (the floor in pyproject.toml).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
)
SCHEDULES = ("cosine", "wsd", "constant")


def exempt_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters owned by an embedding or a normalisation layer (never decayed)."""
    exempt: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag, *NORM_TYPES)):
            exempt.update(id(p) for p in module.parameters(recurse=False))
    return exempt


def param_groups(
    model: nn.Module, weight_decay: float, decay_all: bool = False
) -> list[dict[str, object]]:
    """AdamW parameter groups: `decay` (linear weight matrices) and `no_decay` (the rest).

    Args:
        model: the model, bare or wrapped by torch.compile, checkpoint_wrapper or FSDP2.
        weight_decay: decay of the `decay` group (`no_decay` gets 0.0).
        decay_all: put every parameter in the `decay` group.

    Returns:
        Non-empty groups in a fixed order, each `{"name", "params", "weight_decay"}`, with the
        parameters in `model.named_parameters()` order (the same on every rank). Frozen
        parameters (`requires_grad=False`) are left out; each trainable one appears once.
    """
    # named_parameters() yields a shared (tied) parameter once, under its first name.
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    if decay_all:
        decay, no_decay = params, []
    else:
        exempt = exempt_parameter_ids(model)
        # What remains is decided by shape: linear weights (and any other matrix) are decayed,
        # linear biases and other vectors are not.
        # (ZeRO-3's partitioned parameters are flat between gathers: their `ds_shape` counts)
        decay = [p for p in params if id(p) not in exempt and len(parameter_shape(p)) >= 2]
        no_decay = [p for p in params if id(p) in exempt or len(parameter_shape(p)) < 2]
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, device_type: str) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, ...)` with `optim.*` hyperparameters.

    Args:
        model: the (possibly wrapped) model whose parameters are trained.
        cfg: the `optim` section.
        device_type: "cuda" or "cpu": where the parameters live (decides `fused=None`).
    """
    groups = param_groups(model, cfg.weight_decay, decay_all=cfg.decay_norms_biases_embeddings)
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=use_fused(cfg, device_type),
    )


def lr_lambda(cfg: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier of step `step` (0-based: the step's optimizer update).

    * warmup (all schedules): `(step + 1) / warmup_steps` for the first `warmup_steps` steps,
      so step 0 trains at `lr / warmup_steps` (small, not a wasted zero) and the last warmup
      step at `lr`;
    * cosine: from 1 at `warmup_steps` down to `min_lr_ratio` at `max_steps` (and after);
    * wsd: 1 until the last `decay_fraction * max_steps` steps (never before warmup ends), then
      linear down to `min_lr_ratio` at `max_steps`. Linear rather than 1-sqrt: it is what
      MiniCPM's WSD uses and what `hydra_conf/optim/adamw_wsd.yaml` promises;
    * constant: 1 after warmup.

    The result is a plain function, not a callable object, on purpose: `LambdaLR.state_dict`
    saves the state of callable objects and `load_state_dict` would restore it over the current
    config. A function is skipped, so the schedule always comes from the config of the process.
    """
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={cfg.schedule!r} is not one of {SCHEDULES}")
    warmup = max(0, cfg.warmup_steps)
    floor = cfg.min_lr_ratio
    schedule = cfg.schedule
    decay_steps = round(cfg.decay_fraction * max_steps)
    decay_start = max(warmup, max_steps - decay_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "wsd":
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
            return 1.0 - (1.0 - floor) * progress
        return 1.0

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> LambdaLR:
    """A `LambdaLR` over `lr_lambda(cfg, max_steps)` for every parameter group.

    Call `scheduler.step()` once after each `optimizer.step()`; `scheduler.last_epoch` is then
    the number of optimizer steps taken, and the groups' `lr` is the next step's rate.
    """
    return LambdaLR(optimizer, lr_lambda(cfg, max_steps))


# what `load_state_dict` brings back from a checkpoint into each parameter group, and this
# run's config decides instead (the learning rate follows from the schedule's base rates)
GROUP_SETTINGS = ("initial_lr", "betas", "eps", "weight_decay")


def optimizer_settings(scheduler: LambdaLR) -> tuple[list[dict[str, Any]], list[float]]:
    """This run's hyperparameters of each parameter group and the schedule's base rates, taken
    before a checkpoint's state is loaded over them (`apply_settings`)."""
    groups = [{k: g[k] for k in GROUP_SETTINGS if k in g} for g in scheduler.optimizer.param_groups]
    return groups, list(scheduler.base_lrs)


def apply_settings(scheduler: LambdaLR, settings: tuple[list[dict[str, Any]], list[float]]) -> None:
    """After a resume: the optimizer's hyperparameters and the schedule's base rates are this
    run's config's again, not the checkpoint's (which the optimizer's and `LambdaLR`'s
    `load_state_dict` restore), and each group's learning rate is the schedule's at the step
    the run stands at. With the same config nothing changes, bit for bit (the same product
    `LambdaLR` computes)."""
    groups, base_lrs = settings
    for group, ours in zip(scheduler.optimizer.param_groups, groups, strict=True):
        group.update(ours)
    scheduler.base_lrs = list(base_lrs)
    for group, base, multiplier in zip(scheduler.optimizer.param_groups, base_lrs,
                                       scheduler.lr_lambdas, strict=True):  # fmt: skip
        group["lr"] = base * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
