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
from torch.func import grad, vmap

from labelscan.laftr.fsd import LaftrDraws, stochastic_fsd
from labelscan.laftr.gated import forward


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
    """Proximal self-influence of each row of ``x`` (B, *input_shape) with labels ``y`` (B,), float64 (B,)."""
    net = draws.net
    reference = net.params()

    def example_loss(theta, example, label):
        return F.cross_entropy(forward(net, theta, example.unsqueeze(0)), label.unsqueeze(0))

    def objective(theta, example, label):
        distance = stochastic_fsd(theta, draws, kind)
        proximity = sum(((theta[k] - reference[k]) ** 2).sum() for k in theta)
        return distance + epsilon * example_loss(theta, example, label) + 0.5 * damping * proximity

    step = vmap(grad(objective))
    losses = vmap(example_loss)
    batch = len(x)
    theta = {k: v.unsqueeze(0).expand(batch, *v.shape).clone() for k, v in reference.items()}
    with torch.no_grad():
        before = losses(theta, x, y).double()
        for _ in range(steps):
            gradient = step(theta, x, y)
            theta = {k: theta[k] - learning_rate * gradient[k] for k in theta}
        after = losses(theta, x, y).double()
    return (before - after) / epsilon
