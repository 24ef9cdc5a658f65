"""Shared pieces of the benchmarks: data by path, seeded models and training, measured jobs.

Measurement. Wall time is ``time.perf_counter`` around the measured call only. Peak memory
is the peak resident set size (VmHWM from /proc/self/status) of a fresh ``spawn``ed process
that runs one job: that counts everything torch allocates (tracemalloc would not), and a
fresh process per job keeps one job's high-water mark from leaking into the next. (Not
``ru_maxrss``: a spawned child inherits its parent's maxrss through fork and exec.) A job also records the
resident size just before its measured call (imports, data and model already loaded), so
the reader can tell the job's own memory from the baseline. Each job runs with
``THREADS`` torch threads, like the parent.

Benchmarks import this module as ``common`` (``python benchmarks/<name>.py`` puts this
folder on ``sys.path``).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import labelscan
from labelscan.data import Preprocessing

THREADS = 2
MNIST_FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}


def setup_torch(threads: int = THREADS) -> None:
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- machine load


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def load_note(when: str = "") -> str:
    one, five, fifteen = load_average()
    return f"load average{(' ' + when) if when else ''}: {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def busy_fraction(window_s: float = 2.0) -> float:
    """Fraction of all CPUs busy over ``window_s`` (from /proc/stat). Called while this benchmark
    is idle between jobs, it measures what other processes use — a direct reading, unlike the
    load average, which lags by minutes and counts this benchmark's own jobs."""

    def sample():
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except OSError:
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_quiet(max_busy: float = 0.15, max_wait_s: float = 600.0, log=None) -> float:
    """Before a timed job: wait (up to ``max_wait_s``) until other processes use less than
    ``max_busy`` of the CPUs; returns the last reading (the job runs regardless)."""
    deadline = time.monotonic() + max_wait_s
    busy = busy_fraction()
    waited = False
    while busy > max_busy and time.monotonic() < deadline:
        if log is not None and not waited:
            log(f"other processes use {busy:.0%} of the CPUs; waiting up to {max_wait_s:.0f} s for them")
        waited = True
        time.sleep(5)
        busy = busy_fraction()
    return busy


