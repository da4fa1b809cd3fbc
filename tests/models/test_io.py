"""Transcoder files: export -> load round trips, the circuit-tracer layout, importers, errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import random_transcoder
from safetensors.torch import load_file, save_file

from wiremap.errors import WiremapError
from wiremap.models.formats import (
    import_gemma_scope,
    import_sparsify,
    load_transcoders,
    save_transcoders,
)

L, D, F = 3, 8, 12
ARCHS = ["plt", "skip_plt", "clt", "skip_clt"]


def make(arch: str, activation: str = "relu", k: int | None = None, seed: int = 0):
    return random_transcoder(arch, L, D, F, activation, k, seed, model_name="tiny/model")


@pytest.mark.filterwarnings("ignore:.*circuit-tracer")
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
        assert loaded.W_dec is None
        assert not any(k.startswith("W_dec") for k in loaded.state_dict())


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
    torch.testing.assert_close(layer["W_skip"], tc.W_skip[1].detach())


@pytest.mark.filterwarnings("ignore:.*circuit-tracer")
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
        x @ enc["W_skip_1"].float(), tc.skip(x, 1).detach(), rtol=2e-2, atol=2e-2
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


@pytest.mark.filterwarnings("ignore:.*circuit-tracer")
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


# -- circuit-tracer compatibility (no circuit-tracer needed) ----------------------------------
def _outputs_equal(a, b, n_layers=L):
    x = torch.randn(4, n_layers, D)
    with torch.no_grad():
        (y1, a1), (y2, a2) = a(x), b(x)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(y1, y2)


def test_topk_plt_config_carries_activation_and_k_as_circuit_tracer_reads_them(tmp_path):
    save_transcoders(make("plt", "topk", 3), tmp_path)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (config["activation"], config["k"]) == ("topk", 3)
    assert config["scan"] == config["scan_name"]  # 0.5.0 reads `scan`, main `scan_name`
    assert "0.5.0 loads it as ReLU" in config["circuit_tracer_notes"]
    assert "circuit_tracer_limits" not in config


@pytest.mark.parametrize(
    "arch,activation,match",
    [("skip_clt", "relu", "ignores W_skip_i"), ("clt", "topk", "TopK CLT as a ReLU")],
)
def test_clt_kinds_circuit_tracer_cannot_represent_warn(tmp_path, arch, activation, match):
    with pytest.warns(UserWarning, match=match):
        save_transcoders(make(arch, activation, 3), tmp_path)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert any(match in text for text in config["circuit_tracer_limits"])


def test_config_paths_are_absolute_and_a_moved_folder_still_loads(tmp_path, monkeypatch):
    tc = make("plt", "jumprelu")
    save_transcoders(tc, tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in config["transcoders"])
    (tmp_path / "a").rename(tmp_path / "b")
    _outputs_equal(load_transcoders(tmp_path / "b"), tc)


def test_unpadded_layer_subset_warns_that_circuit_tracer_would_misplace_it(tmp_path):
    tc = make("plt")
    tc.layers = [5, 6, 7]
    with pytest.warns(UserWarning, match=r"wrong layers.*pad_layers=True"):
        save_transcoders(tc, tmp_path)
    assert load_transcoders(tmp_path).layers == [5, 6, 7]


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_layer_subset_names_files_by_model_layer(tmp_path, arch):
    tc = make(arch, "jumprelu")
    tc.layers = [5, 6, 7]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_transcoders(tc, tmp_path, pad_layers=True)
    assert not any("wrong layers" in str(w.message) for w in caught)
    stem = "W_enc" if tc.cross_layer else "layer"
    assert sorted(p.name for p in tmp_path.glob(f"{stem}_*")) == sorted(
        f"{stem}_{m}.safetensors" for m in range(8)
    )
    if tc.cross_layer:  # circuit-tracer's CLT: W_dec_m [F, n_files - m, d]
        assert list(load_file(str(tmp_path / "W_dec_2.safetensors"))["W_dec_2"].shape) == [F, 6, D]
        assert list(load_file(str(tmp_path / "W_dec_6.safetensors"))["W_dec_6"].shape) == [F, 2, D]
    else:
        config = yaml.safe_load((tmp_path / "config.yaml").read_text())
        assert [Path(p).name for p in config["transcoders"]][5] == "layer_5.safetensors"
        zero = load_file(str(tmp_path / "layer_3.safetensors"))
        assert all(not t.any() for t in zero.values())
    again = load_transcoders(tmp_path, lazy=tc.cross_layer)
    assert again.layers == [5, 6, 7]
    _outputs_equal(again, tc)


def test_padding_a_non_consecutive_clt_is_refused(tmp_path):
    tc = make("clt")
    tc.layers = [1, 4, 7]
    with pytest.raises(WiremapError, match="consecutive layers for a CLT"):
        save_transcoders(tc, tmp_path, pad_layers=True)


@pytest.mark.parametrize(
    "model_name,hooks",
    [
        ("google/gemma-3-1b-pt", ("mlp.hook_in", "hook_mlp_out")),
        ("meta-llama/Llama-3.2-1B", ("mlp.hook_in", "mlp.hook_out")),
    ],
)
def test_hook_names_follow_circuit_tracer_per_model_family(tmp_path, model_name, hooks):
    tc = make("plt")
    tc.model_name = model_name
    save_transcoders(tc, tmp_path)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (config["feature_input_hook"], config["feature_output_hook"]) == hooks
    assert load_transcoders(tmp_path).output_hook == "mlp_out"


def test_hook_names_read_the_model_type_of_a_local_checkpoint(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    tc = make("clt")
    tc.model_name, tc.input_hook = str(tmp_path / "model"), "resid_mid"
    save_transcoders(tc, tmp_path / "tc")
    config = yaml.safe_load((tmp_path / "tc" / "config.yaml").read_text())
    assert (config["feature_input_hook"], config["feature_output_hook"]) == (
        "hook_resid_mid",
        "hook_mlp_out",
    )


def test_gemma2_mlp_in_export_warns_circuit_tracer_has_no_such_hook(tmp_path):
    tc = make("plt")
    tc.model_name = "google/gemma-2-2b"
    with pytest.warns(UserWarning, match="no Gemma-2 hook for the pre-feedforward norm"):
        save_transcoders(tc, tmp_path)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (config["feature_input_hook"], config["feature_output_hook"]) == (
        "mlp.hook_in",
        "hook_mlp_out",
    )
    tc.input_hook = "resid_mid"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_transcoders(tc, tmp_path / "resid")


@pytest.mark.parametrize(
    "hooks,match",
    [
        (("mlp.hook_in", "mlp.hook_out"), "MLP output before its post-feedforward norm"),
        (("ln2.hook_normalized", "hook_mlp_out"), "norm's output before its weight"),
        (("blocks.{layer}.hook_attn_out", "hook_mlp_out"), "none of the hooks wiremap reads"),
    ],
)
def test_gemma_configs_with_hooks_wiremap_lacks_are_refused(tmp_path, hooks, match):
    _write_ct_plt(tmp_path, [0, 1])
    config = {"model_name": "google/gemma-2-2b", "model_kind": "transcoder_set",
              "feature_input_hook": hooks[0], "feature_output_hook": hooks[1],
              "transcoders": ["layer_0.safetensors", "layer_1.safetensors"]}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(WiremapError, match=match):
        load_transcoders(tmp_path)
    again = load_transcoders(tmp_path, input_hook="mlp_in", output_hook="mlp_out")
    assert (again.input_hook, again.output_hook) == ("mlp_in", "mlp_out")


# -- folders and configs written or published by circuit-tracer ----------------------------
def _write_ct_plt(folder, names, extra=None, seed=0):
    """Layer files as circuit-tracer's to_safetensors writes them (JumpReLU)."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    layers = []
    for name in names:
        t = {"W_enc": torch.randn(F, D), "W_dec": torch.randn(F, D), "b_enc": torch.randn(F),
             "b_dec": torch.randn(D), "activation_function.threshold": torch.rand(F),
             **(extra or {})}  # fmt: skip
        if "k" in t:  # circuit-tracer's TopK files: k, no threshold
            del t["activation_function.threshold"]
        save_file(t, str(folder / f"layer_{name}.safetensors"))
        layers.append(t)
    return layers


