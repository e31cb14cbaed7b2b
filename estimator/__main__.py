"""`python -m estimator MODEL [options]`: the command line of ../shared/SPEC.md, a thin shell over the library."""

from __future__ import annotations

import os
import sys

from estimator.cli import main

if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (`--json | head -1`): nothing more to say, and no traceback. stdout is
        # pointed at /dev/null so the interpreter's own flush at exit does not fail again
        # (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, what a program killed by the signal reports
    sys.exit(code)
