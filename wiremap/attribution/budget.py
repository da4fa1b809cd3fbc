"""Edge budgets: which edges of a pruned graph to write or draw so it stays readable.

    kept = budget_order(targets, sources, scores, per_node=16, max_edges=20_000)
    obj = budget_graph_json(obj, per_node=16, max_edges=20_000)   # a graph JSON, budgeted

A pruned graph of a real model can keep ~1,000 features and ~200,000 edges: 17 MB of JSON
and a picture made of ink. The budget ranks every edge twice, among the incoming edges of
its target and among the outgoing edges of its source, both by the pruning edge score
`Â'[t,s]·(I'_t + w_t)` (DESIGN.md §7, on the graph it is given). An edge's rank is the better
of the two. Edges are kept by rank — every node's strongest input and output first, then
the second strongest, … — up to `per_node` ranks, and at most `max_edges` in all (within
a rank, the higher score first). So no node loses its strongest connections while weaker
ones elsewhere are kept, and the number of edges is at most
`min(max_edges, 2 · per_node · n_nodes)`.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from wiremap.attribution import prune
from wiremap.errors import WiremapError

SCORE_NAME = "edge score |A[t,s]|/sum_s'|A[t,s']| * (I_t + w_t) on the pruned graph"


def rank_within(group: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Each entry's rank (0 = highest score) among the entries of the same group."""
    n = len(group)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((-score, group))  # by group, then by descending score
    sorted_group = group[order]
    first = np.searchsorted(sorted_group, sorted_group, side="left")
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - first
    return rank


def budget_order(
    targets: np.ndarray,
    sources: np.ndarray,
    scores: np.ndarray,
    per_node: int | None,
    max_edges: int | None,
) -> np.ndarray:
    """Indices of the edges the budget keeps, most important first (see the module doc)."""
    targets, sources = np.asarray(targets), np.asarray(sources)
    scores = np.asarray(scores, dtype=np.float64)
    rank = np.minimum(rank_within(targets, scores), rank_within(sources, scores))
    order = np.lexsort((-scores, rank))
    if per_node is not None:
        order = order[rank[order] < per_node]
    return order if max_edges is None else order[:max_edges]


def check_budget(per_node: int | None, max_edges: int | None) -> None:
    """Raise WiremapError unless both limits are positive integers or None."""
    for name, value in (("edges_per_node", per_node), ("max_edges", max_edges)):
        bad_type = isinstance(value, bool) or not isinstance(value, numbers.Integral)
        if value is not None and (bad_type or value < 1):
            raise WiremapError(f"{name}={value!r}: give a positive integer, or None for no limit")


# ---- on a graph JSON ---------------------------------------------------------------------
def json_edge_arrays(obj: dict) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(node ids, target index, source index, signed weight) of a graph JSON's links."""
    ids = [n["node_id"] for n in obj["nodes"]]
    index = {node_id: i for i, node_id in enumerate(ids)}
    links = obj["links"]
    tgt = np.fromiter((index[ln["target"]] for ln in links), np.int64, len(links))
    src = np.fromiter((index[ln["source"]] for ln in links), np.int64, len(links))
    weight = np.fromiter((float(ln["weight"]) for ln in links), np.float64, len(links))
    return ids, tgt, src, weight


def edge_scores(
    tgt: np.ndarray, src: np.ndarray, weight: np.ndarray, w: np.ndarray, n: int
) -> np.ndarray:
    """The pruning edge score `Â'[t,s]·(I'_t + w_t)` of every edge, on the edges given.

    `w` holds each logit node's probability (zero elsewhere); n is the number of nodes.
    """
    rows, cols = (torch.as_tensor(np.asarray(a, np.int64)) for a in (tgt, src))
    vals, w = (torch.as_tensor(np.asarray(a, np.float64)) for a in (weight, w))
    # the pruning's own code: entries stay in the order given, repeated pairs count apart
    return prune.edge_scores(prune.SparseMatrix(rows, cols, vals, n).abs_normalised(), w).numpy()


def budget_record(per_node: int | None, max_edges: int | None, before: int, kept: int) -> dict:
    """What metadata.edge_budget says: the limits, the edge counts, how edges were ranked."""
    return {
        "edges_per_node": per_node,
        "max_edges": max_edges,
        "edges_before": before,
        "edges_kept": kept,
        "ranked_by": SCORE_NAME,
        "scores_from": "the pruned graph with all its edges, before this budget",
    }


def budget_graph_json(obj: dict, per_node: int | None, max_edges: int | None) -> dict:
    """A copy of `obj` with only the links the budget keeps; records it in metadata.edge_budget.

    Links stay in their original order. Scores in metadata are left as they are: they were
    computed on the graph before the budget.
    """
    check_budget(per_node, max_edges)
    ids, tgt, src, weight = json_edge_arrays(obj)
    w = np.array(
        [float(nd.get("token_prob") or 0.0) * (nd.get("feature_type") == "logit")
         for nd in obj["nodes"]]
    )  # fmt: skip
    scores = edge_scores(tgt, src, weight, w, len(ids))
    kept = np.sort(budget_order(tgt, src, scores, per_node, max_edges))
    links = [obj["links"][i] for i in kept.tolist()]
    before = obj.get("metadata", {}).get("edge_budget", {}).get("edges_before", len(obj["links"]))
    record = budget_record(per_node, max_edges, before, len(links))
    return {**obj, "metadata": {**obj.get("metadata", {}), "edge_budget": record}, "links": links}
