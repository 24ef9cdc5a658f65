"""Turn raw labels (integers, whole floats, numeric strings or class names) into class indices."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class LabelSpec:
    """What the labels must fit: the model's class count, the training set's class names (new
    data must use the same names, mapped to the same indices), and whether this is a training
    set (which needs at least two rows and two classes; a batch of new data need not)."""

    num_classes: int | None = None
    class_names: tuple[str, ...] = ()
    training: bool = True

    def adopt(self, codes: np.ndarray, names: list[str], source: str) -> tuple[np.ndarray, list[str]]:
        """Re-index named labels to the training set's class names; unknown names are refused,
        and so are names in new data for a training set labelled by class index."""
        if names and not self.class_names and not self.training:
            word = next(name for name in names if _numbers(np.asarray([name])) is None)
            row = int(np.argmax(np.asarray(names)[codes] == word))
            raise LabelscanError(
                f"{source}: label {word!r} at row {row} is not a class index, and the training data "
                "was labelled by class index; fix the label"
            )
        if not self.class_names or not names:
            return codes, names
        index = {name: i for i, name in enumerate(self.class_names)}
        unknown = [name for name in names if name not in index]
        if unknown:
            row = int(np.argmax(np.isin(np.asarray(names)[codes], unknown)))
            raise LabelscanError(
                f"{source}: label {unknown[0]!r} at row {row} is not one of the training classes "
                f"({', '.join(self.class_names)}); fix the label"
            )
        return np.asarray([index[name] for name in names], dtype=np.int64)[codes], list(self.class_names)


def check_labels(codes: np.ndarray, names: list[str], source: str, spec: LabelSpec) -> None:
    """Refuse negative labels, labels outside the model's classes, and training data with a single class."""
    num_classes = spec.num_classes

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
    if spec.training and len(present) < 2:
        raise LabelscanError(
            f"{source}: every example has the single class {shown(0)}; "
            "labelscan needs examples of at least two classes"
        )
