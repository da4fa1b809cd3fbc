"""Head loadings and QK attributions are exact (DESIGN.md §11) on Llama, GPT-2 and Gemma-2."""

import os
from pathlib import Path

import pytest
import torch

from wiremap.attribution.attention import (
    head_loadings,
    head_loadings_batch,
    qk_attribution,
    qk_attributions,
)
from wiremap.attribution.attribute import attribute
from wiremap.attribution.export import node_ids
from wiremap.errors import WiremapError
from wiremap.models.hooks import capture
from wiremap.models.loading import load_model
from wiremap.models.replacement import ReplacementModel
from wiremap.models.transcoders import build_transcoder

PROMPT = "The cat sees the moon."
# Gemma-2 with a soft-cap that bites (scores of order 0.1) and a 3-token sliding window
GEMMA = dict(attn_logit_softcapping=0.05, query_pre_attn_scalar=1, sliding_window=3)
LLAMA = dict(num_attention_heads=4, num_key_value_heads=2)  # two query heads per kv head
CASES = [("llama", "plt", LLAMA), ("gpt2", "clt", {}), ("gemma2", "skip_plt", GEMMA)]


def make_rm(tiny_model_dir, arch, tc_arch="plt", **overrides):
    model, tokenizer = load_model(str(tiny_model_dir(arch, n_layers=3, **overrides)))
    torch.manual_seed(2)
    tc = build_transcoder(tc_arch, 3, 32, 48, activation="relu")
    with torch.no_grad():
        tc.encoder_bias.normal_(0, 0.05)
        tc.decoder_bias.normal_(0, 0.05)
        if tc.skip_weight is not None:
            tc.skip_weight.normal_(0, 0.05)
    return ReplacementModel(model, tokenizer, tc)


def some_edges(graph, n=40):
    A = graph.dense_adjacency()
    t, s = (A.abs() > 0).nonzero(as_tuple=True)
    pick = torch.randperm(t.numel(), generator=torch.Generator().manual_seed(0))[:n]
    return [(int(s[i]), int(t[i])) for i in pick], A


# -- head loadings -------------------------------------------------------------------------
@pytest.mark.parametrize("arch,tc_arch,overrides", [*CASES, ("gpt_neox", "skip_clt", {})])
@pytest.mark.parametrize("budget", [None, 6])
def test_head_loadings_sum_to_the_edge(tiny_model_dir, arch, tc_arch, overrides, budget):
    rm = make_rm(tiny_model_dir, arch, tc_arch, **overrides)
    # with a budget, error nodes carry the unvisited features folded into them
    graph = attribute(PROMPT, rm, verbose=False, max_feature_nodes=budget, target_batch=8)
    pairs, A = some_edges(graph)
    loads = head_loadings_batch(rm, graph, pairs, target_batch=7, source_batch=5)
    crossing = 0
    for load, (s, t) in zip(loads, pairs, strict=True):
        assert load.edge == pytest.approx(float(A[t, s]))
        scale = float(A[t].abs().max())
        assert load.total == pytest.approx(load.edge, abs=1e-5 * scale)
        if graph.node_layer_pos(s)[1] != graph.node_layer_pos(t)[1]:
            assert load.residual == 0.0  # another position: only heads move information
            crossing += abs(load.edge) > 1e-4
    assert crossing > 0


