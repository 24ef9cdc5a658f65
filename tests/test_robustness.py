"""Bad input, interruption, determinism, scale and file safety, all through the CLI (issue 6).

Every refusal must exit 2 with one line on stderr that names the problem, print no
traceback, and leave the workspace exactly as it was (no file created, changed or removed).
The workspace each test refuses into is a copy of a summarized and ranked one, so there are
files to damage.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from labelscan import workspace as workspace_module
from labelscan.data.dataset import Dataset
from labelscan.interruption import signals_held
from labelscan.laftr.summary import LaftrSummary
from labelscan.report import read_report

from cli_helpers import (
    FIXTURES, MODEL, WORKSPACE_FILES, copy_workspace, invoke, noisy_rows, ok, refused, snapshot,
    subprocess_env, summarize, write_table,
)

ROWS = 60
QUICK = ["--samples", "200", "--top", "0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A folder holding small.parquet (60 digits) and ws/, summarized and ranked on it."""
    folder = tmp_path_factory.mktemp("robust")
    data = write_table(noisy_rows(ROWS), folder / "small.parquet")
    ok(summarize(folder / "ws", data))
    ok(invoke("rank", "-w", folder / "ws", *QUICK))
    return folder


@pytest.fixture
def ws(base, tmp_path) -> Path:
    """A private copy of the summarized and ranked workspace."""
    return copy_workspace(base / "ws", tmp_path / "ws")


@pytest.fixture
def rows() -> pd.DataFrame:
    return noisy_rows(ROWS)


def refuses_summarize(ws: Path, data: Path, *phrases: str, model: Path = MODEL, extra=()) -> str:
    """summarize into an existing workspace is refused and changes nothing in it."""
    before = snapshot(ws)
    line = refused(summarize(ws, data, *extra, model=model), *phrases)
    assert snapshot(ws) == before
    return line


def refuses_rank(ws: Path, *phrases: str, command: str = "rank", extra=()) -> str:
    before = snapshot(ws)
    line = refused(invoke(command, "-w", ws, *extra, *(QUICK if command == "rank" else ["--samples", "200"])),
                   *phrases)
    assert snapshot(ws) == before
    return line


def fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def set_manifest(ws: Path, **changes) -> None:
    manifest = json.loads((ws / "manifest.json").read_text())
    manifest.update(changes)
    (ws / "manifest.json").write_text(json.dumps(manifest, indent=2))


# ------------------------------------------------------------------ paths


def test_missing_model(ws, base, tmp_path):
    refuses_summarize(ws, base / "small.parquet", "does not exist|no such", re.escape(str(tmp_path / "nope.pt2")),
                      model=tmp_path / "nope.pt2")


def test_missing_data(ws, tmp_path):
    refuses_summarize(ws, tmp_path / "nope.parquet", "no such file", "nope.parquet")


@pytest.mark.parametrize("workspace", ["a-file", "a-file/ws"])
def test_workspace_that_cannot_be_a_folder_is_refused_before_the_pass(base, tmp_path, workspace):
    (tmp_path / "a-file").write_text("not a folder")
    before = snapshot(tmp_path)
    refused(summarize(tmp_path / workspace, base / "small.parquet"), "a-file", "choose another --workspace")
    assert snapshot(tmp_path) == before and not (tmp_path / "a-file" / "ws").exists()


def test_error_text_in_square_brackets_is_printed_as_is(ws, tmp_path):
    """Messages are plain text: a path like run[nan]/d[1].parquet must not be read as rich markup."""
    refuses_summarize(ws, tmp_path / "run[nan]" / "d[1].parquet", "no such file", re.escape("run[nan]/d[1].parquet"))


def test_empty_data_folder(ws, tmp_path):
    (tmp_path / "empty").mkdir()
    refuses_summarize(ws, tmp_path / "empty", "empty")


def test_summarized_model_gone(base, tmp_path):
    model = tmp_path / "model.pt2"
    shutil.copy(MODEL, model)
    ok(summarize(tmp_path / "w", base / "small.parquet", model=model))
    model.unlink()
    refuses_rank(tmp_path / "w", "model", "gone")


