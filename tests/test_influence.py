"""Per-example gradient factors, EK-FAC curvature and the self-influence solvers, checked
against dense exact computations on tiny networks and against the known flips of the digits
fixture."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, DIGITS_SCALE, flatten, perturbed, synthetic_data, tiny_net, unflatten
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

from labelscan import InfluenceSettings, Preprocessing, open_dataset
from labelscan.influence.curvature import fit_curvature, top_eigenvalue
from labelscan.influence.factors import backprop_factors, cross_entropy_cotangent
from labelscan.influence.proximal import proximal_scores
from labelscan.laftr.fsd import LaftrDraws, draw, stochastic_fsd
from labelscan.laftr.gated import gated_forward
from labelscan.laftr.summary import summarize_batches
from labelscan.model import load_model
from labelscan.pipeline import self_influence


def summary_of(net, per_class=True, count=600, seed=0):
    x, y = synthetic_data(net.input_shape, net.num_outputs, count=count, seed=seed)
    return summarize_batches(net, [(x, y)], per_class=per_class), x, y


def small_mlp(seed=0):
    return tiny_net(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3),
                    input_shape=(4,), seed=seed)


def small_cnn(seed=0):
    return tiny_net(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3),
                    input_shape=(1, 6, 6), seed=seed)


def dense_gradients(params, layer_index, per_example):
    """Per-example gradients of one layer as (B, out, in[+1]), the bias as the last column."""
    weight = per_example[f"{layer_index}.weight"]
    dense = weight.reshape(weight.shape[0], weight.shape[1], -1)
    bias = per_example.get(f"{layer_index}.bias")
    return dense if bias is None else torch.cat([dense, bias.unsqueeze(2)], dim=2)


def per_example_ce_gradients(net, params, x, y, gates=None, pool_indices=None):
    """torch.func reference: vmap(grad) of each example's cross-entropy (of the gated net when gates are given)."""

    def loss(theta, example, label, example_gates, example_pools):
        logits, _ = gated_forward(net, theta, example.unsqueeze(0),
                                  None if example_gates is None else [g.unsqueeze(0) for g in example_gates],
                                  None if example_pools is None else [i.unsqueeze(0) for i in example_pools])
        return F.cross_entropy(logits, label.unsqueeze(0))

    gate_dims = None if gates is None else [0] * len(gates)
    pool_dims = None if pool_indices is None else [0] * len(pool_indices)
    return vmap(grad(loss), in_dims=(None, 0, 0, gate_dims, pool_dims))(params, x, y, gates, pool_indices)


# ------------------------------------------------------------------ per-example gradient factors


FACTOR_NETS = {
    "linear": lambda: tiny_net(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4, bias=False), nn.ReLU(),
                               nn.Linear(4, 3), input_shape=(5,)),
    "conv": lambda: tiny_net(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(3, 4, 2, stride=1, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(4, 2, 3, stride=(2, 1), padding=(0, 1)), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * 2 * 5, 5), nn.ReLU(), nn.Linear(5, 3), input_shape=(2, 7, 7)),
}


