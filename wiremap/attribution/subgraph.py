"""Replacement and completeness scores of a pinned subgraph, from a graph JSON's links.

    scores = pinned_scores(graph_obj, ["3_41_5", "1_7_2"])
    scores["replacement"], scores["completeness"]

The JSON holds the *pruned* graph, so these numbers are relative to it: features not
pinned are folded into the error node at their (layer, pos) (their outgoing edges become
that error node's edges, their incoming edges vanish) and the DESIGN.md §7 formulas are
recomputed on what is left, by `wiremap.attribution.prune`'s own code (`scores_of` on a
`SparseMatrix` of the links).
Edges that pruning already removed are simply absent, so a subgraph that pins every
feature scores what the pruned graph scores on its own links.
"""

from __future__ import annotations

from typing import Any

import torch

from wiremap.attribution.prune import SparseMatrix, influence, scores_of

KIND = {"embedding": "token", "logit": "logit", "mlp reconstruction error": "error"}


def node_kind(node: dict) -> str:
    """'feature' | 'error' | 'token' | 'logit' from a JSON node's feature_type."""
    return KIND.get(node.get("feature_type", ""), "feature")


def pinned_scores(obj: dict, pinned_ids: list[str]) -> dict[str, Any]:
    """Scores of the subgraph keeping tokens, logits, errors and the pinned features."""
    ids, kinds, src, tgt, weight = _folded_graph(obj, set(pinned_ids))
    n = len(ids)
    # folded features' edges join their error node's: parallel edges add up, signed
    normalised = SparseMatrix.summed(tgt, src, weight, n).abs_normalised()
    prob = {nd["node_id"]: float(nd.get("token_prob") or 0.0) for nd in obj["nodes"]}
    w = torch.tensor(
        [prob.get(i, 0.0) if k == "logit" else 0.0 for i, k in zip(ids, kinds, strict=True)],
        dtype=torch.float64,
    )
    is_token = torch.tensor([k == "token" for k in kinds], dtype=torch.bool)
    is_error = torch.tensor([k == "error" for k in kinds], dtype=torch.bool)
    scores = scores_of(normalised, influence(normalised, w), w, is_token, is_error)
    return {**scores, "n_features": kinds.count("feature")}


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
    src = torch.tensor([e[0] for e in edges], dtype=torch.long)
    tgt = torch.tensor([e[1] for e in edges], dtype=torch.long)
    weight = torch.tensor([e[2] for e in edges], dtype=torch.float64)
    return ids, kinds, src, tgt, weight
