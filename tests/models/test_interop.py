"""Our transcoder files in circuit-tracer, sparsify and sae-lens, and theirs in wiremap.

Optional: `python -m pytest -m interop` in an environment with circuit-tracer, eai-sparsify
and sae-lens installed; each test skips when its package is missing.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import yaml

from wiremap.models.formats import (
    export_sae_lens,
    export_sparsify,
    import_sae_lens,
    import_sparsify,
    load_transcoders,
    save_transcoders,
)
from wiremap.models.transcoders import build_transcoder

pytestmark = pytest.mark.interop
L, D, F, K = 3, 8, 16, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def make(arch, activation="relu", k=None, layers=None, seed=0):
    torch.manual_seed(seed)
    n = len(layers) if layers else L
    tc = build_transcoder(arch, n, D, F, activation, k, model_name="tiny/model", layers=layers)
    with torch.no_grad():
        for p in tc.parameters():
            p.add_(0.3 * torch.randn_like(p))
        tc.b_enc.add_(2.0)  # TopK: at least k positive pre-activations per token
        if activation == "jumprelu":
            tc.activation.set_threshold(torch.rand(n, F) * 0.5)
    return tc


def export(tc, folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_transcoders(tc, folder, **kw)
    return yaml.safe_load((folder / "config.yaml").read_text())


def ct_load_set(config):
    """circuit-tracer's own config-driven loader (what its hub configs go through)."""
    from circuit_tracer.utils.hf_utils import load_transcoders as ct_load

    return ct_load(config, device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)


def ct_topk(ct_set, k):
    """circuit-tracer main reads `activation`/`k`; 0.5.0 loads ReLU: set TopK by hand."""
    from circuit_tracer.transcoder.activation_functions import TopK

    if all(isinstance(t.activation_function, TopK) for t in ct_set):
        assert {t.activation_function.k for t in ct_set} == {k}
        return
    assert all(t.activation_function is torch.nn.functional.relu for t in ct_set)  # 0.5.0
    for t in ct_set:
        t.activation_function = TopK(k)


def ours(tc, x):
    with torch.no_grad():
        y, a = tc(x)
    return y.transpose(0, 1), a.transpose(0, 1)  # [n, L, ...] -> circuit-tracer's [L, n, ...]


@pytest.mark.parametrize("arch", ["plt", "skip_plt"])
@pytest.mark.parametrize("activation,k", [("relu", None), ("jumprelu", None), ("topk", K)])
def test_plt_exports_load_in_circuit_tracer(tmp_path, monkeypatch, arch, activation, k):
    pytest.importorskip("circuit_tracer")
    tc = make(arch, activation, k)
    config = export(tc, tmp_path / "tc")
    monkeypatch.chdir(tmp_path)  # the config's paths must not depend on the working dir
    ct_set = ct_load_set(config)
    if activation == "topk":
        ct_topk(ct_set, k)
    x = torch.randn(5, L, D)
    y, a = ours(tc, x)
    with torch.no_grad():
        a_ct = ct_set.encode(x.transpose(0, 1))
        y_ct = ct_set.decode(a_ct, x.transpose(0, 1))
    torch.testing.assert_close(a_ct, a, **TOL)
    torch.testing.assert_close(y_ct, y, **TOL)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_clt_exports_load_in_circuit_tracer(tmp_path, activation):
    ct = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")
    tc = make("clt", activation)
    config = export(tc, tmp_path)
    clt = ct.load_clt(str(tmp_path), config["feature_input_hook"], config["feature_output_hook"],
                      None, torch.device("cpu"), torch.float32, False)  # fmt: skip
    x = torch.randn(5, L, D)
    y, a = ours(tc, x)
    with torch.no_grad():
        a_ct = clt.encode(x.transpose(0, 1))
        y_ct = clt.decode(a_ct.to_sparse(), x.transpose(0, 1))
    torch.testing.assert_close(a_ct, a, **TOL)
    torch.testing.assert_close(y_ct, y, **TOL)


def test_skip_clt_export_warns_and_circuit_tracer_drops_the_skip(tmp_path):
    ct = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")
    tc = make("skip_clt", "jumprelu")
    with pytest.warns(UserWarning, match="ignores W_skip_i"):
        save_transcoders(tc, tmp_path)
    clt = ct.load_clt(str(tmp_path), dtype=torch.float32, device=torch.device("cpu"),
                      lazy_decoder=False)  # fmt: skip
    x = torch.randn(4, L, D)
    y, a = ours(tc, x)
    skip = torch.stack([tc.skip(x[:, i], i) for i in range(L)]).detach()
    with torch.no_grad():
        y_ct = clt.decode(clt.encode(x.transpose(0, 1)).to_sparse(), x.transpose(0, 1))
    torch.testing.assert_close(y_ct, y - skip, **TOL)  # exactly the documented limit


