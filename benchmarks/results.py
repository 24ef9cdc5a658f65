"""Write one benchmark's section of benchmarks/RESULTS.md, leaving the other sections as they are."""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# labelscan benchmarks\n\nEach section is written by the script it names; rerun the command to refresh it.\n"


def provenance() -> str:
    """The exact command, the machine and the date, for the top of a section."""
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    return (f"Command: `{command}`  \nMachine: {os.cpu_count()} cores, {platform.machine()}, "
            f"Python {platform.python_version()}  \nDate: {date.today().isoformat()}\n")


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) the section between this benchmark's markers."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    RESULTS.write_text(text if text.endswith("\n") else text + "\n")
