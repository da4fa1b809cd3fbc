"""Graph JSON export, its schema check, subgraph scores by id, and the path summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_prune import E01, F0, F1, F2, LA, T0, T1, hand_graph, random_dag_graph

from wiremap.attribution.budget import (
    budget_graph_json,
    budget_order,
    edge_scores,
    rank_within,
)
from wiremap.attribution.export import (
    cantor,
    graph_to_json,
    node_ids,
    strongest_paths,
    subgraph_scores,
    summarize_paths,
    validate_graph_json,
    write_graph_json,
)
from wiremap.attribution.graph import Graph
from wiremap.attribution.prune import graph_scores, logit_weights, prune_graph
from wiremap.errors import WiremapError


def test_cantor_pairing():
    assert [cantor(0, 0), cantor(1, 0), cantor(0, 1), cantor(2, 3)] == [0, 1, 2, 18]
    values = {cantor(l, f) for l in range(30) for f in range(30)}
    assert len(values) == 900  # injective


def test_hand_graph_json_fields():
    g = hand_graph()
    labels = {(1, 2): "says a"}
    obj = graph_to_json(
        g, node_threshold=0.8, edge_threshold=1.0, labels=labels, node_pool="features"
    )
    validate_graph_json(obj)
    nodes = {n["node_id"]: n for n in obj["nodes"]}
    # kept: f0, f1, f2, e(0,1), both tokens, both logits (e(1,1) is pruned at 0.8)
    assert set(nodes) == {"0_4_1", "1_2_1", "1_9_1", "0_-1_1", "E_1_0", "E_7_1", "3_20_1", "3_21_1"}
    f1 = nodes["1_2_1"]
    assert (f1["feature"], f1["layer"], f1["ctx_idx"]) == (cantor(1, 2), "1", 1)
    assert (f1["jsNodeId"], f1["clerp"], f1["activation"]) == ("1_2-0", "says a", 2.0)
    assert f1["influence"] == pytest.approx(12 / 43)  # strongest feature/error node
    assert nodes["0_-1_1"]["feature_type"] == "mlp reconstruction error"
    assert nodes["E_7_1"]["layer"] == "E" and nodes["E_7_1"]["feature_type"] == "embedding"
    top = nodes["3_20_1"]
    assert top["clerp"] == 'Output " a" (p=0.750)' and top["is_target_logit"] is True
    assert top["token_prob"] == 0.75 and nodes["3_21_1"]["is_target_logit"] is False
    links = {(link["source"], link["target"]): link["weight"] for link in obj["links"]}
    assert links[("0_4_1", "1_9_1")] == -1.0 and links[("E_7_1", "0_4_1")] == 3.0
    assert ("1_-1_1", "3_20_1") not in links  # pruned error node takes its links with it
    meta = obj["metadata"]
    assert meta["schema_version"] == 1 and meta["info"]["generator"]["name"] == "wiremap"
    assert meta["pruning_settings"] == {
        "node_threshold": 0.8,
        "edge_threshold": 1.0,
        "node_pool": "features",
    }
    assert meta["scores"]["full"]["replacement"] == pytest.approx(0.6875)
    assert obj["qParams"]["linkType"] == "both" and obj["qParams"]["pinnedIds"] == []


def test_metadata_names_model_and_transcoders():
    g = hand_graph()
    g.settings = {**g.settings, "model": "/m/tiny", "transcoders": "/t/clt"}
    info = graph_to_json(g)["metadata"]["info"]
    assert (info["model"], info["transcoders"]) == ("/m/tiny", "/t/clt")
    assert "model" not in graph_to_json(hand_graph())["metadata"]["info"]


def test_error_ids_never_collide_with_feature_ids():
    # A naive error id "0_{layer}_{pos}" for error (1, 1) would read "0_1_1", the id of
    # feature 1 at layer 0, position 1.
    g = hand_graph()
    g.active_features[F0] = torch.tensor([0, 1, 1])
    ids = node_ids(g)
    assert len(set(ids)) == len(ids) == g.n_nodes
    assert ids[F0] == "0_1_1" and ids[g.error_index(1, 1)] == "1_-1_1"
    obj = graph_to_json(g, node_threshold=1.0, edge_threshold=1.0)
    validate_graph_json(obj)
    assert {"0_1_1", "1_-1_1"} <= {n["node_id"] for n in obj["nodes"]}


def test_custom_direction_logits_get_unique_ids():
    g = hand_graph()
    g = Graph(**{**g.__dict__, "logit_tokens": torch.tensor([-1, -1])})
    ids = node_ids(g)[g.logit_slice]
    assert ids == ["3_-1_1", "3_-2_1"]
    validate_graph_json(graph_to_json(g))


def test_validate_lists_problems():
    obj = graph_to_json(hand_graph())
    validate_graph_json(obj)
    bad = json.loads(json.dumps(obj))
    bad["nodes"].append(dict(bad["nodes"][0]))
    del bad["nodes"][1]["clerp"]
    bad["links"].append({"source": "nope", "target": bad["nodes"][0]["node_id"], "weight": 1.0})
    bad["links"][0]["weight"] = float("nan")
    bad["qParams"]["pinnedIds"] = ["ghost"]
    del bad["metadata"]["info"]
    with pytest.raises(WiremapError) as err:
        validate_graph_json(bad)
    msg = str(err.value)
    for fragment in ("duplicate node id", "misses 'clerp'", "'nope' is not a node id",
                     "weight should be a finite number", "unknown node id 'ghost'",
                     "metadata misses 'info'"):  # fmt: skip
        assert fragment in msg
    with pytest.raises(WiremapError, match="top level misses 'links'"):
        validate_graph_json({k: v for k, v in obj.items() if k != "links"})


def test_write_graph_json(tmp_path):
    g = random_dag_graph(seed=3)
    result = write_graph_json(g, tmp_path / "out", node_threshold=0.7, slug="demo")
    obj = json.loads((tmp_path / "out" / "demo.json").read_text())
    validate_graph_json(obj)
    assert obj["metadata"]["slug"] == "demo"
    assert len(obj["nodes"]) == int(result.node_mask.sum())
    assert len(obj["links"]) == result.n_edges > 0
    assert result.settings["node_threshold"] == 0.7


def test_subgraph_scores_by_id():
    g = hand_graph()
    assert subgraph_scores(g, ["1_2_1"]) == pytest.approx(graph_scores(g, keep_nodes=[F1]))
    with pytest.raises(WiremapError, match="unknown node ids"):
        subgraph_scores(g, ["9_9_9"])


def test_strongest_paths_by_hand():
    # Everything kept. Shares into logit a: f1 .5, f2 .25, t1 .125; into f1: f0 .5, t1 .25;
    # into f2: f0 .5, t1 .5; into f0: t1 .75, t0 .25.
    g = hand_graph()
    result = prune_graph(g, node_threshold=1.0, edge_threshold=1.0)
    paths = strongest_paths(g, result, k=5)
    assert paths[0][2] == [T1, F0, F1, LA] and paths[0][0] == pytest.approx(0.1875)
    assert [p[0] for p in paths] == pytest.approx([0.1875, 0.125, 0.125, 0.125, 0.09375])
    assert {tuple(p[2]) for p in paths[1:4]} == {(T1, F1, LA), (T1, F2, LA), (T1, LA)}
    assert paths[4][2] == [T1, F0, F2, LA] and paths[4][1] == -1  # f2 <- f0 is inhibitory
    assert all(p[2][0] in (T0, T1) for p in paths) and E01 not in sum((p[2] for p in paths), [])
    assert len(strongest_paths(g, result, k=50)) == 7  # every token-to-a path in the graph


def test_summarize_paths_finds_planted_path():
    g = random_dag_graph(n_layers=3, n_pos=5, n_feat=40, seed=4)
    layers = g.active_features[:, 0]
    low = int((layers == 0).nonzero()[0])
    high = int((layers == 2).nonzero()[0])
    pos = int(g.active_features[low, 1])
    token, logit = g.token_index(pos), g.top_logit
    a = g.adjacency
    a[low, token], a[high, low], a[logit, high] = 500.0, 500.0, 500.0
    text = summarize_paths(g, k=3)
    result = prune_graph(g)
    best = strongest_paths(g, result, k=3)[0]
    assert best[2] == [token, low, high, logit] and best[0] > 0.5
    first_path = text.splitlines()[3]
    l0, p0, f0 = g.active_features[low].tolist()
    l2, _, f2 = g.active_features[high].tolist()
    assert first_path.startswith("  1.") and "(+)" in first_path
    assert (
        f"tok '{g.token_strings[pos]}' -> L{l0} F{f0} @'{g.token_strings[p0]}' -> L{l2} F{f2}"
        in (first_path)
    )
    assert first_path.endswith("logit 'l0'")
    assert "replacement" in text.splitlines()[1]


# ---- edge budget -------------------------------------------------------------------------
def _big_graph():
    from wiremap.attribution.viewer.synthetic import synthetic_graph

    # ~360 features over 12 layers: ~34k edges survive pruning at thresholds 1.0
    return synthetic_graph(n_features=360, n_layers=12, n_pos=8, inputs_per_node=130, seed=1)


@pytest.fixture(scope="module")
def big():
    g = _big_graph()
    result = prune_graph(g, node_threshold=1.0, edge_threshold=1.0)
    targets, sources, weights = (t.numpy() for t in result.edges())
    w = logit_weights(g).double().numpy()
    scores = edge_scores(targets, sources, weights.astype("float64"), w, g.n_nodes)
    return g, result, (targets, sources, scores)


def test_rank_within_and_budget_order_by_hand():
    group = np.array([0, 0, 1, 0, 1])
    assert rank_within(group, np.array([1.0, 3.0, 2.0, 2.0, 5.0])).tolist() == [2, 0, 1, 1, 0]
    # edges t<-s: (2<-0) 5, (2<-1) 1, (3<-0) 4, (3<-1) 3; in-ranks 0,1,0,1; out-ranks 0,1,1,0
    tgt, src = np.array([2, 2, 3, 3]), np.array([0, 1, 0, 1])
    scores = np.array([5.0, 1.0, 4.0, 3.0])
    assert budget_order(tgt, src, scores, None, None).tolist() == [0, 2, 3, 1]
    assert budget_order(tgt, src, scores, 1, None).tolist() == [0, 2, 3]
    assert budget_order(tgt, src, scores, None, 2).tolist() == [0, 2]


def test_edge_budget_bounds_the_json(big, tmp_path):
    g, result, _ = big
    full = write_graph_json(
        g, tmp_path / "full.json", result=result, edges_per_node=None, max_edges=None
    )
    n_all = full.n_edges
    write_graph_json(g, tmp_path / "b.json", result=result, edges_per_node=8, max_edges=3000)
    obj = json.loads((tmp_path / "b.json").read_text())
    validate_graph_json(obj)
    n_nodes = len(obj["nodes"])
    assert n_all > 30_000 and len(obj["links"]) == 3000 <= 2 * 8 * n_nodes
    # bytes: the nodes as before, plus at most 3000 links of bounded length
    size = (tmp_path / "b.json").stat().st_size
    no_links = len(json.dumps({**obj, "links": []}, ensure_ascii=False, separators=(",", ":")))
    assert size <= no_links + 3000 * 80
    assert size * 6 < (tmp_path / "full.json").stat().st_size
    budget = obj["metadata"]["edge_budget"]
    assert (budget["edges_before"], budget["edges_kept"]) == (n_all, 3000)
    assert (budget["edges_per_node"], budget["max_edges"]) == (8, 3000)
    # scores are those of the pruned graph with all its edges
    assert obj["metadata"]["scores"] == result.scores
    assert len(obj["nodes"]) == int(result.node_mask.sum())


def test_edge_budget_keeps_each_nodes_strongest_edges(big):
    g, result, (targets, sources, scores) = big
    k = 3
    obj = graph_to_json(g, result=result, edges_per_node=k, max_edges=None)
    ids = node_ids(g)
    kept = {(link["target"], link["source"]) for link in obj["links"]}
    top_in, top_out = set(), set()
    for end, top in ((targets, top_in), (sources, top_out)):
        for node in np.unique(end):
            mine = np.nonzero(end == node)[0]
            best = mine[np.argsort(-scores[mine], kind="stable")[:k]]
            pairs = (targets[best], sources[best])
            top |= {(ids[t], ids[s]) for t, s in zip(*pairs, strict=True)}
    assert kept == top_in | top_out  # each node's k strongest in and out, nothing else
    assert len(kept) < len(targets) / 5


def test_edge_cap_keeps_the_strongest_by_rank(big):
    g, result, (targets, sources, scores) = big
    cap = 2500
    ids = node_ids(g)
    obj = graph_to_json(g, result=result, edges_per_node=None, max_edges=cap)
    kept = {(link["target"], link["source"]) for link in obj["links"]}
    assert len(kept) == cap
    rank = np.minimum(rank_within(targets, scores), rank_within(sources, scores))
    is_kept = np.array([(ids[t], ids[s]) in kept for t, s in zip(targets, sources, strict=True)])
    assert rank[is_kept].max() <= rank[~is_kept].min()  # every node's 1st, then 2nd, ...
    edge = rank[is_kept].max()  # within the last rank taken, the highest scores
    assert scores[is_kept & (rank == edge)].min() >= scores[~is_kept & (rank == edge)].max()
    # every node with edges keeps its strongest input and output
    assert cap >= (rank == 0).sum() and is_kept[rank == 0].all()


def test_budget_graph_json_matches_the_export(big):
    g, result, _ = big
    unbudgeted = graph_to_json(g, result=result, edges_per_node=None, max_edges=None)
    later = budget_graph_json(unbudgeted, per_node=4, max_edges=2000)
    now = graph_to_json(g, result=result, edges_per_node=4, max_edges=2000)
    assert later["links"] == now["links"]
    assert later["metadata"]["edge_budget"] == now["metadata"]["edge_budget"]
    assert len(unbudgeted["links"]) == result.n_edges  # the input is left alone


def test_bad_edge_budget_is_a_clear_error():
    for bad in ({"edges_per_node": 0}, {"max_edges": -5}, {"max_edges": 2.5}):
        with pytest.raises(WiremapError, match="positive integer"):
            graph_to_json(hand_graph(), **bad)
