"""torchrun (`torch.distributed.run`, unchanged) without the traceback of its own stack when a
rank fails: `kiln train` starts its local ranks with `python -m pretrain.torchrun ARGS`.

When a rank exits with an error, torchrun raises `ChildFailedError` out of its `main`, and
Python prints torchrun's call stack (the launcher's, not the rank's) above the failure table.
The rank has already said what went wrong (`kiln train: rank R: ...`, or its own traceback);
this prints the table alone (which rank, its exit code or signal, when) and exits 1, as
torchrun does. Everything else (arguments, signals, exit codes) is torchrun's.
"""

from __future__ import annotations

import logging
import os
import sys


def main() -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun()  # parses sys.argv[1:], as `python -m torch.distributed.run` does
    except ChildFailedError as error:
        print(error, file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    # the ranks have exited and torchrun has reported them: skip the interpreter's teardown
    # of the modules torch imported (about 1 s of CPU on a 2-core machine, at every run's end)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