def test_padded_layer_subset_lands_at_its_model_layers(tmp_path, monkeypatch):
    pytest.importorskip("circuit_tracer")
    tc = make("plt", "jumprelu", layers=[5, 6, 7])
    config = export(tc, tmp_path / "tc", pad_layers=True)
    monkeypatch.chdir(tmp_path)
    ct_set = ct_load_set(config)
    assert len(ct_set) == 8
    x = torch.randn(4, 3, D)
    y, a = ours(tc, x)
    x8 = torch.cat([torch.randn(4, 5, D), x], 1).transpose(0, 1)
    with torch.no_grad():
        a_ct = ct_set.encode(x8)
        y_ct = ct_set.decode(a_ct, x8)
    assert not a_ct[:5].any() and not y_ct[:5].any()  # padding layers: nothing fires
    torch.testing.assert_close(a_ct[5:], a, **TOL)
    torch.testing.assert_close(y_ct[5:], y, **TOL)
    assert load_transcoders(tmp_path / "tc").layers == [5, 6, 7]


@pytest.mark.parametrize("arch", ["skip_plt", "clt"])
def test_folders_written_by_circuit_tracer_load_in_wiremap(tmp_path, arch):
    ctc = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")
    tc = make(arch, "jumprelu")
    config = export(tc, tmp_path / "ours")
    if arch == "clt":
        theirs = ctc.load_clt(str(tmp_path / "ours"), dtype=torch.float32,
                              device=torch.device("cpu"), lazy_decoder=False)  # fmt: skip
    else:
        theirs = ct_load_set(config)
    theirs.to_safetensors(str(tmp_path / "theirs"))  # no config.yaml
    assert not (tmp_path / "theirs" / "config.yaml").exists()
    again = load_transcoders(tmp_path / "theirs")
    assert again.arch == arch and again.activation.name == "jumprelu"
    x = torch.randn(5, L, D)
    torch.testing.assert_close(ours(again, x), ours(tc, x), **TOL)


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_reads_our_topk_export_and_we_read_theirs(tmp_path, skip):
    sparsify = pytest.importorskip("sparsify")
    tc = make("skip_plt" if skip else "plt", "topk", K)
    export_sparsify(tc, tmp_path / "ours")
    coders = sparsify.SparseCoder.load_many(str(tmp_path / "ours"), local=True)
    assert list(coders) == [f"layers.{i}.mlp" for i in range(L)]
    x = torch.randn(6, L, D)
    y, a = ours(tc, x)
    for i, coder in enumerate(coders.values()):
        with torch.no_grad():
            out = coder(x[:, i], y=None)
        torch.testing.assert_close(out.sae_out, y[i], **TOL)
        dense = torch.zeros(6, F).scatter(-1, out.latent_indices, out.latent_acts)
        torch.testing.assert_close(dense, a[i], **TOL)
    # theirs -> ours: coders sparsify built and saved itself
    for name, coder in coders.items():
        coder.save_to_disk(tmp_path / "theirs" / name)
    again = import_sparsify(tmp_path / "theirs")
    torch.testing.assert_close(ours(again, x), (y, a), **TOL)


@pytest.mark.parametrize("arch", ["plt", "skip_plt"])
@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_sae_lens_reads_our_plt_layers(tmp_path, arch, activation):
    sae_lens = pytest.importorskip("sae_lens")
    tc = make(arch, activation, layers=[2, 4, 6])
    folders = export_sae_lens(tc, tmp_path)
    x = torch.randn(6, L, D)
    y, a = ours(tc, x)
    for i, folder in enumerate(folders):
        sae = sae_lens.SAE.load_from_disk(folder)
        assert sae.cfg.metadata.hook_name == f"blocks.{tc.layers[i]}.mlp.hook_in"
        with torch.no_grad():
            acts = sae.encode(x[:, i])
            out = sae.decode(acts) if "skip" not in arch else sae(x[:, i])
        torch.testing.assert_close(acts, a[i], **TOL)
        torch.testing.assert_close(out, y[i], **TOL)


