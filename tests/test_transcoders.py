"""Transcoder architectures: shapes, consistency of encode/decode/forward, decoders, folding."""

from __future__ import annotations

import math

import pytest
import torch

from wiremap.errors import WiremapError
from wiremap.models.transcoders import (
    TRANSCODERS,
    Transcoder,
    build_transcoder,
    fold_normalisation,
)

L, D, F = 3, 8, 12
ARCHS = ["plt", "skip_plt", "clt", "skip_clt"]
ACTS = [("relu", None), ("jumprelu", None), ("topk", 3), ("batchtopk", 3)]


def make(arch: str, activation: str = "relu", k: int | None = None, seed: int = 0) -> Transcoder:
    """A transcoder with every parameter random (skip and biases included)."""
    torch.manual_seed(seed)
    tc = build_transcoder(arch, L, D, F, activation, k)
    with torch.no_grad():
        for p in tc.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if activation == "jumprelu":
            tc.activation.set_threshold(torch.rand(L, F) * 0.3)
    return tc


def test_registry_holds_the_four_architectures():
    assert set(ARCHS) <= set(TRANSCODERS)
    with pytest.raises(WiremapError, match="unknown transcoder"):
        build_transcoder("sae", L, D, F)
    with pytest.raises(WiremapError, match="input hook"):
        build_transcoder("plt", L, D, F, input_hook="resid_post")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("activation,k", ACTS)
def test_shapes_and_forward_is_decode_of_encode_plus_skip(arch, activation, k):
    tc = make(arch, activation, k)
    x = torch.randn(2, 5, L, D)
    y_hat, a = tc(x)
    assert y_hat.shape == (2, 5, L, D) and a.shape == (2, 5, L, F)
    torch.testing.assert_close(a, tc.encode(x))
    torch.testing.assert_close(y_hat, tc.decode(a) + tc.skip(x))
    assert tc.decoder_norms().shape == (L, F)
    assert tc.has_skip == arch.startswith("skip")
    assert (tc.W_skip is not None) == tc.has_skip
    for layer in range(L):
        assert tc.decoder(layer).shape == (F, tc.n_out(layer), D)
        assert tc.W_enc[layer].shape == (F, D) and tc.b_enc[layer].shape == (F,)
        assert tc.b_dec[layer].shape == (D,)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("activation,k", ACTS[:3])  # batchtopk couples layers through the batch
def test_per_layer_calls_match_the_batched_ones(arch, activation, k):
    tc = make(arch, activation, k)
    x = torch.randn(6, L, D)
    a = tc.encode(x)
    pre = tc.pre_activations(x)
    skip = tc.skip(x)
    for layer in range(L):
        torch.testing.assert_close(tc.pre_activations(x[:, layer], layer), pre[:, layer])
        torch.testing.assert_close(tc.encode(x[:, layer], layer), a[:, layer])
        torch.testing.assert_close(tc.skip(x[:, layer], layer), skip[:, layer])
        manual = x[:, layer] @ tc.W_enc[layer].T + tc.b_enc[layer]
        torch.testing.assert_close(pre[:, layer], manual)


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_a_one_hot_activation_gives_b_dec_plus_the_decoder_vectors(arch):
    tc = make(arch)
    for layer in range(L):
        for feature in (0, F - 1):
            a = torch.zeros(L, F)
            a[layer, feature] = 2.0
            out = tc.decode(a)
            expected = tc.b_dec.detach().clone()
            vecs = tc.decoder(layer)[feature]  # [n_out, D]
            expected[layer : layer + tc.n_out(layer)] += 2.0 * vecs
            torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_norms_concatenate_over_output_layers(arch):
    tc = make(arch)
    norms = tc.decoder_norms()
    for layer in range(L):
        expected = tc.decoder(layer).reshape(F, -1).norm(dim=-1)
        torch.testing.assert_close(norms[layer], expected)
    feats = torch.tensor([3, 1])
    torch.testing.assert_close(tc.decoder(1, feats), tc.decoder(1)[feats])


