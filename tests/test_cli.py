"""The command line contract (design §4; issues 4 and 5): summarize → rank → check, fsd, demo.

One summarized-and-ranked digits workspace is shared by the module (read-only); tests that
change a workspace copy it first.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from importlib.metadata import version as installed_version
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import labelscan
from labelscan.report import read_report, write_report

from cli_helpers import (
    CHECKPOINTS, CLEAN, DATA_OPTIONS, FAST, FIXTURES, FLIPPED, MODEL, NOISY, copy_workspace, invoke, noisy_rows,
    ok, refused, run_cli, snapshot, summarize, write_table,
)

EXPECTED_SCHEMA = {
    "row": pa.int64(), "example_id": pa.string(), "given_label": pa.string(), "predicted_label": pa.string(),
    "suggested_label": pa.string(), "self_influence": pa.float64(), "loss": pa.float64(), "rank": pa.int64(),
    "flagged": pa.bool_(),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def noisy_ws(tmp_path_factory) -> Path:
    """The noisy digits summarized in-process and ranked by a real ``python -m labelscan`` process."""
    workspace = tmp_path_factory.mktemp("noisy") / "ws"
    ok(summarize(workspace, NOISY))
    ok(run_cli("rank", "-w", workspace, *FAST, "--top", "0"))
    return workspace


@pytest.fixture(scope="module")
def small_ws(tmp_path_factory) -> Path:
    """60 digits summarized (no report): for the slower methods and the mutation tests."""
    folder = tmp_path_factory.mktemp("small")
    data = write_table(noisy_rows(60), folder / "small.parquet")
    ok(summarize(folder / "ws", data))
    return folder / "ws"


def fsd_value(stdout: str) -> float:
    match = re.search(r"FSD\D*?([-+0-9.eE]+)", stdout)
    assert match, stdout
    return float(match.group(1))


# ------------------------------------------------------------------ version and help


def test_version():
    result = invoke("--version")
    assert ok(result).strip() == f"labelscan {labelscan.__version__}"
    assert result.stderr == ""
    assert labelscan.__version__ == installed_version("labelscan")


def test_importing_the_package_loads_no_torch_and_every_public_name_resolves():
    probe = ("import sys, labelscan; assert 'torch' not in sys.modules, 'torch loaded'; "
             "[getattr(labelscan, name) for name in labelscan.__all__]; print(sorted(dir(labelscan)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(sorted(labelscan.__all__))


@pytest.mark.parametrize("command, expected", [
    ("summarize", ["MODEL", "DATA", "--workspace", "--scale", "--id-column", "--label-column", "--trust-checkpoint"]),
    ("rank", ["--workspace", "--top", "--method", "--out", "--seed", "--checkpoint"]),
    ("check", ["--workspace", "--max-flagged-fraction", "--data", "--baseline", "--format"]),
    ("fsd", ["MODEL_A", "MODEL_B", "--workspace", "--samples", "--seed"]),
    ("demo", ["--fixtures", "--top"]),
])
def test_help_of_every_command(command, expected):
    stdout = ok(invoke(command, "--help"))
    assert "Usage" in stdout and command in stdout
    for word in expected:  # argument names are shown in lower case
        assert word.lower() in stdout.lower(), f"{word} missing from `labelscan {command} --help`"


def test_top_level_help_lists_every_command():
    stdout = ok(invoke("--help"))
    for command in ("summarize", "rank", "check", "fsd", "demo"):
        assert command in stdout


# ------------------------------------------------------------------ summarize and rank


def test_summarize_writes_manifest_and_summary(noisy_ws):
    assert {p.name for p in noisy_ws.iterdir()} == {"manifest.json", "summary.safetensors", "report.parquet"}
    manifest = json.loads((noisy_ws / "manifest.json").read_text())
    assert manifest["model"]["path"] == str(MODEL.resolve())
    assert manifest["data"]["path"] == str(NOISY.resolve())
    assert manifest["data"]["id_column"] == "example_id"
    assert manifest["data"]["preprocessing"]["scale"] == pytest.approx(0.0625)
    assert manifest["model_fingerprint"] == sha256(MODEL)
    assert manifest["data_fingerprint"] == sha256(NOISY)
    assert manifest["summary_fingerprint"] == sha256(noisy_ws / "summary.safetensors")
    assert manifest["num_rows"] == 1797


def test_report_schema(noisy_ws):
    table = pq.read_table(noisy_ws / "report.parquet")
    assert {field.name: field.type for field in table.schema} == EXPECTED_SCHEMA
    report = table.to_pandas()
    noisy = pd.read_parquet(NOISY)
    assert len(report) == len(noisy) == 1797
    assert report["row"].tolist() == list(range(len(noisy)))
    assert report["example_id"].tolist() == noisy["example_id"].tolist()
    assert report["given_label"].tolist() == noisy["label"].astype(str).tolist()
    assert sorted(report["rank"]) == list(range(1, len(report) + 1))
    ordered = report.sort_values("rank")
    assert (np.diff(ordered["self_influence"].to_numpy()) <= 0).all(), "rank 1 must be the largest score"
    assert np.isfinite(report["self_influence"]).all() and np.isfinite(report["loss"]).all()
    assert set(report["predicted_label"]) <= {str(k) for k in range(10)}
    # unflagged examples keep their label; flagged ones get another class
    kept = report[~report["flagged"]]
    assert (kept["suggested_label"] == kept["given_label"]).all()
    moved = report[report["flagged"]]
    assert len(moved) > 0 and (moved["suggested_label"] != moved["given_label"]).all()


def test_report_metadata(noisy_ws):
    schema = pq.read_schema(noisy_ws / "report.parquet")
    metadata = json.loads(schema.metadata[b"labelscan"])
    assert metadata["method"] == "linear"
    assert metadata["seed"] == 0
    assert metadata["settings"]["samples"] == 300 and metadata["settings"]["seed"] == 0
    assert metadata["model_fingerprint"] == sha256(MODEL)
    assert metadata["data_fingerprint"] == sha256(NOISY)
    assert metadata["summary_fingerprint"] == sha256(noisy_ws / "summary.safetensors")
    assert metadata["label_names"] == []  # integer labels: class k is "k"
    assert metadata["labelscan_version"] == labelscan.__version__
    report = pd.read_parquet(noisy_ws / "report.parquet")
    assert (report["flagged"] == (report["self_influence"] > metadata["threshold"])).all()


def test_report_round_trips_through_read_report(noisy_ws, tmp_path):
    report, metadata = read_report(noisy_ws / "report.parquet")
    expected = pq.read_table(noisy_ws / "report.parquet").to_pandas()
    pd.testing.assert_frame_equal(report, expected)
    assert metadata == json.loads(pq.read_schema(noisy_ws / "report.parquet").metadata[b"labelscan"])
    write_report(report, tmp_path / "again.parquet", metadata)
    again, again_metadata = read_report(tmp_path / "again.parquet")
    pd.testing.assert_frame_equal(again, report)
    assert again_metadata == metadata


def test_rank_out_path_table_and_determinism(noisy_ws, tmp_path):
    """--out writes there (workspace untouched); the table shows the top K; the report is
    byte-identical to the one another process made with the same seed."""
    before = snapshot(noisy_ws)
    out = tmp_path / "elsewhere" / "ranked.parquet"
    out.parent.mkdir()
    stdout = ok(invoke("rank", "-w", noisy_ws, *FAST, "--seed", "0", "--top", "7", "--out", out))
    assert snapshot(noisy_ws) == before
    assert out.read_bytes() == (noisy_ws / "report.parquet").read_bytes()
    report = pd.read_parquet(out).sort_values("rank")
    shown = [line for line in stdout.splitlines() if "digit-" in line]
    assert len(shown) == 7
    for line, example_id, rank in zip(shown, report["example_id"].iloc[:7], report["rank"].iloc[:7]):
        assert example_id in line and re.search(rf"\b{rank}\b", line)
    assert report["example_id"].iloc[7] not in stdout
    assert str(out) in stdout
    assert f"of {len(report)}" in stdout


def test_different_seed_changes_scores(noisy_ws, tmp_path):
    ok(invoke("rank", "-w", noisy_ws, *FAST, "--seed", "1", "--top", "0", "--out", tmp_path / "seed1.parquet"))
    seed0 = pd.read_parquet(noisy_ws / "report.parquet")
    seed1, metadata = read_report(tmp_path / "seed1.parquet")
    assert metadata["seed"] == 1
    assert not np.array_equal(seed0["self_influence"], seed1["self_influence"])
    assert (seed0["loss"] == seed1["loss"]).all()


@pytest.mark.parametrize("method, extra", [
    ("loss", []),
    ("grad-norm", []),
    ("proximal", ["--steps", "1"]),
    ("tracin", [arg for path in CHECKPOINTS for arg in ("--checkpoint", path)]),
])
def test_rank_methods(small_ws, tmp_path, method, extra):
    before = snapshot(small_ws)
    out = tmp_path / f"{method}.parquet"
    stdout = ok(invoke("rank", "-w", small_ws, "--method", method, *FAST, *extra, "--top", "3", "--out", out))
    assert snapshot(small_ws) == before
    assert ("has no default threshold" in stdout) == (method != "linear"), stdout
    report, metadata = read_report(out)
    assert metadata["method"] == method
    assert len(report) == 60 and sorted(report["rank"]) == list(range(1, 61))
    assert np.isfinite(report["self_influence"]).all()
    if method == "loss":
        assert np.allclose(report["self_influence"], report["loss"])
    if method == "tracin":
        assert len(metadata["checkpoints"]) == 3
        assert metadata["checkpoints"][2] == sha256(CHECKPOINTS[2])


def test_rank_refuses_a_changed_model(tmp_path):
    model = tmp_path / "model.pt2"
    model.write_bytes(MODEL.read_bytes())
    data = write_table(noisy_rows(40), tmp_path / "data.parquet")
    workspace = tmp_path / "ws"
    ok(summarize(workspace, data, model=model))
    model.write_bytes((FIXTURES / "digits_mlp_other.pt2").read_bytes())
    before = snapshot(workspace)
    refused(invoke("rank", "-w", workspace, *FAST), "model", "changed")
    refused(invoke("check", "-w", workspace, *FAST), "model", "changed")
    assert snapshot(workspace) == before


@pytest.mark.parametrize("change", ["pixel", "label", "appended row", "label column gone"])
def test_rank_refuses_changed_data(tmp_path, change):
    rows = noisy_rows(40)
    data = write_table(rows, tmp_path / "data.parquet")
    workspace = tmp_path / "ws"
    ok(summarize(workspace, data))
    if change == "pixel":
        rows.loc[5, "pixel_20"] += 1
    elif change == "label":
        rows.loc[5, "label"] = (rows.loc[5, "label"] + 1) % 10
    elif change == "appended row":
        rows = pd.concat([rows, noisy_rows(41).iloc[[40]]], ignore_index=True)
    else:
        rows = rows.drop(columns="label")
    write_table(rows, data)
    before = snapshot(workspace)
    for command in ("rank", "check"):
        refused(invoke(command, "-w", workspace, *FAST), "data", "changed|no longer reads as it did at summarize")
    assert snapshot(workspace) == before


# ------------------------------------------------------------------ check


def test_check_gate_tight_fails_loose_passes_reusing_the_report(noisy_ws):
    before = snapshot(noisy_ws)
    tight = invoke("check", "-w", noisy_ws, *FAST, "--max-flagged-fraction", "0.05")
    assert tight.exit_code == 1, tight.output
    assert "FAIL" in tight.stdout and "Traceback" not in tight.stdout + tight.stderr
    assert "PASS" in ok(invoke("check", "-w", noisy_ws, *FAST, "--max-flagged-fraction", "0.5"))
    assert snapshot(noisy_ws) == before, "check must reuse a current report, not rank again"


def test_check_gate_passes_clean_labels_that_the_noisy_ones_fail(noisy_ws, tmp_path):
    """At the default settings (the flag threshold assumes the default number of LAFTR draws),
    the same recipe trained on the true labels passes the 5% gate and the noisy set fails it."""
    clean_ws = tmp_path / "clean"
    ok(summarize(clean_ws, CLEAN, model=FIXTURES / "digits_mlp_clean.pt2"))
    clean = json.loads(ok(invoke("check", "-w", clean_ws, "--format", "json")))
    failed = invoke("check", "-w", copy_workspace(noisy_ws, tmp_path / "noisy"), "--format", "json")
    assert failed.exit_code == 1, failed.output
    noisy = json.loads(failed.stdout)
    assert clean["passed"] is True and noisy["passed"] is False
    assert clean["flagged_fraction"] < noisy["flagged_fraction"] / 3


@pytest.mark.parametrize("change", ["model", "data", "summary"])
def test_check_refuses_when_files_changed_after_rank(tmp_path, change):
    """Like rank, check must refuse (exit 2) when the model, data or summary changed since
    summarize, even though a report from before the change is in the workspace."""
    model = tmp_path / "model.pt2"
    model.write_bytes(MODEL.read_bytes())
    rows = noisy_rows(40)
    data = write_table(rows, tmp_path / "data.parquet")
    workspace = tmp_path / "ws"
    ok(summarize(workspace, data, model=model))
    ok(invoke("rank", "-w", workspace, *FAST, "--top", "0"))
    if change == "model":
        model.write_bytes((FIXTURES / "digits_mlp_other.pt2").read_bytes())
    elif change == "data":
        rows.loc[3, "label"] = (rows.loc[3, "label"] + 1) % 10
        write_table(rows, data)
    else:
        other = tmp_path / "other"
        ok(summarize(other, data, model=FIXTURES / "digits_mlp_other.pt2"))
        (workspace / "summary.safetensors").write_bytes((other / "summary.safetensors").read_bytes())
    before = snapshot(workspace)
    refused(invoke("check", "-w", workspace, *FAST, "--max-flagged-fraction", "1"),
            "changed|does not match")
    assert snapshot(workspace) == before


def test_check_json(noisy_ws):
    result = invoke("check", "-w", noisy_ws, *FAST, "--max-flagged-fraction", "0.05", "--format", "json")
    assert result.exit_code == 1
    verdict = json.loads(result.stdout)
    report = pd.read_parquet(noisy_ws / "report.parquet")
    assert verdict["rows"] == len(report) == 1797
    assert verdict["flagged"] == int(report["flagged"].sum())
    assert verdict["flagged_fraction"] == pytest.approx(verdict["flagged"] / verdict["rows"])
    assert verdict["passed"] is False
    assert Path(verdict["report"]) == noisy_ws / "report.parquet"
    loose = json.loads(ok(invoke("check", "-w", noisy_ws, *FAST, "--max-flagged-fraction", "0.5", "--format", "json")))
    assert loose["passed"] is True and loose["flagged"] == verdict["flagged"]


def test_check_ranks_when_there_is_no_report(noisy_ws, tmp_path):
    workspace = copy_workspace(noisy_ws, tmp_path / "ws")
    (workspace / "report.parquet").unlink()
    verdict = json.loads(ok(invoke("check", "-w", workspace, *FAST, "--max-flagged-fraction", "0.5",
                                   "--format", "json")))
    assert (workspace / "report.parquet").exists()
    assert (workspace / "report.parquet").read_bytes() == (noisy_ws / "report.parquet").read_bytes()
    assert verdict["rows"] == 1797 and verdict["passed"] is True


def test_check_new_data_ranks_flipped_labels_first(noisy_ws, tmp_path):
    """~100 correctly labelled digits plus 5 whose labels were flipped: the flips come out on top."""
    clean = pd.read_parquet(CLEAN)
    noisy = pd.read_parquet(NOISY)
    agree = clean.index[(clean["label"] == noisy["label"]).to_numpy()]  # rows whose noisy label is right
    assert not set(agree) & set(pd.read_csv(FLIPPED)["row"])
    picked = clean.loc[agree[1000:1105]].reset_index(drop=True)
    flips = [7, 23, 51, 78, 101]
    picked.loc[flips, "label"] = (picked.loc[flips, "label"] + 3) % 10
    picked["example_id"] = [f"new-{i:03d}" for i in range(len(picked))]
    data = write_table(picked, tmp_path / "new.parquet")
    workspace = copy_workspace(noisy_ws, tmp_path / "ws")
    training_report = (workspace / "report.parquet").read_bytes()
    verdict = json.loads(ok(invoke("check", "-w", workspace, *FAST, "--data", data,
                                   "--max-flagged-fraction", "0.9", "--format", "json")))
    assert verdict["rows"] == len(picked) == 105
    assert (workspace / "report.parquet").read_bytes() == training_report, "the training report stays"
    report = pd.read_parquet(verdict["report"])
    assert report["example_id"].tolist() == picked["example_id"].tolist()
    flipped = report.loc[flips]
    others = report.drop(index=flips)
    assert flipped["rank"].max() <= 15, flipped[["rank", "self_influence"]]
    assert flipped["self_influence"].min() > others["self_influence"].median()
    assert flipped["flagged"].mean() > others["flagged"].mean()


def test_check_new_data_may_name_its_own_label_and_id_columns(noisy_ws, tmp_path):
    rows = noisy_rows(30).rename(columns={"example_id": "key", "label": "annotation"})
    data = write_table(rows, tmp_path / "batch.parquet")
    workspace = copy_workspace(noisy_ws, tmp_path / "ws")
    refused(invoke("check", "-w", workspace, *FAST, "--data", data), "no column 'label'", "--label-column")
    ok(invoke("check", "-w", workspace, *FAST, "--data", data, "--label-column", "annotation", "--id-column", "key",
              "--max-flagged-fraction", "1"))
    report = pd.read_parquet(workspace / "check-report.parquet")
    assert report["example_id"].tolist() == rows["key"].tolist()
    assert report["given_label"].tolist() == rows["annotation"].astype(str).tolist()


def test_check_cannot_score_tracin_without_checkpoints(noisy_ws, tmp_path):
    workspace = copy_workspace(noisy_ws, tmp_path / "ws")
    before = snapshot(workspace)
    refused(invoke("check", "-w", workspace, "--method", "tracin", "--threshold", "1"),
            "labelscan rank --method tracin --checkpoint")
    assert snapshot(workspace) == before


def test_check_baseline_must_be_a_labelscan_report(noisy_ws):
    refused(invoke("check", "-w", noisy_ws, *FAST, "--baseline", NOISY), "no labelscan metadata")


def test_check_baseline_counts_only_new_flags(noisy_ws, tmp_path):
    workspace = noisy_ws
    strict = invoke("check", "-w", workspace, *FAST, "--max-flagged-fraction", "0", "--format", "json")
    assert strict.exit_code == 1 and json.loads(strict.stdout)["flagged"] > 0
    same = json.loads(ok(invoke("check", "-w", workspace, *FAST, "--baseline", workspace / "report.parquet",
                                "--max-flagged-fraction", "0", "--format", "json")))
    assert same["gated_flags"] == 0 and same["passed"] is True and same["flagged"] > 0
    # a baseline that lacks three of today's flags: exactly those three count
    report, metadata = read_report(workspace / "report.parquet")
    older = report.copy()
    newly = older.index[older["flagged"]][:3]
    older.loc[newly, "flagged"] = False
    write_report(older, tmp_path / "baseline.parquet", metadata)
    three = invoke("check", "-w", workspace, *FAST, "--baseline", tmp_path / "baseline.parquet",
                   "--max-flagged-fraction", "0", "--format", "json")
    assert three.exit_code == 1
    assert json.loads(three.stdout)["gated_flags"] == 3
    assert "PASS" in ok(invoke("check", "-w", workspace, *FAST, "--baseline", tmp_path / "baseline.parquet",
                               "--max-flagged-fraction", str(3 / len(report))))


def test_check_appends_a_github_step_summary(noisy_ws, tmp_path):
    summary = tmp_path / "step-summary.md"
    summary.write_text("earlier step\n")
    failed = invoke("check", "-w", noisy_ws, *FAST, "--max-flagged-fraction", "0.05",
                    env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert failed.exit_code == 1
    ok(invoke("check", "-w", noisy_ws, *FAST, "--max-flagged-fraction", "0.5",
              env={"GITHUB_STEP_SUMMARY": str(summary)}))
    text = summary.read_text()
    assert text.startswith("earlier step\n")
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert len(headings) == 2 and "fail" in headings[0].lower() and "pass" in headings[1].lower()
    assert "| rows" in text and "1797" in text


def test_unwritable_github_step_summary_keeps_the_gate_verdict(noisy_ws, tmp_path):
    passed = invoke("check", "-w", noisy_ws, *FAST, "--max-flagged-fraction", "0.5",
                    env={"GITHUB_STEP_SUMMARY": str(tmp_path / "missing" / "summary.md")})
    assert passed.exit_code == 0 and "PASS" in passed.stdout
    assert "Traceback" not in passed.stderr and "GITHUB_STEP_SUMMARY" in passed.stderr


def test_check_without_github_summary_writes_none(noisy_ws, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok(invoke("check", "-w", noisy_ws, *FAST, "--max-flagged-fraction", "0.5"))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ fsd


def test_fsd_of_a_model_with_itself_is_zero(small_ws):
    assert abs(fsd_value(ok(invoke("fsd", MODEL, MODEL, "-w", small_ws, "--samples", "1000")))) < 1e-6


def test_fsd_orders_models_by_distance(small_ws):
    before = snapshot(small_ws)
    other = fsd_value(ok(invoke("fsd", MODEL, FIXTURES / "digits_mlp_other.pt2", "-w", small_ws, "--samples", "1000")))
    late = fsd_value(ok(invoke("fsd", CHECKPOINTS[2], CHECKPOINTS[1], "-w", small_ws, "--samples", "1000")))
    assert other > late > 0
    assert snapshot(small_ws) == before


def test_fsd_refuses_another_architecture(small_ws):
    before = snapshot(small_ws)
    refused(invoke("fsd", FIXTURES / "digits_cnn.pt2", MODEL, "-w", small_ws), "architecture")
    refused(invoke("fsd", MODEL, FIXTURES / "digits_cnn.pt2", "-w", small_ws), "architecture")
    assert snapshot(small_ws) == before


# ------------------------------------------------------------------ demo and end to end


def test_demo_prints_precision_and_recall(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stdout = ok(invoke("demo", "--top", "3"))
    precision = re.search(r"precision\s+([0-9.]+)", stdout)
    recall = re.search(r"recall\s+([0-9.]+)", stdout)
    assert precision and recall, stdout
    assert 0 < float(precision.group(1)) <= 1 and 0.5 < float(recall.group(1)) <= 1
    assert list(tmp_path.iterdir()) == [], "the demo works in a temporary folder"


def test_subprocess_refusal_is_one_line_exit_2(tmp_path):
    process = run_cli("rank", "-w", tmp_path / "nothing-here")
    refused(process, "no workspace", "summarize")
    assert not (tmp_path / "nothing-here").exists()


def test_subprocess_check_gate_exit_code(noisy_ws):
    process = run_cli("check", "-w", noisy_ws, *FAST, "--max-flagged-fraction", "0.05")
    assert process.returncode == 1, process.stderr
    assert "FAIL" in process.stdout and "Traceback" not in process.stderr


def test_summarize_defaults_to_dot_labelscan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_table(noisy_rows(30), tmp_path / "d.parquet")
    ok(invoke("summarize", MODEL, data.name, *DATA_OPTIONS))
    assert {p.name for p in (tmp_path / ".labelscan").iterdir()} == {"manifest.json", "summary.safetensors"}
    ok(invoke("rank", "-m", "loss", "--top", "0"))
    assert (tmp_path / ".labelscan" / "report.parquet").exists()