@pytest.mark.parametrize("skip", [False, True])
def test_we_read_transcoders_that_sae_lens_saved(tmp_path, skip):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.transcoder import (
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
    )

    torch.manual_seed(1)
    cls = JumpReLUSkipTranscoder if skip else JumpReLUTranscoder
    cfg_cls = JumpReLUSkipTranscoderConfig if skip else JumpReLUTranscoderConfig
    saes = []
    for layer in (3, 1):
        cfg = cfg_cls(d_in=D, d_sae=F, d_out=D, apply_b_dec_to_input=False)
        cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_mid"
        sae = cls(cfg)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
            sae.threshold.abs_()
        sae.save_model(tmp_path / f"layer_{layer}")
        saes.append(sae)
    tc = import_sae_lens(tmp_path)
    assert tc.input_hook == "resid_mid"
    assert (tc.layers, tc.arch, tc.activation.name) == (
        [1, 3],
        "skip_plt" if skip else "plt",
        "jumprelu",
    )
    x = torch.randn(6, 2, D)
    y, a = ours(tc, x)
    for i, sae in enumerate(saes[::-1]):
        with torch.no_grad():
            torch.testing.assert_close(sae.encode(x[:, i]), a[i], **TOL)
            torch.testing.assert_close(sae(x[:, i]), y[i], **TOL)
    assert isinstance(sae_lens.SAE.load_from_disk(tmp_path / "layer_1"), JumpReLUTranscoder)


@pytest.mark.parametrize(
    "architecture,model_name",
    [("Gemma2ForCausalLM", "google/gemma-2-2b"), ("Gemma3ForCausalLM", "google/gemma-3-1b-pt"),
     ("LlamaForCausalLM", "meta-llama/Llama-3.2-1B"), ("Qwen3ForCausalLM", "Qwen/Qwen3-0.6B")],
)  # fmt: skip
@pytest.mark.parametrize("input_hook", ["mlp_in", "resid_mid"])
def test_our_hook_names_exist_in_circuit_tracers_model_mapping(
    architecture, model_name, input_hook
):
    mapping = pytest.importorskip("circuit_tracer.utils.tl_nnsight_mapping")
    from wiremap.models.formats import ct_hook_names

    tc = make("plt")
    tc.model_name, tc.input_hook = model_name, input_hook
    hooks = mapping.get_mapping(architecture).feature_hook_mapping
    if input_hook == "resid_mid" and "hook_resid_mid" not in hooks:
        pytest.skip(f"circuit-tracer maps no hook_resid_mid for {architecture}")
    names = ct_hook_names(tc)
    if (architecture, input_hook) == ("Gemma2ForCausalLM", "mlp_in"):
        assert names[0] not in hooks  # no Gemma-2 hook means our mlp_in: it must refuse
        names = names[1:]
    assert set(names) <= set(hooks), (names, sorted(hooks))
    if architecture.startswith("Gemma"):  # the normed MLP output, as our mlp_out
        assert hooks[names[-1]][0].endswith("post_feedforward_layernorm")


def _ct_replacement(model_dir, config):
    from circuit_tracer import ReplacementModel

    cpu = torch.device("cpu")
    tset = ct_load_set(config)
    rm = ReplacementModel.from_pretrained_and_transcoders(
        str(model_dir), tset, backend="nnsight", device=cpu, dtype=torch.float32
    )
    return rm, tset


