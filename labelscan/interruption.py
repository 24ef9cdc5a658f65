"""How labelscan ends on Ctrl-C: by SIGINT, as an interrupted program should."""

from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn

INTERRUPTED_STATUS = 130  # what a shell reports for a death by SIGINT


def end_interrupted() -> NoReturn:
    """Die by SIGINT rather than exit normally.

    A shell then reports status 130 and stops the script that ran us, instead of going on to
    its next command; this is also what Python itself does for an unhandled Ctrl-C. Callers
    make sure the files are safe first: every write goes to a temporary name that the
    unwinding removed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":  # elsewhere the exit status is the convention
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    raise SystemExit(INTERRUPTED_STATUS)
