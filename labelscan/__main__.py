"""The ``labelscan`` command and ``python -m labelscan``."""

import signal
import sys

from labelscan.interruption import end_interrupted


def main() -> None:
    """Load the CLI and run it; Ctrl-C while torch is still loading ends quietly too."""
    try:
        from labelscan.cli import app
    except KeyboardInterrupt:  # nothing has been read or written yet
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("interrupted", file=sys.stderr)
        end_interrupted()
    app(prog_name="labelscan")


if __name__ == "__main__":
    main()
