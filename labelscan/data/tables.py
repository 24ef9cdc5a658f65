"""Parquet and CSV tables: one label column, an optional id column, numeric feature columns."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from labelscan.data.dataset import Dataset, reading
from labelscan.data.labels import LabelSpec, encode_labels
from labelscan.data.preprocessing import Preprocessing
from labelscan.errors import LabelscanError

_NUMERIC = (
    pa.types.is_integer,
    pa.types.is_floating,
    pa.types.is_boolean,
    pa.types.is_decimal,
    pa.types.is_null,
)  # null: a CSV column empty in its first block; read as NaN


class _Table(Dataset):
    """Shared by both table formats: pick the columns, read labels and ids up front."""

    def __init__(
        self,
        path: Path,
        files: list[Path],
        schema: pa.Schema,
        key_columns: pa.Table,
        *,
        label_column: str,
        id_column: str | None,
        preprocessing: Preprocessing,
        label_spec: LabelSpec,
    ) -> None:
        self._features = _feature_columns(schema, path, label_column, id_column)
        source = f"{path} column {label_column!r}"
        labels, names = encode_labels(_values(key_columns[label_column], source, "label"), source)
        ids = None
        if id_column is not None:
            id_source = f"{path} column {id_column!r}"
            ids = _values(
                key_columns[id_column].cast(pa.string()), id_source, "example id"
            ).tolist()
        super().__init__(
            path,
            files=files,
            labels=labels,
            label_names=names,
            label_source=source,
            ids=ids,
            feature_shape=(len(self._features),),
            preprocessing=preprocessing,
            label_spec=label_spec,
        )


class ParquetDataset(_Table):
    """One Parquet file, or a folder of them read as one table in sorted file order. Features
    are read with `iter_batches`, so memory follows the batch size, not the table size."""

    def __init__(
        self,
        path: Path,
        files: list[Path],
        *,
        label_column: str,
        id_column: str | None,
        preprocessing: Preprocessing,
        label_spec: LabelSpec,
    ) -> None:
        keys = _key_columns(label_column, id_column)
        schema, parts = None, []
        for file in files:
            with reading(file, "Parquet file"), pq.ParquetFile(file) as parquet:
                if schema is None:
                    schema = parquet.schema_arrow
                    _require(keys, schema, file)
                elif not parquet.schema_arrow.equals(schema, check_metadata=False):
                    raise LabelscanError(
                        f"{file}: its columns differ from those of {files[0].name}; "
                        "all Parquet files in a folder must share one schema"
                    )
                parts.append(parquet.read(columns=keys))
        super().__init__(
            path,
            files,
            schema,
            pa.concat_tables(parts),
            label_column=label_column,
            id_column=id_column,
            preprocessing=preprocessing,
            label_spec=label_spec,
        )

    def _chunks(self, batch_size: int) -> Iterator[np.ndarray]:
        for file in self._files:
            with pq.ParquetFile(file) as parquet:
                for batch in parquet.iter_batches(batch_size=batch_size, columns=self._features):
                    yield _matrix(batch)


class CsvDataset(_Table):
    """A CSV file with a header row, read with pyarrow's streaming reader (block by block)."""

    def __init__(
        self,
        path: Path,
        *,
        label_column: str,
        id_column: str | None,
        preprocessing: Preprocessing,
        label_spec: LabelSpec,
    ) -> None:
        keys = _key_columns(label_column, id_column)
        with reading(path, "CSV file"):
            with pacsv.open_csv(path) as reader:  # infers column types from the first block
                schema = reader.schema
            _require(keys, schema, path)
            text = pacsv.ConvertOptions(
                include_columns=keys,
                column_types=dict.fromkeys(keys, pa.string()),
                strings_can_be_null=True,
                null_values=[""],
            )
            with pacsv.open_csv(path, convert_options=text) as reader:
                key_columns = reader.read_all()
        super().__init__(
            path,
            [path],
            schema,
            key_columns,
            label_column=label_column,
            id_column=id_column,
            preprocessing=preprocessing,
            label_spec=label_spec,
        )

    def _chunks(self, batch_size: int) -> Iterator[np.ndarray]:
        numbers = pacsv.ConvertOptions(
            include_columns=self._features, column_types=dict.fromkeys(self._features, pa.float32())
        )
        with pacsv.open_csv(self.path, convert_options=numbers) as reader:
            for batch in reader:
                yield _matrix(batch)


def _key_columns(label_column: str, id_column: str | None) -> list[str]:
    return [label_column] if id_column is None else [label_column, id_column]


def _require(columns: list[str], schema: pa.Schema, path: Path) -> None:
    """Name the missing label/id column and list the ones there are."""
    for column, option in zip(columns, ("--label-column", "--id-column"), strict=False):
        if column not in schema.names:
            shown = ", ".join(schema.names[:12])
            if len(schema.names) > 12:
                shown += f", … ({len(schema.names)} in all)"
            raise LabelscanError(
                f"{path}: no column {column!r} (columns: {shown}); "
                f"pass {option} with the right name"
            )


def _feature_columns(
    schema: pa.Schema, path: Path, label_column: str, id_column: str | None
) -> list[str]:
    """Every column but the label, the id and a pandas index; each must be numeric."""
    index = {
        c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)
    }
    features = [n for n in schema.names if n not in {label_column, id_column, *index}]
    for name in features:
        kind = schema.field(name).type
        if not any(is_kind(kind) for is_kind in _NUMERIC):
            raise LabelscanError(
                f"{path}: column {name!r} is not numeric ({kind}); pass --id-column {name} "
                "if it holds example ids, or drop it"
            )
    if not features:
        raise LabelscanError(
            f"{path}: no feature columns besides the label and id; add numeric feature columns"
        )
    return features


def _values(column: pa.ChunkedArray, source: str, what: str) -> np.ndarray:
    """A key column as numpy, refusing missing values (naming the first row)."""
    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        raise LabelscanError(
            f"{source}: {what} is missing at row {row}; fill it in or drop the row"
        )
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    return column.to_numpy()


def _matrix(batch: pa.RecordBatch) -> np.ndarray:
    """Numeric columns → float32 (n, F); nulls become NaN so the finiteness check names the row."""
    out = np.empty((batch.num_rows, batch.num_columns), dtype=np.float32)
    for j, column in enumerate(batch.columns):
        out[:, j] = column.cast(pa.float32(), safe=False).to_numpy(zero_copy_only=False)
    return out
