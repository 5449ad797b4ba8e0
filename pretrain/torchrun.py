"""torchrun (`torch.distributed.run`, unchanged) without the traceback of its own stack when a
rank fails, and started ahead of its arguments: `kiln train` starts its local ranks with
`python -m pretrain.torchrun ARGS`, or with a warm agent (`--args-fd`, below).

When a rank exits with an error, torchrun raises `ChildFailedError` out of its `main`, and
Python prints torchrun's call stack (the launcher's, not the rank's) above the failure table.
The rank has already said what went wrong (`kiln train: rank R: ...`, or its own traceback);
this prints the table alone (which rank, its exit code or signal, when) and exits 1, as
torchrun does. Everything else (arguments, signals, exit codes) is torchrun's.

A warm agent: `python -m pretrain.torchrun --args-fd N` imports torchrun (torch: about 2.4 s
on a 2-core machine) first, then reads one JSON object from file descriptor N: torchrun's
arguments, the environment for the ranks and the working directory. `kiln train` starts it
before it composes its config (about 1.5 s of Hydra), so the two overlap and the ranks start
that much sooner (`pretrain.train.start_agent`). Nothing to read (the run needed no agent:
a config error) ends it with status 0. A run of one rank sends `{"rank": CONFIG, ...}`: the
agent trains it itself, as `python -m pretrain.train CONFIG` would (`KILN_WARM_AGENT=0`: the
`kiln train` process trains it).

Forked ranks: a request with `"fork": true` (CPU ranks; `KILN_FORK_RANKS=0` turns it off) runs
the same torchrun, with its function entry point and "fork" start method: the agent imports
what the ranks import (`pretrain.train.preload_rank`), then each rank is a fork of it running
`pretrain.train.forked_rank(CONFIG)`, which saves each rank its own imports (2.5-3 s on 2
cores). Not for CUDA ranks: a process must not fork once CUDA is initialised, and the
imports could initialise it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

from pretrain.exit_codes import (
    INTERRUPTED_EXIT_CODE,
    REQUEUE_EXIT_CODE,
    SAID_EXIT_CODE,
    UNDER_TORCHRUN,
)
from pretrain.train import PARENT_ENV, die_with_parent


def read_request(fd: int) -> dict | None:
    """The request on `fd` (read to its end), or None when the sender wrote nothing."""
    with os.fdopen(fd, "rb") as pipe:
        data = pipe.read()
    return json.loads(data) if data.strip() else None


def fork_ranks(argv: list[str]) -> None:
    """torchrun with `argv` (`... -m pretrain.train CONFIG`), its ranks forked from this
    process once it has imported what they import (`pretrain.train.preload_rank`), each
    running `pretrain.train.forked_rank(CONFIG)`: torchrun's function entry point and its
    "fork" start method, in place of a new `python -u -m pretrain.train CONFIG` per rank. The
    rendezvous, the ranks' environment, restarts, signals and failure reports are torchrun's."""
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    args = parse_args(argv)
    if not (args.module and args.training_script == "pretrain.train"):
        raise ValueError(f"only `-m pretrain.train CONFIG` ranks are forked, not {argv}")
    (config_path,) = args.training_script_args
    args.start_method = "fork"
    config, _, _ = config_from_args(args)
    from pretrain.train import forked_rank, preload_rank

    preload_rank(config_path)
    # a failed forked rank has printed its own traceback; torchrun's agent would add its own
    # stack (where it noticed, in its wait) under the one line it logs for a failed process
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_no_traceback)
    elastic_launch(config, forked_rank)(config_path)


def _no_traceback(record: logging.LogRecord) -> bool:
    record.exc_info, record.exc_text = None, None
    return True


# ranks that stopped on a signal (after saving, or at once on Ctrl-C) and said so on rank 0,
# or that said their user error in one line each
STOPPED = (REQUEUE_EXIT_CODE, INTERRUPTED_EXIT_CODE, SAID_EXIT_CODE)


def _not_a_stop(record: logging.LogRecord) -> bool:
    """Drop torchrun's "failed (exitcode: N)" for a rank that stopped on a signal (rank 0 has
    said where the run stands, and the status is what `kiln train` exits with) or said its
    user error."""
    return not (
        str(record.msg).startswith("failed (exitcode: %s)")
        and isinstance(record.args, tuple)
        and record.args[:1] in [(code,) for code in STOPPED]
    )


def _not_ctrl_c(record: logging.LogRecord) -> bool:
    """Drop torchrun's lines about a Ctrl-C ("Received SIGINT death signal", "Closing process
    N via signal SIGINT"): rank 0 says in one line that the run was interrupted and where it
    stands."""
    message, args = str(record.msg), record.args if isinstance(record.args, tuple) else ()
    sigint = {signal.SIGINT, int(signal.SIGINT), "SIGINT"}
    return not (
        message.startswith(
            (
                "Received %s death signal",
                "Closing process %s via signal %s",
                "Sending process %s closing signal %s",
            )
        )  # fmt: skip
        and any(arg in sigint for arg in args)
    )


def _not_a_termination(record: logging.LogRecord) -> bool:
    """Drop "Terminating process N via signal SIGTERM" (torch's spawn of forked ranks, as
    torchrun stops the others after one failed): the failed rank's own line says why."""
    return not str(record.msg).startswith("Terminating process %s via signal SIGTERM")


