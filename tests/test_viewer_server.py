"""The viewer's HTTP server: every endpoint, path traversal, malformed and oversized requests,
loopback binding; the pinned-subgraph scores; the standalone HTML and PNG exports."""

from __future__ import annotations

import http.client
import json
import random
import threading
from pathlib import Path

import numpy as np
import pytest

from wiremap.attribute.viewer import steer as steer_mod
from wiremap.attribute.viewer.server import host_warning, make_server
from wiremap.attribute.viewer.steer import Steerer
from wiremap.attribute.viewer.subgraph import pinned_scores

TOKENS = ["<bos>", "The", " capital", " of", " France", " is"]


def cantor(layer: int, feat: int) -> int:
    return (layer + feat) * (layer + feat + 1) // 2 + feat


def make_graph_json(
    seed: int = 0, n_layers: int = 4, info: dict | None = None, n_features: int = 200
) -> dict:
    """A small graph JSON following DESIGN.md §8 (features, errors, tokens, logits, links)."""
    rng = random.Random(seed)
    n_pos = len(TOKENS)
    nodes, feats = [], []
    for layer in range(n_layers):
        for pos in range(1, n_pos):
            for _ in range(rng.choice([0, 1, 1, 2])):
                f = rng.randrange(n_features)
                if any(x[:3] == (layer, f, pos) for x in feats):
                    continue
                feats.append((layer, f, pos))
    for layer, f, pos in feats:
        nodes.append(
            {
                "node_id": f"{layer}_{f}_{pos}",
                "feature": cantor(layer, f),
                "layer": str(layer),
                "ctx_idx": pos,
                "feature_type": "cross layer transcoder",
                "jsNodeId": f"{layer}_{f}-0",
                "clerp": "",
                "influence": rng.random(),
                "activation": rng.uniform(0.5, 5),
                "token_prob": 0.0,
                "is_target_logit": False,
            }
        )
    for layer in range(n_layers):
        for pos in (2, n_pos - 1):
            nodes.append(
                {
                    "node_id": f"{layer}_-1_{pos}",
                    "feature": -1,
                    "layer": str(layer),
                    "ctx_idx": pos,
                    "feature_type": "mlp reconstruction error",
                    "jsNodeId": "",
                    "clerp": "",
                    "influence": rng.random(),
                    "activation": None,
                    "token_prob": 0.0,
                    "is_target_logit": False,
                }
            )
    for pos, tok in enumerate(TOKENS):
        nodes.append(
            {
                "node_id": f"E_{100 + pos}_{pos}",
                "feature": pos,
                "layer": "E",
                "ctx_idx": pos,
                "feature_type": "embedding",
                "jsNodeId": f"E_{100 + pos}-{pos}",
                "clerp": tok,
                "influence": None,
                "activation": None,
                "token_prob": 0.0,
                "is_target_logit": False,
            }
        )
    for tok, (tid, p) in {" Paris": (300, 0.6), " the": (301, 0.25), " a": (302, 0.1)}.items():
        nodes.append(
            {
                "node_id": f"{n_layers + 1}_{tid}_{n_pos - 1}",
                "feature": tid,
                "layer": str(n_layers + 1),
                "ctx_idx": n_pos - 1,
                "feature_type": "logit",
                "jsNodeId": f"L_{tid}-{n_pos - 1}",
                "clerp": f'Output "{tok}" (p={p:.3f})',
                "influence": None,
                "activation": None,
                "token_prob": p,
                "is_target_logit": True,
            }
        )
    return {
        "metadata": _metadata(n_layers, info),
        "qParams": _qparams(),
        "nodes": nodes,
        "links": _links(nodes, rng),
    }


def _metadata(n_layers: int, info: dict | None) -> dict:
    return {
        "slug": "capital",
        "scan": "tiny",
        "prompt": "".join(TOKENS[1:]),
        "prompt_tokens": TOKENS,
        "node_threshold": 0.8,
        "schema_version": 1,
        "info": {
            "generator": {"name": "test", "version": "0"},
            "model": "m",
            "transcoders": "t",
            **(info or {}),
        },
        "generation_settings": {},
        "pruning_settings": {"node_threshold": 0.8},
        "scores": {
            "full": {"replacement": 0.7, "completeness": 0.9},
            "pruned": {"replacement": 0.6, "completeness": 0.8},
        },
    }


def _qparams() -> dict:
    return {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}


