"""The ``labelscan`` command and ``python -m labelscan``."""

import sys

from labelscan.interruption import Stopped, end_by, raise_stopped_on_signals


def main() -> None:
    """Run the CLI. Ctrl-C or SIGTERM at any moment, even while torch loads or a table prints,
    gives one line and death by that signal."""
    raise_stopped_on_signals()
    try:
        from labelscan.cli import app

        app(prog_name="labelscan")
    except Stopped as stop:
        print(f"{stop.describe()}; no file was left half-written", file=sys.stderr)
        end_by(stop.signum)


if __name__ == "__main__":
    main()
