"""Forward passes through a LaftrNet with explicit parameters.

``gated_forward`` is LAFTR's linearization: each ReLU multiplies its input by a fixed gate
instead of testing its sign, and each MaxPool selects what the reference stream selected.
Without gates it is the real network (a ReLU is the gate 1[s > 0]). θ is passed as a dict
so that ``torch.func`` can differentiate and vectorize over it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from labelscan.model import LaftrNet

PARAMETRIZED = (nn.Linear, nn.Conv2d)


@dataclass
class Tap:
    """What a Linear or Conv2d layer saw: its input and its pre-activation output."""

    index: int
    layer: nn.Module
    inputs: torch.Tensor
    outputs: torch.Tensor


def layer_params(params: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """The entries of θ that belong to layer ``index`` of the Sequential, keyed by local name."""
    prefix = f"{index}."
    return {name[len(prefix):]: value for name, value in params.items() if name.startswith(prefix)}


def forward(net: LaftrNet, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits of the real ReLU network at θ = ``params``; ``x`` is ``(B, *input_shape)``."""
    return functional_call(net.layers, params, (x,))


def gated_forward(
    net: LaftrNet,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    gates: list[torch.Tensor] | None,
    pool_indices: list[torch.Tensor] | None = None,
    taps: list[Tap] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of the gated linear network, and the MaxPool selections it used.

    ``gates[k]`` replaces the k-th ReLU (same shape as its input, values in {0, 1});
    ``gates=None`` keeps the real ReLUs. With ``pool_indices=None`` each MaxPool selects by
    its own input (the reference stream) and returns those selections; pass them back to
    make another parameter setting use the same selections, as LAFTR shares gates between
    the two streams. A ``taps`` list collects each Linear/Conv2d layer's input and output.
    """
    chosen: list[torch.Tensor] = []
    relu_count = pool_count = 0
    for index, layer in enumerate(net.layers):
        if isinstance(layer, nn.ReLU):
            x = torch.relu(x) if gates is None else x * gates[relu_count]
            relu_count += 1
        elif isinstance(layer, nn.MaxPool2d):
            if pool_indices is None:
                x, selected = F.max_pool2d(
                    x, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                    ceil_mode=layer.ceil_mode, return_indices=True,
                )
                chosen.append(selected)
            else:
                selected = pool_indices[pool_count]
                x = torch.gather(x.flatten(-2), -1, selected.flatten(-2)).view_as(selected)
            pool_count += 1
        else:
            inputs = x
            x = functional_call(layer, layer_params(params, index), (x,))
            if taps is not None and isinstance(layer, PARAMETRIZED):
                taps.append(Tap(index, layer, inputs, x))
    return x, chosen if pool_indices is None else pool_indices