def _links(nodes: list[dict], rng: random.Random) -> list[dict]:
    def level(n):  # tokens below layer 0 below ... below logits
        return -1 if n["layer"] == "E" else int(n["layer"])

    links = []
    for t in nodes:
        if t["feature_type"] in ("embedding", "mlp reconstruction error"):
            continue
        sources = [s for s in nodes if level(s) < level(t) and s["ctx_idx"] <= t["ctx_idx"]]
        for s in rng.sample(sources, min(len(sources), 5)):
            links.append(
                {
                    "source": s["node_id"],
                    "target": t["node_id"],
                    "weight": round(rng.uniform(-1, 2), 4),
                }
            )
    return links


# ---- server fixture and HTTP helpers ---------------------------------------------------------
@pytest.fixture
def served(tmp_path):
    """A running server over a folder with one good graph; yields (folder, request)."""
    folder = tmp_path / "graphs"
    folder.mkdir()
    (folder / "capital.json").write_text(json.dumps(make_graph_json()))
    started = []

    def start(**kw):
        server = make_server(folder, "127.0.0.1", 0, **kw)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server

    server = start()

    def request(method, path, body=None, headers=None, srv=None):
        srv = srv or server
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        if method == "POST":  # what the page sends; tests of other headers override it
            headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, json.loads(raw) if ctype.startswith("application/json") else raw

    request.start = start
    yield folder, request
    for s in started:
        s.shutdown()
        s.server_close()


def test_list_offers_graph_files_only(served, tmp_path):
    folder, request = served
    (folder / "capital.meta.json").write_text("{}")  # Graph.save sidecar, not a graph JSON
    (folder / "notes.txt").write_text("x")
    (tmp_path / "outside.json").write_text("{}")
    (folder / "escape.json").symlink_to(tmp_path / "outside.json")
    status, body = request("GET", "/api/list")
    assert status == 200
    assert [g["name"] for g in body["graphs"]] == ["capital.json"]


def test_graph_endpoint_returns_the_file(served):
    folder, request = served
    status, body = request("GET", "/api/graph?name=capital.json")
    assert status == 200
    assert body == json.loads((folder / "capital.json").read_text())


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"nodes": []}',
        "[1, 2]",
        '{"metadata": {}, "nodes": [{"node_id": "a"}], '
        '"links": [{"source": "a", "target": "zz", "weight": 1}]}',
    ],
)
def test_bad_graph_file_is_an_error_not_a_crash(served, content):
    folder, request = served
    (folder / "bad.json").write_text(content)
    status, body = request("GET", "/api/graph?name=bad.json")
    assert status == 422 and "bad.json" in body["error"]
    assert request("GET", "/api/graph?name=capital.json")[0] == 200  # still serving


@pytest.mark.parametrize(
    "name",
    [
        "..%2Fsecret.json",
        "%2e%2e%2fsecret.json",
        "../secret.json",
        "%2Fetc%2Fpasswd",
        "sub%2Fx.json",
        "..%5Csecret.json",
        "capital.json%00.txt",
        ".hidden.json",
        "capital.txt",
        "%252e%252e%252fsecret.json",
        "link.json",
    ],
)
def test_path_traversal_is_refused(served, tmp_path, name):
    folder, request = served
    (tmp_path / "secret.json").write_text(json.dumps(make_graph_json(seed=9)))
    (folder / "link.json").symlink_to(tmp_path / "secret.json")
    (folder / ".hidden.json").write_text(json.dumps(make_graph_json()))
    for method, path, body in [
        ("GET", f"/api/graph?name={name}", None),
        (
            "POST",
            "/api/save",
            {"name": name.replace("%2F", "/").replace("%2f", "/"), "qParams": {"pinnedIds": []}},
        ),
    ]:
        status, resp = request(method, path, body)
        assert status in (403, 404), (name, status, resp)
        assert "error" in resp
    assert json.loads((tmp_path / "secret.json").read_text()) == make_graph_json(seed=9)


def test_static_files_are_a_fixed_list(served):
    _, request = served
    status, page = request("GET", "/")
    assert status == 200 and b"static/viewer.js" in page and b"http" not in page.split(b"<svg")[0]
    assert request("GET", "/static/viewer.js")[0] == 200
    assert request("GET", "/static/viewer.css")[0] == 200
    for path in ["/static/../server.py", "/static/%2e%2e/server.py", "/static/graphfile.py"]:
        assert request("GET", path)[0] == 404


