"""Transcoder files: export -> load round trips, the circuit-tracer layout, importers, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from wiremap.errors import WiremapError
from wiremap.models.io import (
    import_gemma_scope,
    import_sparsify,
    load_transcoders,
    save_transcoders,
)
from wiremap.models.transcoders import build_transcoder

L, D, F = 3, 8, 12
ARCHS = ["plt", "skip_plt", "clt", "skip_clt"]


def make(arch: str, activation: str = "relu", k: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    tc = build_transcoder(arch, L, D, F, activation, k, model_name="tiny/model")
    with torch.no_grad():
        for p in tc.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if activation == "jumprelu":
            tc.activation.set_threshold(torch.rand(L, F) * 0.3)
    return tc


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("activation,k", [("relu", None), ("jumprelu", None), ("topk", 3)])
@pytest.mark.parametrize("lazy", [False, True])
def test_export_then_load_gives_identical_outputs(tmp_path, arch, activation, k, lazy):
    tc = make(arch, activation, k)
    save_transcoders(tc, tmp_path)
    loaded = load_transcoders(tmp_path, lazy=lazy)
    x = torch.randn(2, 7, L, D)
    y, a = tc(x)
    y2, a2 = loaded(x)
    assert torch.equal(a, a2) and torch.equal(y, y2)
    assert loaded.config == tc.config
    assert loaded.arch == arch and type(loaded.activation) is type(tc.activation)
    torch.testing.assert_close(loaded.decoder_norms(), tc.decoder_norms())
    torch.testing.assert_close(loaded.decoder(1, torch.tensor([4, 0])), tc.decoder(1)[[4, 0]])
    if lazy and tc.cross_layer:
        assert loaded.decoder_weight is None
        assert not any(k.startswith("decoder_weight") for k in loaded.state_dict())


def test_plt_files_follow_the_circuit_tracer_layout(tmp_path):
    tc = make("skip_plt", "jumprelu")
    save_transcoders(tc, tmp_path, extra_config={"training": {"steps": 10, "fvu": 0.1}})
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert config["feature_input_hook"] == "mlp.hook_in"
    assert config["feature_output_hook"] == "mlp.hook_out"
    root = tmp_path.resolve()  # absolute: circuit-tracer resolves against its working dir
    assert config["transcoders"] == [str(root / f"layer_{i}.safetensors") for i in range(L)]
    assert config["model_name"] == "tiny/model" and config["training"]["steps"] == 10
    assert (config["arch"], config["activation"], config["d_transcoder"]) == (
        "skip_plt",
        "jumprelu",
        F,
    )
    layer = load_file(str(tmp_path / "layer_1.safetensors"))
    assert {k: list(v.shape) for k, v in layer.items()} == {
        "W_enc": [F, D],
        "W_dec": [F, D],
        "b_enc": [F],
        "b_dec": [D],
        "activation_function.threshold": [F],
        "W_skip": [D, D],
    }
    torch.testing.assert_close(layer["activation_function.threshold"], tc.threshold(1).detach())
    torch.testing.assert_close(layer["W_skip"], tc.W_skip(1).detach())


def test_clt_files_follow_the_circuit_tracer_layout(tmp_path):
    tc = make("skip_clt", "jumprelu")
    save_transcoders(tc, tmp_path, dtype=torch.bfloat16)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder" and config["dtype"] == "bfloat16"
    enc = load_file(str(tmp_path / "W_enc_1.safetensors"))
    assert {k: list(v.shape) for k, v in enc.items()} == {
        "W_enc_1": [F, D],
        "b_enc_1": [F],
        "b_dec_1": [D],
        "threshold_1": [F],
        "W_skip_1": [D, D],
    }
    assert enc["W_enc_1"].dtype == torch.bfloat16 and enc["threshold_1"].dtype == torch.float32
    # circuit-tracer's CLT computes x @ W_skip_i
    x = torch.randn(5, D)
    torch.testing.assert_close(
        x @ enc["W_skip_1"].float(), tc.skip_layer(x, 1).detach(), rtol=2e-2, atol=2e-2
    )
    for i in range(L):
        dec = load_file(str(tmp_path / f"W_dec_{i}.safetensors"))
        assert list(dec) == [f"W_dec_{i}"] and list(dec[f"W_dec_{i}"].shape) == [F, L - i, D]


def test_bf16_export_loads_in_bf16_with_float32_thresholds(tmp_path):
    tc = make("clt", "jumprelu")
    save_transcoders(tc, tmp_path, dtype="bfloat16")
    loaded = load_transcoders(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert loaded.activation.log_threshold.dtype == torch.float32
    torch.testing.assert_close(loaded.threshold(2), tc.threshold(2).detach())


@pytest.mark.parametrize("arch", ["plt", "clt"])
def test_batchtopk_exports_as_jumprelu_with_its_recorded_threshold(tmp_path, arch):
    tc = make(arch, "batchtopk", 3)
    tc.train()
    tc(torch.randn(64, L, D))
    save_transcoders(tc, tmp_path)
    loaded = load_transcoders(tmp_path)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (config["activation"], config["trained_activation"], config["k"]) == (
        "jumprelu",
        "batchtopk",
        3,
    )
    expected = tc.activation.batch_threshold[:, None].expand(L, F)
    torch.testing.assert_close(loaded.activation.threshold(), expected)
    x = torch.randn(10, L, D)
    pre = tc.pre_activations(x)
    torch.testing.assert_close(loaded.encode(x), pre * (pre > expected))


def test_extra_config_may_not_overwrite_export_keys(tmp_path):
    with pytest.raises(WiremapError, match="arch"):
        save_transcoders(make("plt"), tmp_path, extra_config={"arch": "clt"})


def test_foreign_circuit_tracer_clt_without_our_metadata_loads(tmp_path):
    """A CLT written by another tool: only circuit-tracer keys, skip as [d_in, d_out]."""
    torch.manual_seed(3)
    w_enc, b_enc, b_dec = torch.randn(L, F, D), torch.randn(L, F), torch.randn(L, D)
    w_skip_in_out, theta = torch.randn(L, D, D), torch.rand(L, F)
    w_dec = [torch.randn(F, L - i, D) for i in range(L)]
    for i in range(L):
        enc = {f"W_enc_{i}": w_enc[i], f"b_enc_{i}": b_enc[i], f"b_dec_{i}": b_dec[i]}
        enc.update({f"threshold_{i}": theta[i], f"W_skip_{i}": w_skip_in_out[i]})
        save_file(enc, str(tmp_path / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": w_dec[i]}, str(tmp_path / f"W_dec_{i}.safetensors"))
    config = {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    tc = load_transcoders(tmp_path)
    assert (tc.arch, tc.activation.name, tc.input_hook) == ("skip_clt", "jumprelu", "resid_mid")
    x = torch.randn(4, L, D)
    pre = torch.einsum("nld,lfd->nlf", x, w_enc) + b_enc
    a = pre * (pre > theta)
    y = b_dec + torch.einsum("nld,lde->nle", x, w_skip_in_out)
    for i in range(L):
        y[:, i:] += torch.einsum("nf,fod->nod", a[:, i], w_dec[i])
    y_hat, a_hat = tc(x)
    torch.testing.assert_close(a_hat, a)
    torch.testing.assert_close(y_hat, y, rtol=1e-4, atol=1e-4)


# -- errors ------------------------------------------------------------------------------
def test_missing_config_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(WiremapError, match="config.yaml not found.*save_transcoders"):
        load_transcoders(tmp_path)


def test_missing_layer_file_is_named(tmp_path):
    save_transcoders(make("plt"), tmp_path)
    (tmp_path / "layer_2.safetensors").unlink()
    with pytest.raises(WiremapError, match="layer_2.safetensors is missing"):
        load_transcoders(tmp_path)


def test_corrupt_file_is_named(tmp_path):
    save_transcoders(make("clt"), tmp_path)
    (tmp_path / "W_dec_1.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WiremapError, match="W_dec_1.safetensors is not a readable"):
        load_transcoders(tmp_path, lazy=True)


def test_shape_mismatch_is_named(tmp_path):
    save_transcoders(make("clt"), tmp_path)
    save_file({"W_dec_2": torch.zeros(F, 2, D)}, str(tmp_path / "W_dec_2.safetensors"))
    with pytest.raises(WiremapError, match=r"W_dec_2.safetensors.*\[12, 2, 8\].*\[12, 1, 8\]"):
        load_transcoders(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    save_transcoders(make("plt"), tmp_path)
    path = tmp_path / "layer_0.safetensors"
    tensors = load_file(str(path))
    del tensors["b_enc"]
    save_file(tensors, str(path))
    with pytest.raises(WiremapError, match="layer_0.safetensors has no tensor 'b_enc'"):
        load_transcoders(tmp_path)


# -- Gemma Scope ---------------------------------------------------------------------------
def _write_gemma_scope(root, layers, d=D, f=F, seed=0):
    rng = np.random.default_rng(seed)
    params = []
    for layer in layers:
        p = {
            "W_enc": rng.normal(size=(d, f)).astype(np.float32),
            "W_dec": rng.normal(size=(f, d)).astype(np.float32),
            "b_enc": rng.normal(size=f).astype(np.float32),
            "b_dec": rng.normal(size=d).astype(np.float32),
            "threshold": rng.uniform(0, 1, size=f).astype(np.float32),
        }
        folder = root / f"layer_{layer}" / "width_16k" / "average_l0_50"
        folder.mkdir(parents=True)
        np.savez(folder / "params.npz", **p)
        params.append(p)
    return params


def _gemma_scope_expected(params, x):
    ys, acts = [], []
    for i, p in enumerate(params):
        pre = x[:, i] @ torch.from_numpy(p["W_enc"]) + torch.from_numpy(p["b_enc"])
        a = pre * (pre > torch.from_numpy(p["threshold"]))
        ys.append(a @ torch.from_numpy(p["W_dec"]) + torch.from_numpy(p["b_dec"]))
        acts.append(a)
    return torch.stack(ys, 1), torch.stack(acts, 1)


def test_import_gemma_scope_folder_list_and_glob_agree_with_the_npz_math(tmp_path):
    params = _write_gemma_scope(tmp_path, [0, 1, 2])
    x = torch.randn(6, 3, D)
    y, a = _gemma_scope_expected(params, x)
    files = sorted(tmp_path.rglob("params.npz"))
    for source in (tmp_path, files, str(tmp_path / "layer_*/**/params.npz")):
        tc = import_gemma_scope(source, model_name="google/gemma-2-2b")
        assert (tc.arch, tc.activation.name, tc.layers) == ("plt", "jumprelu", [0, 1, 2])
        y_hat, a_hat = tc(x)
        torch.testing.assert_close(a_hat, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_hat, y, rtol=1e-5, atol=1e-5)


def test_import_gemma_scope_then_export_round_trips(tmp_path):
    _write_gemma_scope(tmp_path / "gs", [4, 7])
    tc = import_gemma_scope(tmp_path / "gs")
    assert tc.layers == [4, 7]
    save_transcoders(tc, tmp_path / "out")
    again = load_transcoders(tmp_path / "out")
    x = torch.randn(5, 2, D)
    assert torch.equal(again(x)[0], tc(x)[0]) and again.layers == [4, 7]


def test_import_gemma_scope_errors(tmp_path):
    _write_gemma_scope(tmp_path / "a", [0])
    with pytest.raises(WiremapError, match="no params.npz"):
        import_gemma_scope(tmp_path / "empty*")
    dup = tmp_path / "a" / "layer_0" / "width_65k" / "average_l0_20"
    dup.mkdir(parents=True)
    np.savez(dup / "params.npz", W_enc=np.zeros((D, F), np.float32))
    with pytest.raises(WiremapError, match="same layer"):
        import_gemma_scope(tmp_path / "a")
    with pytest.raises(WiremapError, match=r"params.npz lacks \['W_dec'"):
        import_gemma_scope([dup / "params.npz"])
    other = _write_gemma_scope(tmp_path / "b", [0, 1], f=F + 1)
    assert other
    good = tmp_path / "a" / "layer_0" / "width_16k" / "average_l0_50" / "params.npz"
    mixed = [good, sorted((tmp_path / "b").rglob("params.npz"))[0]]
    with pytest.raises(WiremapError, match=r"W_enc has shape \[8, 13\] but \[8, 12\]"):
        import_gemma_scope(mixed)


# -- sparsify --------------------------------------------------------------------------------
def _write_sparsify(root, layers, k=3, skip=True, transcode=True, seed=0):
    torch.manual_seed(seed)
    weights = []
    for layer in layers:
        folder = root / f"layers.{layer}.mlp"
        folder.mkdir(parents=True)
        cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
               "num_latents": F, "k": k, "multi_topk": False, "skip_connection": skip,
               "transcode": transcode, "d_in": D}  # fmt: skip
        (folder / "cfg.json").write_text(json.dumps(cfg))
        w = {
            "encoder.weight": torch.randn(F, D),
            "encoder.bias": torch.randn(F),
            "W_dec": torch.randn(F, D),
            "b_dec": torch.randn(D),
        }
        if skip:
            w["W_skip"] = torch.randn(D, D)
        save_file(w, str(folder / "sae.safetensors"))
        weights.append(w)
    return weights


def _sparsify_expected(weights, x, k):
    ys = []
    for i, w in enumerate(weights):
        pre = torch.relu(x[:, i] @ w["encoder.weight"].T + w["encoder.bias"])
        vals, idx = pre.topk(k, dim=-1)
        a = torch.zeros_like(pre).scatter(-1, idx, vals)
        y = a @ w["W_dec"] + w["b_dec"]
        if "W_skip" in w:
            y = y + x[:, i] @ w["W_skip"].T
        ys.append(y)
    return torch.stack(ys, 1)


@pytest.mark.parametrize("skip", [True, False])
def test_import_sparsify_matches_the_sparsify_math(tmp_path, skip):
    weights = _write_sparsify(tmp_path, [0, 2, 1], skip=skip)
    tc = import_sparsify(tmp_path, model_name="meta-llama/Llama-3.2-1B")
    assert tc.arch == ("skip_plt" if skip else "plt") and tc.activation.k == 3
    assert tc.layers == [0, 1, 2]
    ordered = [weights[0], weights[2], weights[1]]  # folders sorted by layer
    x = torch.randn(9, 3, D)
    torch.testing.assert_close(tc(x)[0], _sparsify_expected(ordered, x, 3), rtol=1e-4, atol=1e-4)


def test_import_sparsify_errors(tmp_path):
    _write_sparsify(tmp_path / "sae", [0], transcode=False)
    with pytest.raises(WiremapError, match="sparse autoencoder"):
        import_sparsify(tmp_path / "sae")
    _write_sparsify(tmp_path / "tc", [0, 1])
    (tmp_path / "tc" / "layers.1.mlp" / "sae.safetensors").unlink()
    with pytest.raises(WiremapError, match="layers.1.mlp/sae.safetensors is missing"):
        import_sparsify(tmp_path / "tc")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WiremapError, match="no <hookpoint>/cfg.json"):
        import_sparsify(tmp_path / "empty")
    cfg_path = tmp_path / "tc" / "layers.0.mlp" / "cfg.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "activation": "groupmax"}))
    with pytest.raises(WiremapError, match="groupmax"):
        import_sparsify(tmp_path / "tc")
