"""The training loop: one `train()` for every family, objective and engine.

    for each step:
        for each micro-batch:  loss = engine.forward_backward(batch, last)
        grad_norm, skipped = engine.optimizer_step()
        metrics, evaluation, checkpoints, signals

Run by every rank (under torchrun, or alone); see `pretrain/train.py` for the entry point.
"""

from __future__ import annotations

import collections
import dataclasses
import faulthandler
import gc
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pretrain.checkpoint import CheckpointManager, ModelRecord, rank_and_world
from pretrain.checkpoint_io import CheckpointError
from pretrain.exit_codes import (
    INTERRUPTED_EXIT_CODE,
    NONFINITE_EXIT_CODE,
    REQUEUE_EXIT_CODE,
    USER_ERROR_EXIT_CODE,
)

MAX_NONFINITE_IN_A_ROW = 5


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    wandb_run_id: str | None = None
    loader: dict[str, Any] = field(default_factory=dict)
    max_steps: int = 0  # trainer.max_steps the schedule was drawn for (0: not recorded)


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 (Slurm's warning before a time limit or preemption)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # e.g. Ray Train's training thread: only a main thread may set handlers
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum

    def restore(self) -> None:
        """The handlers from before, once the loop is over: a rank that finished while another
        failed is then stopped by torchrun's SIGTERM at once (this handler kept it alive until
        torchrun's SIGKILL, 30 s later)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def step_all_reduce(means: list[float], flags: list[bool]) -> tuple[list[float], list[bool]]:
    """The loop's one collective per step: the mean over the ranks of each of `means` (the
    loss) and, for each of `flags` (a stop signal, a timed checkpoint due), whether any rank
    raised it, so every rank decides alike. One all-reduce where there were one per figure (a
    network round trip each across nodes); none at one rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(means), list(flags)
    tensor = torch.tensor([*means, *(float(flag) for flag in flags)], dtype=torch.float64)
    dist.all_reduce(tensor)
    values, world = tensor.tolist(), dist.get_world_size()
    return [v / world for v in values[: len(means)]], [v > 0 for v in values[len(means) :]]


class SpikeDetector:
    """Flags a loss far above the recent ones (z-score over a sliding window)."""

    def __init__(self, window: int, threshold: float) -> None:
        self.losses: collections.deque[float] = collections.deque(maxlen=window)
        self.threshold = threshold

    def add(self, loss: float) -> float | None:
        """Record `loss`; return its z-score when it is a spike, else None."""
        zscore = None
        if len(self.losses) >= 20:
            mean = sum(self.losses) / len(self.losses)
            std = (sum((x - mean) ** 2 for x in self.losses) / len(self.losses)) ** 0.5
            if std > 0 and (loss - mean) / std > self.threshold:
                zscore = (loss - mean) / std
        if math.isfinite(loss):
            self.losses.append(loss)
        return zscore


