"""The exit statuses of a run, shared by the trainer and the launchers (no torch import here:
`kiln launch` reads them without paying for one).

- `DONE` (0): trained to `trainer.max_steps`.
- `USER_ERROR_EXIT_CODE` (1): a config, data or checkpoint problem, said in one line per rank.
- `NONFINITE_EXIT_CODE` (3): too many non-finite steps in a row; the last good checkpoint is
  intact, and a restart would diverge again, so no launcher restarts it.
- `REQUEUE_EXIT_CODE` (42): stopped by SIGTERM/SIGUSR1 after saving; the launcher requeues it.
- `INTERRUPTED_EXIT_CODE` (130, a shell's status for SIGINT): stopped at once by Ctrl-C, from
  the latest checkpoint on (rank 0 says which).
"""

DONE = 0
USER_ERROR_EXIT_CODE = 1
NONFINITE_EXIT_CODE = 3
REQUEUE_EXIT_CODE = 42
INTERRUPTED_EXIT_CODE = 130