@pytest.mark.parametrize("name", FACTOR_NETS)
def test_factors_equal_torch_func_per_example_gradients(name):
    net = FACTOR_NETS[name]()
    params = perturbed(net.params(), 0.05)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(9, *net.input_shape, generator=generator)
    y = torch.randint(0, net.num_outputs, (9,), generator=generator)
    logits, factors = backprop_factors(net, params, x, cross_entropy_cotangent(y))
    torch.testing.assert_close(logits, functional_call(net.layers, params, (x,)))
    expected = per_example_ce_gradients(net, params, x, y)
    parametrized = [i for i, layer in enumerate(net.layers) if isinstance(layer, (nn.Linear, nn.Conv2d))]
    assert [f.index for f in factors] == parametrized
    total = torch.zeros(len(x))
    for factor in factors:
        dense = dense_gradients(params, factor.index, expected)
        torch.testing.assert_close(factor.gradients(), dense, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(factor.squared_norms(), (dense**2).sum((1, 2)), rtol=1e-4, atol=1e-7)
        total += factor.squared_norms()
    torch.testing.assert_close(total, (flatten_rows(expected) ** 2).sum(1), rtol=1e-4, atol=1e-7)


def flatten_rows(per_example):
    return torch.cat([v.reshape(len(v), -1) for v in per_example.values()], dim=1)


def test_factors_of_the_gated_network_with_maxpool_equal_torch_func():
    net = tiny_net(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 3, stride=2),
                   nn.ReLU(), nn.Flatten(), nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3), input_shape=(1, 6, 6))
    summary, _, _ = summary_of(net)
    draws = draw(summary, 12, seed=0)
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(1))
    params = perturbed(net.params(), 0.05)
    _, factors = backprop_factors(net, params, draws.x, cross_entropy_cotangent(y), draws.gates, draws.pool_indices)
    expected = per_example_ce_gradients(net, params, draws.x, y, draws.gates, draws.pool_indices)
    for factor in factors:
        torch.testing.assert_close(factor.gradients(), dense_gradients(params, factor.index, expected),
                                   rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ EK-FAC curvature vs the dense Hessian


def dense_hessian(draws: LaftrDraws, kind: str) -> torch.Tensor:
    reference = draws.net.params()
    return hessian(lambda flat: stochastic_fsd(unflatten(flat, reference), draws, kind))(flatten(reference)).double()


@pytest.fixture(scope="module")
def mlp_curvature():
    net = small_mlp()
    summary, x, y = summary_of(net)
    draws = draw(summary, 500, seed=0)
    return net, x, y, draws, fit_curvature(draws, "kl"), dense_hessian(draws, "kl")


def test_ekfac_trace_equals_dense_hessian_trace(mlp_curvature):
    net, _, _, _, curvature, h = mlp_curvature
    assert curvature.num_parameters == h.shape[0] == sum(v.numel() for v in net.params().values())
    assert curvature.mean_eigenvalue == pytest.approx(float(torch.trace(h)) / h.shape[0], rel=1e-4)


def test_ekfac_trace_equals_dense_hessian_trace_conv():
    net = small_cnn()
    summary, _, _ = summary_of(net, per_class=False)
    draws = draw(summary, 300, seed=0)
    h = dense_hessian(draws, "kl")
    assert fit_curvature(draws, "kl").mean_eigenvalue == pytest.approx(float(torch.trace(h)) / h.shape[0], rel=1e-4)


def test_top_eigenvalue_matches_dense(mlp_curvature):
    _, _, _, draws, _, h = mlp_curvature
    dense_top = float(torch.linalg.eigvalsh(h)[-1])
    assert top_eigenvalue(draws, "kl") == pytest.approx(dense_top, rel=0.02)


def exact_inverse_scores(h, gradients, damping):
    system = h + damping * torch.eye(h.shape[0], dtype=torch.float64)
    g = gradients.double()
    return (g * torch.linalg.solve(system, g.T).T).sum(1)


def test_ekfac_scores_rank_like_the_exact_inverse_hessian(mlp_curvature):
    net, x, y, _, curvature, h = mlp_curvature
    params = net.params()
    examples, labels = x[:80], y[:80]
    _, factors = backprop_factors(net, params, examples, cross_entropy_cotangent(labels))
    damping = 0.1 * curvature.mean_eigenvalue
    approximate = curvature.scores(factors, damping)
    gradients = flatten_rows(per_example_ce_gradients(net, params, examples, labels))
    exact = exact_inverse_scores(h, gradients, damping)
    assert spearmanr(approximate.numpy(), exact.numpy())[0] >= 0.9
    # the scores are on the same scale, not just in the same order
    assert float(approximate.median() / exact.median()) == pytest.approx(1.0, abs=0.5)


def layer_blocks(net, hessian_matrix):
    """Each Linear/Conv2d layer's block of the dense Hessian as (out, in+1, out, in+1), bias last."""
    params = net.params()
    positions, start = {}, 0
    for k, v in params.items():
        positions[k] = torch.arange(start, start + v.numel()).view(v.shape[0], -1)
        start += v.numel()
    blocks = {}
    for index, layer in enumerate(net.layers):
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            parts = [positions[f"{index}.weight"]]
            if f"{index}.bias" in positions:
                parts.append(positions[f"{index}.bias"])
            idx = torch.cat(parts, dim=1)
            out, width = idx.shape
            blocks[index] = hessian_matrix[idx.flatten()][:, idx.flatten()].view(out, width, out, width)
    return blocks


@pytest.mark.parametrize("make", [small_mlp, small_cnn])
def test_ekfac_eigenvalues_are_the_exact_hessian_diagonal_in_the_kronecker_eigenbasis(make):
    """EK-FAC's defining property: per layer, λ[o, i] = (q_o ⊗ q_i)ᵀ H (q_o ⊗ q_i) for the dense H."""
    net = make()
    summary, _, _ = summary_of(net)
    draws = draw(summary, 300, seed=0)
    curvature = fit_curvature(draws, "kl")
    blocks = layer_blocks(net, dense_hessian(draws, "kl"))
    assert [layer.index for layer in curvature.layers] == list(blocks)
    for layer in curvature.layers:
        qo, qi = layer.output_basis.double(), layer.input_basis.double()
        for basis in (qo, qi):  # orthonormal bases
            torch.testing.assert_close(basis.T @ basis, torch.eye(len(basis), dtype=torch.float64), atol=1e-5, rtol=0)
        rotated = torch.einsum("ao,bi,abcd,cp,dj->oipj", qo, qi, blocks[layer.index], qo, qi)
        diagonal = torch.diagonal(rotated.reshape(qo.shape[1] * qi.shape[1], -1)).view(qo.shape[1], qi.shape[1])
        scale = float(diagonal.abs().max())
        torch.testing.assert_close(layer.eigenvalues.double(), diagonal, rtol=1e-3, atol=1e-5 * scale)


def test_ekfac_scores_use_the_rotated_per_example_gradient_conv():
    """For convolutions (many positions per example) each example's score is
    Σ_{o,i} [(Q_oᵀ G Q_i)_{oi}]² / (λ_{oi} + damping), with G the dense per-example gradient."""
    net = small_cnn()
    summary, x, y = summary_of(net)
    curvature = fit_curvature(draw(summary, 300, seed=0), "kl")
    params = net.params()
    _, factors = backprop_factors(net, params, x[:20], cross_entropy_cotangent(y[:20]))
    per_example = per_example_ce_gradients(net, params, x[:20], y[:20])
    damping = 0.1 * curvature.mean_eigenvalue
    expected = torch.zeros(20, dtype=torch.float64)
    for layer in curvature.layers:
        g = dense_gradients(params, layer.index, per_example).double()
        rotated = layer.output_basis.double().T @ g @ layer.input_basis.double()
        expected += (rotated**2 / (layer.eigenvalues.double() + damping)).sum((1, 2))
    torch.testing.assert_close(curvature.scores(factors, damping), expected, rtol=1e-4, atol=0)


def test_ekfac_scores_rank_like_the_exact_inverse_hessian_conv():
    net = small_cnn()
    summary, x, y = summary_of(net)
    draws = draw(summary, 300, seed=0)
    curvature, h = fit_curvature(draws, "kl"), dense_hessian(draws, "kl")
    params = net.params()
    _, factors = backprop_factors(net, params, x[:80], cross_entropy_cotangent(y[:80]))
    damping = 0.1 * curvature.mean_eigenvalue
    exact = exact_inverse_scores(h, flatten_rows(per_example_ce_gradients(net, params, x[:80], y[:80])), damping)
    assert spearmanr(curvature.scores(factors, damping).numpy(), exact.numpy())[0] >= 0.9


def test_ekfac_is_exact_for_a_single_linear_layer_with_squared_error():
    """One Linear layer and ρ = ½‖Δz‖²: H = Σ_s w_s [x_s; 1][x_s; 1]ᵀ ⊗ I is exactly Kronecker, so EK-FAC is H."""
    net = tiny_net(nn.Linear(6, 3), input_shape=(6,))
    summary, x, y = summary_of(net)
    draws = draw(summary, 400, seed=0)
    curvature = fit_curvature(draws, "squared")
    h = dense_hessian(draws, "squared")
    # the spectrum is the dense one
    ekfac_spectrum = torch.sort(torch.cat([layer.eigenvalues.flatten() for layer in curvature.layers]).double())[0]
    torch.testing.assert_close(ekfac_spectrum, torch.linalg.eigvalsh(h), rtol=1e-4, atol=1e-6)
    # and the inverse-curvature scores are exact, at small and large damping
    _, factors = backprop_factors(net, net.params(), x[:50], cross_entropy_cotangent(y[:50]))
    gradients = flatten_rows(per_example_ce_gradients(net, net.params(), x[:50], y[:50]))
    for relative in (1e-3, 0.1, 10.0):
        damping = relative * curvature.mean_eigenvalue
        torch.testing.assert_close(curvature.scores(factors, damping), exact_inverse_scores(h, gradients, damping),
                                   rtol=1e-3, atol=0)


# ------------------------------------------------------------------ proximal solver


def double_draws(draws: LaftrDraws) -> LaftrDraws:
    net = copy.copy(draws.net)
    net.layers = copy.deepcopy(draws.net.layers).double()
    return LaftrDraws(net, draws.x.double(), [g.double() for g in draws.gates], draws.pool_indices,
                      draws.reference.double(), draws.weights.double())


@pytest.fixture(scope="module")
def double_problem():
    net = small_mlp()
    summary, x, y = summary_of(net)
    draws = double_draws(draw(summary, 300, seed=0))
    params = draws.net.params()
    examples, labels = x[:24].double(), y[:24]
    gradients = flatten_rows(per_example_ce_gradients(draws.net, params, examples, labels))
    return draws, examples, labels, gradients


def test_one_proximal_step_is_learning_rate_times_squared_gradient_norm(double_problem):
    draws, x, y, gradients = double_problem
    learning_rate = 0.05
    scores = proximal_scores(draws, x, y, epsilon=1e-4, damping=0.3, steps=1, learning_rate=learning_rate)
    expected = learning_rate * (gradients**2).sum(1)
    assert float(expected.min()) > 1e-4
    torch.testing.assert_close(scores, expected, rtol=1e-3, atol=0)


def test_many_proximal_steps_converge_to_the_linear_response(double_problem):
    """Small ε, many gradient steps: [ℓ(θs) − ℓ(θ_m)]/ε → gᵀ(H + λI)⁻¹g with H the dense Hessian of D̂."""
    draws, x, y, gradients = double_problem
    h = dense_hessian(draws, "kl")
    top = float(torch.linalg.eigvalsh(h)[-1])
    damping = 0.5 * top  # gradient descent contracts by ≤ 1 − 0.5/1.5 per step: 30 steps reach ~1e-5
    scores = proximal_scores(draws, x, y, epsilon=1e-5, damping=damping, steps=30,
                             learning_rate=1.0 / (top + damping))
    torch.testing.assert_close(scores, exact_inverse_scores(h, gradients, damping), rtol=2e-3, atol=0)


# ------------------------------------------------------------------ the digits fixture with known flips


FAST = {"samples": 1000}


@pytest.fixture(scope="module")
def linear_scores(digits_summary, digits_dataset):
    return self_influence(digits_summary, digits_dataset, InfluenceSettings(method="linear", seed=0, **FAST))


@pytest.fixture(scope="module")
def loss_scores(digits_summary, digits_dataset):
    return self_influence(digits_summary, digits_dataset, InfluenceSettings(method="loss"))


@pytest.fixture(scope="module")
def digits_subset(tmp_path_factory, digits):
    """60 flipped and 180 clean rows (seeded), as their own Parquet file; returns (dataset, rows)."""
    rng = np.random.default_rng(0)
    rows = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(digits.flipped), 60, replace=False),
        rng.choice(np.flatnonzero(~digits.flipped), 180, replace=False),
    ]))
    path = tmp_path_factory.mktemp("digits") / "subset.parquet"
    pd.read_parquet(FIXTURES / "digits_noisy.parquet").iloc[rows].to_parquet(path, index=False)
    dataset = open_dataset(path, id_column="example_id", preprocessing=Preprocessing(scale=DIGITS_SCALE))
    return dataset, rows


