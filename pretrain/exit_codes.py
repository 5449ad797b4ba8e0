"""The exit statuses of a run, shared by the trainer and the launchers (no torch import here:
`kiln launch` reads them without paying for one).

- `DONE` (0): trained to `trainer.max_steps`.
- `USER_ERROR_EXIT_CODE` (1): a config, data or checkpoint problem, said in one line per rank.
- `SAID_EXIT_CODE` (2): a rank under kiln's torchrun (`UNDER_TORCHRUN` set) that said its
  user error in one line; torchrun then prints no failure table, and `kiln train` exits 1.
- `NONFINITE_EXIT_CODE` (3): too many non-finite steps in a row; the last good checkpoint is
  intact, and a restart would diverge again, so no launcher restarts it.
- `REQUEUE_EXIT_CODE` (42): stopped by SIGTERM/SIGUSR1 after saving; the launcher requeues it.
- `INTERRUPTED_EXIT_CODE` (130, a shell's status for SIGINT): stopped at once by Ctrl-C, from
  the latest checkpoint on (rank 0 says which).
"""

DONE = 0
USER_ERROR_EXIT_CODE = 1
SAID_EXIT_CODE = 2
UNDER_TORCHRUN = "KILN_UNDER_TORCHRUN"
NONFINITE_EXIT_CODE = 3
REQUEUE_EXIT_CODE = 42
INTERRUPTED_EXIT_CODE = 130


def rank_status(code: int) -> int:
    """A rank process's exit status for `worker`'s `code`: a user error is SAID_EXIT_CODE
    under kiln's torchrun (its line said it all), else the code itself."""
    import os

    if code == USER_ERROR_EXIT_CODE and os.environ.get(UNDER_TORCHRUN):
        return SAID_EXIT_CODE
    return code


# what a rank says when a collective fails because another rank's process ended
PEER_GONE = "stopped: another rank's process ended (its own message says why)"


def peer_gone(error: BaseException) -> bool:
    """Whether `error` is gloo's report that the other end of a collective went away (the
    other rank's own error, or a kill, is the news; this rank's traceback would bury it)."""
    text = str(error)
    return "gloo" in text and any(
        cause in text for cause in ("Connection closed by peer", "Connection reset by peer")
    )