def test_malformed_and_oversized_requests(served):
    _, request = served
    status, body = request("POST", "/api/save", b"{oops", {"Content-Type": "application/json"})
    assert status == 400 and "malformed JSON" in body["error"]
    assert request("POST", "/api/save", b"[1]")[0] == 400
    assert request("POST", "/api/save", b"\xff\xfe")[0] == 400
    assert request("POST", "/api/nothing", b"{}")[0] == 404
    status, body = request("POST", "/api/save", b"", {"Content-Length": str(21 * 2**20)})
    assert status == 413 and "refused" in body["error"]  # refused before reading a byte
    small = request.start(max_body=1000)
    big = json.dumps({"name": "capital.json", "labels": {"x": "y" * 2000}}).encode()
    assert request("POST", "/api/save", big, srv=small)[0] == 413


def test_save_writes_pins_supernodes_and_labels(served):
    folder, request = served
    graph = json.loads((folder / "capital.json").read_text())
    feats = [n["node_id"] for n in graph["nodes"] if n["feature_type"].startswith("cross")]
    edit = {
        "pinnedIds": feats[:3],
        "supernodes": [["capital city", feats[0], feats[1]]],
        "clickedId": feats[2],
    }
    status, body = request(
        "POST",
        "/api/save",
        {"name": "capital.json", "qParams": edit, "labels": {feats[0]: "France"}},
    )
    assert status == 200, body
    saved = json.loads((folder / "capital.json").read_text())
    assert saved["qParams"]["pinnedIds"] == feats[:3]
    assert saved["qParams"]["supernodes"] == [["capital city", feats[0], feats[1]]]
    assert saved["qParams"]["linkType"] == "both"  # untouched keys survive
    assert {n["node_id"]: n["clerp"] for n in saved["nodes"]}[feats[0]] == "France"
    assert len(saved["links"]) == len(graph["links"])


@pytest.mark.parametrize(
    "bad",
    [
        {"qParams": {"pinnedIds": ["nope"]}},
        {"qParams": {"supernodes": [["label"]]}},
        {"qParams": {"supernodes": [[3, "E_100_0"]]}},
        {"qParams": {"evil": 1}},
        {"labels": {"nope": "x"}},
        {"labels": {"E_100_0": "x" * 501}},
        {"labels": ["x"]},
    ],
)
def test_save_rejects_bad_edits_and_leaves_the_file(served, bad):
    folder, request = served
    before = (folder / "capital.json").read_bytes()
    status, body = request("POST", "/api/save", {"name": "capital.json", **bad})
    assert status == 400 and body["error"]
    assert (folder / "capital.json").read_bytes() == before


def test_scores_endpoint(served):
    folder, request = served
    graph = json.loads((folder / "capital.json").read_text())
    feats = [n["node_id"] for n in graph["nodes"] if n["feature_type"].startswith("cross")]
    _, none = request("POST", "/api/scores", {"name": "capital.json", "pinnedIds": []})
    status, some = request("POST", "/api/scores", {"name": "capital.json", "pinnedIds": feats[:4]})
    _, every = request("POST", "/api/scores", {"name": "capital.json", "pinnedIds": feats})
    assert status == 200 and every["graph"]["full"] == {"replacement": 0.7, "completeness": 0.9}
    assert none["pinned"]["n_features"] == 0 and every["pinned"]["n_features"] == len(feats)
    assert some["pinned"]["n_features"] == 4
    assert none["pinned"]["completeness"] <= every["pinned"]["completeness"]
    assert request("POST", "/api/scores", {"name": "capital.json", "pinnedIds": "x"})[0] == 400


