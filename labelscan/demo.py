"""``labelscan demo``: summarize, rank and gate the digits fixture, scored against its known flips."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from labelscan.data import Preprocessing
from labelscan.errors import LabelscanError
from labelscan.influence.scoring import InfluenceSettings
from labelscan.jobs import GateResult, Progress, gate, rank_job, summarize_job
from labelscan.workspace import DataSource, ModelSource, Workspace

DEMO_FILES = ("digits_mlp.pt2", "digits_noisy.parquet", "digits_flipped.csv")
GATE_FRACTION = 0.05


@dataclass
class DemoResult:
    report: pd.DataFrame
    gate: GateResult
    flipped: int
    precision: float
    recall: float
    auroc: float

    def describe(self) -> str:
        flagged = int(self.report["flagged"].sum())
        return (
            f"{flagged} of {len(self.report)} digits flagged; {self.flipped} labels were flipped on purpose.\n"
            f"precision {self.precision:.2f}, recall {self.recall:.2f} of the flagged set; "
            f"AUROC {self.auroc:.3f} of the ranking\n"
            f"gate at {GATE_FRACTION:.0%}: {'PASS' if self.gate.passed else 'FAIL'} "
            f"({self.gate.fraction:.1%} flagged)"
        )


def run_demo(fixtures: Path, progress: Progress) -> DemoResult:
    missing = [name for name in DEMO_FILES if not (Path(fixtures) / name).exists()]
    if missing:
        raise LabelscanError(f"{fixtures} lacks {', '.join(missing)}; run the demo from a labelscan clone "
                             "or pass --fixtures path/to/labelscan/fixtures")
    fixtures = Path(fixtures)
    with tempfile.TemporaryDirectory(prefix="labelscan-demo-") as folder:
        workspace = Workspace(folder)
        data = DataSource(str(fixtures / "digits_noisy.parquet"), id_column="example_id",
                          preprocessing=Preprocessing(scale=1 / 16).to_dict())
        summarize_job(workspace, ModelSource(str(fixtures / "digits_mlp.pt2")), data, progress=progress)
        result = rank_job(workspace, InfluenceSettings(method="linear"), progress=progress)
    report = result.report
    flips = set(pd.read_csv(fixtures / "digits_flipped.csv")["row"])
    truth = report["row"].isin(flips)
    flagged = report["flagged"]
    hits = int((truth & flagged).sum())
    return DemoResult(
        report=report,
        gate=gate(result, GATE_FRACTION),
        flipped=len(flips),
        precision=hits / max(int(flagged.sum()), 1),
        recall=hits / len(flips),
        auroc=auroc(report["self_influence"], truth),
    )


def auroc(scores: pd.Series, positive: pd.Series) -> float:
    """Area under the ROC curve via the rank-sum (Mann–Whitney) identity, ties averaged."""
    ranks = scores.rank(method="average")
    count_positive = int(positive.sum())
    count_negative = len(scores) - count_positive
    return float((ranks[positive].sum() - count_positive * (count_positive + 1) / 2) / (count_positive * count_negative))
