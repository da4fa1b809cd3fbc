"""Influence, pruning and scores: a graph worked out by hand, and dense vs sparse agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wiremap.attribution.graph import Graph
from wiremap.attribution.prune import (
    as_matrix,
    graph_scores,
    influence,
    logit_weights,
    prune_graph,
    prune_nodes,
)
from wiremap.errors import WiremapError

# Hand-built graph: n_layers=2, n_pos=2, features only at pos 1.
#   0 f0 (L0, p1)   1 f1 (L1, p1)   2 f2 (L1, p1)
#   3 e(0,0)  4 e(0,1)  5 e(1,0)  6 e(1,1)   7 t0  8 t1   9 logit a (p=.75)  10 logit b (p=.25)
# Edges A[t, s]:
#   f0 <- t1: 3, t0: -1                  -> Â row: t1 .75, t0 .25
#   f1 <- f0: 2, e01: 1, t1: -1          -> Â row: f0 .5, e01 .25, t1 .25
#   f2 <- f0: -1, t1: 1                  -> Â row: f0 .5, t1 .5
#   a  <- f1: 4, f2: 2, e11: -1, t1: 1   -> Â row: f1 .5, f2 .25, e11 .125, t1 .125
#   b  <- f2: 1, e01: 1                  -> Â row: f2 .5, e01 .5
# Influence I = wÂ + wÂ² + wÂ³ (wÂ⁴ = 0):
#   wÂ  = f1 .375, f2 .3125, e11 .09375, t1 .09375, e01 .125
#   wÂ² = f0 .34375, e01 .09375, t1 .25
#   wÂ³ = t1 .2578125, t0 .0859375
F0, F1, F2, E00, E01, E10, E11, T0, T1, LA, LB = range(11)
EDGES = {
    (F0, T1): 3.0, (F0, T0): -1.0,
    (F1, F0): 2.0, (F1, E01): 1.0, (F1, T1): -1.0,
    (F2, F0): -1.0, (F2, T1): 1.0,
    (LA, F1): 4.0, (LA, F2): 2.0, (LA, E11): -1.0, (LA, T1): 1.0,
    (LB, F2): 1.0, (LB, E01): 1.0,
}  # fmt: skip
EXPECTED_INFLUENCE = {
    F0: 0.34375, F1: 0.375, F2: 0.3125, E01: 0.21875, E11: 0.09375,
    T0: 0.0859375, T1: 0.6015625,
}  # fmt: skip


def hand_graph(layout: str = "dense") -> Graph:
    adjacency = torch.zeros(11, 11)
    for (t, s), v in EDGES.items():
        adjacency[t, s] = v
    if layout == "coo":
        adjacency = adjacency.to_sparse_coo()
    elif layout == "csr":
        adjacency = adjacency.to_sparse_csr()
    return Graph(
        prompt="<s> x",
        input_ids=torch.tensor([1, 7]),
        token_strings=["<s>", " x"],
        active_features=torch.tensor([[0, 1, 4], [1, 1, 2], [1, 1, 9]]),
        activations=torch.tensor([1.0, 2.0, 0.5]),
        logit_tokens=torch.tensor([20, 21]),
        logit_probs=torch.tensor([0.75, 0.25]),
        logit_strings=[" a", " b"],
        adjacency=adjacency,
        n_layers=2,
    )


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_influence_by_hand(backend):
    g = hand_graph()
    m = as_matrix(g.adjacency, backend).abs_normalised()
    infl = influence(m, logit_weights(g))
    expected = torch.zeros(11)
    for i, v in EXPECTED_INFLUENCE.items():
        expected[i] = v
    torch.testing.assert_close(infl, expected)
    # every unit of logit weight ends at a leaf (token or error)
    assert infl[[T0, T1, E01, E11]].sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("layout", ["dense", "coo", "csr"])
def test_full_scores_by_hand(layout):
    scores = graph_scores(hand_graph(layout))
    # replacement: tokens (.6015625 + .0859375) / (tokens + errors (.21875 + .09375))
    assert scores["replacement"] == pytest.approx(0.6875)
    # completeness: Σ(I+w) = 97/32; error shares f1 .25, a .125, b .5 remove 10/32
    assert scores["completeness"] == pytest.approx(87 / 97)


def test_pinned_subgraph_scores_by_hand():
    # Keep only f1: f0 folds into e(0,1) (f1 <- e01 becomes 1 + 2 = 3), f2 into e(1,1)
    # (a <- e11 becomes -1 + 2 = 1, b <- e11 becomes 1). Then I: t1 .25, e01 .5, e11 .25.
    scores = graph_scores(hand_graph(), keep_nodes=[F1])
    assert scores["replacement"] == pytest.approx(0.25)
    assert scores["completeness"] == pytest.approx(1.75 / 2.5)
    mask = torch.zeros(11, dtype=torch.bool)
    mask[F1] = True
    assert graph_scores(hand_graph("coo"), keep_nodes=mask) == pytest.approx(scores)
    # keeping every feature changes nothing
    assert graph_scores(hand_graph(), keep_nodes=[F0, F1, F2]) == pytest.approx(
        graph_scores(hand_graph())
    )


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_node_pruning_by_hand(backend):
    g = hand_graph()
    # features+errors ranked: f1 .375, f0 .34375, f2 .3125, e01 .21875, e11 .09375 (sum 43/32)
    # cumulative: 12/43, 23/43, 33/43, 40/43, 1
    r = prune_graph(g, 0.8, 1.0, backend=backend, node_pool="features")
    assert r.node_mask.nonzero().flatten().tolist() == [F0, F1, F2, E01, T0, T1, LA, LB]
    expected_cum = {F1: 12 / 43, F0: 23 / 43, F2: 33 / 43, E01: 40 / 43, E11: 1.0}
    for i, v in expected_cum.items():
        assert r.cumulative_influence[i].item() == pytest.approx(v)
    r = prune_graph(g, 0.5, 0.98, backend=backend, node_pool="features")
    assert r.node_mask.nonzero().flatten().tolist() == [F0, F1, T0, T1, LA, LB]
    # Pruned scores: f2 folds into e(1,1); I becomes f1 .5, f0 .25, e01 .25, e11 .25,
    # t1 .4375, t0 .0625 -> replacement .5; completeness (2.75 - .5) / 2.75.
    assert r.scores["pruned"] == pytest.approx({"replacement": 0.5, "completeness": 9 / 11})
    assert r.scores["full"] == pytest.approx({"replacement": 0.6875, "completeness": 87 / 97})


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_edge_pruning_by_hand(backend):
    # With nodes {f0, f1, t0, t1, a, b}: Â' rows f0 (t1 .75, t0 .25), f1 (f0 2/3, t1 1/3),
    # a (f1 .8, t1 .2); I'+w: f0 .4, f1 .6, a .75. Edge scores: a<-f1 .6, f1<-f0 .4,
    # f0<-t1 .3, f1<-t1 .2, a<-t1 .15, f0<-t0 .1 (total 1.75).
    g = hand_graph()
    r = prune_graph(g, 0.5, 0.8, backend=backend, node_pool="features")
    t, s, w = r.edges()
    kept = {(ti, si): wi for ti, si, wi in zip(t.tolist(), s.tolist(), w.tolist(), strict=True)}
    assert sorted(kept) == sorted([(LA, F1), (F1, F0), (F0, T1), (F1, T1)])
    assert kept[(F1, T1)] == -1.0  # links carry the signed raw A[t, s]
    # At 0.5 only a<-f1 and f1<-f0 survive; f0 then has no input and is dropped, which
    # leaves f1 without input, which is dropped too: the iteration empties the features.
    r = prune_graph(g, 0.5, 0.5, backend=backend, node_pool="features")
    assert r.node_mask.nonzero().flatten().tolist() == [T0, T1, LA, LB]
    assert r.n_edges == 0


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_node_pool_all_by_hand(backend):
    # Every node ranked (circuit-tracer): t1 .6015625, f1 .375, f0 .34375, f2 .3125, e01
    # .21875, e11 .09375, t0 .0859375 (sum 65/32): cumulative .296, .481, .650, .804, ...
    g = hand_graph()
    r = prune_graph(g, node_threshold=0.8, edge_threshold=1.0, backend=backend)
    assert r.settings["node_pool"] == "all"
    assert r.node_mask.nonzero().flatten().tolist() == [F0, F1, F2, T0, T1, LA, LB]
    total = 65 / 32
    expected_cum = {
        T1: 0.6015625 / total,
        F1: (0.6015625 + 0.375) / total,
        E11: 1 - 0.0859375 / total,
    }
    for i, v in expected_cum.items():
        assert r.cumulative_influence[i].item() == pytest.approx(v)
    # the earlier rule keeps a superset: e01 too
    wide = prune_graph(
        g, node_threshold=0.8, edge_threshold=1.0, backend=backend, node_pool="features"
    )
    assert (wide.node_mask & ~r.node_mask).nonzero().flatten().tolist() == [E01]
    with pytest.raises(WiremapError, match="node_pool"):
        prune_graph(g, node_pool="tokens")


def random_dag_graph(n_layers=3, n_pos=5, n_feat=40, n_logits=3, density=0.3, seed=0) -> Graph:
    """Edges only from lower layers (or tokens) to features, and from anything to logits."""
    gen = torch.Generator().manual_seed(seed)
    layer = torch.randint(0, n_layers, (n_feat,), generator=gen)
    pos = torch.randint(1, n_pos, (n_feat,), generator=gen)
    feats = torch.stack([layer, pos, torch.randint(0, 100, (n_feat,), generator=gen)], 1)
    order = torch.argsort(feats[:, 0] * 10_000 + feats[:, 1] * 100 + feats[:, 2])
    feats = feats[order]
    n_err, n = n_layers * n_pos, n_feat + n_layers * n_pos + n_pos + n_logits
    src_layer = torch.full((n,), 10**6)  # tokens: lowest; logits never sources
    src_layer[:n_feat] = feats[:, 0]
    src_layer[n_feat : n_feat + n_err] = torch.arange(n_layers).repeat_interleave(n_pos)
    src_layer[n_feat + n_err : n - n_logits] = -1
    tgt_layer = torch.full((n,), -(10**6))  # errors and tokens have no inputs
    tgt_layer[:n_feat] = feats[:, 0]
    tgt_layer[n - n_logits :] = n_layers
    allowed = src_layer[None, :] < tgt_layer[:, None]
    mask = allowed & (torch.rand(n, n, generator=gen) < density)
    adjacency = torch.randn(n, n, generator=gen) * mask
    probs = torch.rand(n_logits, generator=gen).sort(descending=True).values
    return Graph(
        prompt="p",
        input_ids=torch.arange(n_pos),
        token_strings=[f"t{i}" for i in range(n_pos)],
        active_features=feats,
        activations=torch.rand(n_feat, generator=gen),
        logit_tokens=torch.arange(n_logits) + 50,
        logit_probs=probs / probs.sum() * 0.9,
        logit_strings=[f"l{i}" for i in range(n_logits)],
        adjacency=adjacency,
        n_layers=n_layers,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_and_sparse_agree(seed):
    g = random_dag_graph(seed=seed)
    dense = prune_graph(g, node_threshold=0.7, edge_threshold=0.9, backend="dense")
    sparse = prune_graph(g, node_threshold=0.7, edge_threshold=0.9, backend="sparse")
    assert dense.adjacency.layout == torch.strided and sparse.adjacency.is_sparse
    assert torch.equal(dense.node_mask, sparse.node_mask)
    assert 0 < dense.n_edges < (g.dense_adjacency() != 0).sum()
    torch.testing.assert_close(dense.adjacency, sparse.adjacency.to_dense())
    torch.testing.assert_close(dense.influence, sparse.influence)
    torch.testing.assert_close(dense.cumulative_influence, sparse.cumulative_influence)
    for kind in ("full", "pruned"):
        assert dense.scores[kind] == pytest.approx(sparse.scores[kind])
    pinned = dense.node_mask.nonzero().flatten()[:5]
    assert graph_scores(g, pinned, "dense") == pytest.approx(graph_scores(g, pinned, "sparse"))
    # scores are fractions, and dropping features cannot make the graph more complete
    full, pruned = dense.scores["full"], dense.scores["pruned"]
    assert 0 < pruned["replacement"] <= full["replacement"] <= 1
    assert 0 < pruned["completeness"] <= full["completeness"] <= 1


def test_large_sparse_graph_stays_sparse():
    g = random_dag_graph(n_layers=4, n_pos=50, n_feat=2500, density=0.002)
    g.adjacency = g.adjacency.to_sparse_coo()
    r = prune_graph(g)  # auto backend: N > DENSE_MAX_NODES -> triplets
    assert r.adjacency.is_sparse
    assert r.node_mask[g.token_slice].all() and r.node_mask[g.logit_slice].all()
    assert 0 < r.node_mask[g.feature_slice].sum() < g.n_features


def test_cycle_and_bad_input_raise():
    g = hand_graph()
    g.adjacency[F0, F1] = 1.0  # f1 -> f0 closes a loop with f0 -> f1
    with pytest.raises(WiremapError, match="cycle"):
        prune_graph(g)
    with pytest.raises(WiremapError, match="node_threshold"):
        prune_graph(hand_graph(), node_threshold=0.0)
    g = hand_graph()
    g.adjacency[F0, T1] = float("nan")
    with pytest.raises(WiremapError, match="NaN"):
        prune_graph(g)


# ---- circuit-tracer's rule, reimplemented independently (dense numpy, influence by inverse) --
def ct_rule(
    adjacency: np.ndarray, probs: np.ndarray, n_feat: int, n_tok: int, nt: float, et: float
):
    """circuit-tracer's prune_graph as its code reads (graph.py): (node mask, edge mask)."""
    n, n_logit = len(adjacency), len(probs)
    w = np.zeros(n)
    w[n - n_logit :] = probs

    def infl(a):
        norm = np.abs(a) / np.maximum(np.abs(a).sum(1, keepdims=True), 1e-10)
        return w @ (np.linalg.inv(np.eye(n) - norm) - np.eye(n)), norm

    def threshold(x, t):
        s = np.sort(x)[::-1]
        i = min(int(np.searchsorted(np.cumsum(s) / s.sum(), t)), len(s) - 1)
        return s[i]

    node_infl, _ = infl(adjacency)
    nodes = node_infl >= threshold(node_infl, nt)  # every node in the pool
    nodes[n - n_logit - n_tok :] = True
    pruned = adjacency * nodes[:, None] * nodes[None, :]
    pruned_infl, norm = infl(pruned)
    scores = norm * (pruned_infl + w)[:, None]
    edges = (scores >= threshold(scores.ravel(), et)) & (scores > 0)
    prunable = n - n_logit - n_tok
    while True:
        new = nodes.copy()
        new[:prunable] &= edges[:, :prunable].any(0)  # features and errors need an output
        new[:n_feat] &= edges[:n_feat].any(1)  # features need an input
        edges &= new[:, None] & new[None, :]
        if (new == nodes).all():
            return nodes, edges
        nodes = new


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.6, 0.9), (0.95, 0.7)])
def test_default_rule_matches_circuit_tracer_reimplementation(seed, thresholds):
    g = random_dag_graph(n_feat=60, seed=seed)
    a = g.dense_adjacency().double().numpy()
    nodes, edges = ct_rule(a, g.logit_probs.double().numpy(), g.n_features, g.n_pos, *thresholds)
    for backend in ("dense", "sparse"):
        r = prune_graph(g, *thresholds, backend=backend)
        assert r.node_mask.tolist() == nodes.tolist()
        t, s, _ = r.edges()
        kept = set(zip(t.tolist(), s.tolist(), strict=True))
        assert kept == set(zip(*(i.tolist() for i in np.nonzero(edges)), strict=True))
    # before edge pruning, the earlier rule keeps a superset of the nodes
    infl = prune_graph(g, *thresholds).influence
    narrow, wide = (prune_nodes(g, infl, thresholds[0], pool) for pool in ("all", "features"))
    assert bool((wide | ~narrow).all()) and int(wide.sum()) > int(narrow.sum())


@pytest.mark.interop
def test_default_rule_matches_circuit_tracer_prune():
    """circuit-tracer's own prune_graph on the same adjacency (README, "Looking at a graph")."""
    from types import SimpleNamespace

    ct_graph = pytest.importorskip("circuit_tracer.graph")
    for seed in range(3):
        g = random_dag_graph(n_feat=80, seed=seed)
        duck = SimpleNamespace(  # the attributes circuit-tracer's prune_graph reads
            adjacency_matrix=g.dense_adjacency().float(),
            input_tokens=g.input_ids,
            logit_targets=list(range(g.n_logits)),
            selected_features=torch.arange(g.n_features),
            logit_probabilities=g.logit_probs.float(),
        )
        node_mask, edge_mask, cumulative = ct_graph.prune_graph(duck, 0.8, 0.98)
        r = prune_graph(g, 0.8, 0.98)
        assert torch.equal(r.node_mask, node_mask)
        assert torch.equal(r.adjacency != 0, edge_mask & (duck.adjacency_matrix != 0))
        torch.testing.assert_close(r.cumulative_influence, cumulative)