def test_scores_by_hand_on_a_three_node_chain():
    # token t -> feature f -> logit y (p=1), plus error e -> y; f has one input (t).
    node = lambda i, kind, layer, pos, p=0.0: {  # noqa: E731
        "node_id": i,
        "feature_type": kind,
        "layer": layer,
        "ctx_idx": pos,
        "token_prob": p,
    }
    graph = {
        "metadata": {},
        "nodes": [
            node("E_5_0", "embedding", "E", 0),
            node("0_7_0", "cross layer transcoder", "0", 0),
            node("0_-1_0", "mlp reconstruction error", "0", 0),
            node("2_9_0", "logit", "2", 0, 1.0),
        ],
        "links": [
            {"source": "E_5_0", "target": "0_7_0", "weight": 2.0},
            {"source": "0_7_0", "target": "2_9_0", "weight": 3.0},
            {"source": "0_-1_0", "target": "2_9_0", "weight": -1.0},
        ],
    }
    kept = pinned_scores(graph, ["0_7_0"])
    # Â[y] = (f 0.75, e 0.25); I_f = .75, I_e = .25, I_t = .75 -> replacement .75 / 1.0
    assert kept["replacement"] == pytest.approx(0.75)
    # completeness: Σ (1 - error share of inputs)(I + w) / Σ (I + w); only y has error input
    assert kept["completeness"] == pytest.approx((0.75 + 0.75 + 0.25 + 0.75) / 2.75)
    folded = pinned_scores(graph, [])  # f folds into e (3 - 1 = 2): y's input is all error
    assert folded["replacement"] == pytest.approx(0.0)
    assert folded["completeness"] == pytest.approx(1.0 / 2.0)


def test_scores_match_the_dense_inverse_formula():
    graph = make_graph_json(seed=3)
    ids = [n["node_id"] for n in graph["nodes"]]
    idx = {i: k for k, i in enumerate(ids)}
    a = np.zeros((len(ids), len(ids)))
    for ln in graph["links"]:
        a[idx[ln["target"]], idx[ln["source"]]] += abs(ln["weight"])
    a = a / np.where(a.sum(1, keepdims=True) > 0, a.sum(1, keepdims=True), 1)
    w = np.array([n["token_prob"] for n in graph["nodes"]])
    infl = w @ (np.linalg.inv(np.eye(len(ids)) - a) - np.eye(len(ids)))
    kind = np.array([n["feature_type"] for n in graph["nodes"]])
    tok, err = infl[kind == "embedding"].sum(), infl[kind == "mlp reconstruction error"].sum()
    every = [n["node_id"] for n in graph["nodes"] if n["feature_type"].startswith("cross")]
    assert pinned_scores(graph, every)["replacement"] == pytest.approx(tok / (tok + err))


def test_steer_endpoint_turns_nodes_into_interventions(served, monkeypatch):
    folder, request = served
    calls = []

    def fake_run(model, prompt, features, factor, all_pos, n_new, top_k):
        calls.append((model, prompt, features, factor, all_pos, n_new, top_k))
        return {"baseline": [], "steered": [], "baseline_text": "a", "steered_text": "b"}

    monkeypatch.setattr(steer_mod, "run_steering", fake_run)
    loads = []
    srv = request.start(steerer=Steerer(loader=lambda m, t: loads.append((m, t)) or "MODEL"))
    graph = json.loads((folder / "capital.json").read_text())
    feat = next(n for n in graph["nodes"] if n["feature_type"].startswith("cross"))
    layer, f, pos = (int(x) for x in feat["node_id"].split("_"))
    body = {"name": "capital.json", "nodes": [feat["node_id"]], "ablate": True, "max_new_tokens": 5}
    status, resp = request("POST", "/api/steer", body, srv=srv)
    assert status == 200 and resp["steered_text"] == "b"
    assert calls[-1] == ("MODEL", graph["metadata"]["prompt"], [(layer, pos, f)], 0.0, False, 5, 10)
    request("POST", "/api/steer", {**body, "ablate": False, "scale": 3}, srv=srv)
    assert calls[-1][3] == 3.0 and loads == [("m", "t")]  # the model is built once, then cached
    for bad in [
        {"nodes": ["E_100_0"]},
        {"nodes": []},
        {"nodes": [feat["node_id"]], "scale": "x"},
        {"nodes": [feat["node_id"]], "max_new_tokens": 1000},
    ]:
        status, resp = request("POST", "/api/steer", {"name": "capital.json", **bad}, srv=srv)
        assert status == 400, bad


def test_steer_needs_model_info(served):
    folder, request = served
    graph = make_graph_json()
    del graph["metadata"]["info"]["transcoders"]
    (folder / "noinfo.json").write_text(json.dumps(graph))
    feat = next(n for n in graph["nodes"] if n["feature_type"].startswith("cross"))["node_id"]
    status, body = request("POST", "/api/steer", {"name": "noinfo.json", "nodes": [feat]})
    assert status == 422 and "transcoders" in body["error"]


