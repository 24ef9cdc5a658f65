"""The .labelscan/ folder: manifest, summary and reports, with fingerprints that keep them honest.

``summarize`` records where the model and data came from and what they hashed to, in the
manifest and inside the summary itself; every later command checks those hashes first, so a
report can never silently describe a model or data set other than the one on disk. Files
are written to a temporary name and renamed, so an interrupted command leaves the previous
files intact. The files written are always the fixed names below inside the workspace
(and ``rank --out``), whatever a manifest says.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from labelscan import __version__
from labelscan.data import Dataset, Preprocessing, open_dataset
from labelscan.errors import LabelscanError
from labelscan.laftr.summary import LaftrSummary
from labelscan.files import file_fingerprint, payload_fingerprint, write_atomically
from labelscan.interruption import signals_held
from labelscan.model import LaftrNet, checkpoint_kind, load_model

MANIFEST_VERSION = 1
DEFAULT_WORKSPACE = Path(".labelscan")


@dataclass
class ModelSource:
    """How to load the model again: its path and the options it was loaded with."""

    path: str
    input_shape: list[int] | None = None
    trust_checkpoint: bool = False
    arch: str | None = None

    def load(self) -> LaftrNet:
        shape = tuple(self.input_shape) if self.input_shape else None
        return load_model(self.path, input_shape=shape, trust_checkpoint=self.trust_checkpoint, arch=self.arch)


@dataclass
class DataSource:
    """How to read the data again: its path, columns and preprocessing."""

    path: str
    label_column: str = "label"
    id_column: str | None = None
    preprocessing: dict = field(default_factory=lambda: Preprocessing().to_dict())

    def reading(self) -> dict:
        """The options that decide what the model sees of the data (kept in the summary too)."""
        return {"label_column": self.label_column, "id_column": self.id_column,
                "preprocessing": Preprocessing.from_dict(self.preprocessing).to_dict()}

    def open(self, num_classes: int | None = None, class_names: list[str] | None = None,
             training: bool = True) -> Dataset:
        return open_dataset(self.path, label_column=self.label_column, id_column=self.id_column,
                            preprocessing=Preprocessing.from_dict(self.preprocessing), num_classes=num_classes,
                            class_names=class_names, training=training)


def open_model_and_data(source: ModelSource, data: DataSource) -> tuple[LaftrNet, Dataset]:
    """The model and its data, opened so that each validates the other (shapes, label range).

    A TorchScript or pickled model records no input shape; the data's example shape stands in.
    """
    shape = source.input_shape
    if shape is None and checkpoint_kind(Path(source.path)) != "export":
        shape = list(data.open().feature_shape)
    net = replace(source, input_shape=shape).load()
    return net, data.open(num_classes=net.num_outputs)


@dataclass
class Manifest:
    """What ``summarize`` saw. Fingerprints are sha256 of the files' bytes."""

    model: ModelSource
    data: DataSource
    model_fingerprint: str
    data_fingerprint: str
    summary_fingerprint: str
    num_rows: int
    label_names: list[str]
    options: dict
    labelscan_version: str = __version__
    format_version: int = MANIFEST_VERSION

    @classmethod
    def from_json(cls, payload: dict) -> "Manifest":
        return cls(**{**payload, "model": ModelSource(**payload["model"]), "data": DataSource(**payload["data"])})


