"""Per-example gradients of Linear and Conv2d layers, kept in factored form.

For one example a layer's weight gradient is Dᵀ A: A (T, in+1) holds the layer's inputs
at each of T positions (unfolded patches for a convolution, one row for a Linear layer)
with a trailing 1 for the bias, and D (T, out) the gradients at its pre-activations. Both
come from one batched forward and backward pass, so per-example gradient norms and
curvature-weighted scores cost about one gradient per example and never materialize a
(B, #parameters) matrix for Linear layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from labelscan.errors import LabelscanError
from labelscan.laftr.gated import Tap, gated_forward
from labelscan.model import LaftrNet


@dataclass
class LayerFactors:
    """Factored per-row gradients of one layer: ``inputs`` (B, T, in[+1]), ``grads`` (B, T, out)."""

    index: int
    inputs: torch.Tensor
    grads: torch.Tensor

    def gradients(self) -> torch.Tensor:
        """The dense per-row weight gradients (B, out, in[+1])."""
        return torch.einsum("bto,bti->boi", self.grads, self.inputs)

    def squared_norms(self) -> torch.Tensor:
        """‖Dᵀ A‖²_F per row, without forming the gradient when T = 1."""
        if self.inputs.shape[1] == 1:
            return (self.grads[:, 0] ** 2).sum(1) * (self.inputs[:, 0] ** 2).sum(1)
        return (self.gradients() ** 2).sum((1, 2))


def backprop_factors(
    net: LaftrNet,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    cotangent,
    gates: list[torch.Tensor] | None = None,
    pool_indices: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[LayerFactors]]:
    """Forward ``x``, backpropagate ``cotangent(logits)`` (B, C) and factor each layer's gradient.

    Rows are independent, so the gradient at row b's pre-activations is that row's own
    Jacobian transposed times its cotangent: one backward pass serves the whole batch.
    ``gates=None`` is the real network; otherwise the gated network of the LAFTR draws.
    """
    taps: list[Tap] = []
    with torch.enable_grad():
        tracked = {name: value.detach().requires_grad_() for name, value in params.items()}
        logits, _ = gated_forward(net, tracked, x.detach(), gates, pool_indices, taps)
        outputs = [tap.outputs for tap in taps]
        grads = torch.autograd.grad(logits, outputs, grad_outputs=cotangent(logits.detach()))
    return logits.detach(), [_factor(tap, g) for tap, g in zip(taps, grads)]


def _factor(tap: Tap, grad: torch.Tensor) -> LayerFactors:
    layer, inputs = tap.layer, tap.inputs.detach()
    if isinstance(layer, nn.Linear):
        rows, grads = inputs.unsqueeze(1), grad.unsqueeze(1)
    else:
        if layer.groups != 1:
            raise LabelscanError(f"layer {tap.index} is a grouped convolution, which influence scores do not support yet")
        rows = F.unfold(inputs, layer.kernel_size, layer.dilation, layer.padding, layer.stride).transpose(1, 2)
        grads = grad.flatten(2).transpose(1, 2)
    if layer.bias is not None:
        rows = torch.cat([rows, torch.ones(*rows.shape[:2], 1, dtype=rows.dtype)], dim=2)
    return LayerFactors(tap.index, rows, grads.detach())


def cross_entropy_cotangent(labels: torch.Tensor):
    """∂ CE(logits, labels)/∂ logits = softmax(logits) − onehot(labels), per row."""

    def cotangent(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)

    return cotangent
