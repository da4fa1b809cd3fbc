"""Synthetic attribution graphs the size of a real model's, to test and bench the viewer,
the edge budget and the PNG without running a model.

    graph = synthetic_graph()                        # 1,000 features, 30 layers, 10 positions
    obj = synthetic_graph_json(graph)                # pruned + budgeted graph JSON

Shaped like SmolLM2-135M's graph for "The capital of France is" (995 features, ~220k
edges after pruning): features crowd the later positions, each node reads from every kind
of node below it at the same or earlier positions, and |weights| are heavy-tailed
(log-normal), as attribution weights are.
"""

from __future__ import annotations

from typing import Any

import torch

from wiremap.attribution.graph import Graph


def _feature_table(n_features: int, n_layers: int, n_pos: int, gen: torch.Generator):
    """[n_features, 3] (layer, pos, feature), sorted; more features at later positions."""
    pos_weights = torch.arange(1, n_pos, dtype=torch.float) ** 1.5  # BOS (pos 0) holds none
    pos = torch.multinomial(pos_weights, n_features, replacement=True, generator=gen) + 1
    layer = torch.randint(0, n_layers, (n_features,), generator=gen)
    feats = torch.stack([layer, pos, torch.arange(n_features)], 1)
    return feats[torch.argsort(layer * n_pos * n_features + pos * n_features + feats[:, 2])]


def _node_levels(feats, n_layers: int, n_pos: int, n_logits: int):
    """(layer as a source, layer as a target, position) of every node, in Graph order."""
    n_f, n_err = len(feats), n_layers * n_pos
    tok = torch.arange(n_pos)
    src = torch.cat(
        [feats[:, 0], torch.arange(n_layers).repeat_interleave(n_pos), torch.full((n_pos,), -1)]
    )
    src = torch.cat([src, torch.full((n_logits,), 10**6)])  # logits are never sources
    tgt = torch.cat([feats[:, 0], torch.full((n_err + n_pos,), -(10**6))])  # no inputs
    tgt = torch.cat([tgt, torch.full((n_logits,), n_layers)])
    pos = torch.cat([feats[:, 1], torch.arange(n_pos).repeat(n_layers), tok])
    pos = torch.cat([pos, torch.full((n_logits,), n_pos - 1)])
    assert len(src) == n_f + n_err + n_pos + n_logits
    return src, tgt, pos


def synthetic_graph(
    n_features: int = 1000,
    n_layers: int = 30,
    n_pos: int = 10,
    n_logits: int = 10,
    inputs_per_node: int = 280,
    seed: int = 0,
) -> Graph:
    """A random attribution graph (a DAG): each feature and logit reads from up to
    `inputs_per_node` nodes at lower layers and the same or earlier positions."""
    gen = torch.Generator().manual_seed(seed)
    feats = _feature_table(n_features, n_layers, n_pos, gen)
    src_layer, tgt_layer, pos = _node_levels(feats, n_layers, n_pos, n_logits)
    n = len(src_layer)
    bos_error = torch.zeros(n, dtype=torch.bool)  # BOS features and errors are zeroed
    bos_error[n_features : n_features + n_layers * n_pos : n_pos] = True
    rows, cols = [], []
    for t in [*range(n_features), *range(n - n_logits, n)]:
        allowed = ((src_layer < tgt_layer[t]) & (pos <= pos[t]) & ~bos_error).nonzero()[:, 0]
        pick = allowed[torch.randperm(len(allowed), generator=gen)[:inputs_per_node]]
        rows.append(torch.full_like(pick, t))
        cols.append(pick)
    rows, cols = torch.cat(rows), torch.cat(cols)
    magnitude = torch.exp(1.5 * torch.randn(len(rows), generator=gen))
    sign = torch.where(torch.rand(len(rows), generator=gen) < 0.8, 1.0, -1.0)
    # dense: ~1,300 nodes is 7 MB, and pruning a dense matrix of that size is fastest
    adjacency = torch.zeros(n, n)
    adjacency[rows, cols] = sign * magnitude
    probs = torch.rand(n_logits, generator=gen).sort(descending=True).values ** 3
    words = ["The", " capital", " of", " France", " is", " a", " city", " in", " the", " state"]
    tokens = ["<s>", *(words[i % len(words)] for i in range(n_pos - 1))]
    return Graph(
        prompt="".join(tokens[1:]),
        input_ids=torch.arange(n_pos) + 100,
        token_strings=tokens,
        active_features=feats,
        activations=torch.rand(n_features, generator=gen) * 5,
        logit_tokens=torch.arange(n_logits) + 1000,
        logit_probs=probs / probs.sum() * 0.95,
        logit_strings=[f" answer{i}" for i in range(n_logits)],
        adjacency=adjacency,
        n_layers=n_layers,
        settings={"model": "synthetic"},
    )


def synthetic_graph_json(graph: Graph | None = None, **json_kwargs: Any) -> dict[str, Any]:
    """The graph JSON of `graph` (default `synthetic_graph()`) with every node and edge that
    has influence kept by pruning (thresholds 1.0), then the edge budget (defaults unless
    `edges_per_node` / `max_edges` are given)."""
    from wiremap.attribution.export import graph_to_json

    graph = graph if graph is not None else synthetic_graph()
    kwargs = {"node_threshold": 1.0, "edge_threshold": 1.0, **json_kwargs}
    return graph_to_json(graph, **kwargs)
