"""Attribution graphs are exact: the oracles of DESIGN.md §6, budgets, targets, bad input, CLI."""

import json

import pytest
import torch

from wiremap.attribution.attribute import attribute
from wiremap.attribution.graph import Graph
from wiremap.attribution.targets import demeaned_unembedding, logit_difference
from wiremap.errors import WiremapError
from wiremap.models.loading import load_model
from wiremap.models.replacement import ReplacementModel
from wiremap.models.transcoders import build_transcoder

PROMPT = "The cat sees the moon."
CASES = [
    (a, t) for a in ("llama", "gpt2", "gemma2", "gpt_neox") for t in ("plt", "skip_plt", "clt")
]


def make_rm(tiny_model_dir, arch="llama", tc_arch="plt", no_bias=False, n_feat=48):
    model, tokenizer = load_model(str(tiny_model_dir(arch, n_layers=3)))
    torch.manual_seed(2)
    tc = build_transcoder(tc_arch, 3, 32, n_feat, activation="relu")
    with torch.no_grad():
        tc.encoder_bias.normal_(0, 0.05)
        tc.decoder_bias.normal_(0, 0.05)
        if tc.skip_weight is not None:
            tc.skip_weight.normal_(0, 0.05)
        if no_bias:
            # every constant of the frozen model but the sources: biases of the model
            # (attention, LayerNorm) and of the transcoders
            for name, p in [*model.named_parameters(), *tc.named_parameters()]:
                if name.endswith("bias") or name in ("b_enc", "b_dec"):
                    p.zero_()
    return ReplacementModel(model, tokenizer, tc)


def targets_of(rm, graph, reads, final):
    """Pre-activation of every feature node, demeaned logit of every logit node."""
    tc = rm.transcoders
    pre = [
        tc.pre_activation(reads[layer][0, pos], layer)[f]
        for layer, pos, f in graph.active_features.tolist()
    ]
    logits = demeaned_unembedding(rm, graph.logit_tokens) @ final[0, -1]
    return torch.cat([torch.stack(pre), logits])


def source_writes(rm, graph, run, s: int):
    """(writes, embed_write) that add source node `s`'s contribution once more."""
    n_pos, d = graph.n_pos, rm.d_model
    writes, embed = {}, None
    kind = graph.node_kind(s)
    if kind == "feature":
        layer, pos, f = graph.active_features[s].tolist()
        dec = rm.transcoders.decoder(layer)[f]  # [n_out, d]
        for offset in range(dec.shape[0]):
            w = torch.zeros(1, n_pos, d)
            w[0, pos] = graph.activations[s] * dec[offset]
            writes[layer + offset] = w
    elif kind == "error":
        layer, pos = graph.node_layer_pos(s)
        w = torch.zeros(1, n_pos, d)
        if pos > 0 or graph.settings["include_bos"]:  # BOS errors are no sources by default
            w[0, pos] = run.errors[layer, pos]
        writes[layer] = w
    else:
        pos = s - graph.token_slice.start
        embed = torch.zeros(1, n_pos, d)
        embed[0, pos] = run.resid0[pos]
    return writes, embed


def target_rows(graph):
    return torch.cat(
        [torch.arange(graph.n_features), torch.arange(graph.logit_slice.start, graph.n_nodes)]
    )


@pytest.mark.parametrize("arch,tc_arch", CASES)
def test_intervention_oracle(tiny_model_dir, arch, tc_arch):
    rm = make_rm(tiny_model_dir, arch, tc_arch)
    graph = attribute(PROMPT, rm, verbose=False, target_batch=16)
    A = graph.dense_adjacency()
    run = rm.run(graph.input_ids)
    rows = target_rows(graph)
    gen = torch.Generator().manual_seed(0)
    sources = [
        *torch.randperm(graph.n_features, generator=gen)[:6].tolist(),
        *[graph.error_index(layer, pos) for layer, pos in ((0, 1), (1, graph.n_pos - 1), (2, 3))],
        graph.token_index(0),
        graph.token_index(graph.n_pos - 1),
    ]
    with rm.frozen(graph.input_ids) as lin, torch.no_grad():
        ref = lin.forward()
        base = targets_of(rm, graph, ref.reads, ref.final)
        for s in sources:
            writes, embed = source_writes(rm, graph, run, s)
            out = lin.forward(writes=writes, embed_write=embed)
            change = targets_of(rm, graph, out.reads, out.final) - base
            column = A[rows, s]
            scale = float(column.abs().max() + base.abs().max())
            torch.testing.assert_close(change, column, rtol=0, atol=1e-5 * scale)
    assert A[rows][:, sources].abs().max() > 1e-3  # the columns are not trivially zero