@pytest.fixture(scope="module")
def proximal_subset_scores(digits_summary, digits_subset):
    dataset, _ = digits_subset
    return self_influence(digits_summary, dataset,
                          InfluenceSettings(method="proximal", proximal_samples=64, seed=0, **FAST))


def auroc(digits, result, rows=None):
    flipped = digits.flipped if rows is None else digits.flipped[rows]
    return roc_auc_score(flipped, result.score)


def test_linear_scores_find_the_flipped_labels(digits, linear_scores, loss_scores):
    assert list(linear_scores.rows) == list(range(1797))
    assert linear_scores.ids == digits.ids
    assert np.isfinite(linear_scores.score).all()
    assert auroc(digits, linear_scores) >= 0.9
    assert auroc(digits, linear_scores) >= auroc(digits, loss_scores) - 0.01


def test_proximal_scores_find_the_flipped_labels_and_rank_like_linear(digits, digits_subset, linear_scores,
                                                                     proximal_subset_scores):
    _, rows = digits_subset
    assert list(proximal_subset_scores.ids) == [digits.ids[r] for r in rows]
    assert np.isfinite(proximal_subset_scores.score).all()
    assert auroc(digits, proximal_subset_scores, rows) >= 0.9
    assert spearmanr(proximal_subset_scores.score, linear_scores.score[rows])[0] >= 0.8


