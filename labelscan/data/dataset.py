"""The Dataset every format becomes: validated labels and ids up front, features streamed."""

from __future__ import annotations

import numbers
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from labelscan.data.fingerprint import fingerprint_files
from labelscan.data.labels import LabelSpec, check_labels
from labelscan.data.preprocessing import Preprocessing
from labelscan.errors import LabelscanError, first_line

# What pyarrow, zipfile, gzip/zlib, Pillow (OSError) and the OS raise for unreadable files.
_READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, pa.ArrowException)


@contextmanager
def reading(path: Path, what: str = "file"):
    """Turn library read errors into a one-line LabelscanError naming the file."""
    try:
        yield
    except _READ_ERRORS as exc:
        raise LabelscanError(
            f"{path}: cannot read {what} ({first_line(exc)}); "
            "check that it is complete and not corrupt"
        ) from exc


def visible(folder: Path) -> list[Path]:
    """A folder's entries in sorted order, without hidden ones (.DS_Store, .ipynb_checkpoints)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


@dataclass
class Batch:
    """A run of consecutive examples, ready for the model."""

    rows: torch.Tensor  # int64 (B,): positions in DATA, 0-based, file order
    ids: list[str]
    x: torch.Tensor  # float32 (B, *feature_shape), preprocessing applied
    y: torch.Tensor  # int64 (B,)


class Dataset(ABC):
    """Labelled examples read in file order. Labels and ids are read and checked when the data
    is opened; features are streamed by `batches` and checked as they go, so memory is bounded
    by the batch size for formats that allow it. A format supplies only `_chunks`."""

    def __init__(
        self,
        path: Path,
        *,
        files: list[Path],
        labels: np.ndarray,
        label_names: list[str],
        label_source: str,
        ids: list[str] | None,
        feature_shape: tuple[int, ...],
        preprocessing: Preprocessing,
        label_spec: LabelSpec,
    ) -> None:
        self.path = path
        self.num_rows = len(labels)
        self.feature_shape = tuple(int(d) for d in feature_shape)
        if label_spec.training and self.num_rows < 2:
            raise LabelscanError(
                f"{path}: the data has only {self.num_rows} row(s); "
                "labelscan needs at least 2 examples"
            )
        labels, label_names = label_spec.adopt(labels, list(label_names), label_source)
        self.label_names = label_names
        check_labels(labels, self.label_names, label_source, label_spec)
        if ids is not None:
            _check_unique(ids, path)
        preprocessing.check(self.feature_shape)
        self._files = files
        self._labels = labels
        self._ids = ids if ids is not None else [str(row) for row in range(self.num_rows)]
        self._preprocessing = preprocessing

    @abstractmethod
    def _chunks(self, batch_size: int) -> Iterator[np.ndarray]:
        """Raw features (n, *feature_shape), any numeric dtype, in file order; n is free
        (batch_size is a hint for how much to read at once)."""

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Batches of exactly batch_size examples (the last may be smaller), in file order.
        Raises LabelscanError at the first row with a missing, NaN or infinite feature."""
        if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise LabelscanError(f"batch size must be a positive integer, got {batch_size!r}")
        start = 0
        for raw in _rebatch(self._read(batch_size), batch_size):
            stop = start + len(raw)
            if stop > self.num_rows:
                break
            x = torch.tensor(raw, dtype=torch.float32)
            bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
            if bad.any():
                row = start + int(bad.nonzero()[0])
                raise LabelscanError(
                    f"{self.path}: row {row} has a missing, NaN or infinite feature value; "
                    "fix or drop that row"
                )
            yield Batch(
                rows=torch.arange(start, stop, dtype=torch.int64),
                ids=self._ids[start:stop],
                x=self._preprocessing.apply(x),
                y=torch.from_numpy(self._labels[start:stop].copy()),
            )
            start = stop
        if start != self.num_rows:
            raise LabelscanError(
                f"{self.path}: expected {self.num_rows} rows of features but found a different "
                "number; the data changed while it was read — open it again"
            )

    def _read(self, batch_size: int) -> Iterator[np.ndarray]:
        """`_chunks`, with read errors from any step of the stream made one-line errors."""
        chunks = self._chunks(batch_size)
        while True:
            with reading(self.path):
                chunk = next(chunks, None)
            if chunk is None:
                return
            yield chunk

    def fingerprint(self) -> str:
        """sha256 hex of the data's file bytes (with relative paths, when there are several)."""
        with reading(self.path):
            return fingerprint_files(self._files)


def _rebatch(chunks: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Regroup chunks of any length into runs of exactly `size` (the last may be shorter),
    copying only the short remainder carried between chunks."""
    carry = None
    for chunk in chunks:
        if carry is not None:
            chunk = np.concatenate([carry, chunk])
        whole = len(chunk) - len(chunk) % size
        for start in range(0, whole, size):
            yield chunk[start : start + size]
        carry = chunk[whole:] if whole < len(chunk) else None
    if carry is not None:
        yield carry


def _check_unique(ids: list[str], path: Path) -> None:
    seen: set[str] = set()
    for row, example_id in enumerate(ids):
        if example_id in seen:
            raise LabelscanError(
                f"{path}: example id {example_id!r} appears more than once (again at row {row}); "
                "ids must be unique — fix them or choose another id column"
            )
        seen.add(example_id)