@pytest.mark.parametrize("arch,tc_arch", CASES)
def test_completeness_identity(tiny_model_dir, arch, tc_arch):
    rm = make_rm(tiny_model_dir, arch, tc_arch, no_bias=True)
    # BOS features and errors are sources too, so nothing but the sources feeds a target
    graph = attribute(PROMPT, rm, verbose=False, include_bos=True)
    A = graph.dense_adjacency()
    run = rm.run(graph.input_ids)
    with rm.frozen(graph.input_ids) as lin:
        ref = lin.reference
        values = targets_of(rm, graph, [r.unsqueeze(0) for r in run.reads], ref.final)
    sums = A[target_rows(graph)].sum(1)
    scale = float(A.abs().sum(1).max())
    torch.testing.assert_close(sums, values, rtol=0, atol=1e-6 * scale)
    assert values.abs().max() > 1e-2


def test_adjacency_equals_brute_force_jacobian(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "llama", "skip_clt", n_feat=16)
    graph = attribute("A dog likes", rm, verbose=False, target_batch=5)
    A = graph.dense_adjacency()
    run = rm.run(graph.input_ids)
    n_src = graph.logit_slice.start
    per_source = [source_writes(rm, graph, run, s) for s in range(n_src)]
    with rm.frozen(graph.input_ids) as lin:

        def targets(c):
            writes, embed = {}, 0
            for k, (w, e) in enumerate(per_source):
                for layer, v in w.items():
                    writes[layer] = writes.get(layer, 0) + c[k] * v
                if e is not None:
                    embed = embed + c[k] * e
            out = lin.forward(writes=writes, embed_write=embed)
            return targets_of(rm, graph, out.reads, out.final)

        jac = torch.autograd.functional.jacobian(targets, torch.zeros(n_src))
    torch.testing.assert_close(A[target_rows(graph), :n_src], jac, rtol=1e-4, atol=1e-6)
    assert graph.n_features > 5 and jac.abs().max() > 1e-2


