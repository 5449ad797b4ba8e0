"""DeepSpeed ZeRO (stages 0-3, optional CPU offload) behind the `Engine` interface.

`deepspeed_config` is the one place a DeepSpeed config dict is built, from the typed
`DeepSpeedEngineConfig`. The optimizer and schedule are ours (`pretrain.optim`: torch AdamW
over the weight-decay groups, `LambdaLR`), handed to `deepspeed.initialize`, which partitions
them.

Stepping. DeepSpeed owns gradient accumulation: every micro-batch runs `engine.backward` and
`engine.step`, and the update happens inside the `engine.step` of the last micro-batch (the
accumulation boundary, which must agree with the trainer's `last`). `optimizer_step` then only
reports what happened.

Non-finite losses. After each micro-batch's forward, a flag all-reduced with MIN tells every
rank whether the loss is finite on all of them, so every rank takes the same branch:

* a micro-batch whose loss is not finite anywhere gets no backward pass (on any rank), and
  neither do the later micro-batches of the same step (their forward still runs, for the
  loss metric);
* the step is dropped as a whole, like DDP and FSDP where one NaN micro-batch poisons the
  accumulated gradient: the gradients the step's earlier, finite micro-batches had already
  accumulated (reduced into ZeRO's partitions) are discarded, no parameter or optimizer state
  changes, and the step is reported as skipped (`optimizer_step` returns `skipped=True`).
  Discarding goes through DeepSpeed's own non-finite-gradient path (the one fp16 overflow
  uses; ZeRO stages 1-3 and the bf16 optimizer check the global gradient norm before the
  update, clear every accumulated gradient and skip the update when it is not finite): on the
  step's last micro-batch a poisoned step runs its one backward on a NaN-valued loss, so the
  check trips on every rank. Plain fp32 stage 0 has no such check (DeepSpeed hands the torch
  optimizer the gradients as they are): there this engine drops the gradients itself before
  `engine.step`, and also when the reduced gradient norm is not finite;
* DeepSpeed does not advance the schedule on a step it skips; this engine does, so the
  learning rate stays a function of the step number, as with the other engines.

A step whose losses are finite but whose gradient is not (an overflow in backward) is dropped
by the same DeepSpeed check and reported as skipped too.

Checkpoints are DeepSpeed's (`save_checkpoint` / `load_checkpoint` with optimizer and
scheduler state, under the tag `deepspeed`), and resume bitwise on CPU at the world size that
wrote them. ZeRO partitions the optimizer state by data-parallel rank, and DeepSpeed's plain
`load_checkpoint` cannot repartition it, so a checkpoint written by another number of ranks
goes through DeepSpeed's Universal Checkpointing instead (`load` decides from the world size
recorded next to the checkpoint): rank 0 converts the checkpoint once with
`deepspeed.checkpoint.ds_to_universal` (ZeRO 1-3: one file per parameter for the fp32 master
weight and each Adam moment, plus the optimizer's param groups and step) into
`deepspeed_universal/` inside the checkpoint directory (written under a temporary name and
renamed, so a directory that exists is complete and a later resume reuses it), and every rank
then loads it with DeepSpeed's `checkpoint.load_universal` switched on for that one call,
slicing its own partition of weights and moments. Nothing is lost: the weights, both Adam
moments, the optimizer step and the schedule continue; only the floating-point reduction
order differs from an uninterrupted run at the old world size. ZeRO stage 0 keeps the whole
optimizer state on every rank and loads at any world size as it is. The ZeRO stage must match
the one that wrote the checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pretrain.engine import Engine, compute_loss, finite

TAG = "deepspeed"  # the checkpoint's sub-directory (DeepSpeed's "tag")
META = "deepspeed_engine.json"  # world size and stage of the run that wrote a checkpoint
UNIVERSAL = "deepspeed_universal"  # a checkpoint converted for another world size (cached)
STEPS_PER_PRINT = 2**30  # DeepSpeed's own progress lines: never (the trainer logs)
PRECISIONS = ("auto", "bf16", "fp32")
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.",)  # what module.state_dict() leaves out


def _device_type(cfg: Any) -> str:
    cuda = cfg.cluster.accelerator == "cuda" and torch.cuda.is_available()
    return "cuda" if cuda else "cpu"


def uses_bf16(precision: str, device_type: str) -> bool:
    """bf16 weights and compute: on CUDA for `auto` and `bf16`; CPU runs train in fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"engine.precision={precision!r} is not one of {PRECISIONS}")
    return device_type == "cuda" and precision in ("auto", "bf16")