def _ct_plt_expected(layers, x):
    ys, acts = [], []
    for i, t in enumerate(layers):
        pre = x[:, i] @ t["W_enc"].T + t["b_enc"]
        if "k" in t:
            vals, idx = pre.topk(int(t["k"]))
            a = torch.zeros_like(pre).scatter(-1, idx, vals)
        else:
            a = pre * (pre > t["activation_function.threshold"])
        ys.append(a @ t["W_dec"] + t["b_dec"])
        acts.append(a)
    return torch.stack(ys, 1), torch.stack(acts, 1)


def test_circuit_tracer_to_safetensors_folder_without_config_loads(tmp_path):
    layers = _write_ct_plt(tmp_path, [0, 1, 2])
    tc = load_transcoders(tmp_path)
    assert (tc.arch, tc.activation.name, tc.input_hook) == ("plt", "jumprelu", "mlp_in")
    x = torch.randn(5, L, D)
    y, a = _ct_plt_expected(layers, x)
    torch.testing.assert_close(tc(x)[1], a)
    torch.testing.assert_close(tc(x)[0], y, rtol=1e-4, atol=1e-4)
    assert load_transcoders(tmp_path, input_hook="resid_mid").input_hook == "resid_mid"


def test_circuit_tracer_topk_files_carry_k_as_a_tensor(tmp_path):
    layers = _write_ct_plt(tmp_path, [0, 1, 2], extra={"k": torch.tensor(3)})
    for t in layers:
        t["b_enc"] = t["b_enc"] + 10.0  # every pre-activation positive: both TopKs agree
    for i, t in enumerate(layers):
        save_file(t, str(tmp_path / f"layer_{i}.safetensors"))
    tc = load_transcoders(tmp_path)
    assert (tc.activation.name, tc.activation.k) == ("topk", 3)
    x = torch.randn(5, L, D)
    torch.testing.assert_close(tc(x)[1], _ct_plt_expected(layers, x)[1])


