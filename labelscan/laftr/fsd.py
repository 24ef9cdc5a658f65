"""Function space distance estimators: LAFTR (stochastic and closed form) and exact on data.

The discrepancy ρ between two output vectors is ``kl`` (the Bregman divergence of the
cross-entropy in logit space, KL(softmax(reference) ‖ softmax(candidate)), for
classifiers) or ``squared`` (½‖Δz‖², for regression and for the closed form).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacfwd

from labelscan.errors import LabelscanError
from labelscan.laftr.gated import forward, gated_forward, layer_params
from labelscan.laftr.summary import LaftrSummary
from labelscan.model import LaftrNet

DISCREPANCIES = ("kl", "squared")
CLOSED_FORM_MAX_UNITS = 4096  # its second-moment matrices are (2n)² per layer


def discrepancy(reference: torch.Tensor, candidate: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """ρ per row: KL(softmax(reference) ‖ softmax(candidate)) or ½‖candidate − reference‖²."""
    if kind == "kl":
        log_p = F.log_softmax(reference, dim=-1)
        return (log_p.exp() * (log_p - F.log_softmax(candidate, dim=-1))).sum(-1)
    if kind == "squared":
        return 0.5 * ((candidate - reference) ** 2).sum(-1)
    raise LabelscanError(f"unknown discrepancy {kind!r}; use one of {', '.join(DISCREPANCIES)}")


@dataclass
class LaftrDraws:
    """Inputs and gates drawn once from a summary, reused across parameter settings.

    Reusing them (common random numbers) makes differences between settings far less noisy
    than fresh draws would. ``reference`` holds the logits at θs.
    """

    net: LaftrNet
    x: torch.Tensor
    gates: list[torch.Tensor]
    pool_indices: list[torch.Tensor]
    reference: torch.Tensor
    weights: torch.Tensor  # (S,) mixture weight of each draw, summing to 1

    def __len__(self) -> int:
        return len(self.x)


def draw(summary: LaftrSummary, num_samples: int, seed: int = 0) -> LaftrDraws:
    """S draws: a component per draw in proportion to the prior (stratified), then x ~ N(m, C) and g ~ Bernoulli(μ)."""
    if num_samples < 1:
        raise LabelscanError("the number of LAFTR samples must be at least 1")
    generator = torch.Generator().manual_seed(seed)
    counts = _stratified_counts(summary.prior, num_samples)
    xs, gates, weights = [], [[] for _ in summary.active], []
    for component, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        xs.append(summary.moments.sample(component, count, generator))
        for k, active in enumerate(summary.active):
            probability = active[component].expand(count, *active.shape[1:])
            gates[k].append(torch.bernoulli(probability, generator=generator))
        weights.append(torch.full((count,), float(summary.prior[component]) / count))
    net = summary.net
    x = torch.cat(xs).view(-1, *net.input_shape).float()
    gate_tensors = [torch.cat(g) for g in gates]
    with torch.no_grad():
        reference, pool_indices = gated_forward(net, net.params(), x, gate_tensors)
    weights = torch.cat(weights)
    return LaftrDraws(net, x, gate_tensors, pool_indices, reference, weights / weights.sum())


def stochastic_fsd(params: dict[str, torch.Tensor], draws: LaftrDraws, kind: str = "kl") -> torch.Tensor:
    """The LAFTR Monte Carlo estimate of FSD(θ, θs); differentiable in ``params`` (θ)."""
    candidate, _ = gated_forward(draws.net, params, draws.x, draws.gates, draws.pool_indices)
    return (draws.weights * discrepancy(draws.reference, candidate, kind)).sum()


def deterministic_fsd(summary: LaftrSummary, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The closed-form LAFTR estimate of E[½‖f(x;θ) − f(x;θs)‖²] under the gated network.

    Propagates the mean and second moment of the stacked activations [a; a′] of the two
    parameter settings. Gates are independent of the inputs and shared by both streams, so
    at a ReLU E[g_i g_j] is μ_i μ_j for different units and μ_i for the same unit (which
    covers a unit's pair a_i, a′_i). Affine layers are expanded to dense matrices, so this
    suits small networks; MaxPool has no closed form and is refused.
    """
    net = summary.net
    if any(isinstance(layer, nn.MaxPool2d) for layer in net.layers):
        raise LabelscanError("the closed-form FSD cannot model MaxPool layers; use the stochastic estimate")
    widest = max(math.prod(a.shape[1:]) for a in summary.active) if summary.active else 0
    if max(widest, math.prod(net.input_shape)) > CLOSED_FORM_MAX_UNITS:
        raise LabelscanError(f"the closed-form FSD handles layers of up to {CLOSED_FORM_MAX_UNITS} units; "
                             "use the stochastic estimate for this network")
    steps = _stacked_affine_maps(net, params)
    total = torch.zeros((), dtype=torch.float64)
    for component in range(summary.num_components):
        mean = summary.moments.mean[component].double()
        second = summary.moments.covariance_matrix(component).double() + torch.outer(mean, mean)
        stacked_mean = torch.cat([mean, mean])
        stacked_second = second.repeat(2, 2)
        relu_count = 0
        for step in steps:
            if step is None:  # a ReLU: shared gates
                mu = summary.active[relu_count][component].flatten().double()
                relu_count += 1
                gate_mean = torch.cat([mu, mu])
                n = mu.numel()
                same_unit = torch.eye(n, dtype=torch.float64).repeat(2, 2).bool()
                gate_second = torch.where(same_unit, gate_mean.unsqueeze(1).expand(2 * n, 2 * n),
                                          torch.outer(gate_mean, gate_mean))
                stacked_mean = gate_mean * stacked_mean
                stacked_second = gate_second * stacked_second
                continue
            matrix, offset = step
            mapped_mean = matrix @ stacked_mean
            stacked_second = (
                matrix @ stacked_second @ matrix.T
                + torch.outer(mapped_mean, offset) + torch.outer(offset, mapped_mean) + torch.outer(offset, offset)
            )
            stacked_mean = mapped_mean + offset
        n = stacked_mean.numel() // 2
        second_ref, cross, second_new = stacked_second[:n, :n], stacked_second[:n, n:], stacked_second[n:, n:]
        expected = 0.5 * (torch.trace(second_ref) - 2 * torch.trace(cross) + torch.trace(second_new))
        total = total + summary.prior[component].double() * expected
    return total