def deepspeed_config(
    cfg: Any,
    accumulation: int,
    world: int,
    *,
    device_type: str | None = None,
    parameters: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict of a run.

    Args:
        cfg: the whole run config (`engine` must be a `DeepSpeedEngineConfig`; `data` gives
            the micro-batch size, `optim.grad_clip` the clipping norm).
        accumulation: micro-batches per optimizer step on each rank.
        world: data-parallel ranks.
        device_type: "cuda" or "cpu"; None: CUDA when `cluster.accelerator` is cuda and a GPU
            is visible (how `pretrain.train` picks the device).
        parameters: the model's parameter count, when known: the bucket sizes are capped at
            it (ZeRO allocates its buckets in full, and a 200M-element bucket for a small model
            is gigabytes of memory and most of the step time).
    """
    engine = cfg.engine
    device_type = device_type or _device_type(cfg)
    stage = engine.zero_stage
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.zero_stage={stage} is not one of 0, 1, 2, 3")
    if engine.offload_params and stage != 3:
        raise ValueError("engine.offload_params needs engine.zero_stage=3")
    if engine.offload_optimizer and stage == 0:
        raise ValueError("engine.offload_optimizer needs engine.zero_stage >= 1")
    cap = max(1, parameters) if parameters else None
    reduce_bucket = min(int(engine.reduce_bucket_size), cap or engine.reduce_bucket_size)
    allgather_bucket = min(int(engine.allgather_bucket_size), cap or engine.allgather_bucket_size)
    zero: dict[str, Any] = {"stage": stage}
    if stage > 0:
        zero.update(
            overlap_comm=engine.overlap_comm,
            contiguous_gradients=True,
            reduce_bucket_size=reduce_bucket,
        )
    if stage in (1, 2):
        zero["allgather_bucket_size"] = allgather_bucket
    pin = device_type == "cuda"  # pinned host memory needs a GPU to pin for
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    micro = cfg.data.micro_batch_size
    bf16 = uses_bf16(engine.precision, device_type)
    clip = float(max(0.0, cfg.optim.grad_clip))  # 0: no clipping
    config: dict[str, Any] = {
        "train_batch_size": micro * accumulation * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        # fp32 stage 0 hands the torch optimizer plain gradients: the engine clips them itself
        # (`engine_clips`), so that it sees the norm and can drop a non-finite step
        "gradient_clipping": 0.0 if engine_clips(stage, bf16) else clip,
        "zero_optimization": zero,
        # check_grad_overflow: skip a step whose bf16 gradient is not finite (see the module doc)
        "bf16": {"enabled": True, "check_grad_overflow": True} if bf16 else {"enabled": False},
        "zero_allow_untested_optimizer": True,  # our torch AdamW
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if engine.offload_optimizer or engine.offload_params:
        config["zero_force_ds_cpu_optimizer"] = False  # keep the torch AdamW on offloaded state
    return config


def import_deepspeed() -> Any:
    """`deepspeed`, set up for this process. On the CPU accelerator, DeepSpeed's process group
    builds its shared-memory all-reduce op when it starts (a C++ JIT build: about a minute on
    2 cores the first time on a machine, and a compiler it needs) although only DeepSpeed's
    `inference_all_reduce` calls it, which training never does; marking the op incompatible
    in `deepspeed.ops.__compatible_ops__` (a dict DeepSpeed keeps for edits) skips the build,
    and the collectives stay torch.distributed's (gloo)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # ZeRO-3 calls torch's deprecated names of these collectives, in zero.Init and each step:
    # ~16 copies of the same FutureWarning per step (filter changes reset the registry that
    # shows a warning once per place), not kiln's to act on
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|"
                            r"reduce_scatter_tensor)` is deprecated")  # fmt: skip

    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def zero3_init(cfg: Any, accumulation: int, device: torch.device) -> Any:
    """The context ZeRO-3 ranks build the model in (`build_model_for_engine`): DeepSpeed's
    `zero.Init`, which partitions each parameter over the ranks as soon as its module is made,
    so no rank ever holds the whole model. The values made there are placeholders:
    `scatter_weights` replaces them with rank 0's."""
    deepspeed = import_deepspeed()

    from pretrain.models.accounting import count_parameters

    world = dist.get_world_size() if dist.is_initialized() else 1
    config = deepspeed_config(cfg, accumulation, world, device_type=device.type,
                              parameters=count_parameters(cfg.model).total)  # fmt: skip
    # DeepSpeed's own process group starts with `deepspeed.initialize`: until then it counts
    # one rank, so the batch size is left for it to derive (micro x accumulation x ranks)
    del config["train_batch_size"]
    return deepspeed.zero.Init(config_dict_or_path=config)