def test_summarized_data_gone(tmp_path, rows):
    data = write_table(rows, tmp_path / "data.parquet")
    ok(summarize(tmp_path / "w", data))
    data.unlink()
    refuses_rank(tmp_path / "w", "data.parquet", "no such file")


# ------------------------------------------------------------------ damaged files


@pytest.mark.parametrize("source", ["digits_mlp.pt2", "digits_mlp.ts"])
def test_truncated_checkpoint(ws, base, tmp_path, source):
    raw = (FIXTURES / source).read_bytes()
    model = tmp_path / f"cut{Path(source).suffix}"
    model.write_bytes(raw[: len(raw) * 2 // 3])
    refuses_summarize(ws, base / "small.parquet", "cut", "checkpoint|corrupt|read", model=model)


def test_garbage_checkpoint(ws, base, tmp_path):
    model = tmp_path / "garbage.pt2"
    model.write_bytes(b"not a checkpoint at all\n" * 50)
    refuses_summarize(ws, base / "small.parquet", "garbage.pt2", "checkpoint", model=model)


def test_checkpoint_with_damaged_weights(ws, base, tmp_path):
    raw = bytearray(MODEL.read_bytes())
    start = len(raw) // 3  # inside data/weights/weight_2, an uncompressed member
    raw[start : start + 2000] = bytes(2000)
    model = tmp_path / "damaged.pt2"
    model.write_bytes(bytes(raw))
    refuses_summarize(ws, base / "small.parquet", "damaged.pt2", "corrupt|crc|damaged", model=model)


def test_garbage_summary(ws):
    (ws / "summary.safetensors").write_bytes(b"\x00garbage" * 64)
    refuses_rank(ws, "summary", "changed since summarize|corrupt")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad header"])
def test_corrupt_summary_even_with_a_matching_manifest(ws, damage):
    """The manifest is rewritten to vouch for the damaged bytes: the loader itself must refuse."""
    path = ws / "summary.safetensors"
    raw = bytearray(path.read_bytes())
    if damage == "garbage":
        raw = bytearray(b"\xff" * 4096)
    elif damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw[12:60] = b"x" * 48
    path.write_bytes(bytes(raw))
    set_manifest(ws, summary_fingerprint=fingerprint(path))
    refuses_rank(ws, "summary", "corrupt")


def test_truncated_parquet(ws, tmp_path, rows):
    raw = write_table(rows, tmp_path / "d.parquet").read_bytes()
    (tmp_path / "d.parquet").write_bytes(raw[: len(raw) // 2])
    refuses_summarize(ws, tmp_path / "d.parquet", "d.parquet", "parquet", "corrupt")


def test_truncated_csv(ws, tmp_path, rows):
    text = rows.to_csv(index=False)
    cut = text.index("\n", len(text) // 2) + 12  # a dozen characters into a row
    (tmp_path / "d.csv").write_text(text[:cut])
    refuses_summarize(ws, tmp_path / "d.csv", "d.csv", "csv")


def test_truncated_npz(ws, tmp_path, rows):
    np.savez(tmp_path / "d.npz", X=rows.filter(like="pixel_").to_numpy(), y=rows["label"].to_numpy())
    raw = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "d.npz").write_bytes(raw[: len(raw) // 2])
    refuses_summarize(ws, tmp_path / "d.npz", "d.npz", "npz", "corrupt")


def _idx(magic: int, array: np.ndarray) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx(ws, tmp_path, rows, gz):
    images = rows.filter(like="pixel_").to_numpy().astype(np.uint8).reshape(-1, 8, 8)
    pack = gzip.compress if gz else bytes
    suffix = ".gz" if gz else ""
    raw = pack(_idx(0x803, images))
    (tmp_path / f"train-images-idx3-ubyte{suffix}").write_bytes(raw[: len(raw) - 40])
    (tmp_path / f"train-labels-idx1-ubyte{suffix}").write_bytes(pack(_idx(0x801, rows["label"].to_numpy().astype(np.uint8))))
    refuses_summarize(ws, tmp_path / f"train-images-idx3-ubyte{suffix}", "train-images", "truncated|corrupt")


@pytest.fixture
def images(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURES / "digits_images", tmp_path / "images"))


def test_truncated_png(ws, images):
    victim = sorted((images / "3").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:45])  # the header survives, the pixels do not
    refuses_summarize(ws, images, victim.name, "image", "truncated|corrupt")


def test_garbage_png(ws, images):
    victim = sorted((images / "5").iterdir())[0]
    victim.write_bytes(b"GIF89a not really")
    refuses_summarize(ws, images, victim.name, "image")


def test_non_image_file_in_image_folder(ws, images):
    (images / "4" / "notes.txt").write_text("hello")
    refuses_summarize(ws, images, "notes.txt", "not an image")


def test_file_beside_the_class_folders(ws, images):
    (images / "README.md").write_text("hello")
    refuses_summarize(ws, images, "README.md", "class")


def test_images_of_mixed_sizes(ws, images):
    Image.new("L", (9, 9)).save(images / "7" / "zz-odd.png")
    refuses_summarize(ws, images, "zz-odd.png", "size", "9x9")


# ------------------------------------------------------------------ contents


def test_feature_count_mismatch(ws, tmp_path, rows):
    narrow = rows[["example_id", *[f"pixel_{i}" for i in range(10)], "label"]]
    refuses_summarize(ws, write_table(narrow, tmp_path / "d.parquet"), r"\(10,\)", "64")


@pytest.mark.parametrize("label, phrase", [(-1, "negative"), (2.5, "whole number"), (10, "out of range")])
def test_bad_labels(ws, tmp_path, rows, label, phrase):
    if isinstance(label, float):
        rows["label"] = rows["label"].astype(float)
    rows.loc[17, "label"] = label
    refuses_summarize(ws, write_table(rows, tmp_path / "d.parquet"), "label", phrase, "row 17")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features(ws, tmp_path, rows, value):
    rows.loc[23, "pixel_9"] = value
    refuses_summarize(ws, write_table(rows, tmp_path / "d.parquet"), "row 23", "NaN or infinite")


def test_missing_feature_in_csv(ws, tmp_path, rows):
    text = rows.to_csv(index=False).splitlines()
    fields = text[1 + 11].split(",")
    fields[5] = ""
    text[1 + 11] = ",".join(fields)
    (tmp_path / "d.csv").write_text("\n".join(text) + "\n")
    refuses_summarize(ws, tmp_path / "d.csv", "row 11", "missing")


def test_single_row(ws, tmp_path, rows):
    refuses_summarize(ws, write_table(rows.iloc[:1], tmp_path / "d.parquet"), "1 row", "at least 2")


def test_single_class(ws, tmp_path, rows):
    rows["label"] = 4
    refuses_summarize(ws, write_table(rows, tmp_path / "d.parquet"), "single class", "two classes")


def test_duplicate_example_ids(ws, tmp_path, rows):
    rows.loc[31, "example_id"] = rows.loc[2, "example_id"]
    refuses_summarize(ws, write_table(rows, tmp_path / "d.parquet"), "digit-0002", "more than once")


def test_missing_label_column(ws, tmp_path, rows):
    refuses_summarize(ws, write_table(rows.rename(columns={"label": "target"}), tmp_path / "d.parquet"),
                      "label", "--label-column")


def test_gelu_model(ws, base):
    refuses_summarize(ws, base / "small.parquet", "GELU|gelu", "cannot model", model=FIXTURES / "gelu_mlp.pt2")


def test_nan_model_output_from_overflowing_inputs(ws, base):
    refuses_summarize(ws, base / "small.parquet", "NaN or infinite", "--scale", extra=["--scale", "1e39"])


def test_model_with_huge_weights(ws, base, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        net[0].weight.mul_(1e36)
        net[2].weight.mul_(1e36)
    program = torch.export.export(net, (torch.zeros(2, 64),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, tmp_path / "huge.pt2")
    refuses_summarize(ws, base / "small.parquet", "NaN or infinite", model=tmp_path / "huge.pt2")


def test_overflowing_input_moments_are_refused(ws, base):
    """Finite logits, but x ~ 1e31: the summary's covariance overflows. summarize or rank must refuse."""
    result = summarize(ws, base / "small.parquet", "--scale", "1e30")
    if result.exit_code == 2:
        refused(result, "scale|overflow|infinite")
        return
    ok(result)
    refused(invoke("rank", "-w", ws, "--samples", "200", "--top", "0"), "overflow|infinite|NaN|scale")


# ------------------------------------------------------------------ workspace files from elsewhere


@pytest.fixture(scope="module")
def other_ws(base) -> Path:
    """The same 60 digits summarized with a different model (digits_mlp_other.pt2)."""
    ok(summarize(base / "other", base / "small.parquet", model=FIXTURES / "digits_mlp_other.pt2"))
    return base / "other"


def test_summary_from_another_model(ws, other_ws):
    shutil.copy(other_ws / "summary.safetensors", ws / "summary.safetensors")
    refuses_rank(ws, "summary", "changed since summarize")


def test_summary_from_another_model_with_a_rewritten_manifest(ws, other_ws):
    shutil.copy(other_ws / "summary.safetensors", ws / "summary.safetensors")
    set_manifest(ws, summary_fingerprint=fingerprint(ws / "summary.safetensors"))
    refuses_rank(ws, "summary|model", "fingerprint|another|does not match")


@pytest.mark.parametrize("change", [{"scale": 1.0}, {"label_column": "pixel_0"}])
def test_manifest_with_rewritten_data_options_is_refused(ws, change):
    """The manifest's preprocessing and columns are checked against those the summary was made with."""
    manifest = json.loads((ws / "manifest.json").read_text())
    data = manifest["data"]
    if "scale" in change:
        data["preprocessing"] |= change
    else:
        data |= change
    set_manifest(ws, data=data)
    refuses_rank(ws, "columns or preprocessing")


def test_report_from_another_model_is_not_trusted(ws, other_ws):
    """check must not gate on a report made for another model: it ranks again."""
    ok(invoke("rank", "-w", other_ws, *QUICK))
    own = (ws / "report.parquet").read_bytes()
    shutil.copy(other_ws / "report.parquet", ws / "report.parquet")
    verdict = json.loads(ok(invoke("check", "-w", ws, "--samples", "200", "--max-flagged-fraction", "1",
                                   "--format", "json")))
    assert (ws / "report.parquet").read_bytes() == own
    report, metadata = read_report(ws / "report.parquet")
    assert verdict["flagged"] == int(report["flagged"].sum())
    assert metadata["model_fingerprint"] == fingerprint(MODEL)


@pytest.mark.parametrize("command", ["rank", "check", "fsd"])
def test_manifest_from_a_newer_labelscan(ws, command):
    set_manifest(ws, format_version=99)
    before = snapshot(ws)
    args = [MODEL, MODEL] if command == "fsd" else ["--samples", "200"]
    refused(invoke(command, *args, "-w", ws), "format 99|newer", "upgrade")
    assert snapshot(ws) == before


def test_corrupt_manifest(ws):
    (ws / "manifest.json").write_text("{not json")
    refuses_rank(ws, "manifest", "corrupt")


def test_pickled_checkpoint_needs_trust(ws, base):
    line = refuses_summarize(ws, base / "small.parquet", "pickle", "--trust-checkpoint",
                             model=FIXTURES / "digits_mlp_module.pt")
    assert "digits_mlp_module.pt" in line
    refused(invoke("fsd", MODEL, FIXTURES / "digits_mlp_module.pt", "-w", ws), "pickle", "--trust-checkpoint")


def test_pickled_tracin_checkpoints_need_trust_on_the_command_line(base, tmp_path):
    """A workspace summarized from a trusted pickle does not extend that trust to rank's checkpoints:
    the manifest is a file anyone could have written."""
    ws = tmp_path / "ws"
    ok(summarize(ws, base / "small.parquet", "--trust-checkpoint", "--arch", f"{FIXTURES / 'digits_arch.py'}:mlp",
                 model=FIXTURES / "digits_mlp_state.pt"))
    pickled = ["--method", "tracin", "--checkpoint", FIXTURES / "digits_mlp_module.pt", "--threshold", "1"]
    before = snapshot(ws)
    refused(invoke("rank", "-w", ws, *QUICK, *pickled), "pickle", "--trust-checkpoint")
    assert snapshot(ws) == before
    ok(invoke("rank", "-w", ws, *QUICK, *pickled, "--trust-checkpoint"))


@pytest.mark.parametrize("target", ["missing/folder/r.parquet", "a-folder"])
def test_rank_out_path_that_cannot_be_written(ws, tmp_path, target):
    """--out onto a folder is refused cleanly; --out into a missing folder is refused cleanly
    or creates the folder (either is a fix), but never ends in a traceback."""
    (tmp_path / "a-folder").mkdir()
    before = snapshot(tmp_path)
    result = invoke("rank", "-w", ws, "-m", "loss", "--top", "0", "--out", tmp_path / target)
    if target.startswith("missing") and result.exit_code == 0:
        assert (tmp_path / target).exists()
        return
    refused(result, "r.parquet|a-folder")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("target", ["model.pt2", "data.parquet", "ws/summary.safetensors", "ws/manifest.json",
                                    "data-folder/report.parquet"])
def test_rank_out_never_overwrites_an_input_or_the_workspace(tmp_path, rows, target):
    (tmp_path / "model.pt2").write_bytes(MODEL.read_bytes())
    write_table(rows, tmp_path / "data.parquet")
    (tmp_path / "data-folder").mkdir()
    write_table(rows, tmp_path / "data-folder" / "part-0.parquet")
    data = tmp_path / ("data-folder" if target.startswith("data-folder") else "data.parquet")
    ok(summarize(tmp_path / "ws", data, model=tmp_path / "model.pt2"))
    before = snapshot(tmp_path)
    refused(invoke("rank", "-w", tmp_path / "ws", *QUICK, "--out", tmp_path / target), "would overwrite")
    assert snapshot(tmp_path) == before


def test_threshold_must_be_finite(ws):
    for command in ("rank", "check"):
        refuses_rank(ws, "--threshold must be a finite number", command=command, extra=["--threshold", "nan"])


# ------------------------------------------------------------------ interruption


def _command(args: list) -> list[str]:
    return [sys.executable, "-m", "labelscan", *map(str, args)]


def _start(command: list[str], stderr_file: Path) -> subprocess.Popen:
    """Start ``command`` in a session of its own (as a terminal's foreground job), with rich's
    live progress forced on, so stderr shows when work begins."""
    with stderr_file.open("wb") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=handle, start_new_session=True,
            env=subprocess_env(TTY_COMPATIBLE="1", TTY_INTERACTIVE="1"),
        )


def _wait_for_progress(process: subprocess.Popen, stderr_file: Path, word: bytes, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while word not in stderr_file.read_bytes():
        assert process.poll() is None, f"exited early: {stderr_file.read_bytes()[-500:]!r}"
        assert time.monotonic() < deadline, "no progress shown"
        time.sleep(0.1)
    time.sleep(0.5)  # well into the work
    assert process.poll() is None, "finished before it could be interrupted"


def _ctrl_c(process: subprocess.Popen, stderr_file: Path) -> tuple[str, str]:
    """Send SIGINT to the whole process group, as a terminal does on Ctrl-C; (stdout, stderr)."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        stdout, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return stdout.decode(errors="replace"), stderr_file.read_bytes().decode(errors="replace")


def test_interrupted_summarize_leaves_the_workspace_intact(ws, tmp_path):
    generator = np.random.default_rng(0)
    big = tmp_path / "big.npz"
    np.savez(big, X=generator.integers(0, 17, size=(200_000, 64), dtype=np.uint8),
             y=generator.integers(0, 10, size=200_000))
    before = snapshot(ws)
    # batches of 4 rows: slow enough to interrupt whatever the machine
    process = _start(_command(["summarize", MODEL, big, "-w", ws, "--scale", "0.0625", "--batch-size", "4"]),
                     tmp_path / "err")
    _wait_for_progress(process, tmp_path / "err", b"summarizing")
    _, stderr = _ctrl_c(process, tmp_path / "err")
    assert process.returncode == -signal.SIGINT, stderr[-500:]  # a shell reports this as 130
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert snapshot(ws) == before
    report = tmp_path / "after.parquet"
    ok(invoke("rank", "-w", ws, *QUICK, "--out", report))  # the next run works on the old files
    assert len(pd.read_parquet(report)) == ROWS


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ctrl_c_during_rank_stops_the_calling_script_and_leaves_the_workspace_intact(ws, tmp_path):
    """A script running rank and then another command must stop at Ctrl-C, with status 130.
    bash goes on to the next command when a child handles SIGINT and exits normally."""
    before = snapshot(ws)
    # proximal with very many steps: slow enough to interrupt whatever the machine
    rank = _command(["rank", "-w", ws, "-m", "proximal", "--steps", "100000", "--top", "0"])
    script = f"{shlex.join(rank)}; echo went on; exit 0"
    process = _start(["bash", "-c", script], tmp_path / "err")
    _wait_for_progress(process, tmp_path / "err", b"scoring")
    stdout, stderr = _ctrl_c(process, tmp_path / "err")
    assert "went on" not in stdout and process.returncode == -signal.SIGINT, (process.returncode, stderr[-500:])
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert snapshot(ws) == before
    ok(invoke("rank", "-w", ws, *QUICK))
    assert {p.name for p in ws.iterdir()} == WORKSPACE_FILES


def _wait_until_torch_is_loading(process: subprocess.Popen, timeout: float = 60) -> None:
    """Until torch's library is mapped into the process: past Python's own start-up (which no
    program can guard), well before the command runs."""
    maps = Path(f"/proc/{process.pid}/maps")
    if not maps.exists():
        process.kill()
        pytest.skip("needs /proc to see when torch loads")
    deadline = time.monotonic() + timeout
    while b"libtorch" not in maps.read_bytes():
        assert process.poll() is None, "exited before torch loaded"
        assert time.monotonic() < deadline, "torch never loaded"
        time.sleep(0.002)


def test_ctrl_c_while_labelscan_loads_prints_no_traceback(ws, tmp_path):
    """Loading torch takes a second or more; Ctrl-C then must end as quietly as later on."""
    process = _start(_command(["rank", "-w", ws, *QUICK]), tmp_path / "err")
    _wait_until_torch_is_loading(process)
    _, stderr = _ctrl_c(process, tmp_path / "err")
    assert process.returncode == -signal.SIGINT
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-500:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_rank_leaves_the_workspace_intact(ws, tmp_path, sig):
    """A CI runner's cancel (SIGTERM) or an out-of-memory kill gives no chance to clean up; the
    files from before must still be whole, because nothing is written until the end."""
    before = snapshot(ws)
    process = _start(_command(["rank", "-w", ws, "-m", "proximal", "--steps", "100000", "--top", "0"]),
                     tmp_path / "err")
    _wait_for_progress(process, tmp_path / "err", b"scoring")
    process.send_signal(sig)
    process.communicate(timeout=60)
    assert process.returncode == -sig
    if sig == signal.SIGTERM:  # one that can be caught: a line, and no traceback
        stderr = (tmp_path / "err").read_text(errors="replace")
        assert "terminated" in stderr and "Traceback" not in stderr, stderr[-500:]
    assert snapshot(ws) == before
    ok(invoke("rank", "-w", ws, *QUICK))
    assert {p.name for p in ws.iterdir()} == WORKSPACE_FILES


def test_ctrl_c_is_held_until_the_block_ends():
    got = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            got.append("the block ran to its end")
    assert got == ["the block ran to its end"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_between_the_summary_and_the_manifest_waits_for_both(ws, tmp_path, monkeypatch):
    """The summary and the manifest that vouches for it are replaced together or not at all."""
    write = workspace_module.write_atomically

    def write_then_ctrl_c(path, payload):
        write(path, payload)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(workspace_module, "write_atomically", write_then_ctrl_c)
    fewer = write_table(noisy_rows(ROWS - 10), tmp_path / "fewer.parquet")
    result = summarize(ws, fewer)
    assert isinstance(result.exception, (KeyboardInterrupt, SystemExit)), result.exception
    monkeypatch.undo()
    ok(invoke("rank", "-w", ws, *QUICK))  # refused if the manifest no longer vouched for the summary
    assert len(read_report(ws / "report.parquet")[0]) == ROWS - 10


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize("method, extra", [("linear", ["--samples", "200"]),
                                            ("proximal", ["--samples", "200", "--steps", "2"])])
def test_same_inputs_and_seed_give_byte_identical_reports(ws, tmp_path, method, extra):
    paths = [tmp_path / f"{method}-{i}.parquet" for i in range(2)]
    for path in paths:
        ok(invoke("rank", "-w", ws, "-m", method, *extra, "--seed", "5", "--top", "0", "--out", path))
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_summarize_and_rank_again_give_byte_identical_files(base, tmp_path):
    """Re-summarizing the same inputs must reproduce the summary, manifest and report bytes.
    Five runs, so that a chance match of the metadata order (1 in 6 per pair) cannot pass."""
    summaries, manifests, reports = set(), set(), set()
    for run in range(5):
        workspace = tmp_path / f"w{run}"
        ok(summarize(workspace, base / "small.parquet"))
        ok(invoke("rank", "-w", workspace, "-m", "loss", "--top", "0"))
        summaries.add((workspace / "summary.safetensors").read_bytes())
        manifests.add((workspace / "manifest.json").read_bytes())
        reports.add((workspace / "report.parquet").read_bytes())
    assert len(summaries) == 1
    assert len(manifests) == 1 and len(reports) == 1


# ------------------------------------------------------------------ scale


def test_parquet_with_many_row_groups_is_streamed(tmp_path, monkeypatch):
    """Features come from ParquetFile.iter_batches at the batch size, never as a whole table;
    Arrow's peak memory stays far below the table's size."""
    count, group, batch = 12_000, 500, 128
    generator = np.random.default_rng(1)
    columns = {"example_id": [f"g-{i:05d}" for i in range(count)]}
    columns |= {f"pixel_{i}": generator.integers(0, 17, count).astype(np.float64) for i in range(64)}
    columns["label"] = generator.integers(0, 10, count)
    table = pa.table(columns)
    table_bytes = table.nbytes
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=group)
    del table, columns
    assert pq.ParquetFile(tmp_path / "big.parquet").metadata.num_row_groups == count // group

    seen = {"iter_batches": [], "read": [], "batches": []}
    iter_batches, read = pq.ParquetFile.iter_batches, pq.ParquetFile.read

    def spy_iter_batches(self, *args, **kwargs):
        seen["iter_batches"].append(kwargs.get("batch_size", args[0] if args else None))
        for record_batch in iter_batches(self, *args, **kwargs):
            seen["batches"].append(record_batch.num_rows)
            yield record_batch

    def spy_read(self, columns=None, *args, **kwargs):
        seen["read"].append(columns)
        return read(self, columns, *args, **kwargs)

    def no_read_table(*args, **kwargs):
        raise AssertionError("the whole table was read")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy_iter_batches)
    monkeypatch.setattr(pq.ParquetFile, "read", spy_read)
    monkeypatch.setattr(pq, "read_table", no_read_table)
    sizes = []
    batches = Dataset.batches

    def spy_batches(self, batch_size):
        for item in batches(self, batch_size):
            sizes.append(len(item.x))
            yield item

    monkeypatch.setattr(Dataset, "batches", spy_batches)
    pool = pa.default_memory_pool()
    bound = table_bytes // 3
    peak_before = pool.max_memory()

    stdout = ok(summarize(tmp_path / "ws", tmp_path / "big.parquet", "--batch-size", str(batch)))
    assert f"{count} examples" in stdout
    assert seen["iter_batches"] and set(seen["iter_batches"]) == {batch}
    assert max(seen["batches"]) <= batch and sum(seen["batches"]) == count
    assert max(sizes) == batch and sum(sizes) == count
    assert all(columns is not None and set(columns) <= {"label", "example_id"} for columns in seen["read"])
    if peak_before < bound:  # otherwise an earlier test already went higher and this cannot tell
        assert pool.max_memory() < bound, (pool.max_memory(), table_bytes)
    manifest = json.loads((tmp_path / "ws" / "manifest.json").read_text())
    assert manifest["num_rows"] == count


# ------------------------------------------------------------------ security


def test_summary_and_report_load_without_unpickling(ws, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for name in ("load", "loads"):  # (replacing pickle.Unpickler would break torch's lazy imports)
        monkeypatch.setattr(pickle, name, no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    summary = ws / "summary.safetensors"
    header = int.from_bytes(summary.read_bytes()[:8], "little")
    assert summary.read_bytes()[8:9] == b"{" and header < summary.stat().st_size  # safetensors, not a pickle/zip
    assert (ws / "report.parquet").read_bytes()[:4] == b"PAR1"
    LaftrSummary.load(summary)
    read_report(ws / "report.parquet")
    ok(invoke("rank", "-w", ws, *QUICK))  # loads the summary
    ok(invoke("check", "-w", ws, "--samples", "200", "--max-flagged-fraction", "1"))  # loads the report


def test_tampered_manifest_paths_cannot_redirect_writes(ws, base, tmp_path):
    """Model and data paths re-pointed at identical copies elsewhere: rank still writes only
    report.parquet, inside the workspace, and nothing where the manifest points."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(MODEL, elsewhere / "model.pt2")
    shutil.copy(base / "small.parquet", elsewhere / "data.parquet")
    manifest = json.loads((ws / "manifest.json").read_text())
    manifest["model"]["path"] = str(elsewhere / "model.pt2")
    manifest["data"]["path"] = str(elsewhere / "data.parquet")
    (ws / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(tmp_path)
    ok(invoke("rank", "-w", ws, *QUICK))
    after = snapshot(tmp_path)
    changed = {path for path in set(before) | set(after) if before.get(path) != after.get(path)}
    assert changed == {str(ws / "report.parquet")}


@pytest.mark.parametrize("key", ["report_path", "summary_path", "manifest_path"])
def test_manifest_with_extra_paths_is_refused(ws, tmp_path, key):
    set_manifest(ws, **{key: str(tmp_path / "outside" / "hijack")})
    before = snapshot(tmp_path)
    refused(invoke("rank", "-w", ws, *QUICK), "manifest")
    refused(invoke("check", "-w", ws, "--samples", "200"), "manifest")
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "outside").exists()


def test_workspace_holds_only_its_fixed_files(base):
    assert {p.name for p in (base / "ws").iterdir()} == WORKSPACE_FILES


# ------------------------------------------------------------------ stderr


def test_refusal_stderr_is_exactly_one_line(tmp_path):
    result = invoke("rank", "-w", tmp_path / "none")  # a subprocess shows the same stray line
    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, repr(result.stderr)


@pytest.mark.parametrize("args, phrase", [
    (["rank", "--top", "abc"], r"'--top'.*integer\. See labelscan rank --help\.$"),
    (["rank", "--method", "nope"], r"'--method'.*'nope'"),
    (["rank", "--no-such-option"], r"no such option: --no-such-option"),
    (["summarize"], r"missing argument 'model'\. See labelscan summarize --help"),
    (["rank", "--seed", "99999999999999999999999"], r"'--seed'.*less than or equal"),
    (["rank", "--samples", "99999999999999999999999"], r"'--samples'.*less than or equal"),
    (["--no-such-option"], r"no such option: --no-such-option\. See labelscan --help"),
    (["check", "--format", "xml"], r"'--format'.*'xml'"),
    (["frobnicate"], r"no such command 'frobnicate'\. See labelscan --help"),
    (["rnak"], r"did you mean 'rank'\? See labelscan --help"),
])
def test_usage_errors_are_one_line_too(args, phrase):
    """Bad option values, missing arguments and unknown commands: one line, exit 2, like bad input."""
    line = refused(invoke(*args), phrase)
    assert line.startswith("error:") and "╭" not in line