def main() -> int:
    parent = os.environ.pop(PARENT_ENV, "")
    if parent.isdigit():  # started by `kiln train`: stop (SIGTERM, as torchrun stops) with it
        die_with_parent(int(parent))
    warm = sys.argv[1:2] == ["--args-fd"]
    if warm:
        # a Ctrl-C while `kiln train` composes is for that process, which then stops this one
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if warm:
        request = read_request(int(sys.argv[2]))
        if request is None:
            return 0
        signal.signal(signal.SIGINT, signal.default_int_handler)  # torchrun's, and the ranks'
        # torchrun reads its environment when it parses its arguments and hands it to the ranks
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.pop(PARENT_ENV, None)
        os.chdir(request["cwd"])
        if "rank" in request:  # one rank: trained here, as `python -m pretrain.train CONFIG`
            from pretrain import train

            sys.argv = [train.__file__, request["rank"]]
            train.rank_main()
        sys.argv = [sys.argv[0], *request["argv"]]
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_not_a_stop)
    logging.getLogger("torch.multiprocessing.spawn").addFilter(_not_a_termination)
    for name in ("torch.distributed.elastic.multiprocessing.api",
                 "torch.distributed.elastic.agent.server.api"):  # fmt: skip
        logging.getLogger(name).addFilter(_not_ctrl_c)
    os.environ[UNDER_TORCHRUN] = "1"  # the ranks' environment (forked or started)
    try:
        if warm and request.get("fork"):
            fork_ranks(request["argv"])
        else:
            torchrun()  # parses sys.argv[1:], as `python -m torch.distributed.run` does
    except ChildFailedError as error:
        codes = {failure.exitcode for failure in error.failures.values()}
        if not codes <= set(STOPPED):
            print(error, file=sys.stderr, flush=True)
        # else every failed rank stopped on a signal and rank 0 said so, or said its error
        return 1
    except SignalException as error:
        if error.sigval == signal.SIGINT:  # Ctrl-C: rank 0 has said where the run stands
            return INTERRUPTED_EXIT_CODE
        # torchrun was signalled itself (its parent `kiln train` died, or a kill sent to it):
        # it has stopped the ranks the way it stops them; its stack would say nothing more
        print(f"torchrun: stopped by {signal.Signals(error.sigval).name}; the ranks were "
              "stopped", file=sys.stderr, flush=True)  # fmt: skip
        return 128 + int(error.sigval)
    return 0


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    # the ranks have exited and torchrun has reported them: skip the interpreter's teardown
    # of the modules torch imported (about 1 s of CPU on a 2-core machine, at every run's end)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