def library_version() -> str:
    """labelscan's version and git commit, flagging uncommitted changes to the library."""
    import subprocess

    root = Path(labelscan.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "labelscan"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"labelscan {labelscan.__version__}"
    return f"labelscan {labelscan.__version__} at commit {commit}" + (" with uncommitted library changes" if dirty else "")


# ----------------------------------------------------------------------------- data


def idx_images_path(path: str | Path, split: str = "train") -> Path:
    """Accept the MNIST folder (then pick the split's images file) or an images file itself."""
    path = Path(path)
    return path / MNIST_FILES[split] if path.is_dir() else path


def load_idx(path: str | Path, subset: int | None = None, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-style IDX training set through ``labelscan.open_dataset``, scaled to [0, 1].

    Returns x (N, 1, 28, 28) float32 and y (N,) int64. ``subset`` keeps the first N rows
    (a fixed subset; MNIST's file order is already shuffled across classes).
    """
    dataset = labelscan.open_dataset(idx_images_path(path, split), preprocessing=Preprocessing(scale=1 / 255))
    xs, ys = [], []
    for batch in dataset.batches(8192):
        xs.append(batch.x)
        ys.append(batch.y)
    x, y = torch.cat(xs), torch.cat(ys)
    if subset is not None:
        x, y = x[:subset].contiguous(), y[:subset].contiguous()
    return x, y


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits: x (1797, 1, 8, 8) scaled to [0, 1], y (1797,)."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(data.target, dtype=torch.int64)


def flip_labels(y: torch.Tensor, fraction: float, seed: int, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip ``fraction`` of the labels (chosen at random, seeded) to a different class drawn uniformly.

    Returns the noisy labels and a bool mask of the flipped rows.
    """
    generator = torch.Generator().manual_seed(seed)
    count = round(fraction * len(y))
    rows = torch.randperm(len(y), generator=generator)[:count]
    shift = torch.randint(1, num_classes, (count,), generator=generator)
    noisy = y.clone()
    noisy[rows] = (y[rows] + shift) % num_classes
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[rows] = True
    return noisy, flipped


def write_npz(path: Path, x: torch.Tensor, y: torch.Tensor, *, as_uint8: bool = True) -> Path:
    """Save X/y for ``labelscan.open_dataset`` (uint8 pixels: then pass Preprocessing(scale=1/255))."""
    array = x.numpy()
    if as_uint8:
        array = np.rint(array * 255).astype(np.uint8)
    np.savez(path, X=array, y=y.numpy())
    return path


# ----------------------------------------------------------------------------- models


def mlp(sizes: list[int], seed: int) -> nn.Sequential:
    """Flatten, then Linear/ReLU layers of the given widths (the last Linear has no ReLU)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn(in_shape: tuple[int, int, int], channels: tuple[int, int], seed: int, num_classes: int = 10) -> nn.Sequential:
    """Conv(3x3)-ReLU-MaxPool(2)-Conv(3x3)-ReLU-MaxPool(2)-Flatten-Linear."""
    torch.manual_seed(seed)
    c, h, w = in_shape
    a, b = channels
    return nn.Sequential(
        nn.Conv2d(c, a, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(b * (h // 4) * (w // 4), num_classes),
    )


def laftr_net(seq: nn.Sequential, input_shape: tuple[int, ...], num_outputs: int = 10) -> labelscan.model.LaftrNet:
    return labelscan.model.LaftrNet(seq.eval().requires_grad_(False), tuple(input_shape), num_outputs)


def count_parameters(seq: nn.Module) -> int:
    return sum(p.numel() for p in seq.parameters())


@dataclass
class TrainLog:
    epoch_seconds: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)


def train(
    seq: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    budget_seconds: float | None = None,
    log=None,
) -> TrainLog:
    """Adam on cross-entropy with seeded shuffles and cosine learning-rate decay to 0.

    With ``budget_seconds``, the first epoch's time fixes how many of the ``epochs`` fit the
    budget, and the cosine schedule is laid over that many epochs (so the decay completes).
    Train accuracy and loss are measured on the given labels after each epoch (eval pass).
    """
    seq.train().requires_grad_(True)
    optimizer = torch.optim.Adam(seq.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    planned = epochs
    generator = torch.Generator().manual_seed(seed)
    result = TrainLog()
    step = 0
    epoch = 0
    while epoch < planned:
        t0 = time.perf_counter()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / (planned * steps_per_epoch)))
            rows = order[start : start + batch_size]
            loss = F.cross_entropy(seq(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        result.epoch_seconds.append(time.perf_counter() - t0)
        epoch += 1
        if epoch == 1 and budget_seconds is not None:
            planned = max(1, min(epochs, int(budget_seconds // result.epoch_seconds[0])))
        accuracy, mean_loss = evaluate(seq, x, y)
        result.train_accuracy.append(accuracy)
        result.train_loss.append(mean_loss)
        if log is not None:
            log(f"epoch {epoch}/{planned}: {result.epoch_seconds[-1]:.1f}s, "
                f"train acc {accuracy:.4f}, loss {mean_loss:.4f}")
    seq.eval().requires_grad_(False)
    return result


def train_epoch(seq, optimizer, x, y, batch_size, generator) -> None:
    """One pass of minibatch steps over a seeded permutation (the unit 'one training epoch')."""
    order = torch.randperm(len(x), generator=generator)
    for start in range(0, len(x), batch_size):
        rows = order[start : start + batch_size]
        loss = F.cross_entropy(seq(x[rows]), y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def evaluate(seq: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> tuple[float, float]:
    was_training = seq.training
    seq.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(x), batch_size):
        logits = seq(x[start : start + batch_size])
        correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
        loss += float(F.cross_entropy(logits, y[start : start + batch_size], reduction="sum"))
    seq.train(was_training)
    return correct / len(x), loss / len(x)


# ----------------------------------------------------------------------------- measurement


def rss_mb() -> float:
    """Current resident set size of this process (VmRSS), MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (VmHWM), MiB.

    Not ``ru_maxrss``: Linux carries a process's maxrss across fork and exec, so a spawned
    child's ``ru_maxrss`` starts at its parent's resident size at the fork (a benchmark parent
    holding MNIST made every child read ≥ 1 GB). VmHWM is the high-water mark of the
    child's own address space. ``ru_maxrss`` is the fallback where /proc is missing.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stopwatch:
    """Times the measured part of a job and notes the memory just before it.

    with Stopwatch() as watch: work()   →  watch.seconds, watch.rss_before_mb
    """

    def __enter__(self):
        self.rss_before_mb = rss_mb()
        self.peak_before_mb = peak_rss_mb()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start
        return False

    def record(self) -> dict:
        return {"seconds": self.seconds, "rss_before_mb": self.rss_before_mb, "peak_before_mb": self.peak_before_mb}


def _die_with_parent() -> None:
    """Linux: have the kernel stop this child if the benchmark (its parent) dies."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(connection, job, args, kwargs, threads):
    try:
        _die_with_parent()
        setup_torch(threads)
        out = job(*args, **kwargs)
        out = dict(out or {})
        out["peak_rss_mb"] = peak_rss_mb()
        connection.send(("ok", out))
    except BaseException:  # report any failure to the parent, which re-raises
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


def run_isolated(job, *args, threads: int = THREADS, **kwargs) -> dict:
    """Run ``job(*args, **kwargs)`` (a top-level function returning a dict) in a fresh spawned
    process and return its dict plus ``peak_rss_mb``, that process's peak resident size."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, job, args, kwargs, threads))
    process.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"measured job {job.__name__} died (exit code {process.exitcode}); out of memory?") from None
    process.join()
    if status != "ok":
        raise RuntimeError(f"measured job {job.__name__} failed:\n{payload}")
    return payload


# ----------------------------------------------------------------------------- statistics and tables


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum identity (ties averaged)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def recall_at(scores: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Fraction of the positives among the k highest scores (k = #positives: recall = precision)."""
    top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    return float(np.asarray(positive, dtype=bool)[top].sum() / max(int(np.sum(positive)), 1))


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def pearson(a, b) -> float:
    from scipy.stats import pearsonr

    return float(pearsonr(a, b).statistic)


def table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats are formatted by the caller."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def fmt_mb(value: float) -> str:
    return f"{value:,.0f} MiB"


def fmt_s(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"
