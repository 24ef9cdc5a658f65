"""The curvature of the LAFTR estimate at θs, in eigenvalue-corrected Kronecker form.

At θ = θs the gradient of D̂ vanishes, so its Hessian is exactly the Gauss–Newton matrix
H = Σ_s w_s J_sᵀ Λ_s J_s of the gated network over the LAFTR draws (Λ_s is the Hessian of
ρ in the output: diag(p) − ppᵀ for the KL, the identity for squared error). Storing H is
out of the question for real networks, so per layer we keep the eigenbases of its two
Kronecker factors E[aaᵀ] and E[δδᵀ] and, in that basis, the exact diagonal of H (EK-FAC,
George et al. 2018). Everything comes from the summary alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from labelscan.influence.factors import LayerFactors, backprop_factors
from labelscan.laftr.fsd import LaftrDraws
from labelscan.linalg import eigh


@dataclass
class LayerCurvature:
    """One layer's eigenbases ``input_basis`` (in, in), ``output_basis`` (out, out) and the
    diagonal ``eigenvalues`` (out, in) of the layer's block of H in the rotated basis."""

    index: int
    input_basis: torch.Tensor
    output_basis: torch.Tensor
    eigenvalues: torch.Tensor

    def _rotated(self, factors: LayerFactors) -> tuple[torch.Tensor, torch.Tensor]:
        return factors.grads @ self.output_basis, factors.inputs @ self.input_basis

    def squared_coordinates_sum(self, factors: LayerFactors, copies: int = 1) -> torch.Tensor:
        """Σ over rows of the squared gradient coordinates in the eigenbasis, (out, in).

        With ``copies`` > 1, each run of that many consecutive rows shares its inputs (one
        draw, one row per output direction), which is rotated once and, for rank-one rows,
        summed over the run before the outer product.
        """
        grads = factors.grads @ self.output_basis
        inputs = factors.inputs[::copies] @ self.input_basis
        if inputs.shape[1] == 1:
            grouped = (grads[:, 0] ** 2).view(len(inputs), copies, -1).sum(1)
            return grouped.T @ (inputs[:, 0] ** 2)
        inputs = inputs.repeat_interleave(copies, dim=0)
        return (torch.einsum("bto,bti->boi", grads, inputs) ** 2).sum(0)

    def scores(self, factors: LayerFactors, damping: float) -> torch.Tensor:
        """gᵀ (H_layer + λI)⁻¹ g per row, (B,); rank-one rows never form the gradient."""
        grads, inputs = self._rotated(factors)
        inverse = 1.0 / (self.eigenvalues + damping)
        if inputs.shape[1] == 1:
            return (((grads[:, 0] ** 2) @ inverse) * inputs[:, 0] ** 2).sum(1)
        return ((torch.einsum("bto,bti->boi", grads, inputs) ** 2) * inverse).sum((1, 2))


@dataclass
class Curvature:
    """EK-FAC of H per layer, with the scalars the solvers derive their settings from."""

    layers: list[LayerCurvature]

    @property
    def num_parameters(self) -> int:
        return sum(layer.eigenvalues.numel() for layer in self.layers)

    @property
    def mean_eigenvalue(self) -> float:
        """tr(H) / #parameters: the natural unit for the damping λ."""
        return float(sum(layer.eigenvalues.sum() for layer in self.layers)) / self.num_parameters

    def scores(self, factors: list[LayerFactors], damping: float) -> torch.Tensor:
        """gᵀ (H + λI)⁻¹ g per row, with H in its EK-FAC form."""
        return sum(layer.scores(factor, damping).double() for layer, factor in zip(self.layers, factors))


def output_hessian_root(reference: torch.Tensor, kind: str) -> torch.Tensor:
    """L_s with L_s L_sᵀ = ∂²ρ/∂z² at z = reference, per draw: (S, C, C)."""
    count, classes = reference.shape
    if kind == "squared":
        return torch.eye(classes).expand(count, classes, classes)
    p = torch.softmax(reference, dim=1)
    root_p = p.sqrt()
    return torch.diag_embed(root_p) - p.unsqueeze(2) * root_p.unsqueeze(1)


