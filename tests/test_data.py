"""Tests for labelscan.data: every format, streaming, preprocessing, fingerprints, errors."""

from __future__ import annotations

import gzip
import hashlib
import struct

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from labelscan.data import Batch, Preprocessing, open_dataset
from labelscan.errors import LabelscanError

N, SIDE = 12, 4
RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, size=(N, SIDE, SIDE), dtype=np.uint8)
LABELS = np.repeat(np.arange(3), N // 3)  # sorted, so image-folder order equals row order
COLUMNS = [f"pixel_{i}" for i in range(SIDE * SIDE)]


# ---------------------------------------------------------------- writers: one per format


def write_parquet(path, pixels=PIXELS, labels=LABELS, row_group_size=None, **extra):
    columns = {
        name: pixels.reshape(len(pixels), -1)[:, i].astype(np.int64)
        for i, name in enumerate(COLUMNS)
    }
    pq.write_table(
        pa.table({**extra, **columns, "label": labels}), path, row_group_size=row_group_size
    )
    return path


def write_csv(path, pixels=PIXELS, labels=LABELS):
    flat = pixels.reshape(len(pixels), -1)
    lines = [",".join(COLUMNS + ["label"])]
    lines += [",".join(map(str, [*row, label])) for row, label in zip(flat, labels)]
    path.write_text("\n".join(lines) + "\n")
    return path


def idx_bytes(magic, array):
    return (
        struct.pack(">I", magic)
        + b"".join(struct.pack(">I", d) for d in array.shape)
        + array.tobytes()
    )


def write_idx(folder, pixels=PIXELS, labels=LABELS, gz=True, prefix="train"):
    folder.mkdir(exist_ok=True)
    suffix = ".gz" if gz else ""
    pack = gzip.compress if gz else bytes
    images = folder / f"{prefix}-images-idx3-ubyte{suffix}"
    images.write_bytes(pack(idx_bytes(0x803, pixels)))
    (folder / f"{prefix}-labels-idx1-ubyte{suffix}").write_bytes(
        pack(idx_bytes(0x801, labels.astype(np.uint8)))
    )
    return images


def write_images(folder, pixels=PIXELS, labels=LABELS, names=("0", "1", "2")):
    for row, (image, label) in enumerate(zip(pixels, labels)):
        (folder / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / names[label] / f"{row:02d}.png")
    return folder


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def text(path, content):
    path.write_text(content)
    return path


def binary(path, content):
    path.write_bytes(content)
    return path


def truncated(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return path


def table(tmp, columns, name="d.parquet"):
    pq.write_table(pa.table(columns), tmp / name)
    return tmp / name


FORMATS = {
    "parquet": lambda tmp: write_parquet(tmp / "d.parquet"),
    "parquet-folder": lambda tmp: (
        write_parquet(tmp / "a.parquet", PIXELS[:5], LABELS[:5]),
        write_parquet(tmp / "b.parquet", PIXELS[5:], LABELS[5:]),
        tmp,
    )[-1],
    "csv": lambda tmp: write_csv(tmp / "d.csv"),
    "npz-flat": lambda tmp: write_npz(tmp / "d.npz", X=PIXELS.reshape(N, -1), y=LABELS),
    "npz-images": lambda tmp: write_npz(tmp / "d.npz", X=PIXELS, y=LABELS),
    "idx-gz": lambda tmp: write_idx(tmp / "idx"),
    "idx-raw": lambda tmp: write_idx(tmp / "idx", gz=False),
    "idx-folder": lambda tmp: write_idx(tmp / "idx").parent,
    "png-folder": lambda tmp: write_images(tmp / "png"),
}
IMAGE_FORMATS = {"npz-images", "idx-gz", "idx-raw", "idx-folder", "png-folder"}


def read_all(dataset, batch_size):
    batches = list(dataset.batches(batch_size))
    assert all(isinstance(b, Batch) for b in batches)
    return (
        batches,
        torch.cat([b.rows for b in batches]),
        [i for b in batches for i in b.ids],
        torch.cat([b.x for b in batches]),
        torch.cat([b.y for b in batches]),
    )


def error_message(call):
    with pytest.raises(LabelscanError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------- every format, same tensors


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_the_same_tensors(tmp_path, fmt):
    dataset = open_dataset(FORMATS[fmt](tmp_path))
    shape = (1, SIDE, SIDE) if fmt in IMAGE_FORMATS else (SIDE * SIDE,)
    assert dataset.num_rows == N and dataset.feature_shape == shape and dataset.label_names == []

    batches, rows, ids, x, y = read_all(dataset, 5)

    assert [len(b.y) for b in batches] == [5, 5, 2]
    assert torch.equal(rows, torch.arange(N)) and rows.dtype == torch.int64
    assert x.dtype == torch.float32 and x.shape == (N, *shape)
    assert torch.equal(x.reshape(N, -1), torch.tensor(PIXELS.reshape(N, -1), dtype=torch.float32))
    assert y.dtype == torch.int64 and torch.equal(y, torch.tensor(LABELS))
    expected_ids = (
        [f"{label}/{row:02d}.png" for row, label in enumerate(LABELS)]
        if fmt == "png-folder"
        else [str(row) for row in range(N)]
    )
    assert ids == expected_ids


def test_batches_are_exact_across_files_and_sizes(tmp_path):
    dataset = open_dataset(FORMATS["parquet-folder"](tmp_path))  # files of 5 and 7 rows
    for size in (1, 4, 12, 100):
        batches, rows, *_ = read_all(dataset, size)
        assert [len(b.rows) for b in batches] == [min(size, N - s) for s in range(0, N, size)]
        assert torch.equal(rows, torch.arange(N))
        assert all(
            torch.equal(b.rows, torch.arange(b.rows[0], b.rows[0] + len(b.rows))) for b in batches
        )


def test_parquet_streams_in_bounded_batches(tmp_path, monkeypatch):
    n = 45
    pixels = np.tile(PIXELS, (4, 1, 1))[:n]
    path = write_parquet(tmp_path / "big.parquet", pixels, np.arange(n) % 3, row_group_size=10)
    assert pq.ParquetFile(path).num_row_groups == 5
    calls, original = [], pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        for batch in original(self, *args, **kwargs):
            assert batch.num_rows <= 7
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    dataset = open_dataset(path)
    batches, rows, _, x, y = read_all(dataset, 7)

    assert calls and all(c["batch_size"] == 7 and "label" not in c["columns"] for c in calls)
    assert [len(b.y) for b in batches] == [7] * 6 + [3]
    assert torch.equal(rows, torch.arange(n))
    assert torch.equal(x, torch.tensor(pixels.reshape(n, -1), dtype=torch.float32))
    assert torch.equal(y, torch.tensor(np.arange(n) % 3))


def test_parquet_folder_reads_files_in_sorted_order(tmp_path):
    write_parquet(tmp_path / "b.parquet", PIXELS[6:], LABELS[6:])
    write_parquet(tmp_path / "a.parquet", PIXELS[:6], LABELS[:6])
    _, _, _, x, y = read_all(open_dataset(tmp_path), 4)
    assert torch.equal(x, torch.tensor(PIXELS.reshape(N, -1), dtype=torch.float32))
    assert torch.equal(y, torch.tensor(LABELS))


# ---------------------------------------------------------------- labels and ids


@pytest.mark.parametrize(
    "labels, codes, names",
    [
        (["dog", "cat", "dog", "emu"], [1, 0, 1, 2], ["cat", "dog", "emu"]),
        ([2.0, 0.0, 1.0, 2.0], [2, 0, 1, 2], []),
        (["2", "0", "10", "2"], [2, 0, 10, 2], []),
    ],
)
def test_labels_become_class_indices(tmp_path, labels, codes, names):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"f": [0.5, 1.5, 2.5, 3.5], "label": labels}), path)
    dataset = open_dataset(path)
    assert dataset.label_names == names
    assert next(dataset.batches(10)).y.tolist() == codes


