"""The labelscan command line: parse options, call a job, render the result. No logic lives here."""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import NoReturn, Optional

import typer
from typer.core import TyperCommand, TyperGroup
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from labelscan import __version__
from labelscan.data import Preprocessing
from labelscan.errors import LabelscanError
from labelscan.influence.scoring import METHODS, InfluenceSettings
from labelscan.jobs import check_job, fsd_job, rank_job, summarize_job
from labelscan.report import top_table
from labelscan.workspace import DEFAULT_WORKSPACE, DataSource, ModelSource, Workspace

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _refuse(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False)
    raise typer.Exit(2)


@contextmanager
def _one_line_usage_errors(ctx):
    """A usage error (bad option value, missing argument, unknown command) as one line, exit 2."""
    try:
        yield
    except Exception as exc:  # Typer's usage errors: exit code 2 and a message, whatever their class
        if getattr(exc, "exit_code", None) != 2 or not hasattr(exc, "format_message"):
            raise
        message = exc.format_message().strip()
        _refuse(f"{message}{'' if message.endswith(('.', '?', '!')) else '.'} See {ctx.command_path} --help.")


class _Command(TyperCommand):
    """Typer's command, with its boxed usage errors turned into the one-line errors labelscan prints."""

    def parse_args(self, ctx, args):
        with _one_line_usage_errors(ctx):
            return super().parse_args(ctx, args)


class _Group(TyperGroup):
    """Typer's group: its own options and unknown commands give one-line errors too."""

    def parse_args(self, ctx, args):
        if not args and self.no_args_is_help:
            return super().parse_args(ctx, args)  # Typer shows the help
        with _one_line_usage_errors(ctx):
            return super().parse_args(ctx, args)

    def resolve_command(self, ctx, args):
        with _one_line_usage_errors(ctx):
            return super().resolve_command(ctx, args)


