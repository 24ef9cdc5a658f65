"""Mislabel detection benchmark: labelscan against the rankings users would otherwise choose.

For each dataset × label noise × model the script trains a ReLU network to near-memorization of
the noisy labels (fixed seeds, checkpoints saved during training), then ranks every training
example by each method and scores the ranking against the known flips:

    labelscan linear / proximal   LAFTR per-class summary of the final checkpoint (library defaults)
    loss, grad-norm               final checkpoint, one pass over the data (labelscan methods)
    exact-proximal                proximal objective with the true FSD on data (labelscan method)
    tracin                        squared gradient norms summed over the saved checkpoints
    cleanlab                      confident learning on 5-fold cross-validated probabilities
                                  (the same model and recipe retrained per fold)
    kronfluence ekfac / identity  EK-FAC (resp. identity-curvature) self-influence, final checkpoint

Metrics: AUROC, AUPRC, recall at k = number of flipped rows, wall time, peak memory (resident
set growth over the method's start, sampled every 5 ms), time in training epochs, and the size
of what each method must keep besides the data.

Every hyperparameter is fixed below and printed before anything runs; none is tuned on the flips.
Run it in the benchmark environment (torch, kronfluence, cleanlab, scikit-learn, matplotlib):

    .venv-bench/bin/python benchmarks/mislabel.py --datasets digits
    .venv-bench/bin/python benchmarks/mislabel.py --datasets mnist --mnist /work/shared/data/mnist
    .venv-bench/bin/python benchmarks/mislabel.py --datasets fashion --fashion /work/shared/data/fashion-mnist

Results accumulate in ``--records`` (one JSON per configuration, kept in the repository under
``benchmarks/results/mislabel/``), so configurations can be run by separate commands; each run
rewrites this benchmark's section of RESULTS.md and the plots from every record found there.
Models, summaries and factors go to the scratch folder ``--work-dir``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import tempfile
import threading
import time
import traceback
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import provenance, write_section  # noqa: E402

from labelscan.data import Preprocessing, open_dataset  # noqa: E402
from labelscan.influence.scoring import InfluenceSettings  # noqa: E402
from labelscan.model import LaftrNet  # noqa: E402
from labelscan.pipeline import self_influence, summarize  # noqa: E402

SECTION = "mislabel"
HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------- fixed settings (printed at start)
SEED = 0
NUM_CLASSES = 10
SYMMETRIC_RATE = 0.10
ASYMMETRIC_RATE = 0.20
# Look-alike pairs (source → target); a fixed 20% of each source class's rows is flipped.
ASYMMETRIC_PAIRS = {
    "digits": {7: 1, 3: 8, 5: 6, 6: 5, 2: 7},
    "mnist": {7: 1, 3: 8, 5: 6, 6: 5, 2: 7},
    "fashion": {6: 0, 0: 6, 2: 4, 4: 2},  # shirt↔T-shirt, pullover↔coat
}
TRAIN = {  # Adam, constant learning rate, no weight decay: drives the net to memorize the noise
    "digits": {"epochs": 150, "batch_size": 64, "lr": 1e-3},
    "mnist": {"epochs": 30, "batch_size": 128, "lr": 1e-3},
    "fashion": {"epochs": 30, "batch_size": 128, "lr": 1e-3},
}
CHECKPOINTS = 5  # saved at evenly spaced epochs, the last one being the final model (TracIn)
FOLDS = 5  # cleanlab's cross-validated probabilities
LABELSCAN = {  # library defaults
    "linear": InfluenceSettings(method="linear"),
    "proximal": InfluenceSettings(method="proximal"),
    "exact-proximal": InfluenceSettings(method="exact-proximal"),
}
# proximal and exact-proximal cost steps × proximal_samples network passes per example; on the
# larger sets they score a fixed random subset of this many rows (the same rows for both).
PROXIMAL_ROWS = 1000  # default of --proximal-rows
KRONFLUENCE_BATCH = 256
METHOD_ORDER = ["labelscan linear", "labelscan proximal", "loss", "grad-norm", "exact-proximal",
                "tracin", "cleanlab", "kronfluence ekfac", "kronfluence identity"]


def settings_text() -> str:
    lines = [
        f"seed {SEED}; symmetric noise {SYMMETRIC_RATE:.0%} of rows to a uniformly drawn other class; "
        f"asymmetric noise {ASYMMETRIC_RATE:.0%} of each source class's rows",
        "asymmetric pairs: " + "; ".join(f"{d}: " + ", ".join(f"{a}→{b}" for a, b in p.items())
                                          for d, p in ASYMMETRIC_PAIRS.items()),
        "training: " + "; ".join(f"{d}: Adam lr {t['lr']}, batch {t['batch_size']}, {t['epochs']} epochs"
                                 for d, t in TRAIN.items()) + f"; {CHECKPOINTS} checkpoints at evenly spaced epochs",
        f"cleanlab: {FOLDS}-fold stratified cross-validation, same model and recipe per fold; "
        "ranking by get_label_quality_scores (self_confidence), find_label_issues with defaults",
        "labelscan: summarize(per_class=True); " + "; ".join(
            f"{k}: {v.as_dict()}" for k, v in LABELSCAN.items()),
        f"proximal and exact-proximal score a fixed random subset of --proximal-rows rows (default {PROXIMAL_ROWS}) "
        "when the set is larger",
        f"kronfluence: default FactorArguments/ScoreArguments apart from strategy; batch {KRONFLUENCE_BATCH}; "
        "true Fisher (labels sampled from the model) for the factors",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- data and noise
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    return x, bunch.target.astype(np.int64)


def load_idx(folder: str, subset: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``subset`` rows of train-images-idx3-ubyte.gz, scaled by 1/255, via labelscan's IDX reader."""
    dataset = open_dataset(Path(folder) / "train-images-idx3-ubyte.gz", preprocessing=Preprocessing(scale=1 / 255))
    xs, ys = [], []
    for batch in dataset.batches(8192):
        xs.append(batch.x.numpy())
        ys.append(batch.y.numpy())
        if sum(len(v) for v in ys) >= subset:
            break
    x = np.concatenate(xs)[:subset].astype(np.float32)
    return x.reshape(len(x), 1, 28, 28), np.concatenate(ys)[:subset].astype(np.int64)