@pytest.mark.parametrize("arch", ARCHS)
def test_skip_is_a_linear_map_with_d_out_d_in_layout(arch):
    tc = make(arch)
    x = torch.randn(4, L, D)
    if not tc.has_skip:
        assert torch.equal(tc.skip(x), torch.zeros_like(x))
        return
    for layer in range(L):
        torch.testing.assert_close(tc.skip(x)[:, layer], x[:, layer] @ tc.W_skip[layer].T)


@pytest.mark.parametrize("arch", ARCHS)
def test_initialisation_follows_the_design(arch):
    tc = build_transcoder(arch, L, D, F, "jumprelu")
    assert tc.W_enc.abs().max() <= 1 / math.sqrt(F)
    bound = 1 / math.sqrt(L * D)
    assert all(tc.decoder(i).abs().max() <= bound for i in range(L))
    assert tc.W_enc.std() > 0.5 / math.sqrt(3 * F)  # not all zeros
    assert not tc.b_enc.any() and not tc.b_dec.any()
    if tc.has_skip:
        assert not tc.W_skip.any()


@pytest.mark.parametrize("arch", ARCHS)
def test_config_rebuilds_the_same_architecture(arch):
    tc = build_transcoder(arch, L, D, F, "topk", 4, model_name="m", layers=[1, 3, 5])
    again = build_transcoder(**tc.config)
    assert again.config == tc.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in tc.state_dict().items()
    }
    assert tc.config["layers"] == [1, 3, 5] and tc.config["model_name"] == "m"


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_parameter_under_bf16_autocast(arch):
    tc = make(arch, "jumprelu")
    with torch.no_grad():
        tc.activation.set_threshold(torch.full((L, F), 0.5))
    tc.activation.bandwidth = 2.0  # wide kernel: every θ sees some pre-activations
    x = torch.randn(16, L, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_hat, a = tc(x)
        loss = y_hat.float().pow(2).sum() + a.float().sum()
    loss.backward()
    for name, p in tc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert tc.activation.log_threshold.grad.dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("activation,k", [("jumprelu", None), ("topk", 3), ("relu", None)])
def test_folded_model_on_raw_inputs_equals_normalised_model(arch, activation, k):
    tc = make(arch, activation, k)
    if activation == "jumprelu":  # thresholds near the median pre-activation: many flips if wrong
        pre = tc.pre_activations(torch.randn(256, L, D) * 3.0)
        tc.activation.set_threshold(pre.detach().median(dim=0).values.clamp(min=0.05))
    in_scale = torch.tensor([3.0, 0.5, 1.7])
    out_scale = torch.tensor([0.25, 2.0, 1.3])
    x_raw = torch.randn(64, L, D)  # raw activations; the model was trained on x·in_scale
    y_norm, a_norm = tc(x_raw * in_scale[:, None])
    folded = fold_normalisation(tc, in_scale, out_scale)
    y_raw, a_raw = folded(x_raw)
    assert (a_norm > 0).float().mean() > 0.05
    torch.testing.assert_close(a_raw, a_norm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_raw, y_norm / out_scale[:, None], rtol=1e-5, atol=1e-5)
    # the original is untouched
    torch.testing.assert_close(tc(x_raw * in_scale[:, None])[0], y_norm)


def test_fold_rejects_bad_scales():
    tc = make("plt")
    with pytest.raises(WiremapError, match="in_scale"):
        fold_normalisation(tc, torch.tensor([1.0, 0.0, 1.0]), 1.0)
    with pytest.raises(WiremapError, match="out_scale"):
        fold_normalisation(tc, 1.0, [1.0, 2.0])


def test_batchtopk_transcoder_records_thresholds_while_training():
    tc = make("clt", "batchtopk", 3)
    tc.train()
    y_hat, a = tc(torch.randn(32, L, D))
    assert int((a > 0).sum()) <= 3 * 32 * L
    assert tc.activation.n_recorded.tolist() == [1] * L
    jump = tc.activation.to_jumprelu()
    tc.set_activation(jump)
    assert tc.threshold(0).shape == (F,)
