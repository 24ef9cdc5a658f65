"""The LAFTR summary: what one pass over the training data leaves behind.

Per mixture component (the whole data set, or one per class): the input mean and
covariance, the component's share of the data, and per ReLU unit the probability that its
pre-activation is positive. With θs these determine the LAFTR estimate of the function
space distance, so nothing downstream needs the data again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from labelscan.errors import LabelscanError, first_line
from labelscan.files import write_atomically
from labelscan.linalg import eigh
from labelscan.model import LaftrNet

FORMAT_NAME = "labelscan-laftr-summary"
FORMAT_VERSION = 1

# Largest input size whose full covariance is kept, and whose covariance is compressed to
# low rank plus diagonal; above that only the diagonal is kept.
FULL_COVARIANCE_MAX_DIM = 1024
LOW_RANK_MAX_DIM = 4096
LOW_RANK = 64


@dataclass
class InputMoments:
    """Gaussian input model of each component: mean (K, d) and a covariance representation.

    ``kind`` is ``full`` (``covariance`` is (K, d, d)), ``lowrank`` (``factor`` (K, d, r)
    plus ``variance`` (K, d), covariance = factor factorᵀ + diag(variance)) or
    ``diagonal`` (``variance`` only).
    """

    kind: str
    mean: torch.Tensor
    covariance: torch.Tensor | None = None
    factor: torch.Tensor | None = None
    variance: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        stored = {"mean": self.mean, "covariance": self.covariance, "factor": self.factor,
                  "variance": self.variance}
        return {f"moments.{k}": v for k, v in stored.items() if v is not None}

    def sample(self, component: int, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` draws of x ~ N(mean, covariance) of one component, flat (count, d)."""
        mean = self.mean[component]
        d = mean.numel()
        if self.kind == "full":
            root = _psd_root(self.covariance[component])
            return mean + torch.randn(count, d, generator=generator, dtype=mean.dtype) @ root.T
        draws = mean + torch.randn(count, d, generator=generator, dtype=mean.dtype) * self.variance[component].sqrt()
        if self.kind == "lowrank":
            factor = self.factor[component]
            draws = draws + torch.randn(count, factor.shape[1], generator=generator, dtype=mean.dtype) @ factor.T
        return draws

    def covariance_matrix(self, component: int) -> torch.Tensor:
        """The dense covariance of one component (for closed-form estimators on small inputs)."""
        if self.kind == "full":
            return self.covariance[component]
        dense = torch.diag(self.variance[component])
        if self.kind == "lowrank":
            dense = dense + self.factor[component] @ self.factor[component].T
        return dense