def add_noise(y: np.ndarray, kind: str, dataset: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = y.copy()
    if kind == "sym10":
        rows = rng.choice(len(y), int(round(SYMMETRIC_RATE * len(y))), replace=False)
        shift = rng.integers(1, NUM_CLASSES, len(rows))
        noisy[rows] = (y[rows] + shift) % NUM_CLASSES
    else:
        for source, target in ASYMMETRIC_PAIRS[dataset].items():
            members = np.flatnonzero(y == source)
            rows = rng.choice(members, int(round(ASYMMETRIC_RATE * len(members))), replace=False)
            noisy[rows] = target
    return noisy


# ---------------------------------------------------------------- models and training
def make_model(kind: str, side: int) -> nn.Sequential:
    if kind == "mlp":
        hidden = 128 if side == 8 else 256
        return nn.Sequential(nn.Flatten(), nn.Linear(side * side, hidden), nn.ReLU(),
                             nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))
    if side == 8:
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))
    return nn.Sequential(nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES))


def describe_model(model: nn.Sequential) -> str:
    parts = []
    for layer in model:
        if isinstance(layer, nn.Linear):
            parts.append(f"Linear({layer.in_features},{layer.out_features})")
        elif isinstance(layer, nn.Conv2d):
            parts.append(f"Conv({layer.in_channels},{layer.out_channels},{layer.kernel_size[0]})")
        elif isinstance(layer, nn.MaxPool2d):
            parts.append("MaxPool2")
    return "-".join(parts) + f" ({sum(p.numel() for p in model.parameters()):,} params)"