def test_head_loadings_one_head_by_hand(tiny_model_dir):
    """Token → layer-0 feature: one attention layer between, each head's W_O W_V by hand."""
    rm = make_rm(tiny_model_dir, "llama", **LLAMA)
    graph = attribute(PROMPT, rm, verbose=False)
    feats = graph.active_features.tolist()
    t = next(i for i, (layer, pos, _) in enumerate(feats) if layer == 0 and pos >= 3)
    _, p_t, f = feats[t]
    p_s = p_t - 2
    load = head_loadings(rm, graph, graph.token_index(p_s), t)
    model = rm.model
    attn, block = model.model.layers[0].self_attn, model.model.layers[0]
    ids = graph.input_ids[None]
    model.config._attn_implementation = "eager"  # to return the attention weights
    with torch.no_grad(), capture(model, ["resid_pre", "resid_mid"], [0]) as c:
        pattern = model(ids, output_attentions=True).attentions[0][0]  # [H, q, k]
    x0, mid = c["resid_pre"][0][0], c["resid_mid"][0][0]
    dh, group = attn.head_dim, attn.num_key_value_groups
    w_in = _rms_scale(block.input_layernorm, x0[p_s])
    w_mid = _rms_scale(block.post_attention_layernorm, mid[p_t])
    expected = []
    for h in range(pattern.shape[0]):
        kv = h // group
        v = attn.v_proj.weight[kv * dh : (kv + 1) * dh] @ (w_in * x0[p_s])
        o = attn.o_proj.weight[:, h * dh : (h + 1) * dh] @ v * pattern[h, p_t, p_s]
        expected.append(rm.transcoders.W_enc[0][f] @ (w_mid * o))
    assert load.layers == [0]
    torch.testing.assert_close(load.heads[0].float(), torch.stack(expected), atol=1e-6, rtol=1e-4)
    assert load.heads.abs().max() > 1e-4


def _rms_scale(norm, x):
    return norm.weight * torch.rsqrt(x.pow(2).mean() + norm.variance_epsilon)


def test_head_loadings_of_a_sparse_graph(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "gpt2", "plt")
    graph = attribute(PROMPT, rm, verbose=False)
    pairs, A = some_edges(graph, n=12)
    pairs.append((graph.token_index(0), graph.logit_slice.start))  # BOS: a zero edge
    graph.adjacency = A.to_sparse()
    for load, (s, t) in zip(head_loadings_batch(rm, graph, pairs), pairs, strict=True):
        assert load.edge == float(A[t, s])
        assert load.total == pytest.approx(load.edge, abs=1e-5 * float(A[t].abs().max()))


def test_head_loadings_bad_input(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "llama")
    graph = attribute(PROMPT, rm, verbose=False)
    with pytest.raises(WiremapError, match="unknown node id"):
        head_loadings(rm, graph, "9_9_9", graph.logit_slice.start)
    with pytest.raises(WiremapError, match="not a graph edge"):
        head_loadings(rm, graph, graph.logit_slice.start, 0)


# -- QK attributions -----------------------------------------------------------------------
def model_qk(rm, arch, layer, ids, lin=None, perturb=None):
    """(q [H, pos, dh], k [H_kv, pos, dh], scaling) from the layer's own projections.

    `perturb` (pos, vector) is added to the layer's input; with `lin` (a frozen model)
    the norms are frozen. Rotary is applied here, from the model's cos/sin.
    """
    model, got = rm.model, {}
    layers = model.transformer.h if arch == "gpt2" else model.model.layers
    attn = layers[layer].attn if arch == "gpt2" else layers[layer].self_attn

    def keep(name):
        return lambda _m, _a, out: got.__setitem__(name, out[0].detach())

    def add(_m, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, perturb[0]] += perturb[1]
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    mods = [("qkv", attn.c_attn)] if arch == "gpt2" else [("q", attn.q_proj), ("k", attn.k_proj)]
    handles = [m.register_forward_hook(keep(n)) for n, m in mods]
    if perturb is not None:
        handles.append(layers[layer].register_forward_pre_hook(add, with_kwargs=True))
    try:
        with torch.no_grad():
            lin.forward() if lin is not None else model(ids[None])
    finally:
        for h in handles:
            h.remove()
    dh = getattr(model.config, "head_dim", None) or rm.d_model // model.config.num_attention_heads
    if arch == "gpt2":
        q, k, _ = got["qkv"].split(rm.d_model, dim=-1)
        return _heads(q, dh), _heads(k, dh), dh**-0.5
    q, k = _heads(got["q"], dh), _heads(got["k"], dh)
    cos, sin = model.model.rotary_emb(q, torch.arange(ids.numel())[None])
    q, k = _rotate(q, cos[0], sin[0]), _rotate(k, cos[0], sin[0])
    scalar = getattr(model.config, "query_pre_attn_scalar", None) if arch == "gemma2" else None
    return q, k, (scalar or dh) ** -0.5