@dataclass
class LaftrSummary:
    """θs, the input moments and the ReLU activity of each mixture component.

    ``prior`` (K,) is each component's share of the training set; ``active[k]`` has shape
    (K, *units of the k-th ReLU). ``metadata`` holds fingerprints and options as JSON data.
    """

    net: LaftrNet
    prior: torch.Tensor
    moments: InputMoments
    active: list[torch.Tensor]
    num_examples: int
    metadata: dict = field(default_factory=dict)

    @property
    def num_components(self) -> int:
        return int(self.prior.numel())

    def save(self, path: str | Path) -> None:
        """Write atomically in the safetensors format: no code runs on load."""
        write_atomically(Path(path), self.to_bytes())

    def to_bytes(self) -> bytes:
        """The safetensors file's bytes. All metadata sits under one key as sorted JSON, so
        equal summaries are equal bytes."""
        tensors = {f"theta.{k}": v.contiguous() for k, v in self.net.layers.state_dict().items()}
        tensors |= {k: v.contiguous() for k, v in self.moments.tensors().items()}
        tensors["prior"] = self.prior
        tensors |= {f"active.{i}": a.contiguous() for i, a in enumerate(self.active)}
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "spec": self.net.spec(),
            "input_shape": list(self.net.input_shape),
            "num_outputs": self.net.num_outputs,
            "covariance": self.moments.kind,
            "num_examples": self.num_examples,
            "metadata": self.metadata,
        }
        return save(tensors, metadata={"labelscan": json.dumps(header, sort_keys=True)})

    @classmethod
    def load(cls, path: str | Path) -> "LaftrSummary":
        path = Path(path)
        if not path.exists():
            raise LabelscanError(f"no LAFTR summary at {path}; run labelscan summarize first")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {})["labelscan"])
            tensors = load_file(str(path))
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise LabelscanError(f"the summary {path} is corrupt or not a labelscan summary ({exc}); "
                                 "run labelscan summarize again") from None
        if header.get("format") != FORMAT_NAME:
            raise LabelscanError(f"{path} is not a labelscan summary; run labelscan summarize again")
        version = int(header.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise LabelscanError(
                f"the summary {path} was written by a newer labelscan (format {version}, this one reads "
                f"up to {FORMAT_VERSION}); upgrade labelscan or run summarize again"
            )
        try:
            theta = {k.removeprefix("theta."): v for k, v in tensors.items() if k.startswith("theta.")}
            net = LaftrNet.from_spec(header["spec"], theta, tuple(header["input_shape"]), header["num_outputs"])
            moments = InputMoments(
                kind=header["covariance"],
                **{k.removeprefix("moments."): v for k, v in tensors.items() if k.startswith("moments.")},
            )
            active = [tensors[f"active.{i}"] for i in range(len(net.relu_indices()))]
            prior = tensors["prior"]
        except (KeyError, RuntimeError, TypeError) as exc:
            raise LabelscanError(f"the summary {path} is incomplete ({first_line(exc)}); "
                                 "run labelscan summarize again") from None
        return cls(net, prior, moments, active, header["num_examples"], header["metadata"])


def covariance_kind(dim: int, num_components: int) -> str:
    """The richest covariance that fits: full up to 1,024 inputs, then low rank, then diagonal."""
    if dim <= FULL_COVARIANCE_MAX_DIM:
        return "full"
    if dim <= LOW_RANK_MAX_DIM and num_components * dim * dim * 8 <= 2**30:
        return "lowrank"
    return "diagonal"


class SummaryAccumulator:
    """Streams batches at θs into the sums a LaftrSummary is made of (float64 throughout)."""

    def __init__(self, net: LaftrNet, num_components: int, kind: str):
        self.net = net
        self.kind = kind
        dim = int(torch.tensor(net.input_shape).prod())
        self.count = torch.zeros(num_components, dtype=torch.float64)
        self.sum = torch.zeros(num_components, dim, dtype=torch.float64)
        second_shape = (num_components, dim, dim) if kind != "diagonal" else (num_components, dim)
        self.second = torch.zeros(second_shape, dtype=torch.float64)
        self.active_counts: list[torch.Tensor] | None = None

    @torch.no_grad()
    def add(self, x: torch.Tensor, component: torch.Tensor) -> torch.Tensor:
        """Add a batch ``x`` (B, *input_shape) whose rows belong to ``component`` (B,); returns logits."""
        flat = x.reshape(len(x), -1).double()
        self.count.index_add_(0, component, torch.ones(len(x), dtype=torch.float64))
        self.sum.index_add_(0, component, flat)
        for k in component.unique().tolist():
            rows = flat[component == k]
            self.second[k] += rows.T @ rows if self.kind != "diagonal" else (rows * rows).sum(0)
        positives = []
        h = x
        for layer in self.net.layers:
            if isinstance(layer, nn.ReLU):
                positives.append((h > 0).double())
            h = layer(h)
        if self.active_counts is None:
            self.active_counts = [torch.zeros(len(self.count), *p.shape[1:], dtype=torch.float64) for p in positives]
        for counts, positive in zip(self.active_counts, positives):
            counts.index_add_(0, component, positive)
        return h

    def finish(self, metadata: dict) -> LaftrSummary:
        if (self.count == 0).any():
            empty = (self.count == 0).nonzero().flatten().tolist()
            raise LabelscanError(
                f"classes {empty} have no examples, so per-class moments are undefined; "
                "drop --per-class or fix the labels"
            )
        n = self.count.unsqueeze(1)
        mean = self.sum / n
        if self.kind == "diagonal":
            moments = InputMoments("diagonal", mean.float(), variance=(self.second / n - mean**2).clamp_min(0).float())
        else:
            covariance = self.second / n.unsqueeze(2) - mean.unsqueeze(2) * mean.unsqueeze(1)
            covariance = (covariance + covariance.transpose(1, 2)) / 2
            moments = _compress(covariance, mean) if self.kind == "lowrank" else InputMoments(
                "full", mean.float(), covariance=covariance.float()
            )
        if not all(torch.isfinite(t).all() for t in moments.tensors().values()):
            raise LabelscanError("the input moments overflow (inputs too large); "
                                 "check the preprocessing options (--scale, --mean, --std)")
        active = [(c / self.count.view(-1, *[1] * (c.dim() - 1))).float() for c in self.active_counts]
        prior = (self.count / self.count.sum()).float()
        return LaftrSummary(self.net, prior, moments, active, int(self.count.sum()), metadata)


def summarize_batches(
    net: LaftrNet,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    per_class: bool = False,
    covariance: str = "auto",
    metadata: dict | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> LaftrSummary:
    """One pass over ``(x, y)`` batches at θs; ``x`` is (B, *net.input_shape).

    ``per_class`` keeps one mixture component per class (moments and ReLU activity
    conditioned on the label); ``covariance`` is ``auto``, ``full``, ``lowrank`` or ``diagonal``.
    """
    dim = int(torch.tensor(net.input_shape).prod())
    components = net.num_outputs if per_class else 1
    kind = covariance_kind(dim, components) if covariance == "auto" else covariance
    if kind not in ("full", "lowrank", "diagonal"):
        raise LabelscanError(f"unknown covariance {covariance!r}; use auto, full, lowrank or diagonal")
    accumulator = SummaryAccumulator(net, components, kind)
    for x, y in batches:
        if per_class and ((y < 0) | (y >= components)).any():
            raise LabelscanError(f"labels must be classes 0..{components - 1} of the model for a per-class summary; "
                                 "fix the labels or drop --per-class")
        component = y if per_class else torch.zeros_like(y)
        logits = accumulator.add(x, component)
        if not torch.isfinite(logits).all():
            raise LabelscanError("the model outputs NaN or infinite logits on the data; "
                                 "check the preprocessing options (--scale, --mean, --std)")
        if on_batch is not None:
            on_batch(len(x))
    if accumulator.active_counts is None:
        raise LabelscanError("the data set has no rows")
    return accumulator.finish(metadata or {})


def _compress(covariance: torch.Tensor, mean: torch.Tensor) -> InputMoments:
    """Top-``LOW_RANK`` eigenpairs plus the diagonal they leave unexplained."""
    values, vectors = eigh(covariance)
    top_values = values[:, -LOW_RANK:].clamp_min(0)
    factor = vectors[:, :, -LOW_RANK:] * top_values.sqrt().unsqueeze(1)
    residual = (torch.diagonal(covariance, dim1=1, dim2=2) - (factor**2).sum(2)).clamp_min(0)
    return InputMoments("lowrank", mean.float(), factor=factor.float(), variance=residual.float())


def _psd_root(covariance: torch.Tensor) -> torch.Tensor:
    """A matrix R with R Rᵀ ≈ covariance: Cholesky, with the smallest diagonal jitter that makes
    the singular covariances of images (constant pixels) positive definite."""
    matrix = covariance.double()
    scale = float(matrix.diagonal().mean().clamp_min(1e-12))
    identity = torch.eye(len(matrix), dtype=torch.float64)
    for jitter in (0.0, 1e-10, 1e-8, 1e-6, 1e-4):
        root, info = torch.linalg.cholesky_ex(matrix + jitter * scale * identity)
        if int(info) == 0:
            return root.to(covariance.dtype)
    values, vectors = eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()).to(covariance.dtype)
