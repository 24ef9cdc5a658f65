"""FSD estimator quality (issue 3): how well LAFTR ranks parameter settings by their function
space distance from θs, against the exact FSD on the training inputs and against baselines
that store a comparable number of values.

Models, trained here with fixed seeds (Adam, cosine decay):
  digits-mlp   64-128-128-10 on scikit-learn digits (1,797 images, 8×8, scaled to [0, 1])
  digits-cnn   conv16-pool-conv32-pool-linear on digits
  mnist-mlp    784-256-256-10 on the first --subset MNIST training images (fixed subset)
  mnist-cnn    conv16-pool-conv32-pool-linear on the same subset

Family of settings θ (seeded), all from θs:
  gauss     each weight/bias tensor W gets σ·‖W‖·Z/‖Z‖, Z Gaussian, σ ∈ {0.003 … 0.3}, 3 seeds
  sgd       1-30 full-batch SGD steps (lr 0.1) on a random 128-example subset, 2 subsets
  finetune  5-100 SGD steps (lr 0.05, momentum 0.9, batch 64) on classes 0-4 only or 5-9 only

Ground truth: ``labelscan.laftr.fsd.exact_fsd`` on all of the model's training inputs, KL
(and squared error for the closed-form estimator).

Estimators (numbers stored besides θs, which every method keeps):
  LAFTR stochastic      ``stochastic_fsd`` on ``draw(summary, S, seed=0)``; global and per-class
                        summaries, S ∈ {250, 1000, 4000}; plus diagonal / low-rank covariances
  LAFTR deterministic   ``deterministic_fsd`` (closed form, squared error), MLPs only
  diagonal Fisher       EWC-style ½ Σ F_ii Δθ_i², F_ii = E_x Σ_y p(y|x; θs) (∂ log p(y|x)/∂θ_i)²
                        exactly over all training inputs (#parameters numbers)
  linearized (NTK)      KL(f(x; θs) ‖ f(x; θs) + J(x; θs)Δθ) averaged over k stored inputs
                        (``torch.func.jvp``), k·d numbers
  data subset           the true network on the same k stored inputs, k·d numbers
k is chosen so that k·d matches the numbers the LAFTR summary stores (global, and per-class).

Also times ``labelscan.summarize`` over all 60,000 MNIST training images with an MLP
784-512-512-10 (seeded initialization: the pass's cost does not depend on the weights) in a
fresh process, with its peak resident memory.

    python benchmarks/fsd_quality.py --mnist /work/shared/data/mnist --subset 10000
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from results import provenance, write_section  # noqa: E402

import labelscan  # noqa: E402
from labelscan.laftr.fsd import deterministic_fsd, discrepancy, draw, exact_fsd, stochastic_fsd  # noqa: E402
from labelscan.laftr.summary import LaftrSummary, summarize_batches  # noqa: E402
from labelscan.model import LaftrNet  # noqa: E402

SECTION = "fsd_quality"
CASES = ("digits-mlp", "digits-cnn", "mnist-mlp", "mnist-cnn")
SIGMAS = (0.003, 0.01, 0.03, 0.1, 0.3)
SGD_STEPS = (1, 3, 10, 30)
FINETUNE_STEPS = (5, 20, 50, 100)
SAMPLE_COUNTS = (250, 1000, 4000)
DRAW_SEEDS = (0, 1, 2)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    seq: nn.Sequential
    input_shape: tuple[int, ...]
    x: torch.Tensor
    y: torch.Tensor
    is_mlp: bool
    note: str

    @property
    def net(self) -> LaftrNet:
        return common.laftr_net(self.seq, self.input_shape)


def build_case(name: str, args) -> Case:
    if name.startswith("digits"):
        x, y = common.load_digits()
        data_note = "digits, 1,797 images"
        epochs, batch = 60, 64
    else:
        x, y = common.load_idx(args.mnist, args.subset)
        data_note = f"MNIST, first {len(x):,} training images"
        epochs, batch = 8, 128
    shape = tuple(x.shape[1:])
    if name.endswith("mlp"):
        d = int(np.prod(shape))
        widths = [d, 128, 128, 10] if name.startswith("digits") else [d, 256, 256, 10]
        seq = common.mlp(widths, seed=0)
        arch = "-".join(map(str, widths))
    else:
        seq = common.cnn(shape, (16, 32), seed=0)
        arch = "conv16-pool-conv32-pool-linear"
    t0 = time.perf_counter()
    run = common.train(seq, x, y, epochs=epochs, batch_size=batch, lr=1e-3, seed=0)
    note = (f"{data_note}; {arch}, {common.count_parameters(seq):,} parameters; Adam, {len(run.epoch_seconds)} "
            f"epochs, train accuracy {run.train_accuracy[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
    log(f"{name}: {note}")
    return Case(name, seq, shape, x, y, name.endswith("mlp"), note)


# ----------------------------------------------------------------------------- the family of θ


@dataclass
class Setting:
    family: str
    label: str
    params: dict[str, torch.Tensor]


def gaussian(params: dict[str, torch.Tensor], sigma: float, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in params.items():
        z = torch.randn(v.shape, generator=generator)
        out[k] = v + sigma * v.norm() * z / z.norm()
    return out


def sgd_steps(case: Case, steps: int, seed: int, lr: float = 0.1, size: int = 128) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + seed)
    rows = torch.randperm(len(case.x), generator=generator)[:size]
    model = copy.deepcopy(case.seq).train().requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(case.x[rows]), case.y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def finetune(case: Case, classes: range, steps: int, lr: float = 0.05, batch: int = 64) -> dict[str, torch.Tensor]:
    keep = torch.isin(case.y, torch.tensor(list(classes)))
    x, y = case.x[keep], case.y[keep]
    generator = torch.Generator().manual_seed(2000 + classes.start)
    model = copy.deepcopy(case.seq).train().requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        rows = torch.randint(len(x), (batch,), generator=generator)
        loss = F.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def family(case: Case, quick: bool) -> list[Setting]:
    reference = case.net.params()
    sigmas = SIGMAS[::2] if quick else SIGMAS
    seeds = (0,) if quick else (0, 1, 2)
    settings = [Setting("gauss", f"σ={s} seed {seed}", gaussian(reference, s, 100 * seed + i))
                for i, s in enumerate(sigmas) for seed in seeds]
    settings += [Setting("sgd", f"{n} steps subset {seed}", sgd_steps(case, n, seed))
                 for n in (SGD_STEPS[::2] if quick else SGD_STEPS) for seed in ((0,) if quick else (0, 1))]
    settings += [Setting("finetune", f"{n} steps classes {c.start}-{c.stop - 1}", finetune(case, c, n))
                 for n in (FINETUNE_STEPS[::2] if quick else FINETUNE_STEPS) for c in (range(0, 5), range(5, 10))]
    return settings


# ----------------------------------------------------------------------------- baselines


def fisher_diagonal(net: LaftrNet, x: torch.Tensor, chunk: int = 256) -> dict[str, torch.Tensor]:
    """Exact diagonal of the Fisher E_x[Jᵀ (diag p − ppᵀ) J] at θs over the inputs ``x``.

    With L = diag(√p) − p√pᵀ per example (L Lᵀ = diag p − ppᵀ), F_ii = E_x Σ_c (∂(L_cᵀ z)/∂θ_i)².
    For each column c one backward pass of the batch gives every example's gradient at the
    pre-activations δ (rows are independent); a layer's per-example weight gradient is
    δ aᵀ (Linear) or Σ_t δ_t a_tᵀ over unfolded patches (Conv2d), squared and summed here.
    """
    layers = [(i, m) for i, m in enumerate(net.layers) if isinstance(m, (nn.Linear, nn.Conv2d))]
    total = {f"{i}.{name}": torch.zeros_like(p, dtype=torch.float64)
             for i, m in layers for name, p in m.named_parameters()}
    for start in range(0, len(x), chunk):
        xb = x[start : start + chunk]
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [m.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, (inp[0].detach(), out)))
                 for i, m in layers]
        try:
            with torch.enable_grad():
                z = net.layers(xb.detach().requires_grad_(True))  # params are frozen; track through the input
        finally:
            for h in hooks:
                h.remove()
        p = torch.softmax(z.detach(), dim=1)
        root = p.sqrt()
        L = torch.diag_embed(root) - p.unsqueeze(2) * root.unsqueeze(1)  # (B, C, C), L Lᵀ = diag p − ppᵀ
        outputs = [seen[i][1] for i, _ in layers]
        unfolded = {i: F.unfold(seen[i][0], m.kernel_size, m.dilation, m.padding, m.stride)
                    for i, m in layers if isinstance(m, nn.Conv2d)}
        for c in range(z.shape[1]):
            deltas = torch.autograd.grad(z, outputs, grad_outputs=L[:, :, c], retain_graph=c < z.shape[1] - 1)
            for (i, m), delta in zip(layers, deltas):
                a = seen[i][0]
                if isinstance(m, nn.Linear):
                    total[f"{i}.weight"] += ((delta**2).T @ (a**2)).double()
                    bias_grad = delta
                else:
                    patches = unfolded[i]  # (B, in·k·k, T)
                    d = delta.flatten(2)  # (B, out, T)
                    per_example = torch.einsum("bot,bit->boi", d, patches)
                    total[f"{i}.weight"] += (per_example**2).sum(0).double().view_as(total[f"{i}.weight"])
                    bias_grad = d.sum(2)
                if m.bias is not None:
                    total[f"{i}.bias"] += (bias_grad**2).sum(0).double()
    return {k: (v / len(x)).float() for k, v in total.items()}


def fisher_quadratic(fisher: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], params) -> float:
    return float(0.5 * sum((fisher[k] * (params[k] - reference[k]) ** 2).sum() for k in fisher))


def linearized_fsd(net: LaftrNet, inputs: torch.Tensor, params) -> float:
    """KL(f(x; θs) ‖ f(x; θs) + J Δθ) averaged over the stored inputs (one jvp)."""
    reference = net.params()
    tangent = {k: params[k] - reference[k] for k in reference}
    with torch.no_grad():
        f0, pushed = jvp(lambda theta: functional_call(net.layers, theta, (inputs,)), (reference,), (tangent,))
    return float(discrepancy(f0, f0 + pushed, "kl").mean())


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Estimator:
    name: str
    stored: int
    setup_s: float
    evaluate: Callable[[dict], float]
    truth: str = "kl"
    note: str = ""
    values: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    spread: str = ""


def summary_numbers(summary: LaftrSummary) -> int:
    return (sum(v.numel() for v in summary.moments.tensors().values())
            + sum(a.numel() for a in summary.active) + summary.prior.numel())


def make_summary(case: Case, per_class: bool, covariance: str = "auto") -> tuple[LaftrSummary, float]:
    net = case.net
    x = case.x
    t0 = time.perf_counter()
    batches = ((x[i : i + 512], case.y[i : i + 512]) for i in range(0, len(x), 512))
    summary = summarize_batches(net, batches, per_class=per_class, covariance=covariance)
    return summary, time.perf_counter() - t0


def laftr_estimator(name, summary, summary_s, samples, seed=0, note="") -> Estimator:
    t0 = time.perf_counter()
    draws = draw(summary, samples, seed)
    setup = summary_s + time.perf_counter() - t0

    def evaluate(params):
        with torch.no_grad():
            return float(stochastic_fsd(params, draws, "kl"))

    return Estimator(name, summary_numbers(summary), setup, evaluate, note=note)


def run_case(case: Case, args) -> tuple[str, list[dict]]:
    net = case.net
    reference = net.params()
    d = int(np.prod(case.input_shape))
    n_params = common.count_parameters(case.seq)
    settings = family(case, args.quick)
    log(f"{case.name}: {len(settings)} settings")

    # Ground truth.
    truth: dict[str, list[float]] = {"kl": [], "squared": []}
    exact_seconds = []
    for s in settings:
        t0 = time.perf_counter()
        truth["kl"].append(float(exact_fsd(net, s.params, case.x, "kl")))
        exact_seconds.append(time.perf_counter() - t0)
        if case.is_mlp:  # only the closed form (MLPs) is compared against squared error
            truth["squared"].append(float(exact_fsd(net, s.params, case.x, "squared")))

    estimators: list[Estimator] = []
    global_summary, global_s = make_summary(case, per_class=False)
    class_summary, class_s = make_summary(case, per_class=True)
    for samples in SAMPLE_COUNTS:
        estimators.append(laftr_estimator(f"LAFTR stochastic, global, S={samples}", global_summary, global_s, samples))
    for samples in SAMPLE_COUNTS:
        estimators.append(laftr_estimator(f"LAFTR stochastic, per-class, S={samples}", class_summary, class_s, samples))
    # Cheaper input models at S = 1000 (global): diagonal always; low rank when d exceeds its rank.
    kinds = ["diagonal"] + (["lowrank"] if d > 64 else [])
    for kind in kinds:
        summary, seconds = make_summary(case, per_class=False, covariance=kind)
        estimators.append(laftr_estimator(f"LAFTR stochastic, global, {kind} covariance, S=1000", summary, seconds, 1000))
    if case.is_mlp:
        for label, summary, seconds in (("global", global_summary, global_s), ("per-class", class_summary, class_s)):
            estimators.append(Estimator(
                f"LAFTR deterministic, {label} (squared error)", summary_numbers(summary), seconds,
                lambda params, summary=summary: float(deterministic_fsd(summary, params)), truth="squared",
            ))

    t0 = time.perf_counter()
    fisher = fisher_diagonal(net, case.x)
    fisher_s = time.perf_counter() - t0
    estimators.append(Estimator("diagonal Fisher (EWC)", n_params, fisher_s,
                                lambda params: fisher_quadratic(fisher, reference, params),
                                note="Fisher from all training inputs"))
    generator = torch.Generator().manual_seed(7)
    order = torch.randperm(len(case.x), generator=generator)
    for label, summary in (("global", global_summary), ("per-class", class_summary)):
        k = min(len(case.x), max(1, round(summary_numbers(summary) / d)))
        stored = case.x[order[:k]]
        estimators.append(Estimator(f"linearized (NTK), k={k} (= {label} LAFTR memory)", k * d, 0.0,
                                    lambda params, stored=stored: linearized_fsd(net, stored, params)))
        estimators.append(Estimator(f"data subset, k={k} (= {label} LAFTR memory)", k * d, 0.0,
                                    lambda params, stored=stored: float(exact_fsd(net, params, stored, "kl"))))

    for estimator in estimators:
        for s in settings:
            t0 = time.perf_counter()
            estimator.values.append(estimator.evaluate(s.params))
            estimator.seconds.append(time.perf_counter() - t0)
        log(f"{case.name}: {estimator.name}: Spearman "
            f"{common.spearman(estimator.values, truth[estimator.truth]):.3f}")

    # Variability of the stochastic estimator over draw seeds (Spearman, all settings).
    for estimator in estimators:
        if not estimator.name.startswith("LAFTR stochastic") or "covariance" in estimator.name:
            continue
        summary = global_summary if "global" in estimator.name else class_summary
        samples = int(estimator.name.rsplit("S=", 1)[1])
        values = []
        for seed in DRAW_SEEDS[1:]:
            draws = draw(summary, samples, seed)
            with torch.no_grad():
                values.append(common.spearman([float(stochastic_fsd(s.params, draws, "kl")) for s in settings],
                                              truth["kl"]))
        values.append(common.spearman(estimator.values, truth["kl"]))
        estimator.spread = f"{min(values):.3f}–{max(values):.3f}"

    families = ("gauss", "sgd", "finetune")
    rows, records = [], []
    for estimator in estimators:
        target = np.array(truth[estimator.truth])
        values = np.array(estimator.values)
        within = []
        for fam in families:
            mask = np.array([s.family == fam for s in settings])
            within.append(common.spearman(values[mask], target[mask]))
        ratio = float(np.median(values / target))
        record = {
            "case": case.name, "estimator": estimator.name, "stored": estimator.stored,
            "setup_s": estimator.setup_s, "per_theta_s": float(np.mean(estimator.seconds)),
            "spearman": common.spearman(values, target), "pearson": common.pearson(values, target),
            "within": within, "ratio": ratio, "truth": estimator.truth, "spread": estimator.spread,
        }
        records.append(record)
        rows.append([
            estimator.name + (" †" if estimator.truth == "squared" else ""),
            f"{estimator.stored:,}", common.fmt_s(record["setup_s"]), common.fmt_s(record["per_theta_s"]),
            common.fmt(record["spearman"]) + (f" ({estimator.spread})" if estimator.spread else ""),
            common.fmt(record["pearson"]), *[common.fmt(w) for w in within], f"{ratio:.2f}",
        ])
    fsd_range = f"{min(truth['kl']):.2e} – {max(truth['kl']):.2e}"
    markdown = [
        f"#### {case.name}",
        "",
        f"{case.note}. {len(settings)} settings θ "
        f"({', '.join(f'{sum(s.family == f for s in settings)} {f}' for f in families)}); "
        f"exact KL FSD ranges {fsd_range}; exact FSD over {len(case.x):,} inputs takes "
        f"{common.fmt_s(float(np.mean(exact_seconds)))} per θ. θs itself ({n_params:,} numbers) is stored by every "
        "method and not counted.",
        "",
        common.table(
            ["estimator", "numbers stored", "setup", "time per θ", "Spearman (draw seeds 0-2)", "Pearson",
             "Spearman gauss", "Spearman sgd", "Spearman finetune", "median estimate/exact"],
            rows,
        ),
        "",
    ]
    return "\n".join(markdown), records


# ----------------------------------------------------------------------------- summarize at MNIST scale


def summarize_job(mnist: str, per_class: bool) -> dict:
    """Fresh process: open MNIST (60,000), build the 784-512-512-10 MLP, time ``labelscan.summarize``."""
    t0 = time.perf_counter()
    dataset = labelscan.open_dataset(common.idx_images_path(mnist),
                                     preprocessing=labelscan.Preprocessing(scale=1 / 255))
    load_s = time.perf_counter() - t0
    net = common.laftr_net(common.mlp([784, 512, 512, 10], seed=0), (1, 28, 28))
    with common.Stopwatch() as watch:
        summary = labelscan.summarize(net, dataset, per_class=per_class)
    return {**watch.record(), "load_s": load_s, "rows": summary.num_examples, "kind": summary.moments.kind,
            "stored": summary_numbers(summary)}


def summarize_section(mnist: str, repeats: int = 3) -> str:
    rows = []
    for per_class in (False, True):
        runs = []
        for attempt in range(repeats):
            busy = common.wait_for_quiet(log=log)
            log(f"summarize 60k, per_class={per_class} [{attempt + 1}/{repeats}] (others busy {busy:.0%})")
            runs.append(common.run_isolated(summarize_job, mnist, per_class) | {"busy": busy})
            log(f"summarize: {runs[-1]['seconds']:.1f} s, peak {runs[-1]['peak_rss_mb']:.0f} MiB")
        times = sorted(r["seconds"] for r in runs)
        out = runs[0]
        rows.append([
            "per-class" if per_class else "global", out["kind"], f"{out['rows']:,}", f"{out['stored']:,}",
            f"{common.fmt_s(times[(len(times) - 1) // 2])} ({common.fmt_s(times[0])}–{common.fmt_s(times[-1])})",
            common.fmt_mb(max(r["rss_before_mb"] for r in runs)), common.fmt_mb(max(r["peak_rss_mb"] for r in runs)),
            f"{max(r['busy'] for r in runs):.0%}",
        ])
    return "\n".join([
        "#### `labelscan.summarize`, MNIST 60,000 × MLP 784-512-512-10",
        "",
        f"Fresh process per run, {repeats} runs per row (median time, range in parentheses), 2 torch threads, "
        "batch size 512 (the default). Time is the `summarize` call alone (the IDX file is opened before it, "
        "about 1-3 s of gzip and parsing); peak is the process's peak resident set (VmHWM), including Python, "
        "torch and the loaded data (the resident size before the call is shown). Weights: seeded initialization "
        "(the pass's cost does not depend on them). Before each run the script waits until other processes "
        "use < 15% of the CPUs (last column: their use just before the run, max). Target: < 1 minute, < 2 GB.",
        "",
        common.table(["summary", "covariance", "rows", "numbers stored", "time", "RSS before the call",
                      "peak RSS", "others' CPU use"], rows),
        "",
    ])


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist", required=True, help="folder with the MNIST IDX files (or the train images file)")
    parser.add_argument("--subset", type=int, default=10000, help="first N MNIST training images for the quality runs")
    parser.add_argument("--out", default=None,
                        help="write the markdown to this file instead of the fsd_quality section of RESULTS.md")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES)
                        + " ('' for none)")
    parser.add_argument("--skip-summarize", action="store_true", help="skip the 60,000-image summarize timing")
    parser.add_argument("--quick", action="store_true", help="fewer settings θ (for a smoke run)")
    parser.add_argument("--work-dir", default="/tmp/labelscan-fsd-quality",
                        help="parts already run are kept here (JSON) and the section is rendered from all of them, "
                             "so parts can be rerun separately, e.g. the timing when the machine is quiet")
    args = parser.parse_args()
    common.setup_torch()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cache_path = work / ("parts-quick.json" if args.quick else "parts.json")
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    started = time.perf_counter()

    def store(key: str, markdown: str, records: list[dict], t0: float, load_start: str) -> None:
        cache[key] = {
            "markdown": markdown, "records": records,
            "run": f"{provenance().strip()}  \nTorch {torch.__version__}, {common.THREADS} threads; {load_start}, "
                   f"{common.load_note('at end')}; wall time {common.fmt_s(time.perf_counter() - t0)}; "
                   f"{common.library_version()}.",
        }
        cache_path.write_text(json.dumps(cache, indent=1))

    for name in filter(None, args.cases.split(",")):
        t0, load_start = time.perf_counter(), common.load_note("at start")
        markdown, records = run_case(build_case(name, args), args)
        store(name, markdown, records, t0, load_start)
    if not args.skip_summarize:
        t0, load_start = time.perf_counter(), common.load_note("at start")
        store("summarize", summarize_section(args.mnist), [], t0, load_start)

    parts = []
    for key in [*CASES, "summarize"]:
        if key in cache:
            parts += [cache[key]["markdown"], "", f"<sub>{cache[key]['run']}</sub>", ""]
    records = [r for key in CASES if key in cache for r in cache[key]["records"]]
    section = "\n".join([
        "### FSD estimator quality (`benchmarks/fsd_quality.py`)",
        "",
        "Command (all parts): `python benchmarks/fsd_quality.py --mnist /work/shared/data/mnist --subset 10000`; "
        "each part below names the command and machine load it was produced with.",
        "",
        "Correlations are over the family of settings θ against the exact FSD on the model's training "
        "inputs (KL; † rows against the exact squared-error FSD of the logits). The Spearman column's "
        "parenthesis is the range over three LAFTR draw seeds. 'setup' is what the estimator needs once "
        "(summary pass + draws, Fisher pass); 'numbers stored' excludes θs. 'median estimate/exact' is the "
        "calibration of the absolute value (1 = unbiased).",
        "",
        *parts,
        headline(records) if records else "",
    ])
    if args.out:
        Path(args.out).write_text(section + "\n")
    else:
        write_section(SECTION, section)
    log(f"done in {time.perf_counter() - started:.0f} s")


def headline(records: list[dict]) -> str:
    """The targets, for the configuration ``labelscan fsd`` runs (4,000 draws, global and per-class),
    and for the smallest summary (diagonal covariance, 1,000 draws)."""
    rows = []
    summaries = {"global": "global, S=4000", "per-class": "per-class, S=4000",
                 "global, diagonal": "global, diagonal covariance, S=1000"}
    for case in dict.fromkeys(r["case"] for r in records):
        mine = [r for r in records if r["case"] == case]
        fisher = next(r for r in mine if r["estimator"].startswith("diagonal Fisher"))
        for label, name in summaries.items():
            laftr = next(r for r in mine if r["estimator"] == f"LAFTR stochastic, {name}")
            ahead = laftr["spearman"] > fisher["spearman"]
            rows.append([case, label, common.fmt(laftr["spearman"]), f"{laftr['stored']:,}",
                         common.fmt(fisher["spearman"]), f"{fisher['stored']:,}",
                         "yes" if laftr["spearman"] >= 0.9 else "no", "yes" if ahead else "no",
                         "yes" if laftr["stored"] < fisher["stored"] else "no"])
    return "\n".join(["#### Targets (LAFTR stochastic: S = 4,000 as `labelscan fsd` runs it; and the diagonal-covariance summary)", "", common.table(
        ["case", "summary", "LAFTR Spearman", "LAFTR stored", "diag. Fisher Spearman", "Fisher stored",
         "LAFTR ≥ 0.9", "ahead of Fisher", "less memory than Fisher"], rows), ""])


if __name__ == "__main__":
    main()