def test_same_seed_gives_identical_scores(digits_summary, digits_dataset, linear_scores):
    again = self_influence(digits_summary, digits_dataset, InfluenceSettings(method="linear", seed=0, **FAST))
    assert np.array_equal(again.score, linear_scores.score)


def test_different_seed_changes_scores_slightly(digits_summary, digits_dataset, linear_scores):
    other = self_influence(digits_summary, digits_dataset, InfluenceSettings(method="linear", seed=1, **FAST))
    assert not np.array_equal(other.score, linear_scores.score)
    assert spearmanr(other.score, linear_scores.score)[0] >= 0.95


def test_tracin_over_three_checkpoints_finds_the_flipped_labels(digits, digits_summary, digits_dataset):
    checkpoints = [load_model(FIXTURES / f"digits_mlp_ckpt_{i}.pt2") for i in (1, 2, 3)]
    result = self_influence(digits_summary, digits_dataset, InfluenceSettings(method="tracin"),
                            checkpoints=checkpoints)
    assert np.isfinite(result.score).all() and (result.score >= 0).all()
    assert auroc(digits, result) >= 0.9
    # three checkpoints add information beyond the last one alone (the memorizing model)
    last = self_influence(digits_summary, digits_dataset, InfluenceSettings(method="tracin"),
                          checkpoints=checkpoints[-1:])
    assert auroc(digits, result) > auroc(digits, last)


def test_exact_proximal_runs_on_the_digits_mlp(digits, digits_summary, digits_subset, proximal_subset_scores):
    dataset, rows = digits_subset
    result = self_influence(digits_summary, dataset,
                            InfluenceSettings(method="exact-proximal", proximal_samples=64, steps=2))
    assert len(result.score) == len(rows) and np.isfinite(result.score).all()
    assert result.solver["learning_rate"] > 0 and result.solver["absolute_damping"] > 0
    assert auroc(digits, result, rows) >= 0.85
    assert spearmanr(result.score, proximal_subset_scores.score)[0] >= 0.8
