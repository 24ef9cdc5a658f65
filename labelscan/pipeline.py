"""The library's front door: summarize a training set, measure FSD, score self-influence.

These functions take loaded objects (a LaftrNet, a Dataset, a LaftrSummary), so a notebook
user needs no workspace or CLI; ``labelscan.workspace`` wraps them with files on disk.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from labelscan.data import Batch, Dataset
from labelscan.errors import LabelscanError
from labelscan.influence.scoring import ExampleScores, InfluenceSettings
from labelscan.influence.scoring import self_influence as _score
from labelscan.laftr.fsd import draw, stochastic_fsd
from labelscan.laftr.gated import gated_forward
from labelscan.laftr.summary import LaftrSummary, summarize_batches
from labelscan.model import LaftrNet

DEFAULT_BATCH_SIZE = 512


def model_batches(dataset: Dataset, net: LaftrNet, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[Batch]:
    """The dataset's batches with features reshaped to the model's input shape."""
    check_fits(dataset, net)
    for batch in dataset.batches(batch_size):
        batch.x = batch.x.reshape(len(batch.x), *net.input_shape)
        yield batch


def check_fits(dataset: Dataset, net: LaftrNet) -> None:
    """Refuse data whose feature count the model cannot take."""
    if math.prod(dataset.feature_shape) != math.prod(net.input_shape):
        raise LabelscanError(
            f"the data has examples of shape {dataset.feature_shape} but the model takes {net.input_shape}; "
            "check DATA, or pass --input-shape for a TorchScript or pickled model"
        )


def summarize(
    net: LaftrNet,
    dataset: Dataset,
    *,
    per_class: bool = False,
    covariance: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    metadata: dict | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> LaftrSummary:
    """One streamed pass over ``dataset`` at θs: the LAFTR summary (see ``labelscan.laftr.summary``)."""
    batches = ((b.x, b.y) for b in model_batches(dataset, net, batch_size))
    return summarize_batches(net, batches, per_class=per_class, covariance=covariance,
                             metadata=metadata, on_batch=on_batch)


def fsd(
    summary: LaftrSummary,
    candidate: LaftrNet | dict[str, torch.Tensor],
    reference: LaftrNet | dict[str, torch.Tensor] | None = None,
    *,
    samples: int = 4000,
    seed: int = 0,
    discrepancy: str = "kl",
) -> float:
    """The LAFTR estimate of FSD between two settings of the summarized network.

    ``reference`` defaults to θs. Both settings see the same draws: inputs from the summary's
    moments, and the gates (ReLU activity and MaxPool selections) of θs.
    """
    draws = draw(summary, samples, seed)
    candidate_params = _params_like(summary, candidate)
    with torch.no_grad():
        if reference is not None:
            reference_params = _params_like(summary, reference)
            draws.reference, _ = gated_forward(summary.net, reference_params, draws.x, draws.gates, draws.pool_indices)
        return float(stochastic_fsd(candidate_params, draws, discrepancy))


def _params_like(summary: LaftrSummary, setting: LaftrNet | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = setting.params() if isinstance(setting, LaftrNet) else setting
    expected = summary.net.params()
    if params.keys() != expected.keys() or any(params[k].shape != expected[k].shape for k in params):
        raise LabelscanError(
            "the models have a different architecture from the summarized one; "
            "FSD compares settings of one network"
        )
    return params


def self_influence(
    summary: LaftrSummary,
    dataset: Dataset,
    settings: InfluenceSettings = InfluenceSettings(),
    *,
    checkpoints: list[LaftrNet] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ExampleScores:
    """Self-influence of every example of ``dataset`` (see ``labelscan.influence.scoring``)."""
    net = summary.net
    training_inputs = None
    if settings.method == "exact-proximal":
        training_inputs = _random_inputs(dataset, net, settings.proximal_samples, settings.seed)
    return _score(summary, model_batches(dataset, net, settings.batch_size), settings,
                  checkpoints=checkpoints, training_inputs=training_inputs, on_batch=on_batch)


def _random_inputs(dataset: Dataset, net: LaftrNet, count: int, seed: int) -> torch.Tensor:
    """A seeded random subset of the training inputs, read in one streamed pass."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(dataset.num_rows, generator=generator)[: min(count, dataset.num_rows)]
    keep = torch.zeros(dataset.num_rows, dtype=torch.bool)
    keep[chosen] = True
    parts = [b.x[keep[b.rows]] for b in model_batches(dataset, net)]
    return torch.cat(parts)
