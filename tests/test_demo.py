"""`wiremap demo` and the circuit helpers it uses (wiremap.attribute.circuits).

The end-to-end runs use the shipped organism; the fast one runs reduced sizes, the full-size
one (the Dallas path and the Texas -> California swap at the demo's defaults) is `slow`.
"""

from __future__ import annotations

import pytest
import torch

from wiremap.attribute.circuits import (
    Contrast,
    concept_features,
    feature_nodes,
    logit_node,
    path_through,
    total_effects,
)
from wiremap.attribute.graph import Graph
from wiremap.errors import WiremapError


# -- circuits on a hand-made graph -----------------------------------------------------------
def _toy_graph() -> Graph:
    """2 layers, 2 positions; features f0 (L0, pos 1, #3, a=2) and f1 (L1, pos 1, #5, a=2).

    Edges: token1 -> f0 (2), f0 -> f1 (1), f1 -> logit (3), f0 -> logit (0.5),
    f2 (L0, pos 1, #4, a=1) -> logit (-1).
    """
    feats = torch.tensor([[0, 1, 3], [0, 1, 4], [1, 1, 5]])
    n = 3 + 4 + 2 + 1
    adj = torch.zeros(n, n)
    f0, f2, f1, tok1, logit = 0, 1, 2, 3 + 4 + 1, n - 1
    adj[f0, tok1] = 2.0
    adj[f1, f0] = 1.0
    adj[logit, f1] = 3.0
    adj[logit, f0] = 0.5
    adj[logit, f2] = -1.0
    return Graph(
        prompt="a b",
        input_ids=torch.tensor([1, 7]),
        token_strings=["<s>", " b"],
        active_features=feats,
        activations=torch.tensor([2.0, 1.0, 2.0]),
        logit_tokens=torch.tensor([9]),
        logit_probs=torch.tensor([0.9]),
        logit_strings=[" c"],
        adjacency=adj,
        n_layers=2,
    )


def test_total_effects_sum_paths_divided_by_intermediate_activations():
    g = _toy_graph()
    effect = total_effects(g, logit_node(g, " c"))
    # f0: direct 0.5 + via f1: 1 * 3 / a_f1(2) = 2.0; f2: -1; f1: 3
    torch.testing.assert_close(effect, torch.tensor([2.0, -1.0, 3.0]))


def test_logit_node_by_string_or_id_and_unknown():
    g = _toy_graph()
    assert logit_node(g, " c") == logit_node(g, 9) == g.n_nodes - 1
    with pytest.raises(WiremapError, match="not a logit target"):
        logit_node(g, " d")


def test_concept_features_keep_selective_positive_features_by_effect():
    g = _toy_graph()
    shape = (2, 2, 8)
    mean, other, frac = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    for layer, pos, feat in ((0, 1, 3), (0, 1, 4), (1, 1, 5)):
        mean[layer, pos, feat], frac[layer, pos, feat] = 1.0, 1.0
    other[1, 1, 5] = 0.9  # f1 fires almost as much on the other concept: not selective
    stats = Contrast(mean=mean, mean_other=other, frac=frac)
    # f2 is selective but lowers the logit; f1 is not selective: only f0 remains
    assert concept_features(g, stats, target=" c") == [(0, 1, 3)]
    assert concept_features(g, Contrast(other, other, frac), target=" c") == []


def test_path_through_follows_kept_edges():
    from wiremap.attribute.prune import prune_graph

    g = _toy_graph()
    result = prune_graph(g, node_threshold=1.0, edge_threshold=1.0)
    tok1, logit = g.token_index(1), g.n_nodes - 1
    assert path_through(g, result, tok1, feature_nodes(g, [(1, 1, 5)]), logit)
    assert not path_through(g, result, g.token_index(0), feature_nodes(g, [(1, 1, 5)]), logit)
    assert not path_through(g, result, tok1, feature_nodes(g, [(0, 1, 4)]), logit)