def test_feature_endpoint_errors_are_clear(served):
    folder, request = served
    status, body = request("GET", "/api/feature?name=capital.json&node=E_100_0")
    assert status == 404 and "not a feature node" in body["error"]
    graph = json.loads((folder / "capital.json").read_text())
    feat = next(n for n in graph["nodes"] if n["feature_type"].startswith("cross"))["node_id"]
    status, body = request("GET", f"/api/feature?name=capital.json&node={feat}")
    assert status == 404 and "wiremap features" in body["error"]


def test_binds_loopback_by_default(served):
    from wiremap.attribute import viewer_cmd

    _, request = served
    server = request.start()
    assert server.server_address[0] == "127.0.0.1"
    assert host_warning("127.0.0.1") is None and host_warning("::1") is None
    assert host_warning("localhost") is None
    assert "not loopback" in host_warning("0.0.0.0")
    assert "not loopback" in host_warning("192.168.1.5")
    src = Path(viewer_cmd.__file__).read_text()
    assert 'default="127.0.0.1"' in src


def test_cli_lists_the_commands():
    from wiremap.cli import COMMANDS

    assert COMMANDS["serve"][0] == "wiremap.attribute.viewer_cmd:serve_main"
    assert COMMANDS["features"][0] == "wiremap.attribute.viewer_cmd:features_main"


def test_serve_refuses_a_missing_folder(tmp_path):
    from wiremap.errors import WiremapError

    with pytest.raises(WiremapError, match="not a folder"):
        make_server(tmp_path / "nope", port=0)


# ---- standalone exports ----------------------------------------------------------------------
def test_write_html_is_self_contained(tmp_path):
    from wiremap.attribute.html import write_html

    graph = make_graph_json()
    graph["nodes"][0]["clerp"] = "</script><script>alert(1)</script>"
    page = write_html(graph, tmp_path / "g.html").read_text()
    assert "static/" not in page and "src=" not in page and "href=" not in page
    assert page.lower().count("</script>") == 2  # the graph block and the viewer script
    start = page.index('type="application/json">') + len('type="application/json">')
    embedded = json.loads(page[start : page.index("</script>", start)])
    assert embedded == graph


def test_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    from wiremap.attribute.png import write_png

    path = write_png(make_graph_json(), tmp_path / "g.png", dpi=60)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_steer_with_a_tiny_replacement_model(served, tiny_model_dir, tmp_path):
    pytest.importorskip("wiremap.models.replacement", reason="needs the ReplacementModel")
    pytest.importorskip("wiremap.attribute.interventions", reason="needs the intervention API")
    import torch

    from wiremap.models.io import save_transcoders
    from wiremap.models.transcoders import build_transcoder

    folder, request = served
    model_dir = tiny_model_dir("llama")
    tc = build_transcoder("plt", n_layers=2, d_model=32, d_transcoder=16, model_name=str(model_dir))
    with torch.no_grad():
        tc.encoder_bias.fill_(1.0)  # every feature fires, so scaling one moves the logits
    tc_dir = save_transcoders(tc, tmp_path / "tc")
    steerer = Steerer()
    srv = request.start(steerer=steerer)
    prompt = "the cat sees the moon"
    graph = make_graph_json(n_layers=2, info={"model": str(model_dir), "transcoders": str(tc_dir)})
    graph["metadata"]["prompt"] = prompt
    rm = steerer.model_for(graph)  # built once here, reused by the endpoint
    ids = rm.tokenize(prompt)
    last = int(ids.numel()) - 1
    node = dict(next(n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"))
    node.update(node_id=f"1_3_{last}", layer="1", ctx_idx=last, feature=cantor(1, 3))
    graph["nodes"].append(node)
    (folder / "steer.json").write_text(json.dumps(graph))
    body = {"name": "steer.json", "nodes": [node["node_id"]], "scale": 200.0, "max_new_tokens": 4}
    status, resp = request("POST", "/api/steer", body, srv=srv)
    assert status == 200, resp
    with torch.no_grad():
        want = rm.model(ids[None]).logits[0, -1].softmax(-1)
    assert resp["baseline"][0]["id"] == int(want.argmax())
    assert resp["baseline"][0]["prob"] == pytest.approx(float(want.max()), abs=1e-4)
    base = {t["id"]: t["prob"] for t in resp["baseline"]}
    assert any(abs(base.get(t["id"], 0.0) - t["prob"]) > 1e-4 for t in resp["steered"])
    assert resp["baseline_text"] and resp["steered_text"]
    assert resp["interventions"] == [[1, last, 3, 200.0]]