app = typer.Typer(
    cls=_Group, help="Find likely mislabeled training examples of a trained ReLU network.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

Method = Enum("Method", {m.replace("-", "_"): m for m in METHODS}, type=str)
Covariance = Enum("Covariance", {k: k for k in ("auto", "full", "lowrank", "diagonal")}, type=str)
OutputFormat = Enum("OutputFormat", {"text": "text", "json": "json"}, type=str)

MAX_COUNT = 2**31 - 1  # counts beyond this overflow the libraries underneath
MAX_SEED = 2**32 - 1

WORKSPACE = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w", help="Folder for the summary, manifest and report.")


@contextmanager
def _errors():
    """Bad input, or too little memory for the settings → one line on stderr and exit 2."""
    try:
        yield
    except LabelscanError as exc:
        _refuse(str(exc))
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "can't allocate memory" not in str(exc):  # torch's CPU allocator
            raise
        _refuse("out of memory for these settings; lower --batch-size (or --samples / --proximal-samples)")


@contextmanager
def _progress():
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        def start(description: str, total: int):
            task = bar.add_task(description, total=total)
            return lambda done: bar.advance(task, done)

        yield start


def _version(value: bool) -> None:
    if value:
        out.print(f"labelscan {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """labelscan: LAFTR summaries and proximal self-influence for label-noise detection."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")


def _floats(text: Optional[str], what: str) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise LabelscanError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _shape(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        shape = [int(v) for v in text.split(",")]
    except ValueError:
        raise LabelscanError(f"--input-shape must be comma-separated integers like 1,28,28, got {text!r}") from None
    if any(d < 1 for d in shape):
        raise LabelscanError(f"--input-shape entries must be positive, got {text!r}")
    return shape


def _data_source(path: Path, label_column: str, id_column: Optional[str], scale: float,
                 mean: Optional[str], std: Optional[str]) -> DataSource:
    preprocessing = Preprocessing(scale=scale, mean=_floats(mean, "--mean"), std=_floats(std, "--std"))
    return DataSource(str(path), label_column, id_column, preprocessing.to_dict())


@app.command(cls=_Command)
def summarize(
    model: Path = typer.Argument(..., help="Trained model: .pt2 (torch.export), TorchScript, or a pickle with --trust-checkpoint."),
    data: Path = typer.Argument(..., help="Training data: Parquet/CSV table, .npz, IDX images file, or image folder."),
    workspace: Path = WORKSPACE,
    label_column: str = typer.Option("label", help="Label column of a table."),
    id_column: Optional[str] = typer.Option(None, help="Example-id column of a table (default: row number)."),
    scale: float = typer.Option(1.0, help="Multiply raw features by this first (e.g. 0.00392 for 1/255)."),
    mean: Optional[str] = typer.Option(None, help="Per-channel mean to subtract after scaling, comma-separated."),
    std: Optional[str] = typer.Option(None, help="Per-channel std to divide by after that, comma-separated."),
    input_shape: Optional[str] = typer.Option(None, help="Model input shape without batch, e.g. 1,28,28 (TorchScript/pickles)."),
    trust_checkpoint: bool = typer.Option(False, help="Allow pickled checkpoints, which run code when loaded."),
    arch: Optional[str] = typer.Option(None, help="module:factory building the network for a state-dict checkpoint."),
    per_class: bool = typer.Option(True, help="Keep input moments and ReLU activity per class."),
    covariance: Covariance = typer.Option("auto", help="Input covariance kept: auto picks by input size."),
    batch_size: int = typer.Option(512, min=1, max=MAX_COUNT, help="Examples per batch of the streamed pass."),
) -> None:
    """One pass over DATA: store the LAFTR summary and a manifest in the workspace."""
    with _errors(), _progress() as progress:
        source = ModelSource(str(model), _shape(input_shape), trust_checkpoint, arch)
        summary, manifest = summarize_job(
            Workspace(workspace), source, _data_source(data, label_column, id_column, scale, mean, std),
            per_class=per_class, covariance=covariance.value, batch_size=batch_size, progress=progress,
        )
    units = sum(a[0].numel() for a in summary.active)
    out.print(
        f"summarized {manifest.num_rows} examples: {summary.num_components} component(s), "
        f"{summary.moments.kind} covariance over {summary.moments.mean.shape[1]} inputs, {units} ReLU units "
        f"→ {workspace}"
    )


def _settings(method: Method, seed: int, samples: int, proximal_samples: int, damping: float, epsilon: float,
              steps: int, batch_size: int) -> InfluenceSettings:
    return InfluenceSettings(method=method.value, seed=seed, samples=samples, proximal_samples=proximal_samples,
                             damping=damping, epsilon=epsilon, steps=steps, batch_size=batch_size)


METHOD = typer.Option("linear", "--method", "-m", help="linear / proximal (LAFTR), or a baseline.")
SEED = typer.Option(0, min=0, max=MAX_SEED, help="Seed of the LAFTR draws; same seed, same report.")
SAMPLES = typer.Option(2000, min=1, max=MAX_COUNT, help="LAFTR draws for the curvature.")
PROXIMAL_SAMPLES = typer.Option(32, min=1, max=MAX_COUNT, help="Draws (proximal) or training rows (exact-proximal) the FSD is evaluated on per step.")
DAMPING = typer.Option(0.1, help="λ as a multiple of the mean curvature eigenvalue.")
EPSILON = typer.Option(0.01, help="Up-weighting ε of the proximal solver.")
STEPS = typer.Option(5, min=1, max=MAX_COUNT, help="Gradient steps of the proximal solver.")
THRESHOLD = typer.Option(None, help="Flag examples whose score exceeds this (default 4 for linear; other methods need one).")
BATCH = typer.Option(256, min=1, max=MAX_COUNT, help="Examples scored at once.")


@app.command(cls=_Command)
def rank(
    workspace: Path = WORKSPACE,
    top: int = typer.Option(20, min=0, help="Rows of the table to print."),
    method: Method = METHOD,
    out_path: Optional[Path] = typer.Option(None, "--out", help="Report path (default: WORKSPACE/report.parquet)."),
    seed: int = SEED,
    samples: int = SAMPLES,
    proximal_samples: int = PROXIMAL_SAMPLES,
    damping: float = DAMPING,
    epsilon: float = EPSILON,
    steps: int = STEPS,
    threshold: Optional[float] = THRESHOLD,
    checkpoint: list[Path] = typer.Option([], metavar="PATH", help="Training checkpoints for --method tracin (repeat)."),
    trust_checkpoint: bool = typer.Option(False, help="Allow pickled --checkpoint files, which run code when loaded."),
    batch_size: int = BATCH,
) -> None:
    """Score every training example by self-influence, write the Parquet report, show the top."""
    with _errors(), _progress() as progress:
        settings = _settings(method, seed, samples, proximal_samples, damping, epsilon, steps, batch_size)
        result = rank_job(Workspace(workspace), settings, threshold=threshold, out=out_path,
                          checkpoints=checkpoint, trust_checkpoint=trust_checkpoint, progress=progress)
    report = result.report
    if top:
        out.print(top_table(report, top, f"Most self-influential of {len(report)} examples ({method.value})"))
    if result.metadata["threshold"] is None:
        out.print(f"scored {len(report)} examples; none flagged: method {method.value} has no default threshold "
                  f"(pass --threshold); report → {result.path}")
        return
    flagged = int(report["flagged"].sum())
    out.print(f"{flagged} of {len(report)} examples flagged ({flagged / len(report):.1%}); report → {result.path}")


@app.command(cls=_Command)
def check(
    workspace: Path = WORKSPACE,
    max_flagged_fraction: float = typer.Option(0.05, help="Fail when more than this fraction is flagged."),
    data: Optional[Path] = typer.Option(None, help="Gate NEW data against the workspace's model and summary."),
    label_column: Optional[str] = typer.Option(None, help="Label column of the --data table (default: the training data's)."),
    id_column: Optional[str] = typer.Option(None, help="Example-id column of the --data table (default: the training data's)."),
    baseline: Optional[Path] = typer.Option(None, help="A previous report: fail only on flags it did not have."),
    output_format: OutputFormat = typer.Option("text", "--format", help="text for people, json for machines."),
    method: Method = METHOD,
    seed: int = SEED,
    samples: int = SAMPLES,
    proximal_samples: int = PROXIMAL_SAMPLES,
    damping: float = DAMPING,
    epsilon: float = EPSILON,
    steps: int = STEPS,
    threshold: Optional[float] = THRESHOLD,
    batch_size: int = BATCH,
) -> None:
    """CI data-quality gate: exit 0 when the flagged fraction is within the limit, 1 when not."""
    with _errors(), _progress() as progress:
        settings = _settings(method, seed, samples, proximal_samples, damping, epsilon, steps, batch_size)
        result, verdict = check_job(Workspace(workspace), settings, max_fraction=max_flagged_fraction,
                                    threshold=threshold, data=data, label_column=label_column,
                                    id_column=id_column, baseline=baseline, progress=progress)
    summary = verdict.as_dict() | {"report": str(result.path), "method": result.metadata["method"]}
    if output_format.value == "json":
        out.print_json(json.dumps(summary))
    else:
        word = "[green]PASS[/green]" if verdict.passed else "[red]FAIL[/red]"
        scope = " new" if baseline is not None else ""
        out.print(f"{word}: {verdict.considered}{scope} of {verdict.rows} examples flagged "
                  f"({verdict.fraction:.2%}, limit {max_flagged_fraction:.2%}); report {result.path}")
    _github_summary(summary)
    if not verdict.passed:
        raise typer.Exit(1)


def _github_summary(summary: dict) -> None:
    """Append a markdown verdict to GitHub Actions' step summary when running there."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return
    verdict = "✅ passed" if summary["passed"] else "❌ failed"
    lines = [
        f"### labelscan data-quality gate: {verdict}", "",
        "| rows | flagged | gated | fraction | limit |", "|---:|---:|---:|---:|---:|",
        f"| {summary['rows']} | {summary['flagged']} | {summary['gated_flags']} | "
        f"{summary['flagged_fraction']:.2%} | {summary['max_flagged_fraction']:.2%} |", "",
    ]
    try:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
    except OSError as exc:  # the verdict stands; only its copy for the job page is lost
        err.print(f"warning: could not append to GITHUB_STEP_SUMMARY {escape(target)} ({exc.strerror or exc})",
                  highlight=False)


@app.command(cls=_Command)
def fsd(
    model_a: Path = typer.Argument(..., help="First checkpoint (the reference)."),
    model_b: Path = typer.Argument(..., help="Second checkpoint."),
    workspace: Path = WORKSPACE,
    samples: int = typer.Option(4000, min=1, max=MAX_COUNT, help="LAFTR draws."),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="Seed of the LAFTR draws; same seed, same estimate."),
    trust_checkpoint: bool = typer.Option(False, help="Allow pickled checkpoints, which run code when loaded."),
    arch: Optional[str] = typer.Option(None, help="module:factory for state-dict checkpoints (default: the summarized model's)."),
) -> None:
    """LAFTR function space distance between two checkpoints of the summarized architecture.

    KL(softmax(f_A) ‖ softmax(f_B)) over LAFTR draws, both gated like the summarized model (not symmetric).
    """
    with _errors():
        space = Workspace(workspace)
        like = space.manifest().model
        sources = [ModelSource(str(m), like.input_shape, trust_checkpoint, arch or like.arch) for m in (model_a, model_b)]
        distance = fsd_job(space, *sources, samples=samples, seed=seed)
    out.print(f"FSD ≈ {distance:.6g} (LAFTR, KL, {samples} draws, seed {seed})")


@app.command(cls=_Command)
def demo(
    fixtures: Path = typer.Option(Path(__file__).resolve().parent.parent / "fixtures",
                                  help="The repository's fixtures folder (digits with known flips)."),
    top: int = typer.Option(10, min=0, help="Rows of the ranking to print."),
) -> None:
    """The whole pipeline on scikit-learn's digits with 10% injected label flips."""
    from labelscan.demo import run_demo

    with _errors(), _progress() as progress:
        result = run_demo(fixtures, progress=progress)
    if top:
        out.print(top_table(result.report, top, "Most self-influential digits (linear, LAFTR)"))
    out.print(result.describe())
    if not result.gate.passed:
        out.print("(the gate fails here by design: 10% of the labels were flipped)")
