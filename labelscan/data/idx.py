"""IDX image/label pairs (the MNIST format), gzipped or not, parsed with NumPy."""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from labelscan.data.dataset import Dataset, reading
from labelscan.data.labels import LabelSpec, encode_labels
from labelscan.data.preprocessing import Preprocessing
from labelscan.errors import LabelscanError

_IMAGES = re.compile(r"(?P<stem>.*)images(?P<sep>[-.])idx3-ubyte(?P<gz>\.gz)?")
_MAGIC = {3: 0x00000803, 1: 0x00000801}  # big-endian: 0, 0, type 0x08 = uint8, ndim
_KIND = {3: "images", 1: "labels"}


def is_idx_images(path: Path) -> bool:
    """Whether the name is that of an IDX images file, e.g. train-images-idx3-ubyte.gz."""
    return _IMAGES.fullmatch(path.name) is not None


def labels_beside(images: Path) -> Path:
    """The labels file that goes with an images file: images-idx3 → labels-idx1, same folder."""
    match = _IMAGES.fullmatch(images.name)
    name = f"{match['stem']}labels{match['sep']}idx1-ubyte"
    candidates = [name + (match["gz"] or ""), name + ("" if match["gz"] else ".gz")]
    for candidate in candidates:
        if (images.parent / candidate).is_file():
            return images.parent / candidate
    raise LabelscanError(
        f"{images}: no labels file {candidates[0]} beside it; "
        "put the labels file in the same folder"
    )


class IdxDataset(Dataset):
    """Images (N, rows, cols) uint8 as (N, 1, rows, cols); labels (N,) uint8. Loaded whole."""

    def __init__(
        self, images: Path, *, path: Path, preprocessing: Preprocessing, label_spec: LabelSpec
    ) -> None:
        labels_file = labels_beside(images)
        self._images = _read(images, 3)
        raw_labels = _read(labels_file, 1)
        if len(raw_labels) != len(self._images):
            raise LabelscanError(
                f"{labels_file}: holds {len(raw_labels)} labels but {images.name} holds "
                f"{len(self._images)} images; use the labels file that belongs to these images"
            )
        labels, names = encode_labels(raw_labels, str(labels_file))
        super().__init__(
            path,
            files=[images, labels_file],
            labels=labels,
            label_names=names,
            label_source=str(labels_file),
            ids=None,
            feature_shape=(1, *self._images.shape[1:]),
            preprocessing=preprocessing,
            label_spec=label_spec,
        )

    def _chunks(self, batch_size: int) -> Iterator[np.ndarray]:
        yield self._images[:, None]


def _read(path: Path, ndim: int) -> np.ndarray:
    """Check magic number and size from the big-endian header, return the uint8 payload."""
    with reading(path, "IDX file"):
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise LabelscanError(
            f"{path}: IDX file is truncated (shorter than its header); download it again"
        )
    magic, *shape = np.frombuffer(raw, dtype=">u4", count=1 + ndim).tolist()
    if magic != _MAGIC[ndim]:
        raise LabelscanError(
            f"{path}: wrong IDX magic number 0x{magic:08X} (expected 0x{_MAGIC[ndim]:08X} for "
            f"{_KIND[ndim]}); pass the *-images-idx3-ubyte file with its labels file beside it"
        )
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise LabelscanError(
            f"{path}: IDX header promises {size} bytes of {_KIND[ndim]} {shape} but the file holds "
            f"{len(raw) - header}; it is truncated or corrupt — download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
