"""Activation functions: forward semantics, JumpReLU estimator, TopK/BatchTopK, registry."""

from __future__ import annotations

import math

import pytest
import torch

from wiremap.errors import WiremapError
from wiremap.models.activations import (
    ACTIVATIONS,
    BatchTopK,
    JumpReLU,
    ReLU,
    build_activation,
    register_activation,
    smoothed_jumprelu,
)

L, F = 3, 10


def _jumprelu(threshold: torch.Tensor, bandwidth: float = 0.1) -> JumpReLU:
    act = JumpReLU(threshold.shape[0], threshold.shape[1], bandwidth=bandwidth)
    act.set_threshold(threshold)
    return act


def test_registry_has_the_four_activations_and_rejects_unknown_names():
    assert {"relu", "jumprelu", "topk", "batchtopk"} <= set(ACTIVATIONS)
    with pytest.raises(WiremapError, match="unknown activation"):
        build_activation("gelu", L, F)
    with pytest.raises(WiremapError, match="k"):
        build_activation("topk", L, F)  # k missing
    with pytest.raises(WiremapError, match="k"):
        build_activation("batchtopk", L, F, k=F + 1)


def test_registering_a_taken_activation_name_raises():
    with pytest.raises(WiremapError, match="activation 'relu' is already registered"):

        @register_activation("relu")
        class Clash(ReLU):
            pass

    assert ACTIVATIONS["relu"] is ReLU and ReLU.name == "relu"

    @register_activation("test_relu_copy")
    class Copy(ReLU):
        pass

    try:

        @register_activation("test_relu_copy", replace=True)
        class Replacement(ReLU):
            pass

        act = build_activation("test_relu_copy", L, F)
        assert type(act) is Replacement and act.config()["activation"] == "test_relu_copy"
    finally:
        del ACTIVATIONS["test_relu_copy"]


@pytest.mark.parametrize("name,kw", [("relu", {}), ("jumprelu", {}), ("topk", {"k": 3})])
def test_one_layer_call_equals_the_slice_of_the_all_layer_call(name, kw):
    act = build_activation(name, L, F, **kw)
    if name == "jumprelu":
        act.set_threshold(torch.rand(L, F) * 0.5)
    pre = torch.randn(4, 5, L, F)
    full = act(pre)
    for layer in range(L):
        torch.testing.assert_close(act(pre[..., layer, :], layer), full[..., layer, :])


def test_jumprelu_forward_is_x_times_step_with_per_layer_thresholds():
    theta = torch.rand(L, F)
    act = _jumprelu(theta)
    pre = torch.randn(50, L, F)
    expected = pre * (pre > theta)
    torch.testing.assert_close(act(pre), expected)
    torch.testing.assert_close(act.threshold(), theta)
    assert act.log_threshold.dtype == torch.float32