def train(kind: str, x: torch.Tensor, y: torch.Tensor, recipe: dict, seed: int, checkpoints: int = 0):
    """Returns the trained model, the saved checkpoints and the mean epoch time in seconds."""
    torch.manual_seed(seed)
    model = make_model(kind, x.shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    generator = torch.Generator().manual_seed(seed)
    epochs, batch_size = recipe["epochs"], recipe["batch_size"]
    save_at = {round(epochs * (i + 1) / checkpoints) for i in range(checkpoints)} if checkpoints else set()
    saved, times = [], []
    model.train()
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            rows = order[i:i + batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
        if epoch in save_at:
            saved.append(copy.deepcopy(model).eval())
    return model.eval(), saved, float(np.mean(times))


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([F.softmax(model(x[i:i + 4096]), 1) for i in range(0, len(x), 4096)])


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def laftr(model: nn.Module, input_shape) -> LaftrNet:
    return LaftrNet(copy.deepcopy(model).eval().requires_grad_(False), tuple(input_shape), NUM_CLASSES)


# ---------------------------------------------------------------- measurement
class PeakMemory:
    """Peak resident-set growth over the start of a block, sampled every 5 ms from /proc."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.bytes = self.peak - self.start


def ranking_metrics(score: np.ndarray, flipped: np.ndarray) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    score = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-np.inf)
    k = int(flipped.sum())
    order = np.argsort(-score, kind="stable")
    found = np.cumsum(flipped[order]) / max(k, 1)
    grid = np.linspace(0, 1, 101)
    curve = [float(found[max(int(round(g * len(score))) - 1, 0)]) if g > 0 else 0.0 for g in grid]
    finite = np.where(np.isfinite(score), score, np.nanmin(score[np.isfinite(score)]) - 1)
    return {"auroc": float(roc_auc_score(flipped, finite)), "auprc": float(average_precision_score(flipped, finite)),
            "recall_at_k": float(flipped[order[:k]].mean()) if k else float("nan"), "k": k,
            "rows": int(len(score)), "curve": curve}


# ---------------------------------------------------------------- methods
def kronfluence_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, strategy: str, folder: str):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(F.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    task = Classification()
    wrapped = prepare_model(copy.deepcopy(model).eval(), task)
    analyzer = Analyzer(analysis_name=f"mislabel_{strategy}", model=wrapped, task=task, cpu=True,
                        disable_tqdm=True, disable_model_save=True, output_dir=folder)
    dataset = torch.utils.data.TensorDataset(x, y)
    analyzer.fit_all_factors(factors_name=strategy, dataset=dataset, per_device_batch_size=KRONFLUENCE_BATCH,
                             factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
    analyzer.compute_self_scores(scores_name=f"self_{strategy}", factors_name=strategy, train_dataset=dataset,
                                 per_device_train_batch_size=KRONFLUENCE_BATCH, score_args=ScoreArguments(),
                                 overwrite_output_dir=True)
    scores = analyzer.load_self_scores(f"self_{strategy}")["all_modules"]
    factor_bytes = sum(p.stat().st_size for d in (Path(folder) / f"mislabel_{strategy}").glob("factors_*")
                       for p in d.rglob("*") if p.is_file())
    return scores.double().numpy(), factor_bytes


def cleanlab_scores(kind, x, y_noisy, recipe, seed):
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold

    probs = torch.zeros(len(x), NUM_CLASSES)
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    for i, (fit_rows, held_rows) in enumerate(folds.split(np.zeros(len(y_noisy)), y_noisy)):
        fit_rows, held_rows = torch.as_tensor(fit_rows), torch.as_tensor(held_rows)
        model, _, _ = train(kind, x[fit_rows], torch.as_tensor(y_noisy)[fit_rows], recipe, seed + 1 + i)
        probs[held_rows] = predict(model, x[held_rows])
    pred = probs.numpy().astype(np.float64)
    pred /= pred.sum(1, keepdims=True)
    quality = get_label_quality_scores(y_noisy, pred)
    issues = find_label_issues(y_noisy, pred)
    return 1.0 - quality, issues, pred


def run_config(dataset, noise, kind, x_np, y_clean, args, work: Path) -> dict:
    recipe = TRAIN[dataset]
    y_noisy = add_noise(y_clean, noise, dataset, SEED)
    flipped = y_noisy != y_clean
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_noisy)
    input_shape = tuple(x.shape[1:])
    record = {"dataset": dataset, "noise": noise, "model": kind, "rows": len(y), "flipped": int(flipped.sum()),
              "recipe": recipe, "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
              "date": date.today().isoformat(), "cores": os.cpu_count(), "methods": {}}
    print(f"\n=== {dataset} / {noise} / {kind}: {len(y)} rows, {int(flipped.sum())} flipped", flush=True)

    with PeakMemory() as m:
        model, checkpoints, epoch_seconds = train(kind, x, y, recipe, SEED, CHECKPOINTS)
    train_acc = float((predict(model, x).argmax(1) == y).float().mean())
    clean_acc = float((predict(model, x).argmax(1).numpy() == y_clean).mean())
    record.update(model_desc=describe_model(model), epoch_seconds=epoch_seconds, train_seconds=m.seconds,
                  train_accuracy_noisy=train_acc, train_accuracy_clean=clean_acc,
                  checkpoint_bytes=state_bytes(model))
    print(f"trained {record['model_desc']}: {m.seconds:.1f}s ({epoch_seconds:.2f}s/epoch), "
          f"accuracy on noisy labels {train_acc:.4f}, on clean labels {clean_acc:.4f}", flush=True)

    net = laftr(model, input_shape)
    tmp = Path(tempfile.mkdtemp(dir=work))
    path = tmp / "train.npz"
    np.savez(path, X=x_np, y=y_noisy)
    data = open_dataset(path)
    rng = np.random.default_rng(SEED + 7)
    if len(y) > args.proximal_rows:
        prox_rows = np.sort(rng.choice(len(y), args.proximal_rows, replace=False))
        np.savez(tmp / "subset.npz", X=x_np[prox_rows], y=y_noisy[prox_rows])
        prox_data = open_dataset(tmp / "subset.npz")
    else:
        prox_rows, prox_data = np.arange(len(y)), data

    def add(name, fn, rows=None, keeps=""):
        print(f"  {name} ...", end=" ", flush=True)
        try:
            with PeakMemory() as mem:
                out = fn()
        except Exception as exc:  # record what failed and go on
            message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            print(f"FAILED {message}", flush=True)
            (work / "failures.log").open("a").write(f"{dataset}/{noise}/{kind}/{name}\n{traceback.format_exc()}\n")
            record["methods"][name] = {"failed": message}
            return None
        score, extra = out if isinstance(out, tuple) else (out, {})
        truth = flipped if rows is None else flipped[rows]
        entry = ranking_metrics(score, truth) | {"seconds": mem.seconds, "peak_bytes": mem.bytes,
                                                "epochs": mem.seconds / epoch_seconds, "keeps": keeps} | extra
        if rows is not None and len(rows) < len(y):
            entry["seconds_full_estimate"] = mem.seconds * len(y) / len(rows)
        record["methods"][name] = entry
        print(f"AUROC {entry['auroc']:.3f} AUPRC {entry['auprc']:.3f} R@k {entry['recall_at_k']:.3f} "
              f"{mem.seconds:.1f}s", flush=True)
        return score

    with PeakMemory() as mem:
        summary = summarize(net, data, per_class=True)
    summary.save(tmp / "summary.safetensors")
    summary_bytes = (tmp / "summary.safetensors").stat().st_size
    record.update(summary_seconds=mem.seconds, summary_bytes=summary_bytes, summary_peak=mem.bytes)
    print(f"  summary: {mem.seconds:.1f}s, {summary_bytes:,} bytes ({summary.moments.kind} covariance)", flush=True)

    def labelscan_method(name, source=data):
        return lambda: self_influence(summary, source, LABELSCAN.get(name, InfluenceSettings(method=name))).score

    ck = record["checkpoint_bytes"]
    add("labelscan linear", labelscan_method("linear"), keeps=f"summary {summary_bytes}")
    add("labelscan proximal", labelscan_method("proximal", prox_data), rows=prox_rows, keeps=f"summary {summary_bytes}")
    add("loss", labelscan_method("loss"), keeps=f"checkpoint {ck}")
    add("grad-norm", labelscan_method("grad-norm"), keeps=f"checkpoint {ck}")
    add("exact-proximal", labelscan_method("exact-proximal", prox_data), rows=prox_rows,
        keeps=f"checkpoint {ck} + training data")
    tracin_nets = [laftr(c, input_shape) for c in checkpoints]
    add("tracin", lambda: self_influence(summary, data, InfluenceSettings(method="tracin"), checkpoints=tracin_nets).score,
        keeps=f"checkpoints {sum(state_bytes(c) for c in checkpoints)} ({len(checkpoints)})")

    def cleanlab_method():
        score, issues, pred = cleanlab_scores(kind, x, y_noisy, recipe, SEED)
        hits = int((issues & flipped).sum())
        return score, {"flagged": int(issues.sum()), "flag_precision": hits / max(int(issues.sum()), 1),
                       "flag_recall": hits / max(int(flipped.sum()), 1)}

    add("cleanlab", cleanlab_method, keeps=f"held-out probabilities {len(y) * NUM_CLASSES * 4} (float32)")
    if not args.skip_kronfluence:
        for strategy in ("ekfac", "identity"):
            holder = {}

            def kron(strategy=strategy, holder=holder):
                score, factor_bytes = kronfluence_scores(model, x, y, strategy, str(tmp / "kronfluence"))
                holder["bytes"] = factor_bytes
                return score, {"factor_bytes": factor_bytes}

            add(f"kronfluence {strategy}", kron, keeps=f"checkpoint {ck} + factors")
    for name in ("labelscan linear", "labelscan proximal"):
        entry = record["methods"].get(name, {})
        if "seconds" in entry:
            entry["seconds"] += record["summary_seconds"]
            entry["epochs"] = entry["seconds"] / epoch_seconds
            if "seconds_full_estimate" in entry:
                entry["seconds_full_estimate"] += record["summary_seconds"]
    return record


# ---------------------------------------------------------------- report
def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def keeps_text(keeps: str, entry: dict) -> str:
    words = keeps.split(" ")
    out = []
    for w in words:
        out.append(human_bytes(int(w)) if w.isdigit() else w)
    text = " ".join(out)
    if "factor_bytes" in entry:
        text = text.replace("factors", f"factors {human_bytes(entry['factor_bytes'])}")
    return text


NOISE_NAME = {"sym10": "10% symmetric", "asym20": "20% asymmetric (look-alike pairs)"}
DATASET_NAME = {"digits": "scikit-learn digits", "mnist": "MNIST", "fashion": "Fashion-MNIST"}


def render(records: list[dict]) -> str:
    lines = ["## Mislabel detection: labelscan against loss, gradient norm, TracIn, cleanlab and kronfluence", "",
             provenance(), "",
             "Each table: one trained network, one noisy training set. Larger score = more suspicious. "
             "AUROC/AUPRC of the ranking against the flipped rows; R@k = recall among the top k rows, "
             "k = number of flipped rows. Time includes everything the method needs after training "
             "(labelscan: summarize + score; cleanlab: 5 retrainings + cleanlab). Epochs = time / one "
             "training epoch measured in the same run. Peak memory = growth of the process's resident set "
             "during the method (sampled; a lower bound when freed memory is reused). "
             "Keeps = what the method must store besides the training data.", "",
             "Settings (fixed before running, not tuned on the flips):", "", "```", settings_text(), "```", ""]
    commands = sorted({r["command"] for r in records})
    lines += ["Commands that produced these tables (run from the repository root in `.venv-bench`):", ""]
    lines += [f"- `{c}` ({', '.join(sorted({r['dataset'] for r in records if r['command'] == c}))}, "
              f"{next(r['date'] for r in records if r['command'] == c)}, "
              f"{next(r['cores'] for r in records if r['command'] == c)} cores)" for c in commands]
    done = {(r["dataset"], r["noise"], r["model"]) for r in records}
    missing = [f"{DATASET_NAME[d]} · {NOISE_NAME[n]} · {m.upper()}"
               for d in DATASET_NAME for n in NOISE_NAME for m in ("mlp", "cnn") if (d, n, m) not in done]
    lines += ["", "Not run (time): " + ("; ".join(missing) if missing else "none") + ".", "",
              "Notes: torch ran with 1 thread per process (on a shared 2-core machine 2 threads made training "
              "steps 5-25x slower); two configurations ran at a time on the 2 cores, so wall times carry "
              "contention noise of up to roughly 2x. proximal and exact-proximal scores on a "
              "subset are compared with the subset's own flips, so their AUROC has the sampling error of a "
              "few hundred rows; their full-set time is extrapolated linearly. kronfluence identity is the "
              "squared gradient norm (it matches grad-norm to 3 decimals everywhere), a check of the wiring.", ""]
    for r in records:
        lines += [f"### {DATASET_NAME[r['dataset']]} · {NOISE_NAME[r['noise']]} · {r['model'].upper()}", "",
                  f"{r['rows']:,} rows, {r['flipped']:,} flipped; {r['model_desc']}; "
                  f"{r['recipe']['epochs']} epochs at {r['epoch_seconds']:.2f} s/epoch; training accuracy "
                  f"{r['train_accuracy_noisy']:.1%} on the noisy labels ({r['train_accuracy_clean']:.1%} on the true ones). "
                  f"LAFTR summary: {r['summary_seconds']:.1f} s, {human_bytes(r['summary_bytes'])}.", "",
                  "| method | AUROC | AUPRC | R@k | rows scored | time | epochs | peak memory | keeps |",
                  "|---|---|---|---|---|---|---|---|---|"]
        notes = []
        for name in METHOD_ORDER:
            e = r["methods"].get(name)
            if e is None:
                continue
            if "failed" in e:
                lines.append(f"| {name} | failed | | | | | | | {e['failed'][:140].replace('|', '/')} |")
                continue
            rows = f"{e['rows']:,}" + (" (subset)" if e["rows"] < r["rows"] else "")
            t = f"{e['seconds']:.1f} s"
            if "seconds_full_estimate" in e:
                t += f" (≈{e['seconds_full_estimate']:.0f} s all rows)"
            lines.append(f"| {name} | {e['auroc']:.3f} | {e['auprc']:.3f} | {e['recall_at_k']:.3f} | {rows} | {t} | "
                         f"{e['epochs']:.1f} | {human_bytes(e['peak_bytes'])} | {keeps_text(e['keeps'], e)} |")
            if name == "cleanlab" and "flagged" in e:
                notes.append(f"cleanlab find_label_issues flagged {e['flagged']:,} rows: precision "
                             f"{e['flag_precision']:.3f}, recall {e['flag_recall']:.3f}.")
        lines += [""] + ([" ".join(notes), ""] if notes else [])
    return "\n".join(lines)


def plot(records: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for dataset in DATASET_NAME:
        group = [r for r in records if r["dataset"] == dataset]
        if not group:
            continue
        cols = min(2, len(group))
        rows_ = -(-len(group) // cols)
        fig, axes = plt.subplots(rows_, cols, figsize=(5 * cols, 4 * rows_), squeeze=False)
        flat = axes.ravel()
        for ax in flat[len(group):]:
            ax.axis("off")
        grid = np.linspace(0, 1, 101)
        for ax, r in zip(flat, group):
            for i, name in enumerate(METHOD_ORDER):
                e = r["methods"].get(name)
                if not e or "failed" in e:
                    continue
                label = name + (" (subset)" if e["rows"] < r["rows"] else "")
                ax.plot(grid, e["curve"], label=label, color=plt.cm.tab10(i),
                        linestyle="-" if name.startswith("labelscan") else "--", linewidth=1.4)
            ax.plot(grid, grid, color="grey", linewidth=0.6, label="random")
            share = r["flipped"] / r["rows"]
            ax.plot(grid, np.minimum(grid / share, 1), color="black", linewidth=0.6, linestyle=":", label="perfect")
            ax.set_xlim(0, min(1, 4 * share))
            ax.set_title(f"{NOISE_NAME[r['noise']]} · {r['model'].upper()} ({r['rows']:,} rows)", fontsize=9)
            ax.set_xlabel("fraction of data inspected")
            ax.set_ylabel("fraction of flips found")
        flat[len(group) - 1].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"{DATASET_NAME[dataset]}: flips found vs data inspected")
        fig.tight_layout()
        path = HERE / f"mislabel_{dataset}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="digits", help="comma list of digits, mnist, fashion")
    parser.add_argument("--mnist", default="/work/shared/data/mnist", help="folder with MNIST IDX .gz files")
    parser.add_argument("--fashion", default="/work/shared/data/fashion-mnist", help="folder with Fashion-MNIST IDX .gz files")
    parser.add_argument("--subset", type=int, default=20000, help="first N training rows of MNIST / Fashion-MNIST")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--noises", default="sym10,asym20")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on a shared 2-core machine 2 threads ran 5-25x slower")
    parser.add_argument("--proximal-rows", type=int, default=PROXIMAL_ROWS,
                        help="rows scored by proximal and exact-proximal (a fixed random subset) on larger sets")
    parser.add_argument("--skip-kronfluence", action="store_true")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "labelscan-mislabel"),
                        help="scratch folder for models, summaries and factors")
    parser.add_argument("--records", default=str(HERE / "results" / "mislabel"),
                        help="folder of per-configuration JSON records rendered into RESULTS.md")
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md and plots from --records")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work, records = Path(args.work_dir), Path(args.records)
    work.mkdir(parents=True, exist_ok=True)
    records.mkdir(parents=True, exist_ok=True)
    print(settings_text(), flush=True)
    if not args.report_only:
        for dataset in args.datasets.split(","):
            if dataset == "digits":
                x_np, y_clean = load_digits()
            else:
                x_np, y_clean = load_idx(args.mnist if dataset == "mnist" else args.fashion, args.subset)
            for noise in args.noises.split(","):
                for kind in args.models.split(","):
                    record = run_config(dataset, noise, kind, x_np, y_clean, args, work)
                    (records / f"{dataset}_{noise}_{kind}.json").write_text(json.dumps(record, indent=1) + "\n")
                    finish(records)
    finish(records)


def finish(folder: Path) -> None:
    order = {(d, n, m): i for i, (d, n, m) in enumerate(
        (d, n, m) for d in DATASET_NAME for n in NOISE_NAME for m in ("mlp", "cnn"))}
    records = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    records.sort(key=lambda r: order[(r["dataset"], r["noise"], r["model"])])
    if records:
        write_section(SECTION, render(records))
        plot(records)


if __name__ == "__main__":
    main()
