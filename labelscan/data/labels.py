"""Turn raw labels (integers, whole floats, numeric strings or class names) into class indices."""

from __future__ import annotations

import numpy as np

from labelscan.errors import LabelscanError

_FIX = "labels must be class indices 0..K-1 or class names"


def _numbers(names: np.ndarray) -> np.ndarray | None:
    """Strings that all spell numbers (as in CSV text) are numbers; otherwise they are names."""
    for parse in (int, float):
        try:
            return np.array([parse(name) for name in names])
        except (ValueError, OverflowError):
            continue
    return None


def encode_labels(values: np.ndarray, source: str) -> tuple[np.ndarray, list[str]]:
    """values (N,) raw labels → (int64 codes (N,), class names or [] when labels are integers).

    Class names map to their index among the sorted unique names.
    """
    if values.dtype.kind in "OUS":
        unique, inverse = np.unique(values.astype(str), return_inverse=True)
        numbers = _numbers(unique)
        if numbers is None:
            return inverse.reshape(-1).astype(np.int64), unique.tolist()
        values = numbers[inverse.reshape(-1)]
    if values.dtype.kind == "b":
        values = values.astype(np.int64)
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            row = int(np.argmax(bad))
            raise LabelscanError(
                f"{source}: label {values[row]} at row {row} is not a whole number; {_FIX}"
            )
    elif values.dtype.kind not in "iu":
        raise LabelscanError(f"{source}: labels of type {values.dtype} are not supported; {_FIX}")
    return values.astype(np.int64), []


def check_labels(codes: np.ndarray, names: list[str], source: str, num_classes: int | None) -> None:
    """Refuse negative labels, labels outside num_classes, and data with a single class."""

    def shown(row: int) -> str:
        return repr(names[codes[row]]) if names else str(codes[row])

    negative = codes < 0
    if negative.any():
        row = int(np.argmax(negative))
        raise LabelscanError(f"{source}: label {shown(row)} at row {row} is negative; {_FIX}")
    if num_classes is not None:
        over = codes >= num_classes
        if over.any():
            row = int(np.argmax(over))
            raise LabelscanError(
                f"{source}: label {shown(row)} at row {row} is out of range for "
                f"{num_classes} classes (labels must be 0..{num_classes - 1}); "
                "fix the label or the number of classes"
            )
    present = np.unique(codes)
    if len(present) < 2:
        raise LabelscanError(
            f"{source}: every example has the single class {shown(0)}; "
            "labelscan needs examples of at least two classes"
        )
