"""Image folders DATA/<class>/<image>.png|jpg|jpeg, decoded batch by batch with Pillow."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from labelscan.data.dataset import Dataset, reading, visible
from labelscan.data.labels import LabelSpec
from labelscan.data.preprocessing import Preprocessing
from labelscan.errors import LabelscanError

_EXTENSIONS = (".png", ".jpg", ".jpeg")
_CHANNELS = {"L": 1, "RGB": 3}


class ImageFolderDataset(Dataset):
    """One subfolder per class, sorted by name. When every name is an integer the label is
    int(name) and label_names is [] (as for integer labels in tables, so that label_names[k]
    always names class k); otherwise the label is the name's index and label_names the names.
    Headers are checked when opened (one size and mode everywhere); pixels are decoded only
    when batches ask for them. Example ids are "class/filename"."""

    def __init__(
        self, path: Path, *, preprocessing: Preprocessing, label_spec: LabelSpec
    ) -> None:
        classes = visible(path)
        for entry in classes:
            if not entry.is_dir():
                raise LabelscanError(
                    f"{entry}: unexpected file in an image folder; it must hold only one "
                    "subfolder per class — move the file out"
                )
        names = [c.name for c in classes]
        numbered = all(_is_int(name) for name in names)
        self._images: list[Path] = []
        codes: list[int] = []
        for index, folder in enumerate(classes):
            for file in visible(folder):
                if not file.is_file() or file.suffix.lower() not in _EXTENSIONS:
                    raise LabelscanError(
                        f"{file}: not an image (.png, .jpg or .jpeg); class folders may hold only "
                        "images — move it out"
                    )
                self._images.append(file)
                codes.append(int(folder.name) if numbered else index)
        if not self._images:
            raise LabelscanError(
                f"{path}: no images in its class folders; add DATA/<class>/*.png files"
            )
        first = self._images[0]
        (width, height), first_mode = _header(first)
        for file in self._images[1:]:
            (w, h), mode = _header(file)
            if (w, h) != (width, height):
                raise LabelscanError(
                    f"{file}: image size {w}x{h} differs from {first} ({width}x{height}); "
                    "resize all images to one size"
                )
            if mode != first_mode:
                raise LabelscanError(
                    f"{file}: image mode {mode} differs from {first} ({first_mode}); "
                    "convert all images to one mode (L or RGB)"
                )
        super().__init__(
            path,
            files=self._images,
            labels=np.array(codes, dtype=np.int64),
            label_names=[] if numbered else names,
            label_source=str(path),
            ids=[f"{f.parent.name}/{f.name}" for f in self._images],
            feature_shape=(_CHANNELS[first_mode], height, width),
            preprocessing=preprocessing,
            label_spec=label_spec,
        )

    def _chunks(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self._images), batch_size):
            yield np.stack([self._pixels(f) for f in self._images[start : start + batch_size]])

    def _pixels(self, file: Path) -> np.ndarray:
        """(C, H, W) uint8 for one image."""
        with reading(file, "image"), Image.open(file) as image:
            pixels = np.asarray(image)
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _header(file: Path) -> tuple[tuple[int, int], str]:
    """Size and mode from the header alone (Pillow decodes pixels lazily)."""
    with reading(file, "image"), Image.open(file) as image:
        size, mode = image.size, image.mode
    if mode not in _CHANNELS:
        raise LabelscanError(
            f"{file}: image mode {mode} is not supported; convert images to grayscale (L) or RGB"
        )
    return size, mode


def _is_int(name: str) -> bool:
    try:
        int(name)
    except ValueError:
        return False
    return True
