"""How labelscan stops on Ctrl-C or SIGTERM: files stay whole, then it dies by the same signal.

Dying by the signal, rather than exiting normally, is what a shell expects of an interrupted
program: it reports status 128 + signal (130 for Ctrl-C) and stops the script that ran us
instead of going on to its next command. Python itself does this for an unhandled Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import NoReturn

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """Ctrl-C or SIGTERM. Not a KeyboardInterrupt, so that no layer in between (Typer turns
    those into a plain exit 130) handles it before the command line's top level."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def describe(self) -> str:
        return "interrupted" if self.signum == signal.SIGINT else "terminated"


def _raise_stopped(signum, frame) -> NoReturn:
    for other in STOP_SIGNALS:  # a second Ctrl-C must not cut the clean-up short
        signal.signal(other, signal.SIG_IGN)
    raise Stopped(signum)


def raise_stopped_on_signals() -> None:
    """Turn Ctrl-C and SIGTERM into ``Stopped``, except where they are ignored (a background job)."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) not in (signal.SIG_IGN, None):
            signal.signal(signum, _raise_stopped)


def end_by(signum: int) -> NoReturn:
    """Die by ``signum``; where signals cannot do that, exit with the status a shell would show."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    raise SystemExit(128 + signum)


@contextmanager
def signals_held():
    """Hold Ctrl-C and SIGTERM until the block is done, then deliver them: files written
    together (a summary and the manifest that vouches for it) are never left half-replaced."""
    held = [s for s in STOP_SIGNALS if signal.getsignal(s) is not None]
    if threading.current_thread() is not threading.main_thread() or not held:
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)