def test_csv_class_name_labels(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("f,label\n1,dog\n2,cat\n3,dog\n")
    dataset = open_dataset(path)
    assert dataset.label_names == ["cat", "dog"]
    assert next(dataset.batches(10)).y.tolist() == [1, 0, 1]


def test_image_folder_with_named_classes(tmp_path):
    dataset = open_dataset(write_images(tmp_path / "png", names=("cat", "dog", "emu")))
    assert dataset.label_names == ["cat", "dog", "emu"]
    _, _, ids, _, y = read_all(dataset, 5)
    assert torch.equal(y, torch.tensor(LABELS))
    assert ids[0] == "cat/00.png" and ids[-1] == "emu/11.png"


def test_rgb_images_have_three_channels_in_chw_order(tmp_path):
    rgb = RNG.integers(0, 256, size=(4, 3, 5, 3), dtype=np.uint8)  # (N, H, W, C), H != W
    for row, image in enumerate(rgb):
        (tmp_path / str(row % 2)).mkdir(exist_ok=True)
        Image.fromarray(image).save(tmp_path / str(row % 2) / f"{row}.png")
    dataset = open_dataset(tmp_path)
    assert dataset.feature_shape == (3, 3, 5)
    _, _, ids, x, _ = read_all(dataset, 3)
    order = [int(i.split("/")[1][0]) for i in ids]
    assert torch.equal(x, torch.tensor(rgb[order].transpose(0, 3, 1, 2), dtype=torch.float32))


def test_id_column_and_npz_ids(tmp_path):
    names = [f"ex-{i}" for i in range(N)]
    dataset = open_dataset(
        write_parquet(tmp_path / "d.parquet", example_id=names), id_column="example_id"
    )
    assert dataset.feature_shape == (SIDE * SIDE,)  # the id column is not a feature
    assert read_all(dataset, 5)[2] == names
    npz = write_npz(tmp_path / "d.npz", X=PIXELS, y=LABELS, ids=np.array(names))
    assert read_all(open_dataset(npz), 5)[2] == names


def test_pandas_index_is_not_a_feature(tmp_path):
    frame = pd.DataFrame({"f": [1.0, 2.0, 3.0], "label": [0, 1, 0]}, index=[10, 20, 30])
    frame.to_parquet(tmp_path / "d.parquet")
    assert "__index_level_0__" in pq.read_schema(tmp_path / "d.parquet").names
    dataset = open_dataset(tmp_path / "d.parquet")
    assert dataset.feature_shape == (1,)
    assert next(dataset.batches(3)).x.tolist() == [[1.0], [2.0], [3.0]]


def test_csv_ids_keep_their_text(tmp_path):
    path = text(tmp_path / "d.csv", "id,f,label\n007,1,0\n7,2,1\n")
    assert next(open_dataset(path, id_column="id").batches(2)).ids == ["007", "7"]


# ---------------------------------------------------------------- preprocessing


def test_preprocessing_scalar_and_per_channel():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2)
    out = Preprocessing(scale=0.5, mean=(1.0, 2.0, 3.0), std=(2.0,)).apply(x)
    expected = (x * 0.5 - torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)) / 2.0
    assert torch.allclose(out, expected)
    flat = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    out = Preprocessing(mean=(0.0, 1.0, 2.0), std=(1.0, 2.0, 4.0)).apply(flat)
    assert torch.allclose(
        out, (flat - torch.tensor([0.0, 1.0, 2.0])) / torch.tensor([1.0, 2.0, 4.0])
    )
    assert torch.equal(Preprocessing().apply(flat), flat)


