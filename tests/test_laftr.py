"""LAFTR summary and FSD estimators, checked against exact computations on tiny networks."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import batches, flatten, perturbed, synthetic_data, tiny_net
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import grad, jvp

from labelscan.errors import LabelscanError
from labelscan.laftr.fsd import (
    LaftrDraws,
    deterministic_fsd,
    discrepancy,
    draw,
    exact_fsd,
    stochastic_fsd,
)
from labelscan.laftr.gated import gated_forward
from labelscan.laftr.summary import FORMAT_VERSION, LOW_RANK, LaftrSummary, summarize_batches
from labelscan.model import ChannelAffine


def mlp(seed=0, d=5, classes=3):
    return tiny_net(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, classes),
                    input_shape=(d,), seed=seed)


def conv_net_no_maxpool(seed=0):
    """Conv2d, ChannelAffine (eval BatchNorm), ReLU, AvgPool, Flatten, Linear: everything the closed form takes."""
    affine = ChannelAffine(torch.tensor([0.7, 1.3, -0.9]), torch.tensor([0.1, -0.2, 0.3]))
    return tiny_net(
        nn.Conv2d(1, 3, 3, padding=1), affine, nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(3, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 3),
        input_shape=(1, 6, 6), seed=seed,
    )


def conv_net_maxpool(seed=0):
    affine = ChannelAffine(torch.tensor([1.2, 0.8, 1.1]), torch.tensor([0.05, -0.1, 0.0]))
    return tiny_net(
        nn.Conv2d(1, 3, 3, padding=1), affine, nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3),
        input_shape=(1, 8, 8), seed=seed,
    )


def summary_of(net, per_class=True, covariance="auto", count=600, seed=0, metadata=None):
    x, y = synthetic_data(net.input_shape, net.num_outputs, count=count, seed=seed)
    summary = summarize_batches(net, batches(x, y), per_class=per_class, covariance=covariance,
                                metadata=metadata)
    return summary, x, y


def mc_with_standard_error(params, draws: LaftrDraws, kind: str):
    """The Monte Carlo estimate and its standard error from the per-draw discrepancies.

    Draws of one mixture component share one weight; grouping draws by weight value gives the
    stratified variance (merging two components that happen to share a weight only inflates it).
    """
    with torch.no_grad():
        candidate, _ = gated_forward(draws.net, params, draws.x, draws.gates, draws.pool_indices)
        rho = discrepancy(draws.reference, candidate, kind).double()
    w = draws.weights.double()
    variance = 0.0
    for value in w.unique():
        group = rho[w == value]
        variance += float(value) ** 2 * len(group) * float(group.var(unbiased=True))
    return float((w * rho).sum()), math.sqrt(variance)


def real_relu_inputs(net, params, x):
    """The pre-activation entering every ReLU of the real network, in order."""
    inputs, h = [], x
    for index, layer in enumerate(net.layers):
        if isinstance(layer, nn.ReLU):
            inputs.append(h)
        own = {k.split(".", 1)[1]: v for k, v in params.items() if k.split(".", 1)[0] == str(index)}
        h = torch.func.functional_call(layer, own, (h,))
    return inputs


def double_draws(draws: LaftrDraws) -> LaftrDraws:
    net = copy.copy(draws.net)
    net.layers = copy.deepcopy(draws.net.layers).double()
    return LaftrDraws(net, draws.x.double(), [g.double() for g in draws.gates], draws.pool_indices,
                      draws.reference.double(), draws.weights.double())


# ------------------------------------------------------------------ FSD(θs, θs) = 0


@pytest.mark.parametrize("make", [mlp, conv_net_no_maxpool, conv_net_maxpool])
@pytest.mark.parametrize("kind", ["kl", "squared"])
def test_stochastic_fsd_is_zero_at_reference(make, kind):
    net = make()
    summary, _, _ = summary_of(net)
    draws = draw(summary, 300, seed=3)
    assert float(stochastic_fsd(net.params(), draws, kind)) == pytest.approx(0.0, abs=1e-7)
    # ... and clearly positive away from θs, so the zero above is not vacuous.
    assert float(stochastic_fsd(perturbed(net.params(), 0.2), draws, kind)) > 1e-3


@pytest.mark.parametrize("make", [mlp, conv_net_no_maxpool])
def test_deterministic_fsd_is_zero_at_reference(make):
    net = make()
    summary, _, _ = summary_of(net)
    at_reference = float(deterministic_fsd(summary, net.params()))
    away = float(deterministic_fsd(summary, perturbed(net.params(), 0.2)))
    assert abs(at_reference) < 1e-9 * max(1.0, away)
    assert away > 1e-3


def test_deterministic_fsd_refuses_maxpool():
    net = conv_net_maxpool()
    summary, _, _ = summary_of(net)
    with pytest.raises(LabelscanError, match="MaxPool"):
        deterministic_fsd(summary, net.params())


# ------------------------------------------------------------------ closed form vs Monte Carlo


@pytest.mark.parametrize(
    "make, per_class",
    [(mlp, True), (conv_net_no_maxpool, False), (conv_net_no_maxpool, True)],
    ids=["mlp-per-class", "conv-pooled", "conv-per-class"],
)
def test_deterministic_fsd_matches_monte_carlo_mean(make, per_class):
    net = make()
    summary, _, _ = summary_of(net, per_class=per_class)
    theta = perturbed(net.params(), 0.3, seed=5)
    closed_form = float(deterministic_fsd(summary, theta))
    draws = draw(summary, 20_000, seed=11)
    estimate, standard_error = mc_with_standard_error(theta, draws, "squared")
    assert estimate == pytest.approx(float(stochastic_fsd(theta, draws, "squared")), rel=1e-5)
    # The Monte Carlo error must be small enough for the comparison to mean something ...
    assert standard_error < 0.02 * estimate
    # ... and the closed form within 4 standard errors of the Monte Carlo mean.
    assert abs(closed_form - estimate) < 4 * standard_error, (closed_form, estimate, standard_error)


def test_open_gates_give_the_exact_linear_network_distance():
    """All μ = 1: the gated network is the linear map x ↦ A x + c, and for x ~ N(m, C)
    E½‖ΔA x + Δc‖² = ½(‖ΔA m + Δc‖² + tr(ΔA C ΔAᵀ)), per component weighted by its prior."""
    net = tiny_net(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), input_shape=(4,))
    summary, x, y = summary_of(net, per_class=True)
    summary.active = [torch.ones_like(a) for a in summary.active]
    theta = perturbed(net.params(), 0.3, seed=2)

    def affine(p):
        w1, b1, w2, b2 = (p[k].double().numpy() for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
        return w2 @ w1, w2 @ b1 + b2

    (a_ref, c_ref), (a_new, c_new) = affine(net.params()), affine(theta)
    delta_a, delta_c = a_new - a_ref, c_new - c_ref
    xs, ys = x.double().numpy(), y.numpy()
    expected = 0.0
    for k in range(net.num_outputs):
        rows = xs[ys == k]
        m, c = rows.mean(0), np.cov(rows, rowvar=False, bias=True)
        shift = delta_a @ m + delta_c
        expected += len(rows) / len(xs) * 0.5 * (shift @ shift + np.trace(delta_a @ c @ delta_a.T))

    assert float(deterministic_fsd(summary, theta)) == pytest.approx(expected, rel=1e-5)
    estimate, standard_error = mc_with_standard_error(theta, draw(summary, 20_000, seed=4), "squared")
    assert abs(estimate - expected) < 4 * standard_error


# ------------------------------------------------------------------ the summary's statistics


def test_summary_statistics_match_hand_computation():
    net = mlp()
    summary, x, y = summary_of(net, per_class=True)
    p = {k: v.double() for k, v in net.params().items()}
    xd = x.double()
    s1 = xd @ p["0.weight"].T + p["0.bias"]
    s2 = torch.relu(s1) @ p["2.weight"].T + p["2.bias"]
    assert summary.num_examples == len(x)
    assert summary.moments.kind == "full"
    for k in range(net.num_outputs):
        rows = y == k
        assert float(summary.prior[k]) == pytest.approx(float(rows.double().mean()), rel=1e-6)
        for active, pre in zip(summary.active, (s1, s2)):
            np.testing.assert_allclose(active[k].numpy(), (pre[rows] > 0).double().mean(0).numpy(), atol=1e-6)
        data = xd[rows].numpy()
        np.testing.assert_allclose(summary.moments.mean[k].numpy(), data.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(summary.moments.covariance[k].numpy(),
                                   np.cov(data, rowvar=False, bias=True), rtol=1e-5, atol=1e-6)


def test_conv_summary_activity_has_the_activation_shape():
    net = conv_net_maxpool()
    summary, x, y = summary_of(net, per_class=False)
    pre = real_relu_inputs(net, net.params(), x)
    assert [tuple(a.shape) for a in summary.active] == [(1, *s.shape[1:]) for s in pre]
    for active, s in zip(summary.active, pre):
        np.testing.assert_allclose(active[0].numpy(), (s > 0).double().mean(0).numpy(), atol=1e-6)
    flat = x.reshape(len(x), -1).double().numpy()
    np.testing.assert_allclose(summary.moments.covariance[0].numpy(),
                               np.cov(flat, rowvar=False, bias=True), rtol=1e-5, atol=1e-6)


def stored_sizes(summary, tmp_path):
    path = tmp_path / "summary.safetensors"
    summary.save(path)
    return sum(t.numel() for k, t in load_file(str(path)).items() if not k.startswith("theta."))


@pytest.mark.parametrize("covariance", ["full", "lowrank", "diagonal"])
def test_summary_sizes_are_what_the_design_says(covariance, tmp_path):
    d, classes = 72, 3  # d > LOW_RANK so that the low-rank factor is genuinely low rank
    net = tiny_net(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 7), nn.ReLU(), nn.Linear(7, classes), input_shape=(d,))
    summary, _, _ = summary_of(net, per_class=True, covariance=covariance)
    units = 16 + 7
    per_component = {
        "full": units + d + d * d,
        "lowrank": units + d + d * LOW_RANK + d,
        "diagonal": units + d + d,
    }[covariance]
    assert summary.moments.kind == covariance
    # plus one prior weight per component
    assert stored_sizes(summary, tmp_path) == classes * per_component + classes


def test_auto_covariance_is_full_for_small_inputs():
    summary, _, _ = summary_of(mlp())
    assert summary.moments.kind == "full"


def test_lowrank_covariance_keeps_the_top_eigenvalues_and_the_exact_variances():
    d = 72
    net = tiny_net(nn.Linear(d, 4), nn.ReLU(), nn.Linear(4, 2), input_shape=(d,))
    summary, x, _ = summary_of(net, per_class=False, covariance="lowrank")
    cov = np.cov(x.double().numpy(), rowvar=False, bias=True)
    factor = summary.moments.factor[0].double().numpy()
    gram = factor.T @ factor
    top = np.sort(np.linalg.eigvalsh(cov))[-LOW_RANK:]
    # the factor's columns are orthogonal, scaled by the square roots of the top eigenvalues
    np.testing.assert_allclose(np.sort(np.diag(gram)), top, rtol=1e-4, atol=1e-6)
    off = gram - np.diag(np.diag(gram))
    assert np.abs(off).max() < 1e-4 * top.max()
    np.testing.assert_allclose(np.diag(summary.moments.covariance_matrix(0).double().numpy()),
                               np.diag(cov), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ save / load


@pytest.mark.parametrize("covariance", ["full", "lowrank", "diagonal"])
def test_saved_summary_loads_back_identical(covariance, tmp_path):
    net = conv_net_maxpool()  # Conv2d, ChannelAffine, ReLU, MaxPool2d, Flatten, Linear
    metadata = {"model": "abc123", "options": {"per_class": True}}
    summary, x, _ = summary_of(net, per_class=True, covariance=covariance, metadata=metadata)
    path = tmp_path / "summary.safetensors"
    summary.save(path)
    loaded = LaftrSummary.load(path)

    assert loaded.net.spec() == net.spec()
    assert loaded.net.input_shape == net.input_shape and loaded.net.num_outputs == net.num_outputs
    assert loaded.num_examples == summary.num_examples and loaded.metadata == metadata
    assert loaded.moments.kind == summary.moments.kind
    original_state, loaded_state = net.layers.state_dict(), loaded.net.layers.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for k in original_state:
        assert torch.equal(original_state[k], loaded_state[k]), k
    assert summary.moments.tensors().keys() == loaded.moments.tensors().keys()
    for k, v in summary.moments.tensors().items():
        assert torch.equal(v, loaded.moments.tensors()[k]), k
    assert torch.equal(summary.prior, loaded.prior)
    assert len(loaded.active) == len(summary.active)
    for a, b in zip(summary.active, loaded.active):
        assert torch.equal(a, b)
    assert torch.equal(net.layers(x[:5]), loaded.net.layers(x[:5]))
    # same draws from both, bit for bit
    assert torch.equal(draw(summary, 50, seed=1).reference, draw(loaded, 50, seed=1).reference)


@pytest.fixture
def saved_summary(tmp_path):
    summary, _, _ = summary_of(mlp())
    path = tmp_path / "summary.safetensors"
    summary.save(path)
    return path


def assert_refused(path, match=None):
    with pytest.raises(LabelscanError, match=match) as caught:
        LaftrSummary.load(path)
    assert "\n" not in str(caught.value)


def test_truncated_summary_is_refused(saved_summary):
    data = saved_summary.read_bytes()
    for cut in (3, 40, len(data) // 2, len(data) - 5):
        saved_summary.write_bytes(data[:cut])
        assert_refused(saved_summary)


def test_random_bytes_summary_is_refused(saved_summary):
    rng = np.random.default_rng(0)
    for size in (5, 100, 5000):
        saved_summary.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        assert_refused(saved_summary)
    # a plausible header length followed by garbage
    saved_summary.write_bytes((64).to_bytes(8, "little") + rng.integers(0, 256, 200, dtype=np.uint8).tobytes())
    assert_refused(saved_summary)


def test_missing_summary_is_refused(tmp_path):
    assert_refused(tmp_path / "nope.safetensors", match="summarize")


def resave(path, **changes):
    """Rewrite a summary with entries of its JSON header changed."""
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["labelscan"])
    tensors = load_file(str(path))
    header.update(changes)
    save_file(tensors, str(path), metadata={"labelscan": json.dumps(header)})


def test_newer_format_version_is_refused(saved_summary):
    resave(saved_summary, format_version=FORMAT_VERSION + 1)
    assert_refused(saved_summary, match="newer")


def test_foreign_safetensors_file_is_refused(saved_summary, tmp_path):
    resave(saved_summary, format="something-else")
    assert_refused(saved_summary)
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(3)}, str(plain))
    assert_refused(plain)


def break_header(path):
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["labelscan"])
    resave(path, spec=header["spec"][:-1])  # the spec no longer fits θ


def test_summary_with_a_broken_header_is_refused(saved_summary):
    break_header(saved_summary)
    with pytest.raises(LabelscanError, match="incomplete"):
        LaftrSummary.load(saved_summary)


def test_summary_with_a_broken_header_error_is_one_line(saved_summary):
    break_header(saved_summary)
    assert_refused(saved_summary)


# ------------------------------------------------------------------ MaxPool and the linearization


def test_gated_forward_is_exact_with_the_real_relu_pattern_and_pool_selection():
    net = conv_net_maxpool()
    x = torch.randn(16, *net.input_shape, generator=torch.Generator().manual_seed(0))
    for theta in (net.params(), perturbed(net.params(), 0.2, seed=9)):
        real = torch.func.functional_call(net.layers, theta, (x,))
        gates = [(s > 0).float() for s in real_relu_inputs(net, theta, x)]
        reference, indices = gated_forward(net, theta, x, gates)
        assert len(indices) == 2
        torch.testing.assert_close(reference, real, rtol=1e-5, atol=1e-6)
        replayed, same = gated_forward(net, theta, x, gates, indices)
        assert same is indices
        torch.testing.assert_close(replayed, real, rtol=1e-5, atol=1e-6)


def test_maxpool_selection_is_shared_with_the_candidate_stream():
    """The candidate stream takes the values at the reference stream's argmax positions."""
    net = tiny_net(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32, 3),
                   input_shape=(1, 8, 8))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = net.params()
    _, (indices,) = gated_forward(net, reference, x, [])
    conv_ref = F.conv2d(x, reference["0.weight"], reference["0.bias"], padding=1)
    _, expected_indices = F.max_pool2d(conv_ref, 2, return_indices=True)
    assert torch.equal(indices, expected_indices)

    theta = perturbed(reference, 0.5, seed=3)
    conv_new = F.conv2d(x, theta["0.weight"], theta["0.bias"], padding=1)
    # pick by hand: block (i, j) of channel c takes conv_new at the reference's argmax in that block
    picked = torch.empty(4, 2, 4, 4)
    for b in range(4):
        for c in range(2):
            for i in range(4):
                for j in range(4):
                    block = conv_ref[b, c, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
                    r, s = divmod(int(block.argmax()), 2)
                    picked[b, c, i, j] = conv_new[b, c, 2 * i + r, 2 * j + s]
    expected = picked.flatten(1) @ theta["3.weight"].T + theta["3.bias"]
    got, _ = gated_forward(net, theta, x, [], [indices])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # and it differs from the candidate's own max pooling, so the check above is not vacuous
    own, _ = gated_forward(net, theta, x, [])
    assert not torch.allclose(own, got)


# ------------------------------------------------------------------ differentiability


@pytest.mark.parametrize("make", [mlp, conv_net_maxpool])
@pytest.mark.parametrize("kind", ["kl", "squared"])
def test_stochastic_fsd_gradient_vanishes_at_reference(make, kind):
    net = make()
    summary, _, _ = summary_of(net)
    draws = draw(summary, 200, seed=0)
    gradient = grad(stochastic_fsd)(net.params(), draws, kind)
    away = grad(stochastic_fsd)(perturbed(net.params(), 0.2), draws, kind)
    assert max(float(g.abs().max()) for g in gradient.values()) < 1e-6
    assert max(float(g.abs().max()) for g in away.values()) > 1e-3


@pytest.mark.parametrize("make", [mlp, conv_net_maxpool])
@pytest.mark.parametrize("kind", ["kl", "squared"])
def test_stochastic_fsd_hessian_vector_product_matches_finite_differences(make, kind):
    net = make()
    summary, _, _ = summary_of(net)
    draws = double_draws(draw(summary, 200, seed=0))
    reference = {k: v.double() for k, v in net.params().items()}
    direction = perturbed({k: torch.zeros_like(v) for k, v in reference.items()}, 1.0, seed=7)
    gradient = grad(lambda p: stochastic_fsd(p, draws, kind))
    for at in (reference, perturbed(reference, 0.1, seed=8)):  # at θs, and where ∇ρ ≠ 0
        _, hvp = jvp(gradient, (at,), (direction,))
        h = 1e-5
        plus = flatten(gradient({k: at[k] + h * direction[k] for k in at}))
        minus = flatten(gradient({k: at[k] - h * direction[k] for k in at}))
        difference, product = (plus - minus) / (2 * h), flatten(hvp)
        assert float(product.norm()) > 1e-3
        assert float((product - difference).norm()) < 1e-6 * float(product.norm())


# ------------------------------------------------------------------ exact FSD on data


@pytest.mark.parametrize("kind", ["kl", "squared"])
def test_exact_fsd_matches_hand_computation(kind):
    net = tiny_net(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), input_shape=(4,))
    theta = perturbed(net.params(), 0.3)
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))

    def logits(p):
        q = {k: v.double().numpy() for k, v in p.items()}
        hidden = np.maximum(x.double().numpy() @ q["0.weight"].T + q["0.bias"], 0)
        return hidden @ q["2.weight"].T + q["2.bias"]

    z_ref, z_new = logits(net.params()), logits(theta)
    if kind == "kl":
        def log_softmax(z):
            z = z - z.max(1, keepdims=True)
            return z - np.log(np.exp(z).sum(1, keepdims=True))
        log_p, log_q = log_softmax(z_ref), log_softmax(z_new)
        expected = np.mean((np.exp(log_p) * (log_p - log_q)).sum(1))
    else:
        expected = np.mean(0.5 * ((z_new - z_ref) ** 2).sum(1))
    assert expected > 1e-3
    assert float(exact_fsd(net, theta, x, kind, batch_size=3)) == pytest.approx(expected, rel=1e-5)
    assert float(exact_fsd(net, net.params(), x, kind)) == pytest.approx(0.0, abs=1e-7)


def test_unknown_discrepancy_is_refused():
    with pytest.raises(LabelscanError):
        discrepancy(torch.zeros(2, 3), torch.zeros(2, 3), "hinge")


def test_per_class_summary_refuses_labels_the_model_cannot_output():
    net = mlp()
    x, y = synthetic_data(net.input_shape, net.num_outputs, count=40)
    y[7] = net.num_outputs + 2
    with pytest.raises(LabelscanError):
        summarize_batches(net, [(x, y)], per_class=True)