def test_a_wiremap_export_without_config_is_reported_unfinished(tmp_path):
    save_transcoders(make("plt"), tmp_path)
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(WiremapError, match="unfinished"):
        load_transcoders(tmp_path)


def _hf_cache(root, repo, files):
    """A Hugging Face hub cache holding `files` {name: source path} of `repo`."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("abc123")
    for name, source in files.items():
        target = base / "snapshots" / "abc123" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)


def test_hub_config_with_hf_entries_loads_from_next_to_it_or_the_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    layers = _write_ct_plt(tmp_path / "files", [0, 1, 2])
    repo = "someone/transcoders"
    entries = [f"hf://{repo}/sub/layer_{i}.safetensors" for i in range(L)]
    config = {"model_kind": "transcoder_set", "model_name": "m", "scan": "s",
              "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
              "transcoders": entries}  # fmt: skip
    next_to = tmp_path / "next_to"
    (next_to / "sub").mkdir(parents=True)
    (next_to / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(WiremapError, match=r"neither next to it nor in the Hugging Face cache"):
        load_transcoders(next_to)
    for i in range(2):
        (tmp_path / "files" / f"layer_{i}.safetensors").rename(next_to / f"layer_{i}.safetensors")
    cache = tmp_path / "hf_cache"
    _hf_cache(cache, repo, {"sub/layer_2.safetensors": tmp_path / "files/layer_2.safetensors"})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    tc = load_transcoders(next_to)  # two next to config.yaml, one in the HF cache
    x = torch.randn(5, L, D)
    torch.testing.assert_close(tc(x)[1], _ct_plt_expected(layers, x)[1])


def test_older_hub_configs_list_layer_and_filepath_entries(tmp_path):
    params = _write_gemma_scope(tmp_path, [0, 1])
    files = sorted(tmp_path.rglob("params.npz"))
    entries = [{"id": f"l{i}", "layer": i, "filepath": str(p)} for i, p in enumerate(files)]
    config = {"model_kind": "transcoder_set", "model_name": "some/model",
              "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out",
              "transcoders": entries[::-1]}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    tc = load_transcoders(tmp_path)
    assert (tc.layers, tc.input_hook, tc.output_hook) == ([0, 1], "mlp_in", "mlp_out")
    x = torch.randn(3, 2, D)
    torch.testing.assert_close(tc(x)[1], _gemma_scope_expected(params, x)[1], rtol=1e-5, atol=1e-5)


def test_circuit_tracer_cache_folder_loads_by_hub_reference(tmp_path, monkeypatch):
    cache = tmp_path / "ct_cache"
    folder = cache / "someone" / "repo" / "sub@v1"
    layers = _write_ct_plt(folder, [0, 1, 2])
    config = {"model_kind": "transcoder_set", "scan_name": "someone/repo//sub@v1",
              "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out",
              "revision": "v1"}  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("CIRCUIT_TRACER_CACHE_DIR", str(cache))
    for ref in ("someone/repo/sub@v1", "hf://someone/repo/sub?revision=v1"):
        tc = load_transcoders(ref)
        assert tc.input_hook == "resid_mid"
        x = torch.randn(2, L, D)
        torch.testing.assert_close(tc(x)[1], _ct_plt_expected(layers, x)[1])
    with pytest.raises(WiremapError, match="neither a folder nor in circuit-tracer's cache"):
        load_transcoders("someone/other")


@pytest.mark.parametrize(
    "name,match",
    [("layers.1", "whole-layer coder"), ("layers.1.self_attn", "not an MLP"), ("embed", "MLP")],
)
def test_import_sparsify_refuses_coders_that_are_not_mlp_transcoders(tmp_path, name, match):
    _write_sparsify(tmp_path, [0])
    (tmp_path / "layers.0.mlp").rename(tmp_path / name)
    with pytest.raises(WiremapError, match=match):
        import_sparsify(tmp_path)
    with pytest.raises(WiremapError, match=match):  # an explicit layer does not bypass it
        import_sparsify(tmp_path, layers=[1])


def test_import_sparsify_accepts_gpt2_style_mlp_hookpoints(tmp_path):
    _write_sparsify(tmp_path, [2])
    (tmp_path / "layers.2.mlp").rename(tmp_path / "h.2.mlp")
    assert import_sparsify(tmp_path).layers == [2]


# -- sae-lens and sparsify formats (writers and readers; the peers themselves in test_interop) --
@pytest.mark.parametrize("arch", ["plt", "skip_plt"])
@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_sae_lens_folders_round_trip(tmp_path, arch, activation):
    from wiremap.models.formats import export_sae_lens, import_sae_lens

    tc = make(arch, activation)
    tc.layers = [2, 4, 9]
    folders = export_sae_lens(tc, tmp_path)
    assert [f.name for f in folders] == ["layer_2", "layer_4", "layer_9"]
    cfg = json.loads((folders[1] / "cfg.json").read_text())
    assert (
        cfg["architecture"]
        == ("jumprelu_" if activation == "jumprelu" else "")
        + ("skip_" if arch == "skip_plt" else "")
        + "transcoder"
    )
    assert cfg["metadata"]["hook_name"] == "blocks.4.mlp.hook_in"
    w = load_file(str(folders[0] / "sae_weights.safetensors"))
    assert list(w["W_enc"].shape) == [D, F] and list(w["W_dec"].shape) == [F, D]
    again = import_sae_lens(tmp_path)
    assert (again.layers, again.arch, again.input_hook) == ([2, 4, 9], arch, "mlp_in")
    _outputs_equal(again, tc)


def test_sae_lens_refuses_what_it_cannot_hold(tmp_path):
    from wiremap.models.formats import export_sae_lens, import_sae_lens

    with pytest.raises(WiremapError, match="ReLU or JumpReLU only, not topk"):
        export_sae_lens(make("plt", "topk", 3), tmp_path)
    with pytest.raises(WiremapError, match="no cross-layer transcoders"):
        export_sae_lens(make("clt"), tmp_path)
    export_sae_lens(make("plt"), tmp_path)
    cfg_path = tmp_path / "layer_0" / "cfg.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "architecture": "topk"}))
    with pytest.raises(WiremapError, match="'topk' SAE .* not a transcoder"):
        import_sae_lens(tmp_path)
    cfg = json.loads(cfg_path.read_text())
    cfg["architecture"] = "transcoder"
    cfg["metadata"]["hook_name"] = "blocks.0.ln2.hook_normalized"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WiremapError, match="'ln2.hook_normalized'.*pass input_hook="):
        import_sae_lens(tmp_path)
    assert import_sae_lens(tmp_path, input_hook="mlp_in").input_hook == "mlp_in"


@pytest.mark.parametrize("arch", ["plt", "skip_plt"])
def test_sparsify_folders_round_trip(tmp_path, arch):
    from wiremap.models.formats import export_sparsify

    tc = make(arch, "topk", 3)
    tc.layers = [1, 3, 5]
    export_sparsify(tc, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "layers.1.mlp",
        "layers.3.mlp",
        "layers.5.mlp",
    ]
    again = import_sparsify(tmp_path)
    assert (again.layers, again.arch, again.activation.k) == ([1, 3, 5], arch, 3)
    _outputs_equal(again, tc)
    with pytest.raises(WiremapError, match="TopK coders"):
        export_sparsify(make("plt", "jumprelu"), tmp_path / "x")


def test_gemma_scope_2_layer_files_load_from_a_config(tmp_path):
    torch.manual_seed(4)
    raw = []
    for i in range(2):
        t = {"w_enc": torch.randn(D, F), "w_dec": torch.randn(F, D), "b_enc": torch.randn(F),
             "b_dec": torch.randn(D), "threshold": torch.rand(F),
             "affine_skip_connection": torch.randn(D, D)}  # fmt: skip
        save_file(t, str(tmp_path / f"params_{i}.safetensors"))
        raw.append(t)
    config = {"model_kind": "transcoder_set", "model_name": "some/model",
              "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out",
              "transcoders": [f"params_{i}.safetensors" for i in range(2)]}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    tc = load_transcoders(tmp_path)
    assert (tc.arch, tc.activation.name) == ("skip_plt", "jumprelu")
    x = torch.randn(3, 2, D)
    for i, t in enumerate(raw):  # Gemma Scope 2: pre = x @ w_enc + b_enc, skip = x @ affine
        pre = x[:, i] @ t["w_enc"] + t["b_enc"]
        a = pre * (pre > t["threshold"])
        y = a @ t["w_dec"] + t["b_dec"] + x[:, i] @ t["affine_skip_connection"]
        y_hat, a_hat = tc(x)
        torch.testing.assert_close(a_hat[:, i], a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_hat[:, i], y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["plt", "clt"])
def test_padding_reaches_every_model_layer(tmp_path, arch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"num_hidden_layers": 6}))
    tc = make(arch, "jumprelu")
    tc.layers, tc.model_name = [1, 2, 3], str(tmp_path / "model")
    save_transcoders(tc, tmp_path / "a", pad_layers=True)  # 6 layers, from config.json
    save_transcoders(tc, tmp_path / "b", pad_layers=6)
    for folder in (tmp_path / "a", tmp_path / "b"):
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["padded_n_layers"] == 6
        if tc.cross_layer:  # our layer 3's decoders + zeros for model layers 4 and 5
            w = load_file(str(folder / "W_dec_1.safetensors"))["W_dec_1"]
            assert list(w.shape) == [F, 5, D] and not w[:, 3:].any()
            assert (folder / "W_enc_5.safetensors").is_file()
        else:
            assert len(config["transcoders"]) == 6
        for lazy in (False, True):
            _outputs_equal(load_transcoders(folder, lazy=lazy), tc)
    with pytest.raises(WiremapError, match="gives 3 model layers but the transcoder covers"):
        save_transcoders(tc, tmp_path / "c", pad_layers=3)


def test_an_existing_export_can_be_padded_again(tmp_path):
    tc = make("clt", "jumprelu")
    tc.layers = [2, 3, 4]
    with pytest.warns(UserWarning, match="wrong layers"):
        save_transcoders(tc, tmp_path / "a")
    save_transcoders(load_transcoders(tmp_path / "a"), tmp_path / "b", pad_layers=True)
    assert (tmp_path / "b" / "W_enc_4.safetensors").is_file()
    _outputs_equal(load_transcoders(tmp_path / "b", lazy=True), tc)


# -- the format registry and the old import paths ---------------------------------------------
def test_formats_are_registered_once_and_dispatch_by_name(tmp_path):
    from wiremap.models import formats
    from wiremap.models.formats import FORMATS, Format, register_format

    assert {"wiremap", "circuit_tracer", "gemma_scope", "sparsify", "sae_lens"} <= set(FORMATS)
    with pytest.raises(WiremapError, match="file format 'sae_lens' is already registered"):
        register_format(Format("sae_lens", "a clash"))
    assert FORMATS["sae_lens"].write is formats.export_sae_lens
    tc = make("skip_plt", "jumprelu")
    formats.export_transcoders(tc, tmp_path / "sl", format="sae_lens")
    _outputs_equal(formats.import_transcoders(tmp_path / "sl", format="sae_lens"), tc)
    with pytest.raises(WiremapError, match="cannot write them"):
        formats.export_transcoders(tc, tmp_path / "gs", format="gemma_scope")
    with pytest.raises(WiremapError, match="unknown transcoder file format 'onnx'"):
        formats.import_transcoders(tmp_path, format="onnx")
    try:
        mine = register_format(Format("test_format", "x", read=lambda path: tc))
        assert formats.import_transcoders(tmp_path, format="test_format") is tc
        with pytest.raises(WiremapError, match="reads test_format files but cannot write"):
            formats.export_transcoders(tc, tmp_path, format="test_format")
        assert register_format(Format("test_format", "y"), replace=True) is not mine
    finally:
        del FORMATS["test_format"]


def test_old_io_paths_still_import_with_a_warning():
    import wiremap
    from wiremap.models import formats

    old = {
        "wiremap.models.io": ["save_transcoders", "load_transcoders", "import_gemma_scope",
                              "import_sparsify", "ct_hook_names", "circuit_tracer_limits"],
        "wiremap.models.peer_formats": ["export_sae_lens", "import_sae_lens", "export_sparsify"],
    }  # fmt: skip
    for module, names in old.items():
        for name in names:
            with pytest.warns(DeprecationWarning, match=f"{module}.{name} is deprecated"):
                value = getattr(__import__(module, fromlist=[name]), name)
            assert value is getattr(formats, name, None) or value.__module__.startswith(
                "wiremap.models.formats."
            )
    assert wiremap.save_transcoders is formats.save_transcoders
    assert wiremap.load_transcoders is formats.load_transcoders