def test_preprocessing_round_trips_through_a_dict():
    prep = Preprocessing(scale=1 / 255, mean=[0.1307], std=[0.3081])
    assert prep.mean == (0.1307,)
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    assert prep.to_dict() == {"scale": 1 / 255, "mean": [0.1307], "std": [0.3081]}


@pytest.mark.parametrize(
    "make, phrase",
    [
        (lambda: Preprocessing(std=(1.0, 0.0)), "positive"),
        (lambda: Preprocessing(std=(-1.0,)), "positive"),
        (lambda: Preprocessing(scale=float("nan")), "finite numbers, got nan"),
        (lambda: Preprocessing(scale=0), "non-zero"),
        (lambda: Preprocessing(mean=("a",)), "list of numbers"),
        (lambda: Preprocessing.from_dict({"scale": 1, "shift": 2}), "unknown keys"),
        (lambda: Preprocessing(mean=(1.0, 2.0)).apply(torch.zeros(2, 3, 4, 4)), "3 channels"),
        (lambda: Preprocessing(std=(1.0, 2.0)).apply(torch.zeros(2, 5)), "5 features"),
    ],
)
def test_bad_preprocessing_is_refused(make, phrase):
    assert phrase in error_message(make)


@pytest.mark.parametrize("fmt", ["parquet", "png-folder"])
def test_preprocessing_is_applied_to_batches(tmp_path, fmt):
    prep = Preprocessing(scale=1 / 255, mean=(0.5,), std=(0.25,))
    _, _, _, x, _ = read_all(open_dataset(FORMATS[fmt](tmp_path), preprocessing=prep), 5)
    expected = (torch.tensor(PIXELS.reshape(N, -1), dtype=torch.float32) / 255 - 0.5) / 0.25
    assert torch.allclose(x.reshape(N, -1), expected, atol=1e-6)


