"""`kiln train`: start the ranks (torchrun on this machine when needed) and run the loop.

`kiln train` on a machine with `cluster.nodes * cluster.gpus_per_node` ranks:

- inside a launch that already set RANK/WORLD_SIZE (torchrun, `kiln launch`): this process is
  one rank and trains;
- otherwise, one rank: this process trains;
- otherwise: it writes the resolved config into the run directory and starts torchrun with
  one process per rank on this machine, each running `python -m pretrain.train CONFIG`.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pretrain.exit_codes import (
    INTERRUPTED_EXIT_CODE,
    PEER_GONE,
    USER_ERROR_EXIT_CODE,
    peer_gone,
    rank_status,
)

if TYPE_CHECKING:
    import torch

# torch is imported where a rank needs it, not at the top: the process that only writes the
# config and starts torchrun (`kiln train` at 2+ ranks, `kiln launch`) then never imports it,
# which saved one torch import (2 s here) before the ranks could start theirs.


@dataclass
class Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(cfg: Any) -> Context:
    """Join (or, alone, create) the process group; pick the device and backend."""
    import torch
    import torch.distributed as dist

    cuda = cfg.cluster.accelerator == "cuda" and torch.cuda.is_available()
    backend = cfg.engine.backend if cfg.engine.backend != "auto" else ("nccl" if cuda else "gloo")
    if "RANK" not in os.environ:  # alone: a one-rank group, so every engine works the same
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))  # fmt: skip
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        problem = device_problem(local_rank, torch.cuda.device_count(), cfg.cluster)
        if problem:
            from pretrain.config import ConfigError

            raise ConfigError(problem)
    elif (
        cfg.cluster.accelerator == "cuda" and local_rank == 0 and os.environ.get("RANK", "0") == "0"
    ):
        print("kiln train: cluster.accelerator=cuda, but torch sees no CUDA device: training on "
              "the CPU with gloo (cluster=local_cpu asks for that)", file=sys.stderr, flush=True)  # fmt: skip
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # with NCCL, gloo carries the loop's small CPU tensors (stop flags, metric means)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if backend == "nccl" else backend)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device)


def device_problem(local_rank: int, devices: int, cluster: Any) -> str | None:
    """Why local rank `local_rank` has no CUDA device of its own on a node with `devices`, or
    None (torch would fail in `set_device` with "invalid device ordinal", on every rank)."""
    if local_rank < devices:
        return None
    return (
        f"local rank {local_rank} has no GPU: this node has {devices} CUDA device(s) for "
        f"cluster.gpus_per_node={cluster.gpus_per_node} ranks; set cluster.gpus_per_node="
        f"{devices} (or make the devices visible: CUDA_VISIBLE_DEVICES)"
    )


# glibc's malloc for CPU ranks: tensors of up to this many bytes come from the heap, and freed
# heap memory is handed back to the system only above the trim threshold. By default the mmap
# threshold moves with the process's allocation history (raised each time a large block is
# freed), so the same step costs page faults in one process and not in another: measured with
# bench/trainer.py, a fixed threshold took both the trainer and the minimal loop from 90-115 ms
# to 67-78 ms per step, with less spread between rounds.
MALLOC_MMAP_THRESHOLD = 256 * 2**20
MALLOC_TRIM_THRESHOLD = 1024 * 2**20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>


def malloc_env() -> dict[str, str]:
    """The environment variables that give a new process the settings `tune_cpu_malloc` sets."""
    return {"MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD),
            "MALLOC_TRIM_THRESHOLD_": str(MALLOC_TRIM_THRESHOLD)}  # fmt: skip


def tune_cpu_malloc(*, force: bool = False) -> bool:
    """Fix glibc's mmap and trim thresholds in this process (`mallopt`; no Python binding
    exists), unless the environment already chose them (glibc read them at the process's
    start; `force`: a forked rank, whose environment came after its start). False where glibc
    is not the C library (musl, macOS): nothing changes."""
    import ctypes
    import ctypes.util

    if any(key in os.environ for key in malloc_env()) and not force:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    try:
        mmap = int(os.environ.get("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD))
        trim = int(os.environ.get("MALLOC_TRIM_THRESHOLD_", MALLOC_TRIM_THRESHOLD))
    except ValueError:  # not a number: glibc ignores it too
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap)) and bool(mallopt(M_TRIM_THRESHOLD, trim))


def worker(cfg: Any, *, one_line_errors: bool = True) -> int:
    """Train as one rank of the current launch. A config, data or checkpoint problem prints
    `kiln train: rank R: MESSAGE` and returns USER_ERROR_EXIT_CODE (`one_line_errors`; the
    Ray launcher turns it off: Ray Train carries the exception itself to `kiln launch`)."""
    import torch
    import torch.distributed as dist

    from pretrain.trainer import train

    if cfg.cluster.accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.use_deterministic_algorithms(True, warn_only=True)
        tune_cpu_malloc()
    try:
        context = init_distributed(cfg)
        with run_dir_held(cfg.trainer.run_dir, context.rank):
            return train(cfg, context)
    except user_errors() as error:
        if not one_line_errors:
            raise
        # one write: the ranks share the terminal, and print() writes the newline apart
        sys.stderr.write(f"kiln train: rank {os.environ.get('RANK', '0')}: {one_line(error)}\n")
        sys.stderr.flush()
        return USER_ERROR_EXIT_CODE
    except OSError as error:
        if not one_line_errors or error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a full disk (metrics.jsonl, a log): what filled it is the user's to see; the run's
        # checkpoints are intact
        sys.stderr.write(f"kiln train: rank {os.environ.get('RANK', '0')}: {error}; "
                         f"{resume_hint(cfg.trainer.run_dir)}\n")  # fmt: skip
        sys.stderr.flush()
        return USER_ERROR_EXIT_CODE
    except RuntimeError as error:
        if not one_line_errors or not peer_gone(error):
            raise
        # a collective cut short because another rank's process ended (its error, said by it
        # above, or a kill): gloo's traceback here would bury that rank's own line
        sys.stderr.write(f"kiln train: rank {os.environ.get('RANK', '0')}: {PEER_GONE}\n")
        sys.stderr.flush()
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        if not one_line_errors:
            raise
        # Ctrl-C stops at once, as it should; where the run stands is one line, not a
        # traceback per rank of wherever each was
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"kiln train: interrupted; {resume_hint(cfg.trainer.run_dir)}\n")
            sys.stderr.flush()
        return INTERRUPTED_EXIT_CODE
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def resume_hint(run_dir: str | Path) -> str:
    """Where a stopped run would continue from, for the line that says it stopped."""
    from pretrain.preflight import latest_checkpoint

    path, _ = latest_checkpoint(run_dir)
    if path is None:
        return "no checkpoint was written yet"
    return f"the latest checkpoint is {path} (trainer.resume=auto continues from it)"


def write_run_config(cfg: Any, run_dir: Path) -> Path:
    """The resolved config, as YAML for people and as a pickle for the ranks to load."""
    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True, exist_ok=True)
    yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    (run_dir / "config.yaml").write_text(config_header(cfg) + yaml)
    path = run_dir / "config.pkl"
    path.write_bytes(pickle.dumps(cfg))
    return path


def config_header(cfg: Any) -> str:
    """Comment lines naming what the YAML below leaves implicit: the option picked in each
    config group and the overrides as typed (as Hydra composed them; absent outside a Hydra
    app), and the schema class of each group node (which engine, objective and model family:
    CLM's `objective:` holds only the settings every objective has, `z_loss`)."""
    lines = ["# The resolved config of this run."]
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
        picked = [f"{group}={option}" for group, option in sorted(choices.items())
                  if option is not None and not group.startswith(("hydra", "schema"))
                  and "/" not in group]  # fmt: skip
        lines.append(f"# groups: {' '.join(picked)}")
        # the overrides as typed (of this point, in a sweep): Hydra keeps no record of its own
        typed = HydraConfig.get().overrides.task
        lines.append(f"# overrides: {' '.join(typed) if typed else '(none)'}")
    except ValueError:  # not inside a Hydra app
        pass
    nodes = ("model", "objective", "engine", "optim", "cluster", "logger")
    schemas = [f"{name}={type(getattr(cfg, name)).__name__}" for name in nodes
               if hasattr(cfg, name)]  # fmt: skip
    lines.append(f"# schemas: {' '.join(schemas)}")
    return "\n".join(lines) + "\n"


# set by `kiln train` in the environment of the torchrun it starts: that process's pid, so the
# agent stops when `kiln train` dies (`die_with_parent`), even of SIGKILL
PARENT_ENV = "KILN_PARENT_PID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_SECONDS = 120  # what a stopped rank may take to finish its step and save (as Slurm's lead)


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """Have the kernel send this process `sig` when `parent` (its parent now) exits, however it
    exits (Linux's PR_SET_PDEATHSIG; elsewhere nothing). A `kiln train` killed with SIGKILL
    would otherwise leave its torchrun agent and ranks training on, and a rerun would train
    beside them in the same run directory. SIGTERM is the stop a rank answers by finishing its
    step and saving. A parent already gone (before the call) sends it at once."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


# the warm torchrun agent `kiln train` starts before it composes its config (`start_agent`),
# and the write end of the pipe its arguments go down; None when there is none
_agent: tuple[subprocess.Popen, int] | None = None


def start_agent() -> None:
    """Start `python -m pretrain.torchrun --args-fd N` now, ahead of its arguments: it imports
    torch while this process composes the config, and `run_torchrun` hands it the command
    (see pretrain/torchrun.py). A run that needs no torchrun discards it (`discard_agent`),
    as does this process's exit."""
    global _agent
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere, the machine's CPUs
    cpus = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    if _agent is not None or cpus < 2:
        return  # with one CPU the agent's import would only slow the composing down
    try:
        read, write = os.pipe()
    except OSError:  # out of file descriptors: torchrun starts the usual way, later
        return
    try:
        agent = subprocess.Popen(
            [sys.executable, "-m", "pretrain.torchrun", "--args-fd", str(read)],
            pass_fds=(read,), env=os.environ | {PARENT_ENV: str(os.getpid())},
        )  # fmt: skip
    except OSError:
        os.close(write)
        return
    finally:
        os.close(read)
    _agent = (agent, write)
    atexit.register(discard_agent)


def discard_agent() -> None:
    """Stop the warm agent, if one is waiting: this run does not start torchrun here."""
    global _agent
    if _agent is None:
        return
    agent, write = _agent
    _agent = None
    os.close(write)  # nothing to read: an agent past its import ends by itself
    agent.kill()
    agent.wait()


def _take_agent(
    command: list[str], env: dict[str, str], *, fork: bool = False
) -> subprocess.Popen | None:
    """The warm agent, told to run `command` (torchrun's arguments after
    `python -m pretrain.torchrun`) with `env`, or None when there is no agent for it. `fork`:
    it forks the ranks from itself once it has imported what they need (`forked_rank`)."""
    if command[:3] != [sys.executable, "-m", "pretrain.torchrun"]:
        discard_agent()
        return None
    return _send_to_agent({"argv": command[3:], "env": env, "fork": fork})


def _send_to_agent(request: dict[str, Any]) -> subprocess.Popen | None:
    """The warm agent, sent `request` (with this process's directory), or None when there is
    no agent (or it died before it read)."""
    global _agent
    if _agent is None:
        return None
    agent, write = _agent
    _agent = None
    data = json.dumps(request | {"cwd": os.getcwd()}).encode()
    try:
        with os.fdopen(write, "wb") as pipe:
            pipe.write(data)
    except OSError:  # the agent died before it read (it was killed): start one the usual way
        agent.kill()
        agent.wait()
        return None
    return agent


def _rank_in_agent(config_path: Path) -> int | None:
    """Train the one rank of this run in the warm agent (`python -m pretrain.train CONFIG`
    there, pretrain/torchrun.py), which imported torch while this process composed the
    config; its exit status, or None when there is no agent (this process trains). SIGTERM
    and SIGUSR1 sent to this process (a scheduler's warning) are passed on; a Ctrl-C in the
    terminal reaches the agent itself."""
    agent = _send_to_agent({"rank": str(config_path), "env": dict(os.environ)})
    if agent is None:
        return None

    def forward(signum: int, _frame: Any) -> None:
        agent.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = agent.wait()
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell says


def local_torchrun_command(world: int, config_path: Path) -> list[str]:
    """torchrun on this machine (`pretrain/torchrun.py`: torchrun without its own traceback):
    `world` ranks, each `python -m pretrain.train CONFIG`."""
    return [
        sys.executable, "-m", "pretrain.torchrun", f"--nproc_per_node={world}",
        "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "pretrain.train", str(config_path),
    ]  # fmt: skip


@contextlib.contextmanager
def run_dir_held(run_dir: str | Path, rank: int) -> Iterator[None]:
    """Rank 0 holds the run directory's lock while the ranks train (pretrain/run_lock.py), and
    the other ranks wait until it has it: no rank looks for a checkpoint to resume before the
    directory is this run's (a rank that went ahead while rank 0 waited for another job's lock
    started from another step, and the ranks' collectives no longer matched). A refusal
    reaches every rank, each of which raises it."""
    import torch.distributed as dist

    from pretrain.run_lock import RunDirBusy, hold

    with contextlib.ExitStack() as stack:
        refused = None
        if rank == 0:
            try:
                stack.enter_context(hold(run_dir))
            except RunDirBusy as error:
                refused = str(error)
        if dist.is_initialized() and dist.get_world_size() > 1:
            said = [refused]
            dist.broadcast_object_list(said, src=0)
            refused = said[0]
        if refused is not None:
            raise RunDirBusy(refused)
        yield


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions whose message says all a user needs (the config key, shard or
    checkpoint at fault): a rank prints that one line instead of a traceback."""
    from data_pipeline.shards import ShardFormatError
    from pretrain.checkpoint_io import CheckpointError
    from pretrain.config import ConfigError
    from pretrain.data.manifest import DataError
    from pretrain.run_lock import RunDirBusy

    return (ConfigError, DataError, CheckpointError, ShardFormatError, RunDirBusy)


def one_line(error: BaseException) -> str:
    """A user error's message as a rank prints it. One raised in a DataLoader worker process
    arrives as "Caught X in DataLoader worker process N" and the worker's traceback, whose last
    line holds the message; a shard found malformed while training gets the settings that
    find it before training or skip it."""
    from data_pipeline.shards import ShardFormatError

    message = str(error).rstrip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1].split(": ", 1)[-1]
    if isinstance(error, ShardFormatError):
        message += (
            " (data.verify=shard checks every shard before training; data.on_bad_shard=skip "
            "skips bad shards)"
        )
    return message


def run(cfg: Any) -> int:
    """`kiln train` entry point."""
    if "RANK" not in os.environ:
        from pretrain.preflight import nothing_to_train, preflight

        problems = preflight(cfg)
        for problem in problems:
            print(f"kiln train: {problem}", file=sys.stderr)
        if problems:
            return USER_ERROR_EXIT_CODE
        done = nothing_to_train(cfg)
        if done:
            print(f"kiln train: {done}", file=sys.stderr)
            return 0
    run_dir = Path(cfg.trainer.run_dir)
    config_path = write_run_config(cfg, run_dir)
    world = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    if "RANK" in os.environ or world == 1:
        code = _rank_in_agent(config_path) if "RANK" not in os.environ else None
        if code is not None:
            return code
        discard_agent()  # before this process imports torch itself
        return worker(cfg)
    if cfg.cluster.nodes > 1:
        print(
            "kiln train: cluster.nodes > 1 needs `kiln launch cluster=slurm|ray`", file=sys.stderr
        )
        return 1
    return run_torchrun(cfg, local_torchrun_command(world, config_path))


def run_torchrun(cfg: Any, command: list[str]) -> int:
    """Run a torchrun `command` for this config, passing SIGTERM/SIGUSR1 on to it; returns the
    status rank 0 recorded in RUN_DIR/exit.json (torchrun itself reports any failure as 1)."""
    run_dir = Path(cfg.trainer.run_dir)
    env = dict(os.environ)
    if cfg.cluster.accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")
        for key, value in malloc_env().items():
            env.setdefault(key, value)
    # torchrun signalled itself (a SIGTERM to the process group, or `kiln train`'s death) gives
    # the ranks this long to finish the step and save before it kills them (torch >= 2.12;
    # 30 s before); a signal to `kiln train` goes to the ranks themselves (`stop_ranks`)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(STOP_SECONDS))
    exit_file = run_dir / "exit.json"
    exit_file.unlink(missing_ok=True)
    # torchrun forwards SIGTERM/SIGUSR1 to the ranks but reports any failure as 1: the real
    # status (e.g. REQUEUE_EXIT_CODE after a signal) is what rank 0 wrote to exit.json
    # CPU ranks are forked from the warm agent (`forked_rank`); CUDA ranks start as new
    # processes, as torchrun starts them: a process must not fork once CUDA is initialised
    fork = cfg.cluster.accelerator == "cpu" and os.environ.get("KILN_FORK_RANKS", "1") != "0"
    child = _take_agent(command, env, fork=fork) or subprocess.Popen(
        command, env=env | {PARENT_ENV: str(os.getpid())}
    )

    def forward(signum: int, _frame: Any) -> None:
        stop_ranks(child)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    # a Ctrl-C in the terminal reaches torchrun (this process group), which stops the ranks
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGINT, interrupt)  # `kiln launch -m` starts the next job
    if exit_file.is_file():
        import json

        return int(json.loads(exit_file.read_text())["exit_code"])
    return code


def stop_ranks(agent: subprocess.Popen) -> None:
    """Send SIGTERM (the trainer's "finish the step, save, exit 42") to the ranks of the torchrun
    `agent`, its child processes. Sent to torchrun itself, it would stop the ranks with SIGTERM
    too, but kill them 30 s later (torch's shutdown timeout), which a step and a checkpoint can
    outlast, and print its own traceback; sent to the ranks, torchrun sees them exit. Before
    torchrun has started them, the agent gets it."""
    import psutil  # DeepSpeed's dependency, and Ray's

    sent = 0
    with contextlib.suppress(psutil.Error):
        process = psutil.Process(agent.pid)
        own = process.cmdline()
        for child in process.children():
            with contextlib.suppress(psutil.Error):
                # a forked rank has the agent's command line, a started one runs
                # pretrain.train; not a helper process torchrun's multiprocessing started
                command = child.cmdline()
                if command == own or "pretrain.train" in command:
                    child.send_signal(signal.SIGTERM)
                    sent += 1
    if not sent:
        agent.send_signal(signal.SIGTERM)


# the warm agent's pid, in it and in the ranks forked from it (`preload_rank`)
_agent_pid: int | None = None


def preload_rank(config_path: str) -> None:
    """Import, in the warm agent, the modules a rank of this config imports before its first
    step, so that the ranks forked from the agent start with them (`forked_rank`). On a 2-core
    machine a rank's own imports took 4-6 s: torch 2.4 s (the agent has it already),
    torch._dynamo 1.8 s (the optimizers and `use_deterministic_algorithms` import it), kiln's
    trainer, and for DeepSpeed ZeRO the 1.9 s of DeepSpeed's Muon optimizer (which
    `deepspeed.initialize` imports: its kernels are wrapped in torch.compile), and W&B's 1 s.
    The agent runs no tensor code before it forks, as a rank does before its DataLoader
    forks its workers."""
    import contextlib
    import importlib

    global _agent_pid
    _agent_pid = os.getpid()
    import torch._dynamo  # noqa: F401

    import pretrain.checkpoint_io  # noqa: F401
    import pretrain.data.loader  # noqa: F401
    import pretrain.engine  # noqa: F401
    import pretrain.metrics  # noqa: F401
    import pretrain.models.moe  # noqa: F401
    import pretrain.profiling  # noqa: F401
    import pretrain.trainer  # noqa: F401

    cfg = pickle.loads(Path(config_path).read_bytes())  # noqa: S301 - written by `run`
    if cfg.engine.kind == "deepspeed":
        import deepspeed  # noqa: F401

        with contextlib.suppress(ImportError):  # DeepSpeed releases without it start without it
            importlib.import_module("deepspeed.runtime.zero.muon.muon_optimizer")
    if cfg.logger.backend == "wandb":
        import wandb  # noqa: F401 (1 s; rank 0 logs)


def as_new_process() -> None:
    """Give a process forked from the warm agent what a new Python process started with the
    same environment would have and a fork does not: a session of its own (torchrun starts
    each rank in a new session: a Ctrl-C in the terminal reaches torchrun, which stops the
    ranks), Python's signal handlers (torchrun's agent set its own), no exit hooks (the
    agent's are the agent's to run), unbuffered output (torchrun starts ranks with
    `python -u`), and the thread count and malloc settings of the environment (the C
    libraries read them when the agent started, before torchrun gave the ranks their
    environment)."""
    import io

    import torch

    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    if _agent_pid is not None:  # the agent's death stops the rank (SIGTERM, as torchrun stops)
        die_with_parent(_agent_pid)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    atexit._clear()
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        stream.flush()
        raw = io.FileIO(fd, "w", closefd=False)
        setattr(sys, name, io.TextIOWrapper(raw, encoding=stream.encoding,
                                            errors=stream.errors, write_through=True))  # fmt: skip
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    tune_cpu_malloc(force=True)


def forked_rank(config_path: str) -> None:
    """A rank forked from the warm agent (torchrun's function entry point, start method
    "fork"; pretrain/torchrun.py): `python -m pretrain.train CONFIG` without a new
    interpreter, and without its imports (`preload_rank`). A finished run returns (torchrun
    waits for a return value); any other status is the process's exit status, as
    `end_rank` gives it."""
    as_new_process()
    sys.argv = [__file__, config_path]
    cfg = pickle.loads(Path(config_path).read_bytes())  # noqa: S301 - written by `run`
    try:
        code = worker(cfg)
    except (Exception, KeyboardInterrupt) as error:
        # what Python does with an exception nothing caught, which torchrun's wrapper of a
        # forked rank would only hand to the agent: print it (torch's hook writes "[rankN]:"
        # before each line), run the exit hooks, end with status 1, or of SIGINT
        sys.excepthook(type(error), error, error.__traceback__)
        atexit._run_exitfuncs()
        if isinstance(error, KeyboardInterrupt):
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        raise SystemExit(1) from None
    if code == USER_ERROR_EXIT_CODE:
        atexit._run_exitfuncs()  # the rank's own hooks: its logger may be unfinished
        raise SystemExit(rank_status(code))
    finish_rank(code)
    if code:
        raise SystemExit(code)


def main() -> int:
    config_path = Path(sys.argv[1])
    cfg = pickle.loads(config_path.read_bytes())  # noqa: S301 - written by `run` just before
    return worker(cfg)


def exit_now(code: int) -> NoReturn:
    """End a rank whose run is finished without the interpreter's teardown: the outputs are
    written, the logger finished, the process group destroyed. The teardown of a process that
    imported torch and DeepSpeed frees every module's objects one by one (0.5-2 s of CPU per
    rank, measured on a 2-core machine), and it is where gloo's worker threads can outlive the
    interpreter (pytorch/pytorch#179291: "terminate called without an active exception")."""
    finish_rank(code)
    os._exit(code)


def finish_rank(code: int) -> None:
    """What a finished rank's exit hooks would do and `exit_now` skips: stop W&B's service
    process, flush the logs and the output."""
    import logging

    wandb = sys.modules.get("wandb")
    if wandb is not None:  # its service process, which its own exit hook would stop
        wandb.teardown(exit_code=code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()


def end_rank(code: int) -> NoReturn:
    """The end of a rank's process with `worker`'s exit code: a finished run (trained,
    stopped for a requeue or diverged) skips the teardown (`exit_now`); a user error, whose
    logger may be unfinished, exits the ordinary way."""
    if code == USER_ERROR_EXIT_CODE:
        raise SystemExit(rank_status(code))
    exit_now(code)


def rank_main() -> NoReturn:
    """`python -m pretrain.train CONFIG`: one rank, trained, then this process ends."""
    end_rank(main())


if __name__ == "__main__":
    rank_main()
