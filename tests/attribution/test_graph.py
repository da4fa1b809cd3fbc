"""Graph node tables, index helpers and save/load."""

from __future__ import annotations

import pytest
import torch

from wiremap.attribution.graph import Graph, coo_triplets
from wiremap.errors import WiremapError


def make_graph(sparse: bool = False, n_layers: int = 2, n_pos: int = 3) -> Graph:
    """A small random graph: 4 features, n_layers*n_pos errors, n_pos tokens, 2 logits."""
    feats = torch.tensor([[0, 1, 5], [0, 2, 7], [1, 1, 5], [1, 2, 3]])
    n = len(feats) + n_layers * n_pos + n_pos + 2
    adjacency = torch.randn(n, n) * (torch.rand(n, n) < 0.3)
    if sparse:
        adjacency = adjacency.to_sparse_coo()
    return Graph(
        prompt="a b c",
        input_ids=torch.tensor([1, 10, 11]),
        token_strings=["<s>", " b", " c"],
        active_features=feats,
        activations=torch.rand(len(feats)),
        logit_tokens=torch.tensor([42, 43]),
        logit_probs=torch.tensor([0.6, 0.3]),
        logit_strings=[" x", " y"],
        adjacency=adjacency,
        n_layers=n_layers,
        settings={"model": "tiny", "dtype": torch.float32},
    )


def test_sizes_and_slices():
    g = make_graph()
    assert (g.n_pos, g.n_features, g.n_errors, g.n_logits) == (3, 4, 6, 2)
    assert g.n_nodes == 4 + 6 + 3 + 2
    assert g.error_slice == slice(4, 10) and g.token_slice == slice(10, 13)
    assert g.logit_slice == slice(13, 15)
    assert g.error_index(1, 2) == 4 + 1 * 3 + 2
    assert g.feature_error_indices().tolist() == [5, 6, 8, 9]
    assert g.top_logit == 13
    assert [g.node_kind(i) for i in (0, 4, 10, 14)] == ["feature", "error", "token", "logit"]
    assert g.node_layer_pos(2) == (1, 1)
    assert g.node_layer_pos(g.error_index(1, 2)) == (1, 2)
    assert g.node_layer_pos(11) == (None, 1)


@pytest.mark.parametrize("sparse", [False, True])
def test_save_load_round_trip(tmp_path, sparse):
    g = make_graph(sparse=sparse)
    base = g.save(tmp_path / "run.v1" / "graph")
    assert (tmp_path / "run.v1" / "graph.safetensors").exists()
    h = Graph.load(str(base) + ".safetensors")
    assert h.is_sparse == sparse
    torch.testing.assert_close(h.dense_adjacency(), g.dense_adjacency())
    for name in ("input_ids", "active_features", "activations", "logit_tokens", "logit_probs"):
        torch.testing.assert_close(getattr(h, name), getattr(g, name))
    assert (h.prompt, h.token_strings, h.logit_strings) == (
        g.prompt,
        g.token_strings,
        g.logit_strings,
    )
    assert h.n_layers == g.n_layers
    assert h.settings == {"model": "tiny", "dtype": "torch.float32"}


def test_coo_triplets_agree_across_layouts():
    dense = make_graph().adjacency
    ref = coo_triplets(dense)
    for m in (dense.to_sparse_coo(), dense.to_sparse_csr()):
        rows, cols, vals = coo_triplets(m)
        order = torch.argsort(rows * dense.shape[0] + cols)
        assert torch.equal(rows[order], ref[0]) and torch.equal(cols[order], ref[1])
        torch.testing.assert_close(vals[order], ref[2])


def test_bad_shapes_raise():
    g = make_graph()
    with pytest.raises(WiremapError, match="adjacency"):
        Graph(**{**g.__dict__, "adjacency": torch.zeros(3, 3)})
    with pytest.raises(WiremapError, match="token_strings"):
        Graph(**{**g.__dict__, "token_strings": ["a"]})
    with pytest.raises(WiremapError, match="outside"):
        Graph(**{**g.__dict__, "active_features": torch.tensor([[5, 0, 0]] * 4)})


def test_load_missing_raises(tmp_path):
    with pytest.raises(WiremapError, match="Graph.save"):
        Graph.load(tmp_path / "nothing")