def test_preprocessing_length_is_checked_when_opening(tmp_path):
    message = error_message(
        lambda: open_dataset(
            FORMATS["png-folder"](tmp_path), preprocessing=Preprocessing(mean=(0.1, 0.2, 0.3))
        )
    )
    assert "1 channels" in message


# ---------------------------------------------------------------- fingerprints


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fmt", ["parquet", "csv", "npz-flat", "idx-raw"])
def test_fingerprint_changes_when_a_byte_changes(tmp_path, fmt):
    path = FORMATS[fmt](tmp_path)
    dataset = open_dataset(path)
    before = dataset.fingerprint()
    assert before == open_dataset(path).fingerprint()
    if fmt != "idx-raw":
        assert before == hashlib.sha256(path.read_bytes()).hexdigest()
    flip_last_byte(path)
    assert dataset.fingerprint() != before


def test_idx_fingerprint_covers_the_labels_file(tmp_path):
    dataset = open_dataset(write_idx(tmp_path, gz=False))
    before = dataset.fingerprint()
    flip_last_byte(tmp_path / "train-labels-idx1-ubyte")
    assert dataset.fingerprint() != before


def test_folder_fingerprint_covers_bytes_and_names(tmp_path):
    folder = write_images(tmp_path / "png")
    before = open_dataset(folder).fingerprint()
    image = folder / "1" / "05.png"
    Image.fromarray(255 - PIXELS[5]).save(image)
    edited = open_dataset(folder).fingerprint()
    assert edited != before
    image.rename(folder / "1" / "05a.png")  # same order: only the name differs
    assert open_dataset(folder).fingerprint() != edited


# ---------------------------------------------------------------- bad input


def two_idx_pairs(tmp):
    write_idx(tmp, prefix="train")
    write_idx(tmp, prefix="t10k")
    return tmp


def idx_with(tmp, labels=None, magic=0x803):
    images_path = write_idx(tmp, gz=False)
    images_path.write_bytes(idx_bytes(magic, PIXELS))
    if labels is not None:
        (tmp / "train-labels-idx1-ubyte").write_bytes(idx_bytes(0x801, labels))
    return images_path


def png_folder_with(tmp, name, content):
    folder = write_images(tmp / "png")
    if isinstance(content, Image.Image):
        content.save(folder / "1" / name)
    else:
        (folder / "1" / name).write_bytes(content)
    return folder