class GarbageCollector:
    """Python's garbage collector during the loop.

    Start-up leaves hundreds of thousands of objects (torch, DeepSpeed, Hydra, W&B, ...) that a
    full collection walks every time: 100-200 ms on these CPUs, landing on whichever step
    happens to allocate past the threshold, on each rank at its own moment. So: everything
    alive at the start is frozen (`gc.freeze`: never scanned again), and with `every > 0`
    automatic collection is off and the loop collects the young generations every `every`
    steps (the same steps on every rank, so no rank waits on another's pause) and everything
    after a checkpoint or an eval. `every = 0` keeps automatic collection (frozen start-up
    still). `stop` restores the collector as it was."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.was_enabled = gc.isenabled()
        gc.collect()
        gc.freeze()
        if every > 0:
            gc.disable()

    def step(self, step: int) -> None:
        if self.every > 0 and step % self.every == 0:
            gc.collect(1)

    def full(self) -> None:
        if self.every > 0:
            gc.collect()

    def stop(self) -> None:
        gc.unfreeze()
        if self.was_enabled:
            gc.enable()


def fault_steps(name: str) -> set[int]:
    """Steps at which a test asks for a fault (`KILN_FAULT_NAN_STEPS=3,4`)."""
    value = os.environ.get(name, "")
    return {int(step) for step in value.split(",") if step.strip()}


def train(cfg: Any, context: Any) -> int:
    """Train until `trainer.max_steps` (or a stop signal); returns the process exit code."""
    from pretrain.data.loader import LoaderState, build_run_loader
    from pretrain.engine import build_engine, build_model_for_engine, sharded_build
    from pretrain.hardware import resolve_peak_tflops
    from pretrain.metrics import MetricsLogger
    from pretrain.models.loss import take_z_loss
    from pretrain.models.moe import moe_layers, moe_metrics, take_step_loss
    from pretrain.profiling import StepProfiler

    rank, world = rank_and_world()
    data, trainer = cfg.data, cfg.trainer
    run_dir = Path(trainer.run_dir)
    # context parallelism: groups of `cp` consecutive ranks share each sample, one slice of the
    # sequence each; the data-parallel rank (what the loader and accumulation count) is the group
    cp = getattr(cfg.engine, "context_parallel", 1)
    cp_rank, dp_rank, dp_world = rank % cp, rank // cp, world // cp
    accumulation = data.global_batch_size // (data.micro_batch_size * dp_world)
    checkpoints = CheckpointManager(run_dir, trainer.keep_checkpoints)
    resume_from = _resume_path(trainer.resume, checkpoints)
    # A resumed run's weights come from its checkpoint, and a new run's from trainer.init_from
    # when set: the model is then built empty, not initialised. FSDP2 and ZeRO-3 ranks build
    # an empty model and rank 0 alone the weights, in host memory (`build_model_for_engine`).
    weights_from = "checkpoint" if resume_from else "init_from" if trainer.init_from else "seed"
    model, weights = build_model_for_engine(cfg, device=context.device, accumulation=accumulation,
                                            seed=trainer.seed, weights_from=weights_from)  # fmt: skip
    sharded = sharded_build(cfg.engine) is not None
    # unwrapped: the names and shapes each checkpoint records and `load` checks
    checkpoints.model = ModelRecord(cfg.model.family, dataclasses.asdict(cfg.model), model)
    checkpoints.run_config = dataclasses.asdict(cfg)
    checkpoints.verify = trainer.verify_checkpoints
    if cp > 1:
        from pretrain.engine.context_parallel import apply_context_parallel, shard_sequence

        groups = [dist.new_group(list(range(g * cp, (g + 1) * cp))) for g in range(dp_world)]
        apply_context_parallel(model, groups[dp_rank])
    has_moe = bool(moe_layers(model))  # the engines keep these modules: their stats stay here
    has_z_loss = cfg.objective.z_loss > 0  # its term of each step, summed on the model, too
    initialised = None
    # weights only, into the unwrapped model (or into rank 0's weights, which the engine shards)
    target = weights if sharded else model
    if weights_from == "init_from":
        from pretrain.checkpoint_io import init_weights

        refused = None
        if target is not None:
            try:
                initialised = init_weights(
                    target, cfg.model, Path(trainer.init_from), trainer.verify_checkpoints
                )
            except CheckpointError as error:
                refused = str(error)
        if sharded:  # only rank 0 read them: the others, waiting to be sent shards, learn why
            said = [refused]
            dist.broadcast_object_list(said, src=0)
            refused = said[0]
        if refused is not None:
            raise CheckpointError(refused)
    engine = build_engine(cfg, model, accumulation=accumulation, max_steps=trainer.max_steps,
                          device=context.device, weights=weights,
                          scatter=sharded and weights_from != "checkpoint")  # fmt: skip
    del weights, target  # rank 0's host copy: the engine holds its own shards now
    state = TrainState()
    if resume_from is not None:
        from pretrain.optim import apply_settings, optimizer_settings

        ours = optimizer_settings(engine.scheduler)
        saved = checkpoints.load(engine, resume_from)
        state = TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__ if k in saved})
        was = engine.scheduler.get_last_lr()[0]
        apply_settings(engine.scheduler, ours)  # this run's optim settings, not the checkpoint's
        if rank == 0:
            _say_changes(cfg, resume_from, saved, state, was, engine.scheduler.get_last_lr()[0])
    loader_state = LoaderState.from_dict(state.loader) if state.loader else None
    # a longer (or shorter) data.seq_len than the checkpoint's: the loader re-counts what each
    # source gave in samples of the new length (context extension; see LoaderState.seq_len)
    saved_seq_len = loader_state.seq_len if loader_state is not None else None
    state.max_steps = trainer.max_steps
    remaining = max(0, trainer.max_steps - state.step)
    if resume_from is not None and not remaining and rank == 0:
        sys.stderr.write(
            f"kiln train: {resume_from} is at step {state.step}, trainer.max_steps="
            f"{trainer.max_steps}: nothing to train (final/ is written from it; a larger "
            "trainer.max_steps trains on)\n"
        )
    loader = build_run_loader(cfg, rank=dp_rank, world=dp_world, state=loader_state,
                              num_steps=remaining)  # fmt: skip
    checkpoints.tokenizer = loader.dataset.out_dir / loader.manifest.tokenizer.path
    cuda = context.device.type == "cuda"
    peak_tflops, peak_source = resolve_peak_tflops(
        trainer.peak_tflops,
        cfg.cluster.peak_tflops,
        torch.cuda.get_device_name(context.device) if cuda else None,
        cfg.cluster.gpu_name,
    )
    logger = MetricsLogger(cfg, run_dir, run_id=state.wandb_run_id) if rank == 0 else None
    if logger is not None:
        state.wandb_run_id = logger.run_id
        print(f"kiln train: {_run_line(cfg, state.step, world)}", flush=True)
        unused = _unused_vocabulary(cfg.model.vocab_size, loader.manifest.tokenizer.vocab_size)
        if unused:
            print(f"kiln train: {unused}", flush=True)
        logger.log({"kind": "event", "step": state.step, "event": "start", "world_size": world,
                    "data_parallel": dp_world, "context_parallel": cp,
                    "resumed_from": str(resume_from) if resume_from else None,
                    "init_from": str(initialised.path) if initialised else None,
                    "seq_len": data.seq_len, "checkpoint_seq_len": saved_seq_len,
                    "peak_tflops": peak_tflops, "peak_tflops_from": peak_source})  # fmt: skip
        if initialised is not None:
            at = f" at step {initialised.step}" if initialised.step is not None else ""
            print(f"kiln train: weights from the {initialised.kind} checkpoint "
                  f"{initialised.path}{at} (trainer.init_from); the optimizer, the schedule "
                  "and the data start afresh", flush=True)  # fmt: skip
    stop = StopSignal()
    if os.environ.get("KILN_FAULT_RAISE_RANK") == str(rank):  # tests: a bug in one rank
        raise RuntimeError(f"KILN_FAULT_RAISE_RANK: rank {rank} fails on purpose")
    nan_steps = fault_steps("KILN_FAULT_NAN_STEPS")
    # narrower faults: only this micro-batch index / only this rank (default: all of them)
    nan_micro = os.environ.get("KILN_FAULT_NAN_MICRO", "")
    nan_rank = os.environ.get("KILN_FAULT_NAN_RANK", "")
    hang_steps = fault_steps("KILN_FAULT_HANG_STEPS")  # these steps stall (watchdog tests)
    tokens_per_step = data.global_batch_size * data.seq_len
    flops_per_token = _flops_per_token(cfg)
    peak = peak_tflops * 1e12 * world
    batches = iter(loader.loader)
    exit_code = 0
    start_step = state.step
    spikes = SpikeDetector(trainer.spike_window, trainer.spike_zscore)
    last_save = time.monotonic()  # for trainer.checkpoint_minutes
    armed_at = -math.inf  # when the hang watchdog was last armed
    eval_every = trainer.eval_every
    collector = GarbageCollector(trainer.gc_every)
    profiler = StepProfiler(trainer.profile, run_dir, rank, context.device, state.step + 1)
    timed_from = (time.monotonic(), state.step)  # (when, step): the ETA's start
    try:
        while state.step < trainer.max_steps:
            profiler.before_step(state.step + 1)
            # The hang watchdog: faulthandler's own thread dumps every stack when it is not
            # re-armed in time. Re-arming starts an OS thread, so it happens at most every quarter
            # of the timeout (measured: every step cost 3 ms of a 75 ms CPU step): the dump
            # comes after 3/4 to 1 times `watchdog_seconds` without a finished step.
            now = time.monotonic()
            if trainer.watchdog_seconds > 0 and now - armed_at >= trainer.watchdog_seconds / 4:
                faulthandler.dump_traceback_later(trainer.watchdog_seconds, repeat=True)
                armed_at = now
            started = time.perf_counter()
            wait = 0.0
            losses = []
            for micro in range(accumulation):
                fetched = time.perf_counter()
                with profiler.region("data"):
                    batch = next(batches)
                if cp > 1:
                    batch = shard_sequence(batch, cp_rank, cp)
                wait += time.perf_counter() - fetched
                last = micro == accumulation - 1
                poison = (  # fault injection (tests)
                    state.step + 1 in nan_steps
                    and nan_micro in ("", str(micro))
                    and nan_rank in ("", str(rank))
                )
                if micro == 0 and state.step + 1 in hang_steps:
                    time.sleep(float(os.environ.get("KILN_FAULT_HANG_SECONDS", "3")))
                with profiler.region("forward_backward"):
                    loss = engine.forward_backward(batch, last, poison=poison)
                losses.append(loss)  # on the device: one host sync per step, not per micro-batch
            lr = engine.lr()  # this step's: optimizer_step moves the schedule to the next
            with profiler.region("optimizer_step"):
                grad_norm, skipped = engine.optimizer_step()
            if skipped:  # DeepSpeed says inf on overflow, the others NaN: one meaning
                grad_norm = float("nan")
            losses = torch.stack(losses).float().tolist()
            state.step += 1
            collector.step(state.step)
            state.tokens_seen += tokens_per_step
            if skipped:
                state.nonfinite_steps += 1
                state.nonfinite_in_a_row += 1
            else:
                state.nonfinite_in_a_row = 0
            step_time = time.perf_counter() - started
            profiled = profiler.in_window(state.step)
            profile = profiler.after_step(state.step, step_time)
            # alike on every rank; the first step (the starting loss, near ln V for a new model,
            # the checkpoint's after a resume) and the last always, so a short run shows both
            log_now = state.step % cfg.logger.log_every == 0 or skipped
            log_now = log_now or state.step in (start_step + 1, trainer.max_steps)
            moe: dict[str, float] = {}
            timed = trainer.checkpoint_minutes > 0 and rank == 0
            due = timed and time.monotonic() - last_save >= 60 * trainer.checkpoint_minutes
            flags = [stop.received is not None, due]
            # the logged loss is the LM loss; the MoE losses and the z-loss added to it are
            # logged apart (means over the micro-batches, then over the ranks)
            added: dict[str, float] = {}
            if has_moe:
                added["moe_aux_loss"] = take_step_loss(model) / accumulation
            if has_z_loss:
                added["z_loss"] = take_z_loss(model) / accumulation
            if added:
                (loss, *parts), (signalled, due) = step_all_reduce(
                    [sum(losses) / len(losses) - sum(added.values()), *added.values()], flags
                )
                added = dict(zip(added, parts, strict=True))
                if has_moe:
                    moe = moe_metrics(model) if log_now else {}  # collective
            else:
                (loss,), (signalled, due) = step_all_reduce([sum(losses) / len(losses)], flags)
            if state.step == start_step + 1:  # the first step compiles and warms up: not timed
                timed_from = (time.monotonic(), state.step)
            if logger is not None and log_now:
                tokens_per_s = tokens_per_step / step_time
                logger.log({
                    "kind": "train", "step": state.step, "loss": loss, "lr": lr,
                    "grad_norm": grad_norm, "tokens_seen": state.tokens_seen,
                    "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak,
                    "step_time": step_time, "data_wait": wait, "memory_gib": _memory_gib(context),
                    "skipped": skipped, "nonfinite_steps": state.nonfinite_steps,
                } | added | moe | ({"profiled": True} if profiled else {})
                  | _eta(timed_from, state.step, trainer.max_steps))  # fmt: skip
            if profile is not None and logger is not None:
                # the lists go to metrics.jsonl only (keys with "/" stay off the console line)
                logger.log({"kind": "event", "step": state.step, "event": "profile",
                            "first_step": profiler.start, "step_ms": profile["step_ms"]}
                           | ({"device_busy": profile["device_busy"]} if "device_busy" in profile else {})
                           | {"trace": profile["trace"], "summary": profile["summary"],
                              "profile/regions_ms": profile["regions"], "profile/top": profile["top"],
                              "profile/measure": profile["measure"]})  # fmt: skip
            zscore = spikes.add(loss) if not skipped else None
            if zscore is not None and logger is not None:
                logger.log({"kind": "event", "step": state.step, "event": "loss_spike",
                            "loss": loss, "zscore": zscore})  # fmt: skip
            if state.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                if logger is not None:
                    logger.log({"kind": "event", "step": state.step, "event": "stopped",
                                "reason": f"{state.nonfinite_in_a_row} non-finite steps in a row"})  # fmt: skip
                exit_code = NONFINITE_EXIT_CODE
                break
            if eval_every and state.step % eval_every == 0:
                if not _evaluate(cfg, engine, state, logger, dp_rank, dp_world, cp_rank, cp):
                    eval_every = 0  # no held-out split: said once, not retried
                collector.full()
            _log_written(checkpoints, logger, state.step)
            if (
                signalled
                or due
                or (trainer.checkpoint_every and state.step % trainer.checkpoint_every == 0)
                or state.step == trainer.max_steps
            ):
                state.loader = loader.state_after(state.step - start_step).to_dict()
                # the run's last checkpoint, and one before a requeue, in the foreground
                background = (
                    trainer.async_checkpoint and not signalled and state.step < trainer.max_steps
                )
                saving = time.perf_counter()
                path = checkpoints.save(engine, vars(state) | {}, state.step, background)
                stalled = time.perf_counter() - saving  # what the loop waited for
                collector.full()
                last_save = time.monotonic()
                if logger is not None:
                    logger.log({"kind": "event", "step": state.step, "event": "checkpoint",
                                "path": str(path), "background": background,
                                "seconds": stalled})  # fmt: skip
                    # the data ledger: how much of each source the run has read (metrics.jsonl,
                    # W&B, kiln report; keys with "/" stay off the console)
                    ledger = loader.ledger(state.step - start_step)
                    logger.log({"kind": "event", "step": state.step, "event": "data"}
                               | {f"epochs/{name}": round(entry["epochs"], 4)
                                  for name, entry in ledger.items()}, echo=False)  # fmt: skip
            if signalled:
                exit_code = REQUEUE_EXIT_CODE
                break
    except KeyboardInterrupt:  # Ctrl-C stops at once; `kiln report` tells it from a crash
        if rank == 0:
            _write_exit(run_dir, INTERRUPTED_EXIT_CODE, state)
        raise
    except CheckpointError as error:  # a save that failed (a full disk): said, and recorded
        if rank == 0:
            _write_exit(run_dir, USER_ERROR_EXIT_CODE, state, str(error))
        raise
    finally:
        profiler.close()
        collector.stop()
        stop.restore()
    checkpoints.wait()  # a background save still in flight (a run stopped early)
    _log_written(checkpoints, logger, state.step)
    faulthandler.cancel_dump_traceback_later()
    if exit_code == 0 and state.step >= trainer.max_steps:
        try:
            _finish_run(cfg, engine, loader, run_dir, logger, state)
        except CheckpointError as error:  # final/ not written (a full disk)
            if rank == 0:
                _write_exit(run_dir, USER_ERROR_EXIT_CODE, state, str(error))
            raise
        if logger is not None:
            print(f"kiln train: done at step {state.step:,}; next: kiln report "
                  f"report.run_dir={run_dir}, kiln export export.checkpoint={run_dir} "
                  "export.output_dir=DIR", flush=True)  # fmt: skip
    if logger is not None:
        logger.finish()
    if rank == 0:  # the exit status survives torchrun, which reports any failure as 1
        _write_exit(run_dir, exit_code, state)
        if exit_code == REQUEUE_EXIT_CODE:
            sys.stderr.write(
                f"kiln train: stopped by a signal at step {state.step}, saved "
                f"{checkpoints.root / f'step_{state.step:08d}'}; exit {exit_code} (a "
                "launcher requeues it; trainer.resume=auto continues from it)\n"
            )
            sys.stderr.flush()
    return exit_code


def _log_written(checkpoints: CheckpointManager, logger: Any, step: int) -> None:
    """A `checkpoint_written` event for each background save found on disk since the last
    call (`checkpoint` marks the step its state was taken at; this, when `latest` names it)."""
    for path, seconds in checkpoints.written():
        if logger is not None:
            logger.log({"kind": "event", "step": step, "event": "checkpoint_written",
                        "path": str(path), "seconds": seconds})  # fmt: skip


# settings whose change since a checkpoint is expected of a resume, or says nothing about it
SAME_RUN_ANYWAY = ("trainer.resume", "trainer.run_dir", "trainer.verify_checkpoints", "launch.")


def _say_changes(cfg: Any, path: Path, saved: dict[str, Any], state: TrainState, was: float,
                 becomes: float) -> None:  # fmt: skip
    """A resume with settings other than the checkpoint's (a relaunch, a sweep point continued
    in its old directory): which, in one line (this run's apply from here on: the optimizer's
    hyperparameters and the schedule too), and the learning rate's jump, in another, when it
    moves (extending a finished cosine run warms it back up)."""
    from pretrain.preflight import config_differences

    if isinstance(saved.get("config"), dict):
        here = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))  # as recorded
        changed = [c for c in config_differences(saved["config"], here, prefix="", current=cfg)
                   if not c[1:].startswith(SAME_RUN_ANYWAY)]  # fmt: skip
        if changed:
            more = f", and {len(changed) - 8} more" if len(changed) > 8 else ""
            sys.stderr.write(
                f"kiln train: resuming {path.name} with settings changed since it was saved: "
                f"{', '.join(c[1:] for c in changed[:8])}{more}; this run's apply from here\n"
            )
    if not math.isclose(was, becomes, rel_tol=0.01):
        before, now = state.max_steps, cfg.trainer.max_steps
        longer = bool(before) and before != now and cfg.optim.schedule == "cosine"
        hint = (" (optim.schedule=wsd holds the learning rate until its final decay, for runs "
                "that may be extended)" if longer else "")  # fmt: skip
        sys.stderr.write(
            f"kiln train: the learning rate at step {state.step} goes from {was:.3g} to "
            f"{becomes:.3g} ({cfg.optim.schedule} schedule of optim.lr={cfg.optim.lr:g} over "
            f"trainer.max_steps={now}){hint}\n"
        )
    sys.stderr.flush()


def _finish_run(cfg: Any, engine: Any, loader: Any, run_dir: Path, logger: Any,
                state: TrainState) -> None:  # fmt: skip
    """At the end of a run: the consolidated checkpoint for `kiln export` (run_dir/final) and,
    for decoders, a generated sample printed and logged."""
    from pretrain.checkpoint_io import save_consolidated
    from pretrain.models import empty_model

    weights = engine.full_state_dict()  # collective
    if logger is None or weights is None:
        return
    model = empty_model(cfg.model, "cpu")
    model.load_state_dict(weights)
    tokenizer = loader.dataset.out_dir / loader.manifest.tokenizer.path
    from safetensors import SafetensorError

    try:
        path = save_consolidated(model, cfg.model, run_dir / "final",
                                 tokenizer if tokenizer.is_file() else None, step=state.step)  # fmt: skip
    except (OSError, RuntimeError, SafetensorError) as error:  # a full disk, mostly
        from pretrain.checkpoint import disk_full_note

        note = disk_full_note(run_dir, error, 1 << 20)
        raise CheckpointError(
            f"cannot write {run_dir / 'final'}: {type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else 'a write failed'}"
            f"{note}; the checkpoint of step {state.step} is complete: the same command, once "
            "it can write, writes final/ from it and trains no step"
        ) from None
    logger.log({"kind": "event", "step": state.step, "event": "final", "path": str(path)})
    if cfg.model.family != "decoder" or not tokenizer.is_file() or cfg.trainer.sample_tokens < 1:
        return
    from data_pipeline.tokenizer import load_processor
    from pretrain.models.generation import SamplingConfig, generate

    processor = load_processor(tokenizer)
    prompt = cfg.trainer.sample_prompt
    eos = loader.manifest.tokenizer.special_ids["eos"]
    # temperature with top-k (seeded): greedy decoding of a small model repeats one token
    sampling = SamplingConfig(max_new_tokens=cfg.trainer.sample_tokens, temperature=0.8,
                              top_k=50, stop_tokens=(eos,), seed=cfg.trainer.seed)  # fmt: skip
    tokens = generate(model.eval(), [processor.encode(prompt)], sampling)[0]
    # a model vocabulary padded past the tokenizer's (e.g. 50304) can emit ids it lacks
    known = processor.vocab_size()
    text = prompt + processor.decode([t for t in tokens if t != eos and t < known])
    print(f"kiln train: sample after {state.step} steps:\n{text}\n", flush=True)
    logger.log({"kind": "event", "step": state.step, "event": "sample", "text": text}, echo=False)


def _evaluate(cfg: Any, engine: Any, state: TrainState, logger: Any, rank: int, world: int,
              cp_rank: int = 0, cp: int = 1) -> bool:  # fmt: skip
    """Eval loss on the held-out split; `rank`/`world` are data-parallel (context-parallel
    ranks share samples and take their slice of each). False when the shards have no
    held-out split (said once, as an event and on stderr).

    `eval_loss` is the mean over the micro-batches of all ranks of each one's mean loss (as it
    always was). When the split holds more than one source, `eval_loss/SOURCE` is the mean
    loss of that source's labelled positions, from the same forward passes: each row's loss
    sum and labelled-position count, added up per source over micro-batches and ranks. For
    causal LM (every position labelled, so every micro-batch weighs alike) their mean weighted
    by those counts is `eval_loss`; for mlm, span and ul2, whose micro-batches hold varying
    numbers of targets, it is the mean over all targets, which `eval_loss` approximates."""
    from pretrain.data.loader import DataError, build_run_loader

    try:
        loader = build_run_loader(cfg, rank=rank, world=world, num_steps=cfg.trainer.eval_steps,
                                  split="val")  # fmt: skip
    except DataError as error:
        if logger is not None:
            why = f"no evaluation: {error} (set trainer.eval_every=0 to silence this)"
            print(f"kiln train: {why}", file=sys.stderr, flush=True)
            logger.log({"kind": "event", "step": state.step, "event": "no_eval", "reason": why})
        return False
    if cp > 1:
        from pretrain.engine.context_parallel import shard_sequence

        batches = (shard_sequence(batch, cp_rank, cp) for batch in loader.loader)
    else:
        batches = iter(loader.loader)
    sources = loader.dataset.sources
    means = []  # each micro-batch's mean loss (of this rank's slice of it, under cp)
    totals = torch.zeros(2, len(sources), dtype=torch.float64)  # per source: loss sum, count
    for batch in batches:
        loss_sums, counts = (t.double().cpu() for t in engine.eval_row_losses(batch))
        means.append(float(loss_sums.sum() / counts.sum()))
        # the rows of a sample (more than one under sequence-length warmup) are consecutive
        index = batch["index"]
        owner = loader.sources_of(index).repeat_interleave(len(counts) // len(index))
        totals.index_add_(1, owner, torch.stack([loss_sums, counts]))
    # one all-reduce: the mean over the ranks of their mean, and of each sum and count (the
    # ratio of two such means is that of the totals)
    values = step_all_reduce([sum(means) / max(1, len(means)), *totals.flatten().tolist()], [])[0]
    loss, sums, counts = values[0], values[1 : 1 + len(sources)], values[1 + len(sources) :]
    if logger is not None:
        record = {"kind": "eval", "step": state.step, "eval_loss": loss,
                  "eval_ppl": math.exp(min(loss, 50.0))}  # fmt: skip
        if len(sources) > 1:  # a source the evaluation's samples never drew has no loss
            record |= {f"eval_loss/{name}": total / count
                       for name, total, count in zip(sources, sums, counts, strict=True)
                       if count > 0}  # fmt: skip
        logger.log(record)
    return True


def _run_line(cfg: Any, step: int, world: int) -> str:
    """Where the run goes and what it trains, said once at its start."""
    from pretrain.models.accounting import count_parameters

    size = _count(count_parameters(cfg.model).total)
    data, engine = cfg.data, cfg.engine
    kind = f"ZeRO-{engine.zero_stage}" if engine.kind == "deepspeed" else engine.kind
    tokens = data.global_batch_size * data.seq_len
    steps = f"steps {step:,} -> {cfg.trainer.max_steps:,}" if step else (
        f"{cfg.trainer.max_steps:,} steps")  # fmt: skip
    return (
        f"{cfg.trainer.run_dir}: model={cfg.model.name} ({size} parameters), "
        f"objective={cfg.objective.kind}, {kind} on {world} rank"
        f"{'s' if world != 1 else ''}; {steps} of {data.global_batch_size} x {data.seq_len} "
        f"tokens ({_count(tokens * (cfg.trainer.max_steps - step))} tokens to go)"
    )


def _unused_vocabulary(model: int, tokenizer: int) -> str | None:
    """A note when the model's vocabulary is larger than the tokenizer's by more than padding
    to a multiple of 128 (those embedding rows are never trained on: a tokenizer rebuilt
    smaller, say, and the model preset's size left as it was)."""
    padded = -(-tokenizer // 128) * 128
    if model <= padded:
        return None
    return (
        f"model.vocab_size={model} is {model - tokenizer:,} ids more than the tokenizer's "
        f"{tokenizer} (rows no token uses); model.vocab_size={padded} would do"
    )


def _count(n: float) -> str:
    """1,234 / 12.3M / 4.56B."""
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n:,.0f}"


def _eta(timed_from: tuple[float, int], step: int, max_steps: int) -> dict[str, str]:
    """{"eta": "1h02m"} from the steps since the first timed one, once there are some."""
    since, first = timed_from
    if step <= first or step >= max_steps:
        return {}
    seconds = (time.monotonic() - since) / (step - first) * (max_steps - step)
    hours, rest = divmod(int(seconds), 3600)
    return {"eta": f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"}


def _write_exit(run_dir: Path, exit_code: int, state: TrainState, error: str = "") -> None:
    """RUN_DIR/exit.json: how the run ended (`kiln train`'s status, `kiln report`'s status),
    with the error that ended it, if one did."""
    from pretrain.checkpoint import atomic_write_bytes

    record = {"exit_code": exit_code, "step": state.step, "nonfinite_steps": state.nonfinite_steps}
    if error:
        record["error"] = error
    try:
        atomic_write_bytes(run_dir / "exit.json", json.dumps(record).encode())
    except OSError:
        if not error:
            raise
        # the error being recorded may be this very disk's: it is said on stderr regardless


def _flops_per_token(cfg: Any) -> float:
    """Training FLOPs per token of the model at the run's lengths (`kiln plan`'s convention)."""
    from pretrain.models.accounting import head_fraction, training_flops

    if cfg.model.family == "encoder_decoder":
        from pretrain.objectives import encoder_decoder_lengths

        encoder, decoder = encoder_decoder_lengths(cfg)
        return training_flops(cfg.model, encoder, decoder).per_token
    share = head_fraction(cfg.objective)
    return training_flops(cfg.model, cfg.data.seq_len, head_share=share).per_token


def _memory_gib(context: Any) -> float:
    if context.device.type == "cuda":
        return torch.cuda.max_memory_allocated(context.device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _resume_path(resume: str, checkpoints: CheckpointManager) -> Path | None:
    if resume == "none":
        return None
    if resume == "auto":
        return checkpoints.latest()
    from pretrain.preflight import resume_problem

    problem = resume_problem(resume)
    if problem:
        raise CheckpointError(problem)
    return Path(resume)
