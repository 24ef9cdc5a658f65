"""What each CLI command does, as library calls on a workspace (the CLI only parses and renders).

Each job validates everything before it writes anything, and writes through temporary
files, so a refused or interrupted job leaves the workspace as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pandas as pd

from labelscan import __version__
from labelscan.errors import LabelscanError
from labelscan.influence.scoring import InfluenceSettings
from labelscan.files import check_writable, file_fingerprint
from labelscan.model import LaftrNet, checkpoint_kind, load_model
from labelscan.pipeline import fsd, self_influence, summarize
from labelscan.laftr.summary import LaftrSummary
from labelscan.report import build_report, flag_threshold, read_report, write_report
from labelscan.data import Dataset
from labelscan.workspace import DataSource, Manifest, ModelSource, Workspace, open_model_and_data

Progress = Callable[[str, int], Callable[[int], None]]
"""``progress(description, total)`` returns a callback advanced by the number of rows done."""


def _silent(description: str, total: int) -> Callable[[int], None]:
    return lambda done: None


def summarize_job(
    workspace: Workspace,
    model: ModelSource,
    data: DataSource,
    *,
    per_class: bool = True,
    covariance: str = "auto",
    batch_size: int = 512,
    progress: Progress = _silent,
) -> tuple[LaftrSummary, Manifest]:
    """Summarize DATA at the model's θs into the workspace, with its manifest."""
    model = replace(model, path=str(Path(model.path).resolve()))
    data = replace(data, path=str(Path(data.path).resolve()))
    workspace.check_folder()
    net, dataset = open_model_and_data(model, data)
    fingerprints = {"model_fingerprint": file_fingerprint(Path(model.path)), "data_fingerprint": dataset.fingerprint()}
    options = {"per_class": per_class, "covariance": covariance}
    metadata = {"labelscan_version": __version__, **options, **fingerprints, "reading": data.reading()}
    summary = summarize(net, dataset, per_class=per_class, covariance=covariance, batch_size=batch_size,
                        metadata=metadata,
                        on_batch=progress("summarizing", dataset.num_rows))
    manifest = Manifest(model=model, data=data, summary_fingerprint="", num_rows=dataset.num_rows,
                        label_names=dataset.label_names, options=options, **fingerprints)
    workspace.save(summary, manifest)
    return summary, manifest


@dataclass
class RankResult:
    report: pd.DataFrame
    metadata: dict
    path: Path


def rank_job(
    workspace: Workspace,
    settings: InfluenceSettings,
    *,
    threshold: float | None = None,
    out: Path | None = None,
    checkpoints: list[Path] = (),
    trust_checkpoint: bool = False,
    data: DataSource | None = None,
    progress: Progress = _silent,
) -> RankResult:
    """Score the summarized training set (or ``data``, new examples) and write the report.

    ``threshold=None`` takes the method's default flagging threshold, if it has one. Pickled
    ``checkpoints`` load only with ``trust_checkpoint``, never on the manifest's word.
    """
    threshold = flag_threshold(settings.method, threshold)
    manifest = workspace.manifest()
    path = Path(out) if out is not None else workspace.report_path
    check_writable(path)
    _refuse_overwriting_inputs(path, workspace, manifest, [data.path] if data else [], checkpoints)
    summary = workspace.summary(manifest)
    if data is None:
        dataset = _summarized_data(workspace, manifest, summary.net.num_outputs)
        label_names, data_fingerprint = manifest.label_names, manifest.data_fingerprint
    else:
        workspace.verify(manifest)
        dataset = data.open(num_classes=summary.net.num_outputs, class_names=manifest.label_names, training=False)
        label_names, data_fingerprint = dataset.label_names, dataset.fingerprint()
    like = replace(manifest.model, trust_checkpoint=trust_checkpoint)
    nets = [_load_checkpoint(path, like, summary.net) for path in checkpoints]
    scores = self_influence(summary, dataset, settings, checkpoints=nets,
                            on_batch=progress(f"scoring ({settings.method})", dataset.num_rows))
    report = build_report(scores, label_names, threshold)
    metadata = {
        "labelscan_version": __version__,
        "method": settings.method,
        "settings": settings.as_dict(),
        "solver": scores.solver,
        "threshold": threshold,
        "seed": settings.seed,
        "model_fingerprint": manifest.model_fingerprint,
        "data_fingerprint": data_fingerprint,
        "summary_fingerprint": manifest.summary_fingerprint,
        "training_data": data is None,
        "label_names": label_names,
        "checkpoints": [file_fingerprint(p) for p in checkpoints],
    }
    write_report(report, path, metadata)
    return RankResult(report, metadata, path)


def _summarized_data(workspace: Workspace, manifest: Manifest, num_classes: int | None = None) -> Dataset:
    """The training data, refused unless it is what ``summarize`` read (it opened then, so a
    failure to open now means it changed)."""
    try:
        dataset = manifest.data.open(num_classes=num_classes)
    except LabelscanError as exc:
        raise LabelscanError(f"the data {manifest.data.path} no longer reads as it did at summarize ({exc}); "
                             "restore it or run labelscan summarize again") from None
    workspace.verify(manifest, dataset)
    return dataset


def _refuse_overwriting_inputs(path: Path, workspace: Workspace, manifest: Manifest, data: list[str],
                               checkpoints: list[Path]) -> None:
    """A report must not land on the model, the data, a checkpoint or the workspace's own files."""
    target = path.resolve()
    inputs = {
        "the model": [manifest.model.path], "the data": [manifest.data.path, *data],
        "a checkpoint": checkpoints, "the summary": [workspace.summary_path],
        "the manifest": [workspace.manifest_path],
    }
    for what, paths in inputs.items():
        for source in (Path(p).resolve() for p in paths):
            if target == source or source in target.parents:
                raise LabelscanError(f"--out {path} would overwrite {what} ({source}); choose another path")