BAD_INPUTS = {
    "missing path": (lambda tmp: tmp / "nope.parquet", {}, "no such file"),
    "empty folder": (lambda tmp: tmp, {}, "folder is empty"),
    "no supported files": (
        lambda tmp: text(tmp / "notes.txt", "hi").parent,
        {},
        "no supported data",
    ),
    "unsupported extension": (
        lambda tmp: text(tmp / "d.txt", "hi"),
        {},
        "unsupported file type '.txt'",
    ),
    "corrupt parquet": (
        lambda tmp: binary(tmp / "d.parquet", b"not parquet at all"),
        {},
        "cannot read Parquet file",
    ),
    "truncated parquet": (
        lambda tmp: truncated(write_parquet(tmp / "d.parquet")),
        {},
        "cannot read Parquet file",
    ),
    "parquet folder schemas differ": (
        lambda tmp: (
            write_parquet(tmp / "a.parquet"),
            table(tmp, {"f": [1.0, 2.0], "label": [0, 1]}, "b.parquet"),
            tmp,
        )[-1],
        {},
        "share one schema",
    ),
    "ragged csv": (
        lambda tmp: text(tmp / "d.csv", "f,label\n1,0\n2,1,7\n"),
        {},
        "cannot read CSV file",
    ),
    "empty csv": (lambda tmp: text(tmp / "d.csv", ""), {}, "cannot read CSV file"),
    "corrupt npz": (
        lambda tmp: binary(tmp / "d.npz", b"PK\x03\x04garbage"),
        {},
        "cannot read npz file",
    ),
    "truncated npz": (
        lambda tmp: truncated(write_npz(tmp / "d.npz", X=PIXELS, y=LABELS)),
        {},
        "cannot read npz file",
    ),
    "npz without y": (lambda tmp: write_npz(tmp / "d.npz", X=PIXELS), {}, "no array 'y'"),
    "npz object array": (
        lambda tmp: write_npz(tmp / "d.npz", X=PIXELS, y=np.array([{}] * N, dtype=object)),
        {},
        "plain numeric or string",
    ),
    "npz 1-d X": (
        lambda tmp: write_npz(tmp / "d.npz", X=LABELS, y=LABELS),
        {},
        "must be numeric with shape",
    ),
    "npz y length": (
        lambda tmp: write_npz(tmp / "d.npz", X=PIXELS, y=LABELS[:-1]),
        {},
        "X has 12 rows",
    ),
    "truncated idx gz": (lambda tmp: truncated(write_idx(tmp)), {}, "cannot read IDX file"),
    "truncated idx": (lambda tmp: truncated(write_idx(tmp, gz=False)), {}, "truncated or corrupt"),
    "wrong idx magic": (
        lambda tmp: idx_with(tmp, magic=0x801),
        {},
        "wrong IDX magic number 0x00000801",
    ),
    "idx count mismatch": (
        lambda tmp: idx_with(tmp, labels=LABELS[:-1].astype(np.uint8)),
        {},
        "holds 11 labels but",
    ),
    "idx labels file missing": (
        lambda tmp: binary(tmp / "x-images-idx3-ubyte", idx_bytes(0x803, PIXELS)),
        {},
        "no labels file x-labels-idx1-ubyte",
    ),
    "several idx pairs": (two_idx_pairs, {}, "several IDX images files"),
    "non-image file in image folder": (
        lambda tmp: png_folder_with(tmp, "notes.txt", b"hi"),
        {},
        "not an image",
    ),
    "stray file beside class folders": (
        lambda tmp: (
            write_images(tmp / "png"),
            (tmp / "png" / "x.png").write_bytes(b"x"),
            tmp / "png",
        )[-1],
        {},
        "unexpected file",
    ),
    "corrupt png": (
        lambda tmp: png_folder_with(tmp, "bad.png", b"\x89PNG broken"),
        {},
        "cannot read image",
    ),
    "mixed image sizes": (
        lambda tmp: png_folder_with(tmp, "big.png", Image.new("L", (5, 4))),
        {},
        "image size 5x4 differs",
    ),
    "mixed image modes": (
        lambda tmp: png_folder_with(tmp, "rgb.png", Image.new("RGB", (4, 4))),
        {},
        "image mode RGB differs",
    ),
    "unsupported image mode": (
        lambda tmp: png_folder_with(tmp, "a.png", Image.new("RGBA", (4, 4))),
        {},
        "mode RGBA is not supported",
    ),
    "class folders without images": (
        lambda tmp: ((tmp / "a").mkdir(), (tmp / "b").mkdir(), tmp)[-1],
        {},
        "no images",
    ),
    "missing label column": (
        lambda tmp: table(tmp, {"f": [1.0, 2.0], "target": [0, 1]}),
        {},
        "no column 'label' (columns: f, target)",
    ),
    "missing id column": (
        lambda tmp: table(tmp, {"f": [1.0, 2.0], "label": [0, 1]}),
        {"id_column": "name"},
        "pass --id-column",
    ),
    "non-numeric feature": (
        lambda tmp: table(tmp, {"f": [1.0, 2.0], "name": ["a", "b"], "label": [0, 1]}),
        {},
        "column 'name' is not numeric",
    ),
    "csv non-numeric feature": (
        lambda tmp: text(tmp / "d.csv", "name,f,label\na,1,0\nb,2,1\n"),
        {},
        "--id-column name",
    ),
    "missing label": (
        lambda tmp: table(tmp, {"f": [1.0, 2.0, 3.0], "label": [0, None, 1]}),
        {},
        "label is missing at row 1",
    ),
    "missing csv label": (
        lambda tmp: text(tmp / "d.csv", "f,label\n1,0\n2,\n3,1\n"),
        {},
        "label is missing at row 1",
    ),
    "negative label": (
        lambda tmp: table(tmp, {"f": [1.0, 2.0, 3.0], "label": [0, -1, 1]}),
        {},
        "label -1 at row 1 is negative",
    ),
    "fractional label": (
        lambda tmp: table(tmp, {"f": [1.0, 2.0, 3.0], "label": [0.0, 1.0, 1.5]}),
        {},
        "label 1.5 at row 2 is not a whole number",
    ),
    "fractional csv label": (
        lambda tmp: text(tmp / "d.csv", "f,label\n1,0\n2,0.5\n"),
        {},
        "label 0.5 at row 1 is not a whole number",
    ),
    "label out of range": (
        lambda tmp: table(tmp, {"f": [1.0, 2.0, 3.0], "label": [0, 3, 1]}),
        {"num_classes": 3},
        "label 3 at row 1 is out of range for 3 classes",
    ),
    "class names beyond num_classes": (
        lambda tmp: table(tmp, {"f": [1.0, 2.0, 3.0], "label": ["a", "b", "c"]}),
        {"num_classes": 2},
        "label 'c' at row 2 is out of range for 2 classes",
    ),
    "idx label out of range": (
        lambda tmp: write_idx(tmp),
        {"num_classes": 2},
        "label 2 at row 8 is out of range for 2 classes",
    ),
    "class name in new data for a training set of class indices": (
        lambda tmp: table(tmp, {"f": [1.0, 2.0, 3.0], "label": ["0", "cat", "1"]}),
        {"training": False, "num_classes": 3},
        "label 'cat' at row 1 is not a class index",
    ),
    "label column also the id column": (
        lambda tmp: table(tmp, {"f": [1.0, 2.0, 3.0], "label": [0, 1, 0]}),
        {"id_column": "label"},
        "must be different columns",
    ),
    "single row": (lambda tmp: table(tmp, {"f": [1.0], "label": [0]}), {}, "only 1 row"),
    "single class": (
        lambda tmp: table(tmp, {"f": [1.0, 2.0], "label": [4, 4]}),
        {},
        "single class 4",
    ),
    "single class folder": (
        lambda tmp: write_images(tmp, PIXELS[:3], LABELS[:3]),
        {},
        "single class",
    ),
    "duplicate ids": (
        lambda tmp: table(tmp, {"f": [1.0, 2.0, 3.0], "id": ["a", "b", "a"], "label": [0, 1, 0]}),
        {"id_column": "id"},
        "example id 'a' appears more than once (again at row 2)",
    ),
    "duplicate npz ids": (
        lambda tmp: write_npz(tmp / "d.npz", X=PIXELS, y=LABELS, ids=np.array(["a", "b"] * 6)),
        {},
        "example id 'a' appears more than once",
    ),
}