def scatter_weights(module: nn.Module, weights: nn.Module | None) -> None:
    """Copy rank 0's whole `weights` (None on the other ranks) into the partitions of `module`,
    built under `zero3_init`: each parameter is gathered whole, rank 0 writes it and DeepSpeed
    partitions rank 0's values again (`GatheredParameters` with `modifier_rank=0`), one
    parameter at a time."""
    import deepspeed

    rank = dist.get_rank() if dist.is_initialized() else 0
    if weights is None and rank == 0:
        raise ValueError("a ZeRO-3 model built under zero.Init needs rank 0's weights")
    sources = dict(weights.named_parameters()) if weights is not None else {}
    for name, parameter in module.named_parameters():
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0), torch.no_grad():
            if rank == 0:
                parameter.data.copy_(sources[strip_wrappers(name)])


def engine_clips(stage: int, bf16: bool) -> bool:
    """Whether `DeepSpeedEngine` (not DeepSpeed) clips and checks the gradient: fp32 stage 0,
    where DeepSpeed steps the torch optimizer directly and has no non-finite check."""
    return stage == 0 and not bf16


def strip_wrappers(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        key = key.replace(prefix, "")
    return key


def _record_cache(root: Path) -> None:
    """A converted checkpoint's checksums.json (as a training checkpoint's): its reuse by a
    later resume checks it first (`_cache_changes`)."""
    from data_pipeline.shards import atomic_write_bytes
    from pretrain.checkpoint_io import CHECKSUMS, file_sha256

    files = {
        p.relative_to(root).as_posix(): {"sha256": file_sha256(p, sync=True), "bytes": p.stat().st_size}
        for p in sorted(root.rglob("*")) if p.is_file()
    }  # fmt: skip
    record = {"algorithm": "sha256", "files": files}
    atomic_write_bytes(root / CHECKSUMS, json.dumps(record, indent=1).encode())


def _cache_changes(root: Path) -> str:
    """How the converted checkpoint at `root` differs from what its conversion wrote, in words
    ("" when it does not, or when it predates recorded checksums)."""
    from pretrain.checkpoint_io import CheckpointError, file_problems, recorded_files

    try:
        files = recorded_files(root, {})
    except CheckpointError as error:
        return str(error)
    problems = file_problems(root, sorted(files), files) if files else []
    if not problems:
        return ""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more} since the conversion"


def convert_to_universal(source: Path, target: Path, *, log: Path | None = None) -> None:
    """DeepSpeed's `ds_to_universal` on the tag directory `source` (a ZeRO 1-3 checkpoint of
    any number of ranks), writing the universal checkpoint's tag directory `target` and a
    `latest_universal` file next to it. In this process (no worker pool: a torch.distributed
    process should not fork); DeepSpeed's progress output goes to `log`."""
    from deepspeed.checkpoint import ds_to_universal

    args = SimpleNamespace(input_folder=str(source), output_folder=str(target),
                           num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                           strict=True, inject_missing_state=True)  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if log is not None:
            stream = stack.enter_context(open(log, "w"))
            stack.enter_context(contextlib.redirect_stdout(stream))
            stack.enter_context(contextlib.redirect_stderr(stream))
        ds_to_universal.main(args)