def current_report(workspace: Workspace, settings: InfluenceSettings, threshold: float | None = None) -> RankResult | None:
    """The workspace's report, if it describes the summarized model, data and summary as they
    are now, and was made with these settings and threshold."""
    if not workspace.report_path.exists():
        return None
    manifest = workspace.manifest()
    _summarized_data(workspace, manifest)
    report, metadata = read_report(workspace.report_path)
    current = (
        metadata.get("training_data")
        and metadata.get("model_fingerprint") == manifest.model_fingerprint
        and metadata.get("summary_fingerprint") == manifest.summary_fingerprint
        and metadata.get("data_fingerprint") == manifest.data_fingerprint
        and metadata.get("settings") == settings.as_dict()
        and metadata.get("threshold") == flag_threshold(settings.method, threshold)
    )
    return RankResult(report, metadata, workspace.report_path) if current else None


@dataclass
class GateResult:
    """The data-quality gate's verdict; ``new_flags`` counts flags absent from the baseline."""

    rows: int
    flagged: int
    considered: int
    max_fraction: float
    baseline: str | None

    @property
    def fraction(self) -> float:
        return self.considered / self.rows if self.rows else 0.0

    @property
    def passed(self) -> bool:
        return self.fraction <= self.max_fraction

    def as_dict(self) -> dict:
        return {"rows": self.rows, "flagged": self.flagged, "gated_flags": self.considered,
                "flagged_fraction": self.fraction, "max_flagged_fraction": self.max_fraction,
                "baseline": self.baseline, "passed": self.passed}


def gate(result: RankResult, max_fraction: float, baseline: Path | None = None) -> GateResult:
    """Pass when the fraction of flagged rows (only those new relative to ``baseline``) is within ``max_fraction``."""
    if result.metadata.get("threshold") is None:
        raise LabelscanError(f"method {result.metadata.get('method')} has no default flagging threshold; "
                             "pass --threshold, or use --method linear")
    report = result.report
    if not 0 <= max_fraction <= 1:
        raise LabelscanError(f"--max-flagged-fraction must be between 0 and 1, got {max_fraction}")
    flagged = report[report["flagged"]]
    considered = flagged
    if baseline is not None:
        previous, _ = read_report(baseline)
        known = set(previous.loc[previous["flagged"], "example_id"])
        considered = flagged[~flagged["example_id"].isin(known)]
    return GateResult(len(report), len(flagged), len(considered), max_fraction,
                      str(baseline) if baseline is not None else None)


def check_job(
    workspace: Workspace,
    settings: InfluenceSettings,
    *,
    max_fraction: float,
    threshold: float | None = None,
    data: Path | None = None,
    label_column: str | None = None,
    id_column: str | None = None,
    baseline: Path | None = None,
    progress: Progress = _silent,
) -> tuple[RankResult, GateResult]:
    """The CI gate: reuse a current report or rank, then gate (``data``: score new examples only).

    New data is read with the training data's preprocessing, and with its label and id columns
    unless ``label_column`` / ``id_column`` name others; it is reported to
    ``check-report.parquet``, leaving the training report alone.
    """
    if flag_threshold(settings.method, threshold) is None:
        raise LabelscanError(f"method {settings.method} has no default flagging threshold; "
                             "pass --threshold, or use --method linear")
    if not 0 <= max_fraction <= 1:
        raise LabelscanError(f"--max-flagged-fraction must be between 0 and 1, got {max_fraction}")
    if baseline is not None:
        read_report(baseline)
    result = None if data is not None else current_report(workspace, settings, threshold)
    if result is None and settings.method == "tracin":
        raise LabelscanError("check has no training checkpoints to score --method tracin with; run labelscan rank "
                             "--method tracin --checkpoint ... with the same --threshold, and check gates its report")
    if data is not None:
        known = workspace.manifest().data
        source = DataSource(str(data), label_column or known.label_column, id_column or known.id_column,
                            known.preprocessing)
        result = rank_job(workspace, settings, threshold=threshold, out=workspace.check_report_path,
                          data=source, progress=progress)
    elif result is None:
        result = rank_job(workspace, settings, threshold=threshold, progress=progress)
    return result, gate(result, max_fraction, baseline)


def fsd_job(workspace: Workspace, model_a: ModelSource, model_b: ModelSource, *, samples: int, seed: int) -> float:
    """LAFTR FSD between two checkpoints of the summarized architecture."""
    manifest = workspace.manifest()
    summary = workspace.summary(manifest)
    nets = [_load_checkpoint(Path(m.path), m, summary.net) for m in (model_a, model_b)]
    return fsd(summary, nets[1], nets[0], samples=samples, seed=seed)


def _load_checkpoint(path: Path, like: ModelSource, summarized: LaftrNet) -> LaftrNet:
    """Another checkpoint of the summarized network, loaded with the same options."""
    shape = None if checkpoint_kind(Path(path)) == "export" else summarized.input_shape
    net = load_model(path, input_shape=shape, trust_checkpoint=like.trust_checkpoint, arch=like.arch)
    if net.spec() != summarized.spec() or net.input_shape != summarized.input_shape:
        raise LabelscanError(f"{path} is not a checkpoint of the summarized architecture; "
                             "FSD and TracIn compare settings of one network")
    return net