class Workspace:
    """A folder holding ``manifest.json``, ``summary.safetensors``, ``report.parquet`` (the
    training set's ranking) and ``check-report.parquet`` (the last ``check --data``)."""

    def __init__(self, root: str | Path = DEFAULT_WORKSPACE):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.safetensors"

    @property
    def report_path(self) -> Path:
        return self.root / "report.parquet"

    @property
    def check_report_path(self) -> Path:
        return self.root / "check-report.parquet"

    def check_folder(self) -> None:
        """Refuse, before any work, a workspace path that is a file or lies where nothing can be written."""
        if self.root.exists() and not self.root.is_dir():
            raise LabelscanError(f"workspace {self.root} exists and is not a folder; choose another --workspace")
        existing = next(p for p in (self.root.absolute(), *self.root.absolute().parents) if p.exists())
        if not existing.is_dir():
            raise LabelscanError(f"cannot create workspace {self.root}: {existing} is a file; choose another --workspace")
        if not os.access(existing, os.W_OK):
            raise LabelscanError(f"cannot write workspace {self.root}: no permission in {existing}; "
                                 "choose another --workspace")

    def create(self) -> None:
        self.check_folder()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LabelscanError(f"cannot create workspace {self.root} ({exc.strerror or exc}); "
                                 "choose another --workspace") from None

    def save(self, summary: LaftrSummary, manifest: Manifest) -> None:
        """Summary first, then the manifest that vouches for it, with Ctrl-C held until both
        are in place. Only a hard kill between the two renames can split them, and then the
        manifest's summary fingerprint no longer matches, which later commands refuse."""
        self.create()
        payload = summary.to_bytes()
        manifest.summary_fingerprint = payload_fingerprint(payload)
        with signals_held():
            write_atomically(self.summary_path, payload)
            write_atomically(self.manifest_path, json.dumps(asdict(manifest), indent=2).encode())

    def manifest(self) -> Manifest:
        if not self.manifest_path.exists():
            raise LabelscanError(f"no workspace at {self.root}; run labelscan summarize MODEL DATA first")
        try:
            payload = json.loads(self.manifest_path.read_text())
            version = int(payload.get("format_version", 0))
        except (OSError, ValueError, AttributeError) as exc:
            raise LabelscanError(f"{self.manifest_path} is corrupt ({exc}); run labelscan summarize again") from None
        if version > MANIFEST_VERSION:
            raise LabelscanError(
                f"{self.manifest_path} was written by a newer labelscan (format {version}); upgrade labelscan"
            )
        try:
            return Manifest.from_json(payload)
        except (TypeError, KeyError) as exc:
            raise LabelscanError(f"{self.manifest_path} is incomplete ({exc}); run labelscan summarize again") from None

    def summary(self, manifest: Manifest) -> LaftrSummary:
        """The summary, after checking it is the one the manifest vouches for, of the same model and data."""
        self._check_summary_file(manifest)
        summary = LaftrSummary.load(self.summary_path)
        recorded = (summary.metadata.get("model_fingerprint"), summary.metadata.get("data_fingerprint"))
        if recorded != (manifest.model_fingerprint, manifest.data_fingerprint):
            raise LabelscanError(f"{self.summary_path} was computed from another model or data than the manifest "
                                 "names; run labelscan summarize again")
        if summary.metadata.get("reading") != manifest.data.reading():
            raise LabelscanError(f"{self.manifest_path} reads the data with other columns or preprocessing than "
                                 f"{self.summary_path} was computed with; run labelscan summarize again")
        return summary

    def verify(self, manifest: Manifest, dataset: Dataset | None = None) -> None:
        """Refuse if the model file, the summary file, or the data when given changed since ``summarize``."""
        model_path = Path(manifest.model.path)
        if not model_path.exists():
            raise LabelscanError(f"the summarized model {model_path} is gone; restore it or run summarize again")
        if file_fingerprint(model_path) != manifest.model_fingerprint:
            raise LabelscanError(f"the model {model_path} changed since summarize; run labelscan summarize again")
        self._check_summary_file(manifest)
        if dataset is not None and dataset.fingerprint() != manifest.data_fingerprint:
            raise LabelscanError(f"the data {manifest.data.path} changed since summarize; run labelscan summarize again")

    def _check_summary_file(self, manifest: Manifest) -> None:
        if not self.summary_path.exists():
            raise LabelscanError(f"{self.summary_path} is missing; run labelscan summarize again")
        if file_fingerprint(self.summary_path) != manifest.summary_fingerprint:
            raise LabelscanError(f"{self.summary_path} changed since summarize; run labelscan summarize again")