def _heads(x, dh):
    return x.reshape(x.shape[0], -1, dh).transpose(0, 1)  # [H, pos, dh]


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@pytest.mark.parametrize("arch,tc_arch,overrides", CASES)
def test_qk_pairs_and_bias_equal_the_models_score(tiny_model_dir, arch, tc_arch, overrides):
    rm = make_rm(tiny_model_dir, arch, tc_arch, **overrides)
    graph = attribute(PROMPT, rm, verbose=False, max_feature_nodes=10)
    ids, n_heads = graph.input_ids, rm.model.config.num_attention_heads
    ids_json = set(node_ids(graph))
    for layer, head in [(1, 0), (2, n_heads - 1)]:
        q, k, scale = model_qk(rm, arch, layer, ids)
        group = n_heads // k.shape[0]
        q_pos = graph.n_pos - 1
        for k_pos in (q_pos - 2, q_pos - 1):
            qk = qk_attribution(rm, graph, layer, head, q_pos, k_pos)
            score = scale * float(q[head, q_pos] @ k[head // group, k_pos])
            assert qk.score == pytest.approx(score, abs=1e-6 * max(1.0, abs(score)))
            assert abs(score) > 1e-4
            graph_nodes = {n for n in qk.query_nodes if n[:2] not in ("A_", "R_")}
            assert graph_nodes <= ids_json and qk.query_nodes[-1] == f"R_{layer}_{q_pos}"
            assert f"A_{layer - 1}_{q_pos}" in qk.query_nodes  # earlier attention blocks
            assert qk.pairs.shape == (len(qk.query_nodes), len(qk.key_nodes))
    top = qk.top(4)
    assert len(top) == 4 and abs(top[0][2]) >= abs(top[-1][2])
    requests = [(layer, h, q_pos, k) for layer in (1, 2) for h in range(n_heads) for k in (1, 2)]
    requests = [r for r in requests if r[0] != 2 or "sliding_window" not in overrides]
    for request, batched in zip(requests, qk_attributions(rm, graph, requests), strict=True):
        alone = qk_attribution(rm, graph, *request)
        assert batched.query_nodes == alone.query_nodes and batched.key_nodes == alone.key_nodes
        torch.testing.assert_close(batched.pairs, alone.pairs)


@pytest.mark.parametrize("arch,tc_arch,overrides", CASES)
def test_qk_brute_force_scaling_one_write(tiny_model_dir, arch, tc_arch, overrides):
    """Scaling a node's write by (1+ε) at the layer's input moves the score by ε × its sum."""
    rm = make_rm(tiny_model_dir, arch, tc_arch, **overrides)
    ids = rm.tokenize(PROMPT)
    layer, head, q_pos, k_pos = 2, 1, ids.numel() - 1, ids.numel() - 2
    qk = qk_attribution(rm, PROMPT, layer, head, q_pos, k_pos)
    run = rm.run(ids)
    group = rm.model.config.num_attention_heads // _kv_heads(rm)
    eps = 0.5
    with rm.frozen(ids) as lin:
        q, k, scale = model_qk(rm, arch, layer, ids, lin)
        base = scale * float(q[head, q_pos] @ k[head // group, k_pos])
        for side, pos, nodes, sums in (
            ("query", q_pos, qk.query_nodes, qk.row_sums()),
            ("key", k_pos, qk.key_nodes, qk.col_sums()),
        ):
            for name in [*_sample_nodes(nodes), f"A_1_{pos}"]:
                w = node_write(rm, run, name, layer, arch)
                q2, k2, _ = model_qk(rm, arch, layer, ids, lin, perturb=(pos, eps * w))
                change = scale * float(q2[head, q_pos] @ k2[head // group, k_pos]) - base
                i = nodes.index(name)
                expected = eps * float(sums[i])
                assert change == pytest.approx(expected, rel=1e-4, abs=1e-5), (side, name)
    assert qk.pairs.abs().max() > 1e-3


def _kv_heads(rm):
    cfg = rm.model.config
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def _sample_nodes(nodes):
    """A feature, an error node and the token node of this side (those present)."""
    kinds = {"E": None, "err": None, "feat": None}
    for name in nodes:
        if name[:2] in ("A_", "R_"):
            continue
        key = "E" if name.startswith("E_") else "err" if "_-1_" in name else "feat"
        kinds[key] = kinds[key] or name
    return [n for n in kinds.values() if n]


def node_write(rm, run, name, layer, arch):
    """The residual write of node `name` before `layer`, from the clean run."""
    if name.startswith("A_"):
        return attention_write(rm, arch, *(int(x) for x in name.split("_")[1:]))
    if name.startswith("E_"):
        return run.resid0[int(name.split("_")[2])]
    src, f, pos = (int(x) for x in name.split("_"))
    if f == -1:
        return run.errors[src, pos]
    a = run.activations.to_dense()[src, pos, f]
    dec = rm.transcoders.decoder(src)[f]  # [n_out, d]
    return a * dec[: layer - src].sum(0)


def attention_write(rm, arch, layer, pos):
    """What layer `layer`'s attention block added to the residual at `pos` (clean run)."""
    block = rm.model.transformer.h[layer] if arch == "gpt2" else rm.model.model.layers[layer]
    module = {"gpt2": "attn", "gemma2": "post_attention_layernorm"}.get(arch, "self_attn")
    got = []
    handle = getattr(block, module).register_forward_hook(
        lambda _m, _a, out: got.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            rm.model(rm.tokenize(PROMPT)[None])
    finally:
        handle.remove()
    return got[0][0, pos]


def test_gemma_soft_cap_gives_the_models_pattern(tiny_model_dir):
    """softmax over keys of the capped scores = the model's attention weights (full layer)."""
    rm = make_rm(tiny_model_dir, "gemma2", "plt", **GEMMA)
    ids = rm.tokenize(PROMPT)
    layer, head, q_pos = 1, 0, ids.numel() - 1  # layer 1 attends to every earlier token
    scores = [qk_attribution(rm, PROMPT, layer, head, q_pos, k) for k in range(q_pos + 1)]
    capped = torch.tensor([s.capped_score for s in scores], dtype=torch.float64)
    raw = torch.tensor([s.score for s in scores], dtype=torch.float64)
    assert (capped - raw).abs().max() > 1e-2  # the cap bites
    with torch.no_grad():
        rm.model.config._attn_implementation = "eager"
        weights = rm.model(ids[None], output_attentions=True).attentions[layer][0, head, q_pos]
    torch.testing.assert_close(torch.softmax(capped, 0), weights.double(), atol=1e-5, rtol=0)


def test_qk_refusals(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "gemma2", "plt", **GEMMA)
    last = rm.tokenize(PROMPT).numel() - 1
    with pytest.raises(WiremapError, match="sliding window of 3"):
        qk_attribution(rm, PROMPT, 0, 0, last, last - 3)  # layer 0 slides
    assert qk_attribution(rm, PROMPT, 0, 0, last, last - 2).pairs.numel() > 0
    with pytest.raises(WiremapError, match="causal"):
        qk_attribution(rm, PROMPT, 1, 0, 2, 3)
    with pytest.raises(WiremapError, match="head 9"):
        qk_attribution(rm, PROMPT, 1, 9, 2, 1)
    qwen = make_rm(tiny_model_dir, "qwen3")
    with pytest.raises(WiremapError, match="not bilinear"):
        qk_attribution(qwen, PROMPT, 1, 0, 2, 1)


# -- CLI and viewer --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_graph(tiny_model_dir, tmp_path_factory):
    """(graph JSON path, model path, transcoders path) of `wiremap attribute --heads 30`."""
    from wiremap.cli import main
    from wiremap.models.io import save_transcoders

    tmp = tmp_path_factory.mktemp("heads_cli")
    path = tiny_model_dir("llama", n_layers=3, **LLAMA)
    save_transcoders(build_transcoder("plt", 3, 32, 48, model_name=str(path)), tmp / "tc")
    out = tmp / "graph.json"
    args = ["attribute", "--model", str(path), "--transcoders", str(tmp / "tc"), "--quiet"]
    assert main([*args, "--prompt", PROMPT, "--out", str(out), "--heads", "30"]) == 0
    return out, path, tmp / "tc"


def test_attribute_cli_heads_block(cli_graph):
    import json

    from wiremap.attribution.export import validate_graph_json
    from wiremap.attribution.graph import Graph

    out, path, tc = cli_graph
    obj = json.loads(out.read_text())
    validate_graph_json(obj)
    block = obj["heads"]
    assert block["n_heads"] == 4 and 0 < len(block["edges"]) <= 30
    links = {(link["source"], link["target"]): link["weight"] for link in obj["links"]}
    graph = Graph.load(out.with_suffix(""))
    rm = ReplacementModel.from_pretrained(str(path), str(tc))
    edge = block["edges"][0]
    assert edge["weight"] == links[edge["source"], edge["target"]]
    exact = head_loadings(rm, graph, edge["source"], edge["target"])
    shares = {(h["layer"], h["head"]): h["share"] for h in edge["heads"]}
    for layer, head, share in exact.top(3):
        assert shares[layer, head] == pytest.approx(share, rel=1e-3, abs=1e-7)
    keyed = [h for h in edge["heads"] if "qk" in h]
    assert keyed and keyed[0]["qk"] in block["qk"]
    entry = block["qk"][keyed[0]["qk"]]
    assert entry["pairs"] and all(q in block["names"] for q, _, _ in entry["pairs"])


def test_attribute_cli_rejects_a_bad_heads_count(capsys):
    from wiremap.cli import main

    args = ["attribute", "--model", "m", "--transcoders", "t", "--prompt", "p", "--out", "o.json"]
    assert main([*args, "--heads", "0"]) == 2
    assert "--heads 0: give a whole number of at least 1" in capsys.readouterr().err


def test_viewer_lists_heads_and_qk_pairs(cli_graph, tmp_path):
    import json

    from test_viewer_browser import CHROMIUM, Browser

    from wiremap.attribution.html import write_html

    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    obj = json.loads(cli_graph[0].read_text())
    edge = next(e for e in obj["heads"]["edges"] if any("qk" in h for h in e["heads"]))
    page = write_html(obj, tmp_path / "graph.html")
    browser = Browser(tmp_path / "profile")
    try:
        browser.goto(page.as_uri())
        browser.wait_for("document.querySelectorAll('#graph .node').length", "the graph")
        browser.js(f"showNode({json.dumps(edge['target'])})")
        browser.click("#node-panel .heads-button")
        rows = browser.wait_for(
            "document.querySelectorAll('#edge-panel .head-list li').length", "heads"
        )
        assert 0 < rows <= 8
        key = json.dumps(f"{edge['source']}>{edge['target']}")
        browser.js(f"showEdgeHeads(S.heads.get({key}))")
        browser.click("#edge-panel li.has-qk")
        n = browser.wait_for("document.querySelectorAll('#qk-box .qk-table tr').length", "QK pairs")
        assert n > 1
        assert "score" in browser.js("document.querySelector('#qk-box .facts').textContent")
        if os.environ.get("WIREMAP_SCREENSHOT"):
            browser.screenshot(Path(os.environ["WIREMAP_SCREENSHOT"]))
    finally:
        browser.close()


# -- heads between two positions, and the demo's report of them --------------------------------
def test_heads_between_and_the_demo_report(tiny_model_dir):
    from wiremap.attribution.attention import heads_between, strongest_edges
    from wiremap.attribution.prune import prune_graph
    from wiremap.demo import _heads_of

    rm = make_rm(tiny_model_dir, "llama", **LLAMA)
    graph = attribute(PROMPT, rm, verbose=False)
    result = prune_graph(graph)
    pos, last = 3, graph.n_pos - 1
    A = graph.dense_adjacency()
    weights = [abs(float(A[t, s])) for s, t in strongest_edges(result, 8)]
    assert weights == sorted(weights, reverse=True) and weights[0] == float(
        result.edges()[2].abs().max()
    )
    found = heads_between(rm, graph, result, pos, n_edges=6)
    assert 0 < len(found.loadings) <= 6
    for x in found.loadings:
        assert graph.node_layer_pos(x.source)[1] == pos
        assert graph.node_layer_pos(x.target)[1] == last
    # every edge crosses positions, so the signed head shares add up to all of Σ|edge|
    assert sum(v for *_, v in found.heads) == pytest.approx(1.0, abs=1e-4)
    lines = []
    report = _heads_of(rm, graph, result, pos, None, None, 6, lines.append)
    top = report["heads"][0]
    assert (top["layer"], top["head"]) == found.heads[0][:2]
    assert "carried by" in lines[1] and f"L{top['layer']} H{top['head']}" in lines[1]
    rm.model.config._attn_implementation = "eager"  # the model's own attention weights
    with torch.no_grad():
        weights = rm.model(graph.input_ids[None], output_attentions=True).attentions
    assert top["weight"] == pytest.approx(float(weights[top["layer"]][0, top["head"], last, pos]))


def test_demo_attention_stage_on_the_organism():
    """`wiremap demo --attention` on the shipped organism (random transcoders: fast)."""
    from wiremap.attribution.prune import prune_graph
    from wiremap.demo import attention_stage, attribute_prompt, demo_prompts
    from wiremap.models.organism import organism_path

    model, tokenizer = load_model(str(organism_path()))
    tc = build_transcoder("clt", model.config.num_hidden_layers, model.config.hidden_size, 64)
    rm = ReplacementModel(model, tokenizer, tc, check_model_name=False)
    prompts = demo_prompts()
    graphs = {}
    for name in ("dallas", "antonym_fr"):
        graph, _ = attribute_prompt(rm, prompts[name])
        # random transcoders: the default pruning keeps a handful of edges; keep them all
        graphs[name] = (graph, prune_graph(graph, node_threshold=1.0, edge_threshold=1.0))
    dallas = graphs["dallas"][0]
    city = [t.strip() for t in dallas.token_strings].index("Dallas")
    texas = [f for f in dallas.active_features.tolist() if f[1] == city][:3]
    lines = []
    found = attention_stage(rm, graphs, texas, lines.append, n_edges=4)
    assert set(found) == {"dallas", "antonym_fr"}
    assert found["dallas"]["source_pos"] == city
    assert found["antonym_fr"]["source_pos"] == graphs["antonym_fr"][0].token_strings.index(
        " petit"
    )
    text = "\n".join(lines)
    assert "from the Texas features at ' Dallas'" in text and "' petit'" in text
    assert all(report["heads"] for report in found.values())
    for report in found.values():
        for head in report["heads"]:
            assert 0.0 <= head["weight"] <= 1.0 and head["key_side"] and head["pairs"]


def test_head_loadings_old_batch_keyword_warns(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "llama", **LLAMA)
    graph = attribute(PROMPT, rm, verbose=False)
    pairs, _ = some_edges(graph, 3)
    new = head_loadings_batch(rm, graph, pairs, target_batch=2)
    with pytest.warns(DeprecationWarning, match="head_loadings_batch\\(batch_size"):
        old = head_loadings_batch(rm, graph, pairs, batch_size=2)
    for a, b in zip(new, old, strict=True):
        torch.testing.assert_close(a.heads, b.heads)
