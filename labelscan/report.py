"""Scores → ranked DataFrame → Parquet with metadata, and the rich table people read.

Flagging rule: an example is flagged when its self-influence exceeds a threshold. For the
``linear`` method the score is gᵀ(H + λI)⁻¹g with H the curvature of the *average*
discrepancy over the training distribution, so score / N is the example's influence on its
own fit as a share of the whole training set — what Cook's distance measures for
regression — and the default threshold 4 is Cook's 4/N rule of thumb. Other methods score
on scales of their own (the proximal solver's few steps stop far short of the linear
limit), so they flag only with an explicit threshold.

Suggested label: for a flagged example, the class the model finds most probable among the
classes other than the given one (a memorizing model predicts the given label, so its
runner-up is the informative guess); for any other example, the given label.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from rich.table import Table

from labelscan.errors import LabelscanError, first_line
from labelscan.influence.scoring import ExampleScores
from labelscan.files import write_atomically

DEFAULT_THRESHOLDS = {"linear": 4.0}
METADATA_KEY = b"labelscan"

SCHEMA = pa.schema([
    ("row", pa.int64()),
    ("example_id", pa.string()),
    ("given_label", pa.string()),
    ("predicted_label", pa.string()),
    ("suggested_label", pa.string()),
    ("self_influence", pa.float64()),
    ("loss", pa.float64()),
    ("rank", pa.int64()),
    ("flagged", pa.bool_()),
])


def flag_threshold(method: str, threshold: float | None) -> float | None:
    """The threshold to flag with: ``threshold`` if given (it must be finite), else the method's
    default, or None for a method that has none."""
    if threshold is None:
        return DEFAULT_THRESHOLDS.get(method)
    if not math.isfinite(threshold):
        raise LabelscanError(f"--threshold must be a finite number, got {threshold}")
    return threshold


def build_report(scores: ExampleScores, label_names: list[str], threshold: float | None) -> pd.DataFrame:
    """One row per example in data order; ``rank`` 1 is the most suspicious (ties keep data order).

    With ``threshold=None`` nothing is flagged.
    """
    order = np.lexsort((scores.rows, -scores.score))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    flagged = scores.score > threshold if threshold is not None else np.zeros(len(order), dtype=bool)
    suggested = np.where(flagged, scores.runner_up, scores.given)
    name = _namer(label_names)
    return pd.DataFrame({
        "row": scores.rows.astype(np.int64),
        "example_id": pd.Series(scores.ids, dtype=object),
        "given_label": name(scores.given),
        "predicted_label": name(scores.predicted),
        "suggested_label": name(suggested),
        "self_influence": scores.score.astype(np.float64),
        "loss": scores.loss.astype(np.float64),
        "rank": rank,
        "flagged": flagged,
    })


def write_report(report: pd.DataFrame, path: Path, metadata: dict) -> None:
    """Parquet with the fixed schema and ``metadata`` as JSON under the key ``labelscan``, written atomically."""
    table = pa.Table.from_pandas(report, schema=SCHEMA, preserve_index=False)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomically(Path(path), sink.getvalue().to_pybytes())


def read_report(path: Path) -> tuple[pd.DataFrame, dict]:
    """A report and its metadata; a file that is not a labelscan report is refused."""
    path = Path(path)
    if not path.exists():
        raise LabelscanError(f"no report at {path}; run labelscan rank first")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise LabelscanError(f"{path} is not a readable Parquet file ({first_line(exc)}); "
                             "pass a report written by labelscan rank") from None
    try:
        metadata = json.loads((table.schema.metadata or {})[METADATA_KEY])
    except (KeyError, ValueError):
        raise LabelscanError(f"{path} has no labelscan metadata, so it is not a labelscan report; "
                             "pass a report written by labelscan rank") from None
    if not set(SCHEMA.names) <= set(table.schema.names):
        raise LabelscanError(f"{path} lacks report columns; run labelscan rank again")
    return table.to_pandas(), metadata


def top_table(report: pd.DataFrame, k: int, title: str) -> Table:
    """The ``k`` most suspicious examples as a rich table."""
    table = Table(title=title, title_justify="left")
    for column, justify in (("rank", "right"), ("row", "right"), ("id", "left"), ("given", "left"),
                            ("pred", "left"), ("suggest", "left"), ("score", "right"),
                            ("loss", "right"), ("flag", "center")):
        table.add_column(column, justify=justify, no_wrap=column == "id")
    for entry in report.nsmallest(k, "rank").itertuples():
        table.add_row(
            str(entry.rank), str(entry.row), entry.example_id, entry.given_label, entry.predicted_label,
            entry.suggested_label, f"{entry.self_influence:.4g}", f"{entry.loss:.4g}",
            "[red]●[/red]" if entry.flagged else "",
        )
    return table


def _namer(label_names: list[str]):
    def name(labels: np.ndarray) -> np.ndarray:
        if label_names:
            return np.asarray([label_names[i] for i in labels], dtype=object)
        return labels.astype(str).astype(object)

    return name