def fit_curvature(draws: LaftrDraws, kind: str = "kl", chunk: int = 256) -> Curvature:
    """Two passes over the draws: Kronecker factors and their eigenbases, then the corrected diagonal."""
    net, params = draws.net, draws.net.params()
    input_second: dict[int, torch.Tensor] = {}
    output_second: dict[int, torch.Tensor] = {}
    copies = draws.reference.shape[1]
    for rows in _chunks(draws, kind, chunk):
        for factor, weight in _factor_rows(net, params, rows):
            positions = factor.inputs.shape[1]
            inputs, weight = factor.inputs[::copies], weight[::copies] * copies  # the copies share inputs
            weighted = inputs * (weight / positions).sqrt().view(-1, 1, 1)
            input_second[factor.index] = input_second.get(factor.index, 0) + torch.einsum(
                "bti,btj->ij", weighted, weighted).double()
            output_second[factor.index] = output_second.get(factor.index, 0) + torch.einsum(
                "bto,btp->op", factor.grads, factor.grads).double()
    bases = {
        index: (_eigenbasis(input_second[index]), _eigenbasis(output_second[index])) for index in input_second
    }
    eigenvalues: dict[int, torch.Tensor] = {}
    for rows in _chunks(draws, kind, chunk):
        for factor, _ in _factor_rows(net, params, rows):
            input_basis, output_basis = bases[factor.index]
            basis = LayerCurvature(factor.index, input_basis, output_basis, None)
            squares = basis.squared_coordinates_sum(factor, copies)
            eigenvalues[factor.index] = eigenvalues.get(factor.index, 0) + squares.double()
    return Curvature([
        LayerCurvature(index, bases[index][0], bases[index][1], eigenvalues[index].float()) for index in bases
    ])


def _chunks(draws: LaftrDraws, kind: str, chunk: int):
    """Draws replicated once per output class, each copy carrying one column of √w_s L_s."""
    roots = output_hessian_root(draws.reference, kind)
    classes = roots.shape[2]
    for start in range(0, len(draws), chunk):
        part = slice(start, start + chunk)
        repeat = lambda t: t[part].repeat_interleave(classes, dim=0)  # noqa: E731
        weights = draws.weights[part]
        cotangents = (roots[part] * weights.sqrt().view(-1, 1, 1)).transpose(1, 2).reshape(-1, roots.shape[1])
        yield (
            repeat(draws.x),
            None if draws.gates is None else [repeat(g) for g in draws.gates],
            [repeat(i) for i in draws.pool_indices] if draws.pool_indices else draws.pool_indices,
            cotangents,
            weights.repeat_interleave(classes) / classes,
        )


def _factor_rows(net, params, rows):
    x, gates, pool_indices, cotangents, weights = rows
    _, factors = backprop_factors(net, params, x, lambda _: cotangents, gates, pool_indices)
    return [(factor, weights) for factor in factors]


def _eigenbasis(matrix: torch.Tensor) -> torch.Tensor:
    _, vectors = eigh(matrix)
    return vectors.float()


def top_eigenvalue(draws: LaftrDraws, kind: str = "kl", iterations: int = 30, seed: int = 0) -> float:
    """The largest eigenvalue of H by power iteration with exact Gauss–Newton products."""
    from torch.func import jvp, vjp

    from labelscan.laftr.gated import gated_forward

    net, params = draws.net, draws.net.params()

    def outputs(theta):
        return gated_forward(net, theta, draws.x, draws.gates, draws.pool_indices)[0]

    roots = output_hessian_root(draws.reference, kind)
    hessian_out = roots @ roots.transpose(1, 2) * draws.weights.view(-1, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    vector = {k: torch.randn(v.shape, generator=generator) for k, v in params.items()}
    value = 0.0
    _, pullback = vjp(outputs, params)
    for _ in range(iterations):
        norm = math.sqrt(sum(float((v**2).sum()) for v in vector.values()))
        vector = {k: v / norm for k, v in vector.items()}
        _, pushed = jvp(outputs, (params,), (vector,))
        (product,) = pullback(torch.einsum("sij,sj->si", hessian_out, pushed))
        value = sum(float((product[k] * vector[k]).sum()) for k in vector)
        vector = product
    return value