BAD_FEATURES = {  # found while batches stream, so opening succeeds
    "npz infinite feature": (
        lambda tmp: write_npz(
            tmp / "d.npz", X=np.where(np.arange(N)[:, None] == 6, np.inf, 1.0), y=LABELS
        ),
        "row 6 has a missing, NaN or infinite",
    ),
    "nan feature": (
        lambda tmp: table(tmp, {"f": [1.0, 2.0, 3.0, np.nan, 5.0], "label": [0, 1, 0, 1, 0]}),
        "row 3 has a missing, NaN or infinite",
    ),
    "null parquet feature": (
        lambda tmp: table(tmp, {"f": [1, 2, None, 4, 5], "label": [0, 1, 0, 1, 0]}),
        "row 2 has a missing",
    ),
    "missing csv feature": (
        lambda tmp: text(tmp / "d.csv", "f,g,label\n1,2,0\n3,,1\n"),
        "row 1 has a missing",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_one_line_error(tmp_path, case):
    build, options, phrase = BAD_INPUTS[case]
    path = build(tmp_path)
    message = error_message(lambda: open_dataset(path, **options))
    assert phrase in message, message
    assert str(tmp_path) in message  # names the offending file


@pytest.mark.parametrize("case", BAD_FEATURES)
def test_bad_feature_values_are_refused_while_streaming(tmp_path, case):
    build, phrase = BAD_FEATURES[case]
    dataset = open_dataset(build(tmp_path))
    message = error_message(lambda: list(dataset.batches(2)))
    assert phrase in message, message
    assert str(tmp_path) in message


def test_batches_before_a_bad_row_are_still_yielded(tmp_path):
    path = table(tmp_path, {"f": [1.0, 2.0, 3.0, np.nan, 5.0], "label": [0, 1, 0, 1, 0]})
    batches = open_dataset(path).batches(2)
    assert next(batches).rows.tolist() == [0, 1]
    assert "row 3" in error_message(lambda: next(batches))


def test_batch_size_must_be_positive(tmp_path):
    dataset = open_dataset(FORMATS["npz-flat"](tmp_path))
    assert "positive integer" in error_message(lambda: next(dataset.batches(0)))