def _stacked_affine_maps(net: LaftrNet, params: dict[str, torch.Tensor]) -> list:
    """Per layer, (blockdiag(W, W′), [b; b′]) acting on [a; a′], or None for a ReLU."""
    reference = net.params()
    shape = net.input_shape
    steps = []
    for index, layer in enumerate(net.layers):
        if isinstance(layer, nn.ReLU):
            steps.append(None)
            continue
        (w_ref, b_ref), out_shape = _affine_matrix(layer, index, reference, shape)
        (w_new, b_new), _ = _affine_matrix(layer, index, params, shape)
        steps.append((torch.block_diag(w_ref, w_new), torch.cat([b_ref, b_new])))
        shape = out_shape
    return steps


def _affine_matrix(layer: nn.Module, index: int, params: dict[str, torch.Tensor], shape: tuple[int, ...]):
    """(W, b) in float64 with layer(x).flatten() = W x.flatten() + b, and the output shape."""
    own = {name: value.double() for name, value in layer_params(params, index).items()}
    layer64 = copy.deepcopy(layer).double()

    def apply(flat: torch.Tensor) -> torch.Tensor:
        return functional_call(layer64, own, (flat.view(1, *shape),)).flatten()

    zero = torch.zeros(math.prod(shape), dtype=torch.float64)
    out_shape = tuple(functional_call(layer64, own, (zero.view(1, *shape),)).shape[1:])
    return (jacfwd(apply)(zero), apply(zero)), out_shape


def exact_fsd(
    net: LaftrNet,
    params: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    kind: str = "kl",
    batch_size: int = 1024,
) -> torch.Tensor:
    """The true FSD on data: mean over ``inputs`` of ρ(f(x; θ), f(x; θs)) for the real network."""
    reference = net.params()
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            x = inputs[start : start + batch_size]
            total += discrepancy(forward(net, reference, x), forward(net, params, x), kind).double().sum()
    return total / len(inputs)


def _stratified_counts(prior: torch.Tensor, total: int) -> torch.Tensor:
    """Largest-remainder allocation of ``total`` draws to components, deterministic."""
    exact = prior.double() * total
    counts = exact.floor().long()
    remainder = total - int(counts.sum())
    if remainder:
        counts[torch.argsort(exact - counts, descending=True)[:remainder]] += 1
    return counts
