"""Self-influence through the proximal Bregman response, solved by a few SGD steps per example.

θ_m = argmin_θ D̂(θ, θs) + ε·ℓ(x_m, t_m; θ) + (λ/2)‖θ − θs‖², started at θs, and the score is
[ℓ(θs) − ℓ(θ_m)] / ε. Plain gradient steps (not Adam, which normalizes the gradient's scale
away) keep the signal; a small ε keeps the response in the linear regime so the score does
not collapse to the example's loss. All examples of a batch are solved at once with
``torch.func.vmap``, sharing the same LAFTR draws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from labelscan.laftr.fsd import LaftrDraws, stochastic_fsd
from labelscan.laftr.gated import forward

PARAMETER_BUDGET = 8_000_000  # per-example θ copies solved at once (≈ 32 MB each for Δ and its gradient)


def proximal_scores(
    draws: LaftrDraws,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epsilon: float,
    damping: float,
    steps: int,
    learning_rate: float,
    kind: str = "kl",
) -> torch.Tensor:
    """Proximal self-influence of each row of ``x`` (B, *input_shape) with labels ``y`` (B,), float64 (B,).

    Each example carries its own copy of θ, so rows are solved in chunks that keep those
    copies within ``PARAMETER_BUDGET`` numbers, whatever the batch size.
    """
    net = draws.net
    count = sum(p.numel() for p in net.params().values())
    chunk = max(1, PARAMETER_BUDGET // count)
    if len(x) > chunk:
        return torch.cat([
            proximal_scores(draws, x[i : i + chunk], y[i : i + chunk], epsilon=epsilon, damping=damping,
                            steps=steps, learning_rate=learning_rate, kind=kind)
            for i in range(0, len(x), chunk)
        ])
    reference = net.params()

    def example_loss(theta, example, label):
        return F.cross_entropy(forward(net, theta, example.unsqueeze(0)), label.unsqueeze(0))

    def smooth_part(delta, example, label):
        """The objective but its proximity term, whose gradient λΔ is added in closed form."""
        theta = {k: reference[k] + delta[k] for k in reference}
        return stochastic_fsd(theta, draws, kind) + epsilon * example_loss(theta, example, label)

    step = vmap(grad(smooth_part))
    batch = len(x)
    delta = {k: torch.zeros(batch, *v.shape) for k, v in reference.items()}
    with torch.no_grad():
        for _ in range(steps):
            gradient = step(delta, x, y)
            for k in delta:  # Δ ← Δ − η (∇ + λΔ), in place
                delta[k].mul_(1 - learning_rate * damping).sub_(gradient[k], alpha=learning_rate)
        return _loss_decrease(net, delta, x, y) / epsilon


def _loss_decrease(net, delta, x, y) -> torch.Tensor:
    """ℓ(θs) − ℓ(θs + Δ) per example, in float64: the decrease is often below float32 resolution."""
    state = {k: v.double() for k, v in net.layers.state_dict().items()}
    shifted = {k: v + delta[k].double() if k in delta else v for k, v in state.items()}

    def example_loss(theta, example, label):
        logits = functional_call(net.layers, theta, (example.unsqueeze(0),))
        return F.cross_entropy(logits, label.unsqueeze(0))

    inputs = x.double()
    before = vmap(example_loss, in_dims=(None, 0, 0))(state, inputs, y)
    after = vmap(example_loss, in_dims=({k: 0 if k in delta else None for k in state}, 0, 0))(shifted, inputs, y)
    return before - after
