"""Transcoder architectures: shapes, consistency of encode/decode/forward, decoders, folding."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_transcoder

from wiremap.errors import WiremapError
from wiremap.models.registry import Registry
from wiremap.models.transcoders import (
    OLD_PARAMETER_NAMES,
    TRANSCODERS,
    PerLayerTranscoder,
    Transcoder,
    build_transcoder,
    fold_normalisation,
    register_transcoder,
    x_then_layer,
)

L, D, F = 3, 8, 12
ARCHS = ["plt", "skip_plt", "clt", "skip_clt"]
ACTS = [("relu", None), ("jumprelu", None), ("topk", 3), ("batchtopk", 3)]


def make(arch: str, activation: str = "relu", k: int | None = None, seed: int = 0) -> Transcoder:
    return random_transcoder(arch, L, D, F, activation, k, seed)


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


# -- parameter names until 0.1: old checkpoints and exports still load -------------------------
def _old_keys(state: dict, prefix: str = "") -> dict:
    """`state` as written before the rename (encoder_weight, decoder_weight.3, ...)."""
    new_to_old = {v: k for k, v in OLD_PARAMETER_NAMES.items()}
    out = {}
    for key, value in state.items():
        head, dot, tail = key[len(prefix) :].partition(".")
        if key.startswith(prefix) and head in new_to_old:
            key = f"{prefix}{new_to_old[head]}{dot}{tail}"
        out[key] = value
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_old_state_dict_and_safetensors_load(arch, tmp_path):
    from safetensors.torch import load_file, save_file

    tc = make(arch, "jumprelu")
    old = _old_keys(tc.state_dict())
    assert "encoder_weight" in old and not any(k.startswith("W_") for k in old)
    fresh = build_transcoder(arch, L, D, F, "jumprelu")
    fresh.load_state_dict(old)  # strict: every key renamed, none left over
    save_file({k: v.contiguous() for k, v in old.items()}, str(tmp_path / "old.safetensors"))
    from_file = build_transcoder(arch, L, D, F, "jumprelu")
    from_file.load_state_dict(load_file(str(tmp_path / "old.safetensors")))
    x = torch.randn(5, L, D)
    for loaded in (fresh, from_file):
        for (name, p), (_, q) in zip(tc.named_parameters(), loaded.named_parameters(), strict=True):
            assert torch.equal(p, q), name
        torch.testing.assert_close(loaded(x)[0], tc(x)[0])


def test_old_lightning_checkpoint_loads(tmp_path):
    from wiremap.train.export_cmd import load_checkpoint
    from wiremap.train.module import TranscoderModule

    module = TranscoderModule(L, D, arch="skip_clt", d_transcoder=F, activation="relu")
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))
    old = _old_keys(module.state_dict(), prefix="transcoder.")
    assert "transcoder.decoder_weight.2" in old and "transcoder.skip_weight" in old
    ckpt = tmp_path / "step=3.ckpt"
    saved = {"hyper_parameters": dict(module.hparams), "state_dict": old, "global_step": 3}
    torch.save(saved, ckpt)
    loaded, step = load_checkpoint(ckpt)
    assert step == 3
    for (name, p), (_, q) in zip(module.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_old_names_warn_and_alias_the_new_ones():
    tc = make("skip_plt")
    x = torch.randn(4, D)
    for old, new in OLD_PARAMETER_NAMES.items():
        with pytest.warns(DeprecationWarning, match=f"{old} is deprecated.*use {new}"):
            assert getattr(tc, old) is getattr(tc, new)
    calls = {
        "encode_layer": lambda: tc.encode_layer(x, 1),
        "pre_activation": lambda: tc.pre_activation(x, 1),
        "skip_layer": lambda: tc.skip_layer(x, 1),
    }
    wanted = [tc.encode(x, 1), tc.pre_activations(x, 1), tc.skip(x, 1)]
    for (name, call), want in zip(calls.items(), wanted, strict=True):
        with pytest.warns(DeprecationWarning, match=name):
            torch.testing.assert_close(call(), want)
    assert tc.skip(x, 1).abs().sum() > 0  # the skip path is random here, not zeros


def test_layer_then_x_order_warns_and_is_swapped():
    x = torch.randn(2, D)
    assert x_then_layer(x, 3, "m") == (x, 3)
    with pytest.warns(DeprecationWarning, match=r"m\(layer, x\) is deprecated"):
        got_x, got_layer = x_then_layer(3, x, "m")
    assert got_x is x and got_layer == 3


# -- registries refuse a second registration ---------------------------------------------------
def test_registering_a_taken_architecture_name_raises():
    with pytest.raises(WiremapError, match="transcoder architecture 'plt' is already registered"):

        @register_transcoder("plt")
        class Clash(PerLayerTranscoder):
            pass

    assert TRANSCODERS["plt"] is PerLayerTranscoder

    @register_transcoder("test_plt_copy")
    class Copy(PerLayerTranscoder):
        pass

    try:
        assert build_transcoder("test_plt_copy", L, D, F).arch == "test_plt_copy"

        @register_transcoder("test_plt_copy", replace=True)
        class Replacement(PerLayerTranscoder):
            pass

        assert type(build_transcoder("test_plt_copy", L, D, F)) is Replacement
    finally:
        del TRANSCODERS["test_plt_copy"]


def test_registry_lookup_names_the_choices():
    reg = Registry("widget")
    reg.add("a", 1)
    with pytest.raises(WiremapError, match="widget 'a' is already registered"):
        reg.add("a", 2)
    assert reg.add("a", 3, replace=True) == 3 and reg.lookup("a") == 3
    with pytest.raises(WiremapError, match="unknown widget 'b'; choose one of a"):
        reg.lookup("b")
