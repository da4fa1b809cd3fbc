"""Feature cards on a tiny cache and tiny transcoders, checked against a brute-force scan."""

from __future__ import annotations

import gzip
import json

import helpers
import pytest
import torch

from wiremap.attribution.features import (  # noqa: E402
    FeatureCardConfig,
    FeatureStore,
    build_feature_cards,
    hist_bin,
)
from wiremap.cache import ActivationCache  # noqa: E402
from wiremap.models.formats import load_transcoders, save_transcoders  # noqa: E402
from wiremap.models.loading import load_model  # noqa: E402
from wiremap.models.transcoders import build_transcoder  # noqa: E402

TOP_K = 5


@pytest.fixture(scope="module")
def tiny_cache(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    model = tiny_model_dir("llama")
    # several shards: the pass must cross shard borders
    settings = dict(n_tokens=600, context_length=16, batch_size=8, shard_tokens=128)
    cfg = helpers.tiny_cache(model, root, n_docs=60, seed=1, dtype="float32", **settings)
    return model, cfg.out, root


@pytest.fixture(scope="module", params=["plt", "clt"])
def cards(request, tiny_cache):
    model, cache_dir, root = tiny_cache
    torch.manual_seed(0)
    tc = build_transcoder(
        request.param, n_layers=2, d_model=32, d_transcoder=40, model_name=str(model)
    )
    with torch.no_grad():  # biases that leave some features rare and some common
        tc.b_enc.copy_(torch.linspace(-1.5, 0.3, 40).expand(2, 40))
    tc_dir = save_transcoders(tc, root / f"tc_{request.param}")
    cfg = FeatureCardConfig(
        cache=str(cache_dir),
        transcoders=str(tc_dir),
        top_k=TOP_K,
        n_samples=9,
        context=8,
        n_logits=4,
        progress=False,
        chunk_elements=40 * 50,
    )  # 50-row chunks: many merges
    out = build_feature_cards(cfg)
    return FeatureStore(out), load_transcoders(tc_dir), ActivationCache(cache_dir), model, out


def _brute_force(cache, tc, layer):
    x, _ = cache.get(slice(0, cache.n_tokens))
    with torch.no_grad():
        return tc.encode(x[:, cache.layers.index(tc.layers[layer])], layer)  # [N, F]


def test_top_contexts_match_a_brute_force_scan(cards):
    store, tc, cache, _, _ = cards
    for layer in range(tc.n_layers):
        acts = _brute_force(cache, tc, layer)
        top_vals = acts.T.topk(TOP_K, dim=1).values
        for f in range(tc.d_transcoder):
            card = store.card(layer, f)
            top = [a for a in card["activations"] if "binMin" not in a]
            want = [float(v) for v in top_vals[f] if v > 0]
            rows = [a["dataIndex"] for a in top]
            # same rows up to ties: distinct rows whose true activations are the top values
            assert len(set(rows)) == len(rows) == len(want), (layer, f)
            assert acts[rows, f].tolist() == pytest.approx(want, abs=1e-5)
            got_vals = [a["values"][a["qualifyingTokenIndex"]] for a in top]
            assert got_vals == pytest.approx(want, abs=1e-5)
            assert card["maxActApprox"] == pytest.approx(max([0.0] + want))
            active = acts[:, f] > 0
            assert card["frac_nonzero"] == pytest.approx(float(active.float().mean()))
            assert sum(card["freq_hist_data_bar_heights"]) == int(active.sum())
            if active.any():
                bins = torch.bincount(hist_bin(acts[active, f]))
                assert max(card["freq_hist_data_bar_heights"]) == int(bins.max())


def test_contexts_are_rebuilt_from_the_cache(cards):
    store, tc, cache, model, _ = cards
    _, tok = load_model(str(model))
    acts = _brute_force(cache, tc, 1)
    checked = 0
    for f in range(0, tc.d_transcoder, 7):
        for ex in store.card(1, f)["activations"]:
            row, q = ex["dataIndex"], ex["qualifyingTokenIndex"]
            rows = torch.arange(row - q, row - q + len(ex["tokens"]))
            positions = cache.positions(rows)
            assert torch.equal(positions - positions[0], torch.arange(len(rows)))  # one context
            assert ex["tokens"] == [tok.decode([t]) for t in cache.tokens(rows).tolist()]
            assert ex["values"] == pytest.approx(acts[rows, f].tolist(), abs=1e-5)
            if "binMin" in ex:
                assert ex["binMin"] - 1e-6 <= ex["values"][q] <= ex["binMax"] + 1e-6
            checked += 1
    assert checked > 10


def test_quantile_examples_and_logit_lens(cards):
    store, tc, _, model, _ = cards
    lm, tok = load_model(str(model))
    f = tc.d_transcoder - 1  # the most common feature: has a random sample
    card = store.card(0, f)
    quantile = [a for a in card["activations"] if "binMin" in a]
    assert quantile and all(0 < a["binContains"] <= 1 for a in quantile)
    with torch.no_grad():
        direction = tc.decoder(0, torch.tensor([f])).sum(1)  # CLT: summed over output layers
        logits = lm.lm_head(lm.model.norm(direction))[0]
    assert card["pos_values"] == pytest.approx(logits.topk(4).values.tolist(), abs=1e-4)
    assert card["pos_str"] == [tok.decode([i]) for i in logits.topk(4).indices.tolist()]
    assert card["neg_values"] == pytest.approx((-(-logits).topk(4).values).tolist(), abs=1e-4)


def test_store_layout_reads_with_plain_gzip(cards):
    store, tc, _, _, out = cards
    index = json.loads((out / "index.json").read_text())
    lines = gzip.decompress((out / index["layers"]["1"]["file"]).read_bytes()).splitlines()
    assert len(lines) == tc.d_transcoder
    assert json.loads(lines[17]) == store.card(1, 17)
    with pytest.raises(Exception, match="no feature card"):
        store.card(5, 0)


def test_feature_endpoint_serves_cards(cards, tmp_path):
    import http.client
    import threading

    from test_viewer_server import make_graph_json

    from wiremap.attribution.viewer.server import make_server

    _, _, _, _, out = cards
    graph = make_graph_json(n_layers=2, info={"transcoders": str(out.parent)}, n_features=40)
    (tmp_path / "g.json").write_text(json.dumps(graph))
    node = next(n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, feat, _ = (int(x) for x in node["node_id"].split("_"))
    server = make_server(tmp_path, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        conn.request("GET", f"/api/feature?name=g.json&node={node['node_id']}")
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        server.shutdown()
        server.server_close()
    assert resp.status == 200
    assert body == FeatureStore(out).card(layer, feat)
