"""NumPy .npz files holding X (features), y (labels) and optionally ids, loaded whole."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from labelscan.data.dataset import Dataset, reading
from labelscan.data.labels import LabelSpec, encode_labels
from labelscan.data.preprocessing import Preprocessing
from labelscan.errors import LabelscanError, first_line

_SAVE = "save X, y (and ids) with numpy.savez using plain numeric or string arrays"


class NpzDataset(Dataset):
    """X (N, F), (N, H, W) or (N, C, H, W); y (N,); ids (N,) optional. Never unpickles."""

    def __init__(
        self, path: Path, *, preprocessing: Preprocessing, label_spec: LabelSpec
    ) -> None:
        x, y, ids = _load(path)
        if x.dtype.kind not in "biuf" or x.ndim not in (2, 3, 4):
            raise LabelscanError(
                f"{path}: array 'X' has dtype {x.dtype} and shape {x.shape}; "
                "X must be numeric with shape (N, F), (N, H, W) or (N, C, H, W)"
            )
        for name, array in (("y", y), ("ids", ids)):
            if array is not None and array.shape != (len(x),):
                raise LabelscanError(
                    f"{path}: array {name!r} has shape {array.shape} but X has {len(x)} rows; "
                    f"{name} must have shape ({len(x)},)"
                )
        self._x = x
        source = f"{path} array 'y'"
        labels, names = encode_labels(y, source)
        super().__init__(
            path,
            files=[path],
            labels=labels,
            label_names=names,
            label_source=source,
            ids=None if ids is None else ids.astype(str).tolist(),
            feature_shape=x.shape[1:] if x.ndim != 3 else (1, *x.shape[1:]),
            preprocessing=preprocessing,
            label_spec=label_spec,
        )

    def _chunks(self, batch_size: int) -> Iterator[np.ndarray]:
        yield self._x.reshape(len(self._x), *self.feature_shape)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read X, y and ids with allow_pickle=False; object arrays and bad members are errors."""
    with reading(path, "npz file"):
        try:
            npz = np.load(path, allow_pickle=False)
        except ValueError as exc:  # not an npz, or object arrays that would need pickle
            raise LabelscanError(
                f"{path}: cannot read npz file ({first_line(exc)}); {_SAVE}"
            ) from exc
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise LabelscanError(f"{path}: holds a single array, not an npz archive; {_SAVE}")
        with npz:
            missing = [name for name in ("X", "y") if name not in npz.files]
            if missing:
                found = ", ".join(npz.files) or "none"
                raise LabelscanError(f"{path}: no array {missing[0]!r} (arrays: {found}); {_SAVE}")
            try:
                return npz["X"], npz["y"], npz["ids"] if "ids" in npz.files else None
            except ValueError as exc:
                raise LabelscanError(
                    f"{path}: cannot read an array ({first_line(exc)}); {_SAVE}"
                ) from exc