def _not_a_tensor_parallel_note(record: logging.LogRecord) -> bool:
    """Drop DeepSpeed's "MPU is not provided, setting tp size to 1" on loading a universal
    checkpoint (a resume at another world size): kiln uses no tensor parallelism, so it is
    what DeepSpeed should do, said on every rank."""
    return not record.getMessage().startswith("MPU is not provided")


class DeepSpeedEngine(Engine):
    """ZeRO stage `engine.zero_stage` over all ranks, stepped by DeepSpeed."""

    def __init__(self, cfg: Any, model: nn.Module, accumulation: int, max_steps: int,
                 device: torch.device, weights: nn.Module | None = None,
                 scatter: bool = False) -> None:  # fmt: skip
        deepspeed = import_deepspeed()

        from pretrain.optim import build_optimizer, build_scheduler

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        logging.getLogger("DeepSpeed").addFilter(_not_a_tensor_parallel_note)
        self.module = model
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.stage = cfg.engine.zero_stage
        self.grad_clip = cfg.optim.grad_clip
        self.run_dir = Path(cfg.trainer.run_dir)
        if scatter:  # built under zero3_init; not when resuming, which the load fills
            scatter_weights(model, weights)
        from pretrain.models import parameter_numel

        numel = sum(parameter_numel(p) for p in model.parameters())
        config = deepspeed_config(cfg, accumulation, self.world, device_type=device.type,
                                  parameters=numel)  # fmt: skip
        # With the optimizer state offloaded, AdamW steps CPU tensors (decides `fused`).
        optimizer_device = "cpu" if cfg.engine.offload_optimizer else device.type
        optimizer = build_optimizer(model, cfg.optim, device_type=optimizer_device)
        self.scheduler = build_scheduler(optimizer, cfg.optim, max_steps)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                lr_scheduler=self.scheduler, config=config,
                                                dist_init_required=False)  # fmt: skip
        super().__init__(self.ds, accumulation, device)
        # DeepSpeed's wrapped optimizers (ZeRO 1-3, bf16) drop a step whose gradient is not
        # finite and say so through `overflow`; plain fp32 stage 0 steps the torch optimizer.
        self.engine_clips = engine_clips(self.stage, uses_bf16(cfg.engine.precision, device.type))
        if not self.engine_clips and not hasattr(self.ds.optimizer, "overflow"):
            raise RuntimeError(
                f"DeepSpeed optimizer {type(self.ds.optimizer).__name__} has no non-finite check"
            )
        self._poisoned = False  # a non-finite loss in the step being accumulated
        self._dropped = False  # this engine dropped the step's gradients (fp32 stage 0)
        self._step_lr: float | None = None  # the step's lr, read before ds.step() moves it
        self._norm: float | None = None  # fp32 stage 0: the step's gradient norm

    def _finite_everywhere(self, loss: Tensor) -> bool:
        flag = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def forward_backward(
        self, batch: dict[str, Tensor], last: bool, poison: bool = False
    ) -> Tensor:
        boundary = self.ds.is_gradient_accumulation_boundary()
        if boundary != last:
            raise RuntimeError(
                f"DeepSpeed's accumulation boundary ({boundary}) disagrees with the trainer's "
                f"last micro-batch ({last}): gradient_accumulation_steps != {self.accumulation}?"
            )
        with self.attention_context():
            loss = compute_loss(self.ds, self.to_device(batch), self.lm_loss)
        if poison:
            loss = loss * float("nan")
        if not self._finite_everywhere(loss):
            self._poisoned = True
        if not self._poisoned:
            self.ds.backward(loss)
        elif last and not self.engine_clips:
            # One backward of a NaN loss: DeepSpeed's non-finite check then discards every
            # gradient accumulated for this step and skips the update (on every rank).
            self.ds.backward(loss * float("nan"))
        if last and self.engine_clips:
            self._check_plain_gradients()
        if last:  # ds.step() moves the schedule on: `lr()` is asked after it, for this step
            self._step_lr = float(self.ds.get_lr()[0])
        self.ds.step()  # applies (or skips) the update on the last micro-batch
        return loss.detach()

    def _check_plain_gradients(self) -> None:
        """fp32 stage 0, at the boundary (after DeepSpeed's all-reduce): clip like the other
        engines, or drop the gradients when the step is poisoned or their norm not finite."""
        parameters = [p for p in self.module.parameters() if p.grad is not None]
        if self._poisoned or not parameters:
            norm = float("nan")
        else:
            max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
            norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        self._norm = norm
        if not finite(norm):
            for parameter in self.module.parameters():
                parameter.grad = None  # torch AdamW leaves a parameter without a gradient alone
            self._dropped = True

    def optimizer_step(self) -> tuple[float, bool]:
        applied = self.ds.was_step_applied()
        skipped = self._poisoned or self._dropped or not applied
        if not applied:
            self.scheduler.step()  # DeepSpeed holds the schedule on a skipped step; we do not
        if self._norm is not None:
            norm = self._norm
        else:
            value = self.ds.get_global_grad_norm()
            norm = float("nan") if value is None else float(value)
        self._poisoned = self._dropped = False
        self._norm = None
        self._step_lr = None
        return norm, skipped

    def lr(self) -> float:
        """This step's learning rate (the one its update used), as the other engines give."""
        if self._step_lr is not None:
            return self._step_lr
        return float(self.ds.get_lr()[0])

    def save(self, directory: Path) -> None:
        self.ds.save_checkpoint(str(directory), tag=TAG, client_state={}, save_latest=False)
        if self.rank == 0:
            meta = {"world_size": self.world, "zero_stage": self.stage}
            (Path(directory) / META).write_text(json.dumps(meta))

    def load(self, directory: Path) -> None:
        meta_path = Path(directory) / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory}: not a DeepSpeed engine checkpoint (no {META})")
        meta = json.loads(meta_path.read_text())
        if meta["zero_stage"] != self.stage:
            raise RuntimeError(
                f"{directory} was written with engine.zero_stage={meta['zero_stage']}; this run "
                f"uses zero_stage={self.stage}. DeepSpeed checkpoints load at the stage that "
                "wrote them."
            )
        if meta["world_size"] != self.world and self.stage > 0:
            self._load_universal(Path(directory), meta["world_size"])
            return
        path, _ = self.ds.load_checkpoint(str(directory), tag=TAG, load_module_strict=True,
                                          load_optimizer_states=True,
                                          load_lr_scheduler_states=True)  # fmt: skip
        if path is None:
            raise FileNotFoundError(f"{directory}: DeepSpeed found no checkpoint tagged {TAG!r}")

    def _load_universal(self, directory: Path, written_by: int) -> None:
        """Load a ZeRO checkpoint written by `written_by` ranks through its universal form."""
        root = self._universal_checkpoint(directory, written_by)
        config = self.ds._config  # `load_universal` is read from the config at load time only
        previous = config.load_universal_checkpoint
        config.load_universal_checkpoint = True
        try:
            path, _ = self.ds.load_checkpoint(str(root), tag=TAG, load_module_strict=True,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=True)  # fmt: skip
        finally:
            config.load_universal_checkpoint = previous
        if path is None:
            raise FileNotFoundError(f"{root}: DeepSpeed found no universal checkpoint {TAG!r}")
        if self.stage == 3:
            self._repair_zero3_optimizer(root / TAG / "zero" / "optimizer_state.pt")

    def _repair_zero3_optimizer(self, optimizer_state: Path) -> None:
        """Undo two slips of ZeRO-3's universal load (DeepSpeed 0.19.8), which restores the
        weights and both Adam moments exactly but
        * gives every param group the hyperparameters of the first saved group (the no-decay
          group would come back with weight decay): each group gets its own back (the groups
          are built in the same order);
        * hands every group's Adam state the same `step` tensor, which torch AdamW increments
          in place, once per group and step: the later groups' bias correction would run
          ahead. Each gets its own copy."""
        saved = torch.load(optimizer_state, map_location="cpu", weights_only=False)["param_groups"]
        optimizer = self.ds.optimizer.optimizer  # the torch AdamW
        if len(saved) != len(optimizer.param_groups):
            raise RuntimeError(
                f"{optimizer_state}: {len(saved)} optimizer param groups, this run has "
                f"{len(optimizer.param_groups)}"
            )
        for group, values in zip(optimizer.param_groups, saved, strict=True):
            group.update({key: value for key, value in values.items() if key != "params"})
        for state in optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def _universal_checkpoint(self, directory: Path, written_by: int) -> Path:
        """The universal form of `directory`'s DeepSpeed checkpoint (collective): made by
        rank 0 on first use, next to it (or under the run directory when the checkpoint's
        directory is read-only), and reused afterwards. Returns the directory to load from."""
        answer: list[Any] = [None]  # ("ok", path) or ("error", message), from rank 0
        failure: Exception | None = None
        if self.rank == 0:
            try:
                answer[0] = ("ok", str(self._convert_once(directory, written_by)))
            except Exception as error:  # every rank must hear of it, not wait in a collective
                failure = error
                answer[0] = ("error", f"{type(error).__name__}: {error}")
        if dist.is_initialized() and self.world > 1:
            dist.broadcast_object_list(answer, src=0)
        status, value = answer[0]
        if status != "ok":
            raise RuntimeError(
                f"{directory}: converting the DeepSpeed checkpoint of a {written_by}-rank run to "
                f"a universal checkpoint for {self.world} ranks failed: {value}"
            ) from failure
        return Path(value)

    def _convert_once(self, directory: Path, written_by: int) -> Path:
        root = directory / UNIVERSAL
        if not os.access(directory, os.W_OK):
            digest = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:12]
            root = self.run_dir / UNIVERSAL / f"{directory.name}-{digest}"
        if (root / TAG).is_dir():  # converted by an earlier resume (only complete ones are renamed)
            changed = _cache_changes(root)
            if not changed:
                return root
            # a derived copy: made again from the checkpoint (checked before this), not refused
            print(f"kiln train: {root}: {changed}; converting the checkpoint again",
                  file=sys.stderr, flush=True)  # fmt: skip
        tmp = root.parent / f".{root.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            convert_to_universal(directory / TAG, tmp / TAG, log=tmp / "conversion.log")
            _record_cache(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
        logging.getLogger(__name__).info(
            "converted %s (%d ranks) to a universal checkpoint in %s", directory, written_by, root
        )
        return root

    def full_state_dict(self) -> dict[str, Tensor] | None:
        if self.stage == 3:
            # collective: gathers one module's partitions at a time onto rank 0
            state = self.ds._zero3_consolidated_16bit_state_dict()
            if state is None:
                return None
            return {strip_wrappers(key): value for key, value in state.items()}
        if self.rank != 0:
            return None
        return {key: value.detach().cpu() for key, value in self.module.state_dict().items()}


def read_model_state(directory: Path) -> dict[str, Tensor]:
    """The whole model's weights in a checkpoint this engine wrote, read by one process on the
    CPU: ZeRO 1-3 through DeepSpeed's `zero_to_fp32` (the fp32 master weights, reassembled
    from every rank's optimizer partition, whatever the world size); stage 0 from the module
    state DeepSpeed saved. Activation checkpointing's wrapper names are taken out."""
    import contextlib
    import io

    directory = Path(directory)
    stage = json.loads((directory / META).read_text())["zero_stage"]
    if stage == 0:
        saved = torch.load(directory / TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)  # fmt: skip
        state = saved["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # its progress lines and bars are not ours to print (a failure raises)
        try:
            with (contextlib.redirect_stdout(io.StringIO()),
                  contextlib.redirect_stderr(io.StringIO())):  # fmt: skip
                state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)
        except Exception as error:
            damaged = unreadable_archives(directory / TAG)
            if damaged:  # DeepSpeed's own error (e.g. "[Errno 22]") names no file
                raise ValueError(f"{', '.join(damaged)} cut short or damaged ({error})") from error
            raise
    return {strip_wrappers(key): value for key, value in state.items()}


def unreadable_archives(directory: Path) -> list[str]:
    """The `.pt` files in `directory` whose zip structure (torch.save's format) does not open:
    cut short or overwritten. Reads only each file's directory at its end, not the tensors."""
    import zipfile

    damaged = []
    for path in sorted(Path(directory).glob("*.pt")):
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError):
            damaged.append(path.name)
    return damaged