def test_jumprelu_compares_in_float32_even_for_bf16_models():
    # θ = 0.999 rounds to 1.0 in bf16; an input of exactly 1.0 must still pass the threshold.
    act = _jumprelu(torch.full((L, F), 0.999)).to(torch.bfloat16)
    assert act.log_threshold.dtype == torch.float32
    pre = torch.ones(2, L, F, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = act(pre)
    assert out.dtype == torch.bfloat16
    assert bool((out == 1).all())


def test_jumprelu_threshold_gradient_equals_finite_differences_of_smoothed_objective():
    """The STE is the exact log-θ derivative of Σ g·smoothed_jumprelu (see the docstring)."""
    torch.manual_seed(1)
    eps = 0.2
    theta = torch.rand(L, F) * 0.5 + 0.3
    act = _jumprelu(theta, bandwidth=eps)
    # Put many inputs inside the kernel window so the gradient is far from trivial.
    pre = theta + (torch.rand(64, L, F) - 0.5) * 3 * eps
    g = torch.randn(64, L, F)
    (act(pre) * g).sum().backward()
    ste = act.log_threshold.grad.double()

    log_t = act.log_threshold.detach().double()
    h = 1e-6

    def objective(lt: torch.Tensor) -> torch.Tensor:
        value = smoothed_jumprelu(pre.double(), lt.exp(), eps) * g.double()
        return value.sum(dim=0)  # [L, F]: each θ only touches its own column

    fd = (objective(log_t + h) - objective(log_t - h)) / (2 * h)
    assert ste.abs().max() > 0.1
    torch.testing.assert_close(ste, fd, rtol=1e-4, atol=1e-5)


def test_smoothed_jumprelu_is_jumprelu_outside_the_window():
    x = torch.linspace(-1, 2, 301, dtype=torch.float64)
    theta, eps = torch.tensor(0.5, dtype=torch.float64), 0.1
    far = (x - theta).abs() >= eps / 2
    smooth = smoothed_jumprelu(x, theta, eps)
    torch.testing.assert_close(smooth[far], (x * (x > theta))[far])


def test_jumprelu_mean_threshold_gradient_estimates_the_expected_output_derivative():
    """For x ~ N(μ, σ): d/dθ E[x·1[x>θ]] = −θ·p(θ); the STE batch mean estimates it."""
    torch.manual_seed(0)
    mu, sigma, theta0, eps = 0.5, 1.0, 0.8, 0.05
    act = _jumprelu(torch.full((1, 1), theta0), bandwidth=eps)
    pre = mu + sigma * torch.randn(400_000, 1, 1)
    act(pre).mean().backward()
    grad_theta = act.log_threshold.grad.item() / theta0  # d/dθ = d/dlogθ / θ
    density = math.exp(-0.5 * ((theta0 - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    assert grad_theta == pytest.approx(-theta0 * density, rel=0.05)


def test_jumprelu_input_gradient_is_the_step_and_step_has_kernel_gradient():
    theta = torch.full((L, F), 0.2)
    act = _jumprelu(theta, bandwidth=0.1)
    pre = torch.randn(30, L, F, requires_grad=True)
    act(pre).sum().backward()
    torch.testing.assert_close(pre.grad, (pre > theta).float())

    act.zero_grad()
    act.step(pre.detach()).sum().backward()
    window = ((pre.detach() - theta).abs() < 0.05).float().sum(0)
    expected = -(1 / 0.1) * window * theta  # chain rule through θ = exp(log θ)
    torch.testing.assert_close(act.log_threshold.grad, expected)


def test_topk_keeps_the_k_largest_per_token_and_layer():
    act = build_activation("topk", L, F, k=3)
    pre = torch.randn(7, L, F)
    out = act(pre)
    top = pre.topk(3, dim=-1).values
    assert bool(((out > 0).sum(-1) <= 3).all())
    torch.testing.assert_close(out.sort(-1).values[..., -3:], top.relu().sort(-1).values)
    # everything kept is one of the top-3, and negatives are zeroed
    assert bool((out[out > 0] >= top[..., -1:].expand_as(out)[out > 0]).all())


def test_topk_passes_gradients_only_to_kept_features():
    act = build_activation("topk", L, F, k=2)
    pre = (torch.rand(4, L, F) + 0.1).requires_grad_()
    act(pre).sum().backward()
    assert bool(((pre.grad > 0).sum(-1) == 2).all())


def test_batchtopk_keeps_k_times_batch_per_layer_and_records_its_threshold():
    act = build_activation("batchtopk", L, F, k=2, threshold_momentum=0.5)
    assert isinstance(act, BatchTopK)
    pre = torch.rand(6, L, F) + 0.01  # all positive: exactly k·batch survive per layer
    act.train()
    out = act(pre)
    per_layer = (out > 0).sum(dim=(0, 2))
    assert per_layer.tolist() == [2 * 6] * L
    # tokens may get more or fewer than k: the budget is shared over the batch
    kept_min = torch.where(out > 0, out, torch.inf).amin(dim=(0, 2))
    torch.testing.assert_close(act.batch_threshold, kept_min)

    out2 = act(pre * 2)  # EMA with momentum 0.5
    torch.testing.assert_close(act.batch_threshold, kept_min * 1.5)
    assert act.n_recorded.tolist() == [2] * L
    assert out2.shape == pre.shape


def test_batchtopk_per_layer_call_and_eval_mode_do_not_record():
    act = build_activation("batchtopk", L, F, k=2)
    act.eval()
    out = act(torch.rand(5, F), layer=1)
    assert int((out > 0).sum()) == 10
    assert act.n_recorded.tolist() == [0] * L
    with pytest.raises(WiremapError, match="no recorded threshold"):
        act.to_jumprelu()


def test_batchtopk_to_jumprelu_uses_recorded_or_given_thresholds():
    act = build_activation("batchtopk", L, F, k=2)
    act.record_batch_threshold(torch.tensor([0.1, 0.2, 0.3]))
    jump = act.to_jumprelu()
    expected = torch.tensor([0.1, 0.2, 0.3])[:, None].expand(L, F)
    torch.testing.assert_close(jump.threshold(), expected)
    pre = torch.rand(9, L, F)
    torch.testing.assert_close(jump(pre), pre * (pre > expected))

    per_feature = torch.rand(L, F)
    torch.testing.assert_close(act.to_jumprelu(per_feature).threshold(), per_feature)
    torch.testing.assert_close(act.to_jumprelu(0.25).threshold(), torch.full((L, F), 0.25))


def test_activation_config_round_trips_through_build_activation():
    for name, kw in [("relu", {}), ("jumprelu", {"bandwidth": 0.3}), ("topk", {"k": 4})]:
        act = build_activation(name, L, F, **kw)
        cfg = act.config()
        again = build_activation(cfg.pop("activation"), L, F, **cfg)
        assert again.config() == act.config()
