"""Helpers shared by test_cli.py and test_robustness.py: run the CLI, snapshot folders, check refusals.

The CLI is exercised two ways: ``invoke`` runs the Typer app in-process (cheap, for the many
cases), ``run_cli`` runs ``python -m labelscan`` in a subprocess (real exit codes and stderr).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner, Result

from labelscan.cli import app

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MODEL = FIXTURES / "digits_mlp.pt2"
NOISY = FIXTURES / "digits_noisy.parquet"
CLEAN = FIXTURES / "digits_clean.parquet"
FLIPPED = FIXTURES / "digits_flipped.csv"
CHECKPOINTS = [FIXTURES / f"digits_mlp_ckpt_{i}.pt2" for i in (1, 2, 3)]
DATA_OPTIONS = ["--scale", "0.0625", "--id-column", "example_id"]
FAST = ["--samples", "300"]  # fewer LAFTR draws than the default: same code path, less time
WORKSPACE_FILES = {"manifest.json", "summary.safetensors", "report.parquet"}

# Wide output so that rich tables and help never truncate ids or option names; never write
# to a real GitHub step summary from a test.
ENV = {"COLUMNS": "200", "GITHUB_STEP_SUMMARY": None}

_runner = CliRunner()


def invoke(*args, env: dict | None = None) -> Result:
    """The CLI in-process; stdout and stderr are captured separately."""
    return _runner.invoke(app, [str(a) for a in args], env={**ENV, **(env or {})}, prog_name="labelscan")


def subprocess_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    env.update(COLUMNS="200", **extra)
    return env


def run_cli(*args, cwd: Path | None = None, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """``python -m labelscan ARGS`` in a subprocess, text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "labelscan", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env=subprocess_env(**env),
    )


def summarize(workspace: Path, data: Path, *extra, model: Path = MODEL) -> Result:
    return invoke("summarize", model, data, "-w", workspace, *DATA_OPTIONS, *extra)


def ok(result: Result | subprocess.CompletedProcess) -> str:
    """Assert success and return stdout."""
    code = result.exit_code if isinstance(result, Result) else result.returncode
    stdout, stderr = result.stdout, result.stderr
    exception = getattr(result, "exception", None)
    assert code == 0, f"exit {code}\nstdout:\n{stdout}\nstderr:\n{stderr}\nexception: {exception!r}"
    return stdout


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def refused(result: Result | subprocess.CompletedProcess, *phrases: str, code: int = 2) -> str:
    """Assert a clean refusal: exit ``code``, one non-blank line on stderr matching every
    phrase (regular expressions, case-insensitive), no traceback anywhere. Returns the line."""
    exit_code = result.exit_code if isinstance(result, Result) else result.returncode
    stdout, stderr = result.stdout, result.stderr
    context = f"stdout:\n{stdout}\nstderr:\n{stderr}\nexception: {getattr(result, 'exception', None)!r}"
    assert exit_code == code, f"exit {exit_code}, expected {code}\n{context}"
    if isinstance(result, Result):  # an uncaught exception would be here, not SystemExit
        assert result.exception is None or isinstance(result.exception, SystemExit), context
    assert "Traceback" not in stderr + stdout, context
    lines = error_lines(stderr)
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}\n{context}"
    for phrase in phrases:
        assert re.search(phrase, lines[0], re.IGNORECASE), f"{phrase!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(*roots: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``roots`` (hidden ones too): path → (size, mtime_ns, sha256)."""
    state = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            stat = path.stat()
            state[str(path)] = (stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def copy_workspace(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, copy_function=shutil.copy2)
    return target


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_parquet(path, index=False)
    return path


def noisy_rows(count: int) -> pd.DataFrame:
    """The first ``count`` rows of the noisy digits table (every class is among the first 10)."""
    return pd.read_parquet(NOISY).iloc[:count].reset_index(drop=True)
