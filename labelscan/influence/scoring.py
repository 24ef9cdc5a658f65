"""Self-influence of every training example, by any of the supported methods.

``linear`` and ``proximal`` are the product: the curvature comes from the LAFTR summary, so
scoring streams the data once and never iterates over it inside a solver. ``loss``,
``grad-norm``, ``exact-proximal`` (the proximal objective with the true FSD on a random
subset of the training data) and ``tracin`` (squared gradient norms summed over several
checkpoints) are the baselines users compare against.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from labelscan.data import Batch
from labelscan.errors import LabelscanError
from labelscan.influence.curvature import fit_curvature, top_eigenvalue
from labelscan.influence.factors import backprop_factors, cross_entropy_cotangent
from labelscan.influence.proximal import proximal_scores
from labelscan.laftr.fsd import LaftrDraws, draw
from labelscan.laftr.gated import forward
from labelscan.laftr.summary import LaftrSummary
from labelscan.model import LaftrNet

METHODS = ("linear", "proximal", "loss", "grad-norm", "exact-proximal", "tracin")


@dataclass(frozen=True)
class InfluenceSettings:
    """Every setting that changes the scores; saved in the report's metadata.

    ``damping`` is λ relative to the mean eigenvalue of the LAFTR Hessian (tr H / #params),
    which makes one default fit networks of any scale. ``samples`` LAFTR draws fit the
    curvature. The proximal solvers evaluate the FSD at every step of every example, so their
    cost grows with what they evaluate it on: ``proximal_samples`` LAFTR draws (``proximal``)
    or training examples (``exact-proximal``). ``epsilon`` and ``steps`` are the proximal
    solver's up-weighting and number of gradient steps (step size 1/(λ_max(H) + λ)).
    """

    method: str = "linear"
    samples: int = 2000
    proximal_samples: int = 32
    damping: float = 0.1
    epsilon: float = 0.01
    steps: int = 5
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self):
        if self.method not in METHODS:
            raise LabelscanError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("samples", "proximal_samples", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise LabelscanError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("damping", "epsilon"):
            if not getattr(self, name) > 0:
                raise LabelscanError(f"--{name} must be positive, got {getattr(self, name)}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExampleScores:
    """Per-example results in data order; ``runner_up`` is the most probable class other than the given one."""

    rows: np.ndarray
    ids: list[str]
    given: np.ndarray
    predicted: np.ndarray
    runner_up: np.ndarray
    loss: np.ndarray
    score: np.ndarray
    solver: dict = field(default_factory=dict)


def self_influence(
    summary: LaftrSummary,
    batches: Iterable[Batch],
    settings: InfluenceSettings = InfluenceSettings(),
    *,
    checkpoints: list[LaftrNet] | None = None,
    training_inputs: torch.Tensor | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ExampleScores:
    """Score each example of ``batches`` (the training set, or new data) against ``summary``.

    ``checkpoints`` are needed by ``tracin``; ``training_inputs`` (a random subset of the
    training inputs) by ``exact-proximal``. Returns scores where larger means more
    self-influential, i.e. more suspicious.
    """
    net = summary.net
    scorer, solver = _make_scorer(summary, settings, checkpoints, training_inputs)
    parts: dict[str, list] = {key: [] for key in ("rows", "ids", "given", "predicted", "runner_up", "loss", "score")}
    for batch in batches:
        x = batch.x.reshape(len(batch.x), *net.input_shape)
        logits, score = scorer(x, batch.y)
        parts["rows"].append(batch.rows.numpy())
        parts["ids"].extend(batch.ids)
        parts["given"].append(batch.y.numpy())
        parts["predicted"].append(logits.argmax(1).numpy())
        others = logits.scatter(1, batch.y.unsqueeze(1), float("-inf"))
        parts["runner_up"].append(others.argmax(1).numpy())
        parts["loss"].append(F.cross_entropy(logits, batch.y, reduction="none").double().numpy())
        parts["score"].append(score.double().numpy())
        if on_batch is not None:
            on_batch(len(x))
    if not parts["rows"]:
        raise LabelscanError("the data set has no rows to score")
    joined = {k: (v if k == "ids" else np.concatenate(v)) for k, v in parts.items()}
    return ExampleScores(**joined, solver=solver)


def _make_scorer(summary, settings, checkpoints, training_inputs):
    """The per-batch scoring function for ``settings.method`` and the solver settings it derived.

    A scorer maps ``(x, y)`` to ``(logits at θs, scores)``; methods that backpropagate through
    θs reuse that pass's logits instead of running the network twice.
    """
    net, method = summary.net, settings.method
    if method == "loss":
        def loss(x, y):
            logits = _logits(net, x)
            return logits, F.cross_entropy(logits, y, reduction="none")

        return loss, {}
    if method == "grad-norm":
        return (lambda x, y: _gradient_norms(net, x, y)), {}
    if method == "tracin":
        if not checkpoints:
            raise LabelscanError("--method tracin needs the training checkpoints; pass --checkpoint for each")

        def tracin(x, y):
            return _logits(net, x), sum(_gradient_norms(c, x, y)[1] for c in checkpoints)

        return tracin, {"checkpoints": len(checkpoints)}
    if method == "exact-proximal":
        if training_inputs is None:
            raise LabelscanError("--method exact-proximal needs the training data")
        draws = data_draws(net, training_inputs)
    else:
        draws = draw(summary, settings.samples, settings.seed)
    curvature = fit_curvature(draws)
    damping = settings.damping * curvature.mean_eigenvalue
    if method == "linear":
        def linear(x, y):
            logits, factors = backprop_factors(net, net.params(), x, cross_entropy_cotangent(y))
            return logits, curvature.scores(factors, damping)

        return linear, {"absolute_damping": damping}
    if method == "proximal":
        draws = draw(summary, settings.proximal_samples, settings.seed + 1)
    learning_rate = 1.0 / (top_eigenvalue(draws) + damping)

    def proximal(x, y):
        return _logits(net, x), proximal_scores(draws, x, y, epsilon=settings.epsilon, damping=damping,
                                                steps=settings.steps, learning_rate=learning_rate)

    return proximal, {"absolute_damping": damping, "learning_rate": learning_rate}


def _logits(net: LaftrNet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return forward(net, net.params(), x)


def _gradient_norms(net: LaftrNet, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``net``'s logits and each row's ‖∇θ ℓ‖²."""
    logits, factors = backprop_factors(net, net.params(), x, cross_entropy_cotangent(y))
    return logits, sum(f.squared_norms().double() for f in factors)


def data_draws(net: LaftrNet, inputs: torch.Tensor) -> LaftrDraws:
    """Real training inputs in place of LAFTR draws: the real network, equal weights (exact FSD)."""
    inputs = inputs.reshape(len(inputs), *net.input_shape)
    with torch.no_grad():
        reference = forward(net, net.params(), inputs)
    weights = torch.full((len(inputs),), 1.0 / len(inputs))
    return LaftrDraws(net, inputs, None, None, reference, weights)

