"""Choose the reader for DATA from what the path is: file extension, or a folder's contents."""

from __future__ import annotations

from pathlib import Path

from labelscan.data.arrays import NpzDataset
from labelscan.data.dataset import Dataset, visible
from labelscan.data.idx import IdxDataset, is_idx_images
from labelscan.data.images import ImageFolderDataset
from labelscan.data.labels import LabelSpec
from labelscan.data.preprocessing import Preprocessing
from labelscan.data.tables import CsvDataset, ParquetDataset
from labelscan.errors import LabelscanError

_SUPPORTED = (
    "give a .parquet, .csv or .npz file, an IDX images file (*-images-idx3-ubyte[.gz]), "
    "or a folder of Parquet files, of one IDX pair, or of class subfolders of images"
)


def open_dataset(
    path: str | Path,
    *,
    label_column: str = "label",
    id_column: str | None = None,
    preprocessing: Preprocessing = Preprocessing(),
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    training: bool = True,
) -> Dataset:
    """Open DATA and validate its labels and ids (features are checked as batches stream).

    label_column and id_column apply to tables; num_classes, when given, bounds the labels.
    ``class_names`` (the training set's) re-indexes named labels of new data to match, and
    ``training=False`` allows the single-row or single-class batches new data may come in.
    """
    path = Path(path)
    if id_column is not None and id_column == label_column:
        raise LabelscanError(f"{path}: --id-column and --label-column both name {label_column!r}; "
                             "the labels and the example ids must be different columns")
    table = {"label_column": label_column, "id_column": id_column}
    spec = LabelSpec(num_classes, tuple(class_names or ()), training)
    common = {"preprocessing": preprocessing, "label_spec": spec}
    if not path.exists():
        raise LabelscanError(f"{path}: no such file or folder; check the DATA path")
    if path.is_dir():
        entries = visible(path)
        if not entries:
            raise LabelscanError(f"{path}: the folder is empty; {_SUPPORTED}")
        parquet = [p for p in entries if p.is_file() and p.suffix.lower() == ".parquet"]
        if parquet:
            return ParquetDataset(path, parquet, **table, **common)
        idx = [p for p in entries if p.is_file() and is_idx_images(p)]
        if len(idx) > 1:
            raise LabelscanError(
                f"{path}: holds several IDX images files ({', '.join(p.name for p in idx)}); "
                "pass the path of the images file you mean"
            )
        if idx:
            return IdxDataset(idx[0], path=path, **common)
        if any(p.is_dir() for p in entries):
            return ImageFolderDataset(path, **common)
        raise LabelscanError(f"{path}: no supported data files in this folder; {_SUPPORTED}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return ParquetDataset(path, [path], **table, **common)
    if suffix == ".csv":
        return CsvDataset(path, **table, **common)
    if suffix == ".npz":
        return NpzDataset(path, **common)
    if is_idx_images(path):
        return IdxDataset(path, path=path, **common)
    raise LabelscanError(
        f"{path}: unsupported file type {suffix or '(no extension)'!r}; {_SUPPORTED}"
    )