@pytest.mark.parametrize(
    "arch,input_hook",
    [("llama", "mlp_in"), ("qwen3", "mlp_in"), ("gemma2", "resid_mid"), ("gemma3_text", "mlp_in")],
)
def test_circuit_tracers_replacement_model_reads_our_hooks(
    tmp_path, tiny_model_dir, arch, input_hook
):
    """In circuit-tracer's own model, our features fire as in ours and its MLP outputs are ours."""
    pytest.importorskip("circuit_tracer")
    from transformers import AutoModelForCausalLM

    from wiremap.models.hooks import capture

    model_dir = tiny_model_dir(arch, n_layers=L, d_model=32)
    torch.manual_seed(0)
    tc = build_transcoder(
        "plt", L, 32, 64, "relu", model_name=str(model_dir), input_hook=input_hook
    )
    with torch.no_grad():
        for p in tc.parameters():
            p.add_(0.3 * torch.randn_like(p))
    rm, tset = _ct_replacement(model_dir, export(tc, tmp_path))
    ctx = rm.setup_attribution("the cat sat on the mat")
    tokens = rm.ensure_tokenized("the cat sat on the mat")
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad(), capture(hf, [input_hook, "mlp_out"]) as acts:
        hf(tokens[None])
    x = torch.stack([acts[input_hook][i][0] for i in range(L)], 1)  # [pos, L, d]
    mlp_out = torch.stack([acts["mlp_out"][i][0] for i in range(L)])  # [L, pos, d]
    a_ct = ctx.activation_matrix.to_dense()
    with torch.no_grad():
        a = tc(x)[1].transpose(0, 1)
        ct_out = ctx.error_vectors + tset.decode(a_ct, x.transpose(0, 1))
    # position 0 (BOS) is zeroed by circuit-tracer
    assert a_ct[:, 1:].count_nonzero() > 0
    torch.testing.assert_close(a_ct[:, 1:], a[:, 1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ct_out[:, 1:], mlp_out[:, 1:], rtol=1e-4, atol=1e-4)


def test_a_gemma2_mlp_in_export_is_refused_by_circuit_tracer(tmp_path, tiny_model_dir):
    pytest.importorskip("circuit_tracer")
    model_dir = tiny_model_dir("gemma2", n_layers=L, d_model=32)
    tc = build_transcoder("plt", L, 32, 64, "relu", model_name=str(model_dir))
    with pytest.raises(KeyError, match="mlp.hook_in"):  # rather than reading another input
        _ct_replacement(model_dir, export(tc, tmp_path))


@pytest.mark.parametrize("arch", ["plt", "clt"])
def test_a_padded_layer_subset_runs_in_circuit_tracers_replacement_model(
    tmp_path, tiny_model_dir, arch
):
    ctc = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")
    from circuit_tracer import ReplacementModel

    model_dir = tiny_model_dir("llama", n_layers=4, d_model=32)
    torch.manual_seed(0)
    tc = build_transcoder(arch, 2, 32, 64, "relu", model_name=str(model_dir), layers=[1, 2])
    with torch.no_grad():
        for p in tc.parameters():
            p.add_(0.3 * torch.randn_like(p))
    config = export(tc, tmp_path, pad_layers=True)  # 4 model layers, read from config.json
    cpu = torch.device("cpu")
    if arch == "clt":
        hooks = config["feature_input_hook"], config["feature_output_hook"]
        ct_tc = ctc.load_clt(str(tmp_path), *hooks, None, cpu, torch.float32, False)
    else:
        ct_tc = ct_load_set(config)
    rm = ReplacementModel.from_pretrained_and_transcoders(
        str(model_dir), ct_tc, backend="nnsight", device=cpu, dtype=torch.float32
    )
    prompt = "the cat sat on the mat"
    a_ct = rm.setup_attribution(prompt).activation_matrix.to_dense()
    from transformers import AutoModelForCausalLM

    from wiremap.models.hooks import capture

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad(), capture(hf, ["mlp_in"], layers=[1, 2]) as acts:
        hf(rm.ensure_tokenized(prompt)[None])
    x = torch.stack([acts["mlp_in"][m][0] for m in (1, 2)], 1)
    with torch.no_grad():
        a = tc(x)[1].transpose(0, 1)
    assert a_ct.shape[0] == 4 and not a_ct[[0, 3]].any()
    torch.testing.assert_close(a_ct[1:3, 1:], a[:, 1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,activation", [("skip_plt", "jumprelu"), ("clt", "relu")])
def test_circuit_tracers_own_cache_folder_loads_by_hub_reference(
    tmp_path, monkeypatch, arch, activation
):
    """Our export 'published' on a stand-in hub, cached by circuit-tracer's own
    save_transcoders_to_cache, then loaded from that cache by its hub reference."""
    caching = pytest.importorskip("circuit_tracer.utils.caching")
    tc = make(arch, activation)
    export(tc, tmp_path / "hub")
    hub = lambda *args, **kwargs: str(tmp_path / "hub" / "config.yaml")  # noqa: E731
    monkeypatch.setattr(caching, "hf_hub_download", hub)
    monkeypatch.setattr(caching, "snapshot_download", lambda *a, **k: str(tmp_path / "hub"))
    monkeypatch.setenv("CIRCUIT_TRACER_CACHE_DIR", str(tmp_path / "ct_cache"))
    cached = caching.save_transcoders_to_cache("someone/transcoders@v1")
    assert cached == tmp_path / "ct_cache" / "someone" / "transcoders@v1"
    again = load_transcoders("someone/transcoders@v1")
    assert (again.arch, again.activation.name) == (arch, activation)
    x = torch.randn(5, L, D)
    torch.testing.assert_close(ours(again, x), ours(tc, x), **TOL)


def test_topk_clt_export_warns_and_circuit_tracer_reads_it_as_relu(tmp_path):
    ct = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")
    tc = make("clt", "topk", K)
    with pytest.warns(UserWarning, match="TopK CLT as a ReLU CLT"):
        save_transcoders(tc, tmp_path)
    clt = ct.load_clt(str(tmp_path), dtype=torch.float32, device=torch.device("cpu"),
                      lazy_decoder=False)  # fmt: skip
    x = torch.randn(4, L, D)
    with torch.no_grad():
        a_ct = clt.encode(x.transpose(0, 1))
        relu = torch.relu(tc.pre_activations(x)).transpose(0, 1)
    torch.testing.assert_close(a_ct, relu, **TOL)  # exactly the documented limit
    assert (a_ct > 0).sum(-1).max() > K
