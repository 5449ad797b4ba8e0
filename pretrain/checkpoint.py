"""Training checkpoints: atomic directories, a `latest` pointer, the last k kept.

    RUN_DIR/checkpoints/step_00000200/    engine state (model, optimizer, scheduler: the
                                          engine's own format), rng_rank{R}.pt per rank,
                                          tokenizer.model (the run's SentencePiece model),
                                          checksums.json (each file's size and sha256),
                                          trainer.json (step, tokens, loader state, W&B id,
                                          the model's config and parameter shapes...)
    RUN_DIR/checkpoints/latest            the name of the newest complete checkpoint

A checkpoint is written under `.step_N.tmp`, renamed when every rank has written its part,
and only then does `latest` (itself written through a temporary file and a rename) move to
it: a crash at any moment leaves `latest` naming a complete checkpoint. Before the rename the
ranks share out the files: each hashes its share and flushes it to the disk (fsync), so a
power cut cannot leave `latest` naming files the disk never received, and a resume (each rank
its share again) or `kiln export` refuses a checkpoint whose bytes changed since (a flipped
bit resumed as other weights, silently). A write that fails (a full disk) is one error naming
the checkpoint, its cause and the disk's free space; the part written is removed.

`save(..., background=True)` (`trainer.async_checkpoint`) stops the loop only to copy the state
into host memory; a thread per rank writes the files, the ranks meet at a barrier of their own
(a gloo group only these threads use), and rank 0's thread then renames and moves `latest` as
above. The next save, and the end of the run, wait for it first; a failure there is raised.

A checkpoint records its model (`ModelRecord`: the config and every parameter's name and shape,
before any engine wraps it); `load` compares it with the run's model before the engine reads a
byte, so resuming a run directory with another model is one error naming the parameter and the
config keys that differ, not the engine's size-mismatch list per rank.
"""

from __future__ import annotations

import collections
import copy
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.shards import atomic_write_bytes
from pretrain.checkpoint_io import (
    CHECKSUMS,
    CheckpointError,
    damage,
    file_problems,
    file_sha256,
    recorded_files,
)
from pretrain.exit_codes import peer_gone
from pretrain.preflight import config_differences

TRAINER_STATE = "trainer.json"


def rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def host_copy(obj: Any) -> Any:
    """A copy of a state dict (dicts, lists and tuples of tensors and plain values) that shares
    no tensor with it, every tensor in host memory: what a background write may read while
    training changes the original."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: host_copy(value) for key, value in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(host_copy(value) for value in obj)
    return copy.deepcopy(obj)


def write_files(files: dict[Path, Any]) -> None:
    """Write each file: text as it is, anything else with `torch.save`."""
    for path, content in files.items():
        if isinstance(content, str):
            path.write_text(content)
        else:
            torch.save(content, path)


class ModelRecord:
    """What a checkpoint says about its model: the model config (a dict) and the name and
    shape of every parameter of the model as built (no engine, no compile, no FP8 wrappers)."""

    def __init__(self, family: str, config: dict[str, Any], model: torch.nn.Module) -> None:
        self.family, self.config = family, config
        from pretrain.models import parameter_shape

        self.parameters = {name: list(parameter_shape(p)) for name, p in model.named_parameters()}

    def as_dict(self) -> dict[str, Any]:
        return {"model_family": self.family, "model": self.config, "parameters": self.parameters}

    def check(self, saved: dict[str, Any], path: Path) -> None:
        """Raise CheckpointError unless the checkpoint at `path` (its trainer.json, `saved`)
        holds parameters of the same names and shapes. One written before checkpoints recorded
        their model passes unchecked (the engine's own load then decides)."""
        theirs = saved.get("parameters")
        if theirs is None or theirs == self.parameters:
            return
        parts = shape_differences(theirs, self.parameters)
        keys = config_differences(saved.get("model") or {}, self.config)
        if keys:
            parts.append(f"the model config differs in {', '.join(keys)}")
        raise CheckpointError(
            f"{path} holds another model: {'; '.join(parts)}. Resume it with the model it was "
            "trained with, or train this one in a new trainer.run_dir"
        )


def shape_differences(theirs: dict[str, list[int]], ours: dict[str, list[int]]) -> list[str]:
    """How two {name: shape} maps differ, in a few words each (empty when they agree)."""
    differ = [name for name in ours if name in theirs and theirs[name] != ours[name]]
    parts = []
    if differ:
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        parts.append(f"{differ[0]} is {theirs[differ[0]]} there, {ours[differ[0]]} here{more}")
    for names, where in (([n for n in ours if n not in theirs], "only this model has"),
                         ([n for n in theirs if n not in ours], "only the checkpoint has")):  # fmt: skip
        if names:
            parts.append(f"{len(names)} parameter(s) {where} ({names[0]}, ...)")
    return parts


class CheckpointManager:
    """Saves and finds the checkpoints of one run directory (every rank builds one). With a
    `model` record, each checkpoint carries it and `load` refuses one of another model."""

    def __init__(self, run_dir: Path, keep: int, model: ModelRecord | None = None) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.model = model
        # copied into every checkpoint (rank 0), so `kiln export` of one finds its tokenizer
        self.tokenizer: Path | None = None
        # the run's resolved config, recorded in trainer.json ("config"): a resume with other
        # settings says which
        self.run_config: dict[str, Any] | None = None
        # check each file against its checksum before a resume reads it
        # (`trainer.verify_checkpoints`)
        self.verify = True
        self.rank, self.world = rank_and_world()
        self._writer: threading.Thread | None = None  # the background save in flight
        self._failure: tuple[str, BaseException] | None = None
        # background saves on disk, (path, seconds the write took), until `written` takes them
        self._written: collections.deque[tuple[Path, float]] = collections.deque()
        self._group: Any = None  # the background writers' own process group (gloo)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names; None before the first one; CheckpointError when it
        names no complete checkpoint (see `pretrain.preflight.latest_checkpoint`)."""
        from pretrain.preflight import latest_checkpoint

        path, problem = latest_checkpoint(self.root.parent)
        if problem:
            raise CheckpointError(problem)
        return path

    def save(self, engine: Any, trainer_state: dict[str, Any], step: int,
             background: bool = False) -> Path:  # fmt: skip
        """Write a checkpoint of `engine` and `trainer_state` at `step` (collective). With
        `background`, return once the state is copied to host memory; a thread writes it."""
        self.wait()
        name = f"step_{step:08d}"
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        if self.rank == 0:
            # a save cut short before (this one's, or another step's of a killed run) holds
            # space this one may need; none other is in flight (`wait` above)
            for stale in [tmp, *self.root.glob(".step_*.tmp")]:
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        record = self.model.as_dict() if self.model is not None else {}
        if self.run_config is not None:
            record = record | {"config": self.run_config}
        payload = json.dumps(
            trainer_state | record | {"step": step, "world_size": self.world},
            indent=1,
            default=str,
        )
        if background:
            if self._group is None and dist.is_initialized():  # collective: every rank
                self._group = dist.new_group(backend="gloo")
            write = engine.save_async(tmp, self._group)
            rng = rng_state()  # fresh objects: the generators move on
            self._writer = threading.Thread(
                target=self._write_in_background, args=(write, rng, tmp, final, payload, step),
                name=f"kiln-checkpoint-{name}", daemon=True,
            )  # fmt: skip
            self._writer.start()
            return final
        try:
            engine.save(tmp)
            torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        except _write_errors() as error:
            raise self._write_failed(tmp, final, error) from None
        barrier()
        checksums = self._checksum_share(tmp, None)
        self._finish(tmp, final, payload, step, checksums)
        barrier()
        return final

    def _write_in_background(self, write: Callable[[], None], rng: dict[str, Any], tmp: Path,
                             final: Path, payload: str, step: int) -> None:  # fmt: skip
        started = time.perf_counter()
        try:
            write()
            torch.save(rng, tmp / f"rng_rank{self.rank}.pt")
            if self._group is not None:
                dist.barrier(group=self._group)  # every rank's part is on disk
            checksums = self._checksum_share(tmp, self._group)
            self._finish(tmp, final, payload, step, checksums)
            self._written.append((final, time.perf_counter() - started))
        except _write_errors() as error:  # raised in the training thread by wait()
            if peer_gone(error):  # another rank's write failed, and it said so
                self._failure = (final.name, error)
            else:
                self._failure = (final.name, self._write_failed(tmp, final, error))
        except BaseException as error:
            self._failure = (final.name, error)

    def written(self) -> list[tuple[Path, float]]:
        """The background saves completed since the last call: (path, seconds the write took
        after the loop went on). Complete on every rank; rank 0 has renamed them and moved
        `latest` to them."""
        done = []
        while self._written:
            done.append(self._written.popleft())
        return done

    def _checksum_share(self, tmp: Path, group: Any) -> dict[str, dict[str, Any]]:
        """Every rank, once every part is written: hash and fsync its share of the files
        (`share_out`: about as many bytes each), gathered on rank 0, which gets {name: {"bytes", "sha256"}} for all
        of them (the other ranks get {})."""
        # rank 0's listing, for all: on a shared filesystem another node's may be stale, and
        # a file no rank's share held would go unrecorded
        listing = [{p.relative_to(tmp).as_posix(): p.stat().st_size
                    for p in tmp.rglob("*") if p.is_file()} if self.rank == 0 else None]  # fmt: skip
        if self.world > 1 and dist.is_initialized():
            dist.broadcast_object_list(listing, src=0, group=group)
        sizes: dict[str, int] = listing[0]  # type: ignore[assignment]
        mine = {
            name: {"sha256": file_sha256(tmp / name, sync=True), "bytes": sizes[name]}
            for name in share_out(sizes, self.world)[self.rank]
        }
        if self.world == 1 or not dist.is_initialized():
            return mine
        parts: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, parts, dst=0, group=group)
        return {name: entry for part in parts or [] for name, entry in part.items()}

    def _finish(self, tmp: Path, final: Path, payload: str, step: int,
                checksums: dict[str, dict[str, Any]]) -> None:  # fmt: skip
        """Rank 0, once every rank's part is written and hashed: the tokenizer, checksums.json
        and trainer.json (the mark of a complete checkpoint), each flushed to the disk; the
        rename; `latest`."""
        if os.environ.get("KILN_FAULT_CRASH_IN_SAVE") == str(step):  # tests: die mid-save
            os._exit(17)
        if self.rank != 0:
            return
        try:
            if self.tokenizer is not None and self.tokenizer.is_file():
                shutil.copyfile(self.tokenizer, tmp / "tokenizer.model")
                checksums["tokenizer.model"] = {
                    "sha256": file_sha256(tmp / "tokenizer.model", sync=True),
                    "bytes": (tmp / "tokenizer.model").stat().st_size,
                }
            record = {"algorithm": "sha256", "files": dict(sorted(checksums.items()))}
            recorded = json.dumps(record, indent=1).encode()
            atomic_write_bytes(tmp / CHECKSUMS, recorded)
            # trainer.json names its checksums.json: one deleted or emptied is damage too
            state = json.loads(payload) | {"checksums": {
                "files": len(checksums), "sha256": hashlib.sha256(recorded).hexdigest()}}  # fmt: skip
            atomic_write_bytes(tmp / TRAINER_STATE, json.dumps(state, indent=1).encode())
        except _write_errors() as error:
            raise self._write_failed(tmp, final, error) from None
        for directory in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            sync_directory(directory)  # the files' names, not only their bytes
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        sync_directory(self.root)
        atomic_write_bytes(self.root / "latest", final.name.encode())
        sync_directory(self.root)
        self._prune()

    def _write_failed(self, tmp: Path, final: Path, error: BaseException) -> CheckpointError:
        """The error for a checkpoint this rank could not write (a full disk, mostly): its
        cause in a line, the disk's free space when that is the cause, and the checkpoint
        a resume starts from. What was written of it is removed (the space it took is the
        space a resume needs)."""
        from torch.distributed.checkpoint.api import CheckpointException

        if isinstance(error, CheckpointException) and error.failures:
            error = next(iter(error.failures.values()))[0]  # a rank's own error
        written = tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)  # the space a resume needs
        try:
            previous = self.latest()
        except CheckpointError:
            previous = None
        took = tree_bytes(previous) if previous is not None else 0
        detail = (
            f"; a save needs room for one checkpoint ({_mebibytes(took)} the last) beyond the "
            f"trainer.keep_checkpoints={self.keep} kept, until the oldest is pruned"
            if took else ""
        )  # fmt: skip
        note = disk_full_note(self.root, error, max(written, took), detail)
        if previous is not None:
            then = f"`latest` still names {previous.name}, where trainer.resume=auto continues"
        else:
            then = "no checkpoint of this run was written before"
        return CheckpointError(
            f"cannot write checkpoint {final}: {type(error).__name__}: "
            f"{_first_line(error) or 'a write failed'}{note}; {then}"
        )

    def other_checkpoint(self, path: Path) -> str:
        """What to resume from instead of the checkpoint at `path`, in words: the newest other
        complete one beside it (of its own run: it may be another run's, or a copy)."""
        path = Path(path)
        others = sorted(
            p for p in path.parent.glob("step_*")
            if (p / TRAINER_STATE).is_file() and p.resolve() != path.resolve()
        )  # fmt: skip
        if others:
            return f"resume from another with trainer.resume={others[-1]}"
        if path.parent.resolve() != self.root.resolve():
            return f"no other checkpoint is kept beside it; copy {path.name} again if it is a copy"
        return "no other checkpoint of this run is kept; start over in a new trainer.run_dir"

    def wait(self) -> None:
        """Wait for the background save in flight, if any; raise if it failed."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._failure is not None:
            name, error = self._failure
            self._failure = None
            if isinstance(error, CheckpointError) or peer_gone(error):
                raise error  # said in one line by the rank
            raise RuntimeError(
                f"the background checkpoint {self.root / name} failed on rank {self.rank}: "
                f"{type(error).__name__}: {error}; `latest` still names the previous one"
            ) from error

    def _prune(self) -> None:
        """Rank 0, after a save: keep the newest `keep` checkpoints. Also removes what a
        process killed part way left: a save's `.step_N.tmp` (none other is in flight: `save`
        waits for the one before) and a `step_N` without its trainer.json (a removal cut
        short; `latest` names a complete one)."""
        steps = sorted(self.root.glob("step_*"))
        done = [p for p in steps if (p / TRAINER_STATE).is_file()]
        stale = [p for p in steps if p not in done] + list(self.root.glob(".step_*.tmp"))
        for old in done[: max(0, len(done) - self.keep)] + stale:
            shutil.rmtree(old, ignore_errors=True)

    def _verify(self, path: Path, state: dict[str, Any]) -> None:
        """CheckpointError on every rank unless each file the checkpoint at `path` (its
        trainer.json: `state`) recorded is as it was written; the ranks hash a share each
        (`share_out`: about as many bytes each)."""
        try:
            files = recorded_files(path, state)
        except CheckpointError as error:
            raise CheckpointError(
                f"{error}; {self.other_checkpoint(path)} (or trainer.verify_checkpoints=false "
                "to read it as it is)"
            ) from None
        if files is None:  # written before checkpoints recorded their files
            return
        # RNG files are read at the world size that wrote them only; a missing one is said by
        # `load`, and the run goes on without it
        same_world = state.get("world_size") == self.world
        sizes = {name: entry["bytes"] for name, entry in files.items()
                 if not name.startswith("rng_rank") or (same_world and (path / name).exists())}  # fmt: skip
        problems = file_problems(path, share_out(sizes, self.world)[self.rank], files)
        if self.world > 1 and dist.is_initialized():
            shares: list[Any] = [None] * self.world
            dist.all_gather_object(shares, problems)
            problems = [problem for share in shares for problem in share]
        if problems:
            raise CheckpointError(
                f"{damage(path, problems)}; {self.other_checkpoint(path)} (or "
                "trainer.verify_checkpoints=false to read it as it is)"
            )

    def load(self, engine: Any, path: Path) -> dict[str, Any]:
        """Restore `engine` and this rank's RNG from `path`; returns the trainer state. A
        damaged checkpoint (unreadable trainer.json, files changed since they were written,
        engine files that do not load) is a CheckpointError naming it, not a traceback per
        rank."""
        path = Path(path)
        try:
            state = json.loads((path / TRAINER_STATE).read_text())
            if not isinstance(state, dict):
                raise ValueError(f"a JSON {type(state).__name__}, not an object")
            # a state without its step or data position would resume from step 0 on these
            # weights, silently, and overwrite the run's checkpoints
            missing = [key for key in ("step", "loader") if key not in state]
            if missing:
                raise ValueError(f"it lacks {', '.join(missing)}")
            named = path.name.removeprefix("step_")
            if named.isdigit() and int(named) != state["step"]:
                raise ValueError(f"it records step {state['step']} in {path.name}")
        except (OSError, ValueError) as error:
            raise CheckpointError(
                f"{path / TRAINER_STATE}: unreadable ({error}): a damaged checkpoint; "
                f"{self.other_checkpoint(path)}"
            ) from error
        if self.model is not None:
            self.model.check(state, path)
        if self.verify:
            self._verify(path, state)
        from torch.distributed.checkpoint.api import CheckpointException

        # DCP logs a missing .metadata (to the root logger) with its traceback before it
        # fails: the failure is said in one line below
        logging.getLogger().addFilter(_not_a_metadata_fallback)
        rng = path / f"rng_rank{self.rank}.pt"
        try:
            engine.load(path)
            if state.get("world_size") == self.world and rng.is_file():
                set_rng_state(torch.load(rng, weights_only=False))
        except CheckpointError:
            raise
        except (OSError, EOFError, RuntimeError, ValueError, KeyError, AssertionError,
                CheckpointException) as error:  # fmt: skip
            # a file torch cannot read (truncated, missing; DCP's CheckpointException, a
            # BaseException, or its assertion on missing metadata), or the engine's refusal
            if isinstance(error, CheckpointException) and error.failures:
                error = next(iter(error.failures.values()))[0]  # a rank's own error
            raise CheckpointError(
                f"{path}: cannot resume from it: {type(error).__name__}: "
                f"{_first_line(error) or 'a file ends early (truncated)'}"
            ) from None
        if state.get("world_size") == self.world and not rng.is_file():
            # the weights and the data position are restored; the random draws are not
            print(f"kiln train: rank {self.rank}: {rng} is missing: this rank's random "
                  "generators start afresh, so the resumed run is not bitwise the "
                  "uninterrupted one", file=sys.stderr, flush=True)  # fmt: skip
        barrier()
        return state


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError (Python's own writes), RuntimeError (torch.save's
    "unexpected pos" on a full disk, DeepSpeed's), DCP's CheckpointException (a BaseException,
    holding each rank's error)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (OSError, RuntimeError, CheckpointException)


def share_out(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Files ({name: bytes}) split among `world` ranks to read about as many bytes each: the
    largest first, each to the rank with the fewest bytes so far (the lower rank on a tie).
    Every rank computes the same split from the same sizes."""
    loads, shares = [0] * world, [[] for _ in range(world)]
    for name in sorted(sizes, key=lambda name: (-sizes[name], name)):
        rank = min(range(world), key=lambda rank: (loads[rank], rank))
        shares[rank].append(name)
        loads[rank] += sizes[name]
    return shares


def tree_bytes(path: Path) -> int:
    """The bytes of the files under `path` (0 when it is gone)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def sync_directory(path: Path) -> None:
    """fsync a directory: the names of the files in it reach the disk, not only their bytes.
    A filesystem that cannot (some network ones say EINVAL) is left to its own guarantees."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _errnos(error: BaseException) -> set[int]:
    """The OS error numbers in `error` and its causes (torch reports a full disk as a
    RuntimeError saying "No space left on device", or only "unexpected pos")."""
    found: set[int] = set()
    seen: BaseException | None = error
    while seen is not None and len(found) < 8:
        if isinstance(seen, OSError) and seen.errno:
            found.add(seen.errno)
        text = str(seen)
        if "No space left on device" in text:
            found.add(errno.ENOSPC)
        if "Disk quota exceeded" in text:
            found.add(errno.EDQUOT)
        seen = seen.__cause__ or seen.__context__
    return found


def disk_full_note(directory: Path, error: BaseException, needed: int, detail: str = "") -> str:
    """The note " (the disk is full: ...)" when that is why the write failed: the error says
    so, or says nothing of its cause and fewer than `needed` bytes are free; otherwise ""."""
    numbers = _errnos(error)
    if numbers and not numbers & {errno.ENOSPC, errno.EDQUOT}:
        return ""  # another cause (permissions, a missing directory...), said by the error
    free = shutil.disk_usage(directory).free
    if not numbers and free >= max(needed, 1 << 20):
        return ""
    full = "the disk quota is used up" if errno.EDQUOT in numbers else "the disk is full"
    return f" ({full}: {_mebibytes(free)} free in {directory}{detail})"


def _mebibytes(count: int) -> str:
    if count >= 1 << 30:
        return f"{count / (1 << 30):,.1f} GiB"
    if count >= 1 << 20:
        return f"{count / (1 << 20):,.1f} MiB"
    return f"{count / (1 << 10):,.1f} KiB"


def _not_a_metadata_fallback(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(
        ("Global metadata is not found", "Rank local metadata is not found")
    )


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (DCP's CheckpointException holds every
    rank's traceback)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "")
