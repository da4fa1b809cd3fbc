"""Replacement and completeness scores of a pinned subgraph, from a graph JSON's links.

    scores = pinned_scores(graph_obj, ["3_41_5", "1_7_2"])
    scores["replacement"], scores["completeness"]

The JSON holds the *pruned* graph, so these numbers are relative to it: features not
pinned are folded into the error node at their (layer, pos) (their outgoing edges become
that error node's edges, their incoming edges vanish) and the DESIGN.md §7 formulas are
recomputed on what is left (the same definitions as `wiremap.attribute.prune.graph_scores`).
Edges that pruning already removed are simply absent, so a subgraph that pins every
feature scores what the pruned graph scores on its own links.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KIND = {"embedding": "token", "logit": "logit", "mlp reconstruction error": "error"}


def node_kind(node: dict) -> str:
    """'feature' | 'error' | 'token' | 'logit' from a JSON node's feature_type."""
    return KIND.get(node.get("feature_type", ""), "feature")


def pinned_scores(obj: dict, pinned_ids: list[str]) -> dict[str, Any]:
    """Scores of the subgraph keeping tokens, logits, errors and the pinned features."""
    ids, kinds, src, tgt, weight = _folded_graph(obj, set(pinned_ids))
    n = len(ids)
    norm = row_normalised(np.abs(weight), tgt, n)
    w = np.zeros(n)
    logit_prob = {nd["node_id"]: float(nd.get("token_prob") or 0.0) for nd in obj["nodes"]}
    for i, node_id in enumerate(ids):
        if kinds[i] == "logit":
            w[i] = logit_prob.get(node_id, 0.0)
    influence = influence_np(w, norm, src, tgt, n)
    is_err, is_tok = kinds == "error", kinds == "token"
    denom = influence[is_tok].sum() + influence[is_err].sum()
    replacement = float(influence[is_tok].sum() / denom) if denom > 0 else 0.0
    # completeness as in wiremap.attribute.prune: every node weighted by I + w; a node
    # with no inputs counts as fully explained
    non_error = 1.0 - np.bincount(tgt, weights=norm * is_err[src], minlength=n)
    weights = influence + w
    total = weights.sum()
    completeness = float((non_error * weights).sum() / total) if total > 0 else 0.0
    n_feat = int((kinds == "feature").sum())
    return {"replacement": replacement, "completeness": completeness, "n_features": n_feat}


def _folded_graph(obj: dict, keep: set[str]):
    """Node ids/kinds and COO edges after folding unpinned features into error nodes."""
    ids: list[str] = []
    kinds: list[str] = []
    index: dict[str, int] = {}
    remap: dict[str, int] = {}
    dropped: set[str] = set()

    def add(node_id: str, kind: str) -> int:
        if node_id not in index:
            index[node_id] = len(ids)
            ids.append(node_id)
            kinds.append(kind)
        return index[node_id]

    errors = {
        (str(nd.get("layer")), nd.get("ctx_idx")): nd["node_id"]
        for nd in obj["nodes"]
        if node_kind(nd) == "error"
    }
    for node in obj["nodes"]:
        kind = node_kind(node)
        if kind != "feature" or node["node_id"] in keep:
            remap[node["node_id"]] = add(node["node_id"], kind)
        else:  # folded: its writes count as error at the same (layer, pos)
            key = (str(node.get("layer")), node.get("ctx_idx"))
            err_id = errors.get(key, f"{key[0]}_-1_{key[1]}")
            remap[node["node_id"]] = add(err_id, "error")
            dropped.add(node["node_id"])
    edges = [
        (remap[ln["source"]], remap[ln["target"]], float(ln["weight"]))
        for ln in obj["links"]
        if ln["target"] not in dropped
    ]
    return (ids, np.array(kinds), *_summed(edges, len(ids)))


def _summed(edges: list[tuple[int, int, float]], n: int):
    """(src, tgt, weight) with parallel edges summed signed, as folding columns does."""
    if not edges:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    src, tgt, weight = (np.array(col) for col in zip(*edges, strict=True))
    keys, inverse = np.unique(tgt.astype(np.int64) * n + src, return_inverse=True)
    summed = np.bincount(inverse, weights=weight.astype(np.float64))
    return keys % n, keys // n, summed


def row_normalised(values: np.ndarray, tgt: np.ndarray, n: int) -> np.ndarray:
    """Each target row of |A| scaled to sum 1 (rows with no input stay zero)."""
    sums = np.bincount(tgt, weights=values, minlength=n)
    return values / np.where(sums[tgt] > 0, sums[tgt], 1.0)


def influence_np(w, norm, src, tgt, n: int, max_steps: int = 1000) -> np.ndarray:
    """I = w(Â + Â² + …), by repeated sparse products (a DAG, so it terminates)."""
    x, total = w.astype(np.float64), np.zeros(n)
    for _ in range(max_steps):
        x = np.bincount(src, weights=x[tgt] * norm, minlength=n)
        total += x
        if not np.any(np.abs(x) > 1e-12):
            break
    return total