def test_feature_budget_keeps_exact_edges_and_folds_the_rest(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "gpt2", "clt")
    full = attribute(PROMPT, rm, verbose=False)
    budget = full.n_features // 3
    part = attribute(PROMPT, rm, verbose=False, max_feature_nodes=budget, target_batch=8)
    assert part.n_features == budget and part.settings["n_active_features"] == full.n_features
    # the visited features are nodes of the full graph; edges among them are the same
    key = {tuple(f): i for i, f in enumerate(full.active_features.tolist())}
    idx = torch.tensor([key[tuple(f)] for f in part.active_features.tolist()])
    A, P = full.dense_adjacency(), part.dense_adjacency()
    torch.testing.assert_close(P[:budget, :budget], A[idx][:, idx])
    torch.testing.assert_close(P[part.logit_slice, :budget], A[full.logit_slice][:, idx])
    # unvisited features are folded into errors: every row keeps its sum
    torch.testing.assert_close(P[part.logit_slice].sum(1), A[full.logit_slice].sum(1))
    torch.testing.assert_close(P[:budget].sum(1), A[idx].sum(1), rtol=1e-5, atol=1e-5)
    # best-first: the feature with the largest direct effect on the top logit is visited
    top = int(A[full.top_logit, : full.n_features].abs().argmax())
    assert top in idx.tolist()
    # one pass for the logits, then one per batch of 8 features
    assert part.settings["n_backward_passes"] == 1 + -(-budget // 8)


def test_batch_size_and_sparse_layout_do_not_change_edges(tiny_model_dir, monkeypatch):
    rm = make_rm(tiny_model_dir, "gemma2", "skip_plt")
    a = attribute(PROMPT, rm, verbose=False, target_batch=256)
    import wiremap.attribution.attribute as module

    monkeypatch.setattr(module, "DENSE_MAX_NODES", 10)
    b = attribute(PROMPT, rm, verbose=False, target_batch=3)
    assert b.is_sparse and not a.is_sparse
    torch.testing.assert_close(b.dense_adjacency(), a.dense_adjacency(), rtol=1e-5, atol=1e-6)
    assert b.settings["n_backward_passes"] > a.settings["n_backward_passes"]


def test_bos_zeroed_and_graph_fields(tiny_model_dir, tmp_path):
    rm = make_rm(tiny_model_dir)
    graph = attribute(PROMPT, rm, verbose=False)
    A = graph.dense_adjacency()
    assert (graph.active_features[:, 1] > 0).all()
    assert A[:, [graph.error_index(layer, 0) for layer in range(3)]].abs().max() == 0
    assert graph.token_strings[0] == "<bos>" and graph.n_layers == 3
    assert 0.95 <= float(graph.logit_probs.sum()) or graph.n_logits == 10
    assert (graph.activations > 0).all()
    # nothing feeds a token or error node, and no feature reads a later position
    assert A[graph.error_slice].abs().max() == 0 and A[graph.token_slice].abs().max() == 0
    f = graph.active_features
    later = (f[:, None, 1] < f[None, :, 1]) | (f[:, None, 0] <= f[None, :, 0])
    assert A[graph.feature_slice, graph.feature_slice][later].abs().max() == 0
    s = graph.settings
    assert s["n_backward_passes"] >= 2 and s["dtype"] == "float32" and s["batch_size"] == 256
    graph.save(tmp_path / "g")
    back = Graph.load(tmp_path / "g")
    torch.testing.assert_close(back.dense_adjacency(), A)


def test_explicit_targets(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "llama", "plt", no_bias=True)
    tokens = [" moon", 17]
    graph = attribute(PROMPT, rm, verbose=False, target_tokens=tokens, include_bos=True)
    assert graph.logit_tokens.tolist() == [rm.tokenizer(" moon").input_ids[0], 17]
    label, direction = logit_difference(rm, " moon", 17)
    diff = attribute(
        PROMPT, rm, verbose=False, target_directions={label: direction}, include_bos=True
    )
    assert diff.logit_strings == [label] and diff.logit_tokens.tolist() == [-1]
    n_src = graph.logit_slice.start
    A, D = graph.dense_adjacency()[:, :n_src], diff.dense_adjacency()[:, :n_src]
    # a logit difference is the difference of the two logit rows
    torch.testing.assert_close(
        D[diff.logit_slice][0],
        A[graph.logit_slice][0] - A[graph.logit_slice][1],
        rtol=1e-5,
        atol=1e-6,
    )
    with torch.no_grad():
        logits = rm.model(graph.input_ids[None]).logits[0, -1]
    torch.testing.assert_close(
        D[diff.logit_slice].sum(), logits[graph.logit_tokens].diff().neg()[0], rtol=1e-5, atol=1e-5
    )


def test_bad_input(tiny_model_dir):
    rm = make_rm(tiny_model_dir)
    with pytest.raises(WiremapError, match="empty"):
        attribute("", rm, verbose=False)
    with pytest.raises(WiremapError, match="context"):
        attribute("the moon " * 200, rm, verbose=False)
    with pytest.raises(WiremapError, match="single token"):
        attribute(PROMPT, rm, verbose=False, target_tokens=["moonlight tonight"])
    with pytest.raises(WiremapError, match="vocabulary"):
        attribute(PROMPT, rm, verbose=False, target_tokens=[10**6])
    with pytest.raises(WiremapError, match="d_model"):
        attribute(PROMPT, rm, verbose=False, target_directions=[torch.ones(5)])


def test_attribute_cli(tiny_model_dir, tmp_path, capsys):
    from wiremap.attribution.export import validate_graph_json
    from wiremap.cli import main
    from wiremap.models.io import save_transcoders

    path = tiny_model_dir("llama", n_layers=3)
    save_transcoders(build_transcoder("plt", 3, 32, 48, model_name=str(path)), tmp_path / "tc")
    out = tmp_path / "graph.json"
    args = ["attribute", "--model", str(path), "--transcoders", str(tmp_path / "tc")]
    pictures = ["--html", str(tmp_path / "g.html"), "--png", str(tmp_path / "g.png")]
    code = main([*args, "--prompt", PROMPT, "--out", str(out), "--quiet", "--target", " moon"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "replacement" in printed and "completeness" in printed and "paths" in printed
    obj = json.loads(out.read_text())
    validate_graph_json(obj)
    assert obj["metadata"]["info"]["model"] == str(path)
    assert Graph.load(tmp_path / "graph").n_logits == 1
    out2 = str(tmp_path / "g2.json")
    assert main([*args, "--prompt", PROMPT, "--out", out2, "--quiet", *pictures]) == 0
    assert '"nodes"' in (tmp_path / "g.html").read_text()
    assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")
    assert main([*args, "--prompt", "", "--out", str(out)]) == 2
    assert "empty" in capsys.readouterr().err
    out3 = tmp_path / "g3.json"
    budget = ["--edges-per-node", "1", "--max-edges", "5", "--node-threshold", "1"]
    assert main([*args, "--prompt", PROMPT, "--out", str(out3), "--quiet", *budget]) == 0
    budgeted = json.loads(out3.read_text())
    assert len(budgeted["links"]) <= 5 < len(json.loads(out.read_text())["links"])
    assert budgeted["metadata"]["edge_budget"]["max_edges"] == 5


def test_feature_influence_is_the_series_over_the_rows_so_far():
    from wiremap.attribution.attribute import feature_influence

    torch.manual_seed(0)
    n_feat, n_cols, n_logits = 12, 20, 2
    order = [7, 3, 9, 5]  # visited; a DAG: each row reads only features with a lower index
    rows = torch.randn(len(order), n_cols)
    for i, f in enumerate(order):
        rows[i, f:n_feat] = 0
    logit_rows, w = torch.randn(n_logits, n_cols), torch.tensor([0.7, 0.2])
    # brute force: the full matrix over features + logits, unvisited rows zero
    full = torch.zeros(n_feat + n_logits, n_feat + n_logits)
    full[order, :n_feat] = rows[:, :n_feat].abs() / rows.abs().sum(1, keepdim=True)
    full[n_feat:, :n_feat] = logit_rows[:, :n_feat].abs() / logit_rows.abs().sum(1, keepdim=True)
    weights = torch.cat([torch.zeros(n_feat), w])
    expected, x = torch.zeros(n_feat + n_logits), weights
    for _ in range(n_feat + 1):
        x = x @ full
        expected += x
    got = feature_influence(logit_rows, rows, order, w, n_feat)
    torch.testing.assert_close(got, expected[:n_feat])


def test_ranking_once_visits_by_direct_effect(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "llama", "plt")
    full = attribute(PROMPT, rm, verbose=False)
    budget = full.n_features // 3
    once = attribute(PROMPT, rm, verbose=False, max_feature_nodes=budget, target_batch=8,
                     rerank_every=0)  # fmt: skip
    # ranked once: the budget's features with the largest direct effect on the logits
    A = full.dense_adjacency()[full.logit_slice, : full.logit_slice.start].abs()
    direct = (full.logit_probs[:, None] * A / A.sum(1, keepdim=True)).sum(0)[: full.n_features]
    expected = set(direct.topk(budget).indices.tolist())
    key = {tuple(f): i for i, f in enumerate(full.active_features.tolist())}
    assert {key[tuple(f)] for f in once.active_features.tolist()} == expected
    assert once.settings["n_backward_passes"] == 1 + -(-budget // 8)


def test_old_keywords_warn_and_give_the_same_graph(tiny_model_dir, tmp_path):
    from wiremap.attribution.renamed import include_bos_of
    from wiremap.attribution.sources import SourceTable

    rm = make_rm(tiny_model_dir, "llama", "plt")
    new = attribute(PROMPT, rm, verbose=False, target_batch=7, include_bos=True)
    assert new.settings["include_bos"] is True and "zero_bos" not in new.settings
    with pytest.warns(DeprecationWarning, match="batch_size=.*target_batch"):
        with pytest.warns(DeprecationWarning, match="zero_bos=False is include_bos=True"):
            old = attribute(PROMPT, rm, verbose=False, batch_size=7, zero_bos=False)
    assert old.settings["batch_size"] == 7 and old.settings["include_bos"] is True
    torch.testing.assert_close(old.dense_adjacency(), new.dense_adjacency())
    with pytest.raises(WiremapError, match="give only target_batch"):
        attribute(PROMPT, rm, verbose=False, target_batch=7, batch_size=8)
    run = rm.run(rm.tokenize(PROMPT))
    with pytest.warns(DeprecationWarning, match="SourceTable.build"):
        table = SourceTable.build(rm, run, zero_bos=True)
    assert table.n_features == SourceTable.build(rm, run).n_features
    assert (table.features[:, 1] > 0).all() and (table.errors[:, 0] == 0).all()
    # graphs saved before the rename store zero_bos; they load and read the same
    new.settings = {k: v for k, v in new.settings.items() if k != "include_bos"}
    new.settings["zero_bos"] = False
    new.save(tmp_path / "old")
    back = Graph.load(tmp_path / "old")
    assert include_bos_of(back.settings) is True and include_bos_of({"zero_bos": True}) is False
    assert include_bos_of({}) is False and include_bos_of({"include_bos": True}) is True


def test_batches_never_span_two_layers():
    from wiremap.attribution.attribute import layer_batches

    layers = torch.tensor([0] * 5 + [1] * 9 + [3] * 4)
    sizes = layer_batches(layers, 4)
    assert sizes == [3, 2, 3, 3, 3, 4] and sum(sizes) == layers.numel()
    ends = torch.tensor(sizes).cumsum(0)
    starts = ends - torch.tensor(sizes)
    assert all(layers[s] == layers[e - 1] for s, e in zip(starts, ends, strict=True))
