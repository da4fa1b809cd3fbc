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

from wiremap.attribution.subgraph import pinned_scores
from wiremap.attribution.viewer import steer as steer_mod
from wiremap.attribution.viewer.server import host_warning, make_server
from wiremap.attribution.viewer.steer import Steerer

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
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
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
        "a" * 300 + ".json",
        "%2Ftmp%2Fsecret.json",
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
        {"labels": {"E_100_0": 5}},
        {"qParams": {"pinnedIds": [["x"]]}},
        {"qParams": {"pinnedIds": [{"a": 1}]}},
        {"qParams": {"pinnedIds": "E_100_0"}},
        {"qParams": {"pinnedIds": ["E_100_0"] * 1000}},
        {"qParams": {"supernodes": 5}},
        {"qParams": {"supernodes": [5]}},
        {"qParams": {"supernodes": [["x" * 501, "E_100_0"]]}},
        {"qParams": {"supernodes": [["a", ["E_100_0"]]]}},
        {"qParams": {"supernodes": [["a", "E_100_0", "E_100_0"]]}},
        {"qParams": {"supernodes": [["a", "E_100_0"], ["b", "E_100_0"]]}},
        {"qParams": {"clickedId": ["E_100_0"]}},
        {"qParams": {"linkType": "x" * 501}},
        {"qParams": 5},
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
    from wiremap.attribution import viewer_cmd
    from wiremap.commands import parse

    _, request = served
    server = request.start()
    assert server.server_address[0] == "127.0.0.1"
    assert host_warning("127.0.0.1") is None and host_warning("::1") is None
    assert host_warning("localhost") is None
    assert "not loopback" in host_warning("0.0.0.0")
    assert "not loopback" in host_warning("192.168.1.5")
    assert parse(["graphs"], "wiremap serve", viewer_cmd.serve, positional=True)["host"] == (
        "127.0.0.1"
    )


def test_cli_lists_the_commands():
    from wiremap.cli import COMMANDS

    assert COMMANDS["serve"][0] == "wiremap.attribution.viewer_cmd:serve_main"
    assert COMMANDS["features"][0] == "wiremap.attribution.viewer_cmd:features_main"


def test_serve_refuses_a_missing_folder(tmp_path):
    from wiremap.errors import WiremapError

    with pytest.raises(WiremapError, match="not a folder"):
        make_server(tmp_path / "nope", port=0)


# ---- standalone exports ----------------------------------------------------------------------
def test_write_html_is_self_contained(tmp_path):
    from wiremap.attribution.html import write_html

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
    from wiremap.attribution.png import write_png

    path = write_png(make_graph_json(), tmp_path / "g.png", dpi=60)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_steer_with_a_tiny_replacement_model(served, tiny_model_dir, tmp_path):
    pytest.importorskip("wiremap.models.replacement", reason="needs the ReplacementModel")
    pytest.importorskip("wiremap.attribution.interventions", reason="needs the intervention API")
    import torch

    from wiremap.models.formats import save_transcoders
    from wiremap.models.transcoders import build_transcoder

    folder, request = served
    model_dir = tiny_model_dir("llama")
    tc = build_transcoder("plt", n_layers=2, d_model=32, d_transcoder=16, model_name=str(model_dir))
    with torch.no_grad():
        tc.b_enc.fill_(1.0)  # every feature fires, so scaling one moves the logits
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


# ---- hardening: hosts, origins, bodies, slow clients, saves, messages ------------------------
def raw_request(server, data: bytes, pause: float = 0.0, timeout: float = 30) -> bytes:
    """Send raw bytes (after `pause` seconds, nothing) and read until the server closes."""
    import socket
    import time

    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        time.sleep(pause)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


SAVE = {"name": "capital.json", "qParams": {"pinnedIds": ["E_100_0"]}}


def test_host_header_allow_list(served):
    folder, request = served
    before = (folder / "capital.json").read_bytes()
    for host in ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]", "a:b:c"]:
        for path in ["/", "/api/list", "/api/graph?name=capital.json"]:
            status, _ = request("GET", path, headers={"Host": host})
            assert status in (400, 403), (host, path)
        assert request("POST", "/api/save", SAVE, {"Host": host})[0] in (400, 403)
    assert (folder / "capital.json").read_bytes() == before
    for host in ["localhost", "LOCALHOST:8000", "127.0.0.1:1234", "[::1]:8000", "localhost."]:
        assert request("GET", "/api/list", headers={"Host": host})[0] == 200, host
    lan = request.start(allow_hosts=["mybox.lan"])
    assert request("GET", "/api/list", headers={"Host": "mybox.lan:8000"}, srv=lan)[0] == 200
    assert request("GET", "/api/list", headers={"Host": "other.lan"}, srv=lan)[0] == 403
    server = request.start()
    assert status_of(raw_request(server, b"GET /api/list HTTP/1.0\r\n\r\n")) == 400  # no Host
    two = b"GET /api/list HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n"
    assert status_of(raw_request(server, two)) == 400


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "multipart/form-data; boundary=x"},
        {"Content-Type": ""},
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "https://127.0.0.1"},
        {"Origin": "http://127.0.0.1:1"},
        {"Referer": "http://evil.example/page.html"},
        {"Sec-Fetch-Site": "cross-site"},
    ],
)
def test_writes_need_json_from_the_same_origin(served, headers):
    folder, request = served
    before = (folder / "capital.json").read_bytes()
    for path, body in [
        ("/api/save", SAVE),
        ("/api/scores", {"name": "capital.json", "pinnedIds": []}),
        ("/api/steer", {"name": "capital.json", "nodes": ["E_100_0"]}),
    ]:
        status, resp = request("POST", path, body, headers)
        assert status in (403, 415), (path, status, resp)
    assert (folder / "capital.json").read_bytes() == before


def test_same_origin_writes_are_accepted(served):
    folder, request = served
    srv = request.start()
    origin = f"http://127.0.0.1:{srv.server_address[1]}"
    headers = {"Origin": origin, "Content-Type": "application/json; charset=utf-8"}
    assert request("POST", "/api/save", SAVE, headers, srv=srv)[0] == 200
    referer = {"Referer": origin + "/index.html", "Sec-Fetch-Site": "same-origin"}
    assert request("POST", "/api/save", SAVE, referer, srv=srv)[0] == 200
    localhost = {"Host": f"localhost:{srv.server_address[1]}"}
    localhost["Origin"] = f"http://{localhost['Host']}"
    assert request("POST", "/api/save", SAVE, localhost, srv=srv)[0] == 200
    saved = json.loads((folder / "capital.json").read_text())
    assert saved["qParams"]["pinnedIds"] == ["E_100_0"]


@pytest.mark.parametrize(
    "length",
    [b"\xc2\xb2", b"-1", b"1e3", b" ", b"0x10", b"99999999999999999999", b"12, 13"],
)
def test_bad_content_length_is_answered_400(served, length):
    folder, request = served
    server = request.start()
    head = b"POST /api/save HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    answer = raw_request(server, head + b"Content-Length: " + length + b"\r\n\r\n{}")
    assert status_of(answer) == 400 and b"Content-Length" in answer
    two = head + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
    assert status_of(raw_request(server, two)) == 400
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    assert status_of(raw_request(server, chunked)) == 411
    assert request("GET", "/api/list", srv=server)[0] == 200  # still serving


def test_deep_or_odd_json_bodies_are_answered_400(served):
    folder, request = served
    before = (folder / "capital.json").read_bytes()
    deep_list = b"[" * 100_000 + b"]" * 100_000
    deep_dict = b'{"name": "capital.json", "qParams": ' + b'{"a":' * 40 + b"1" + b"}" * 41
    for body in [deep_list, b"[" * 100_000, deep_dict, b'{"name": NaN}', b'{"x": Infinity}']:
        status, resp = request("POST", "/api/save", body)
        assert status == 400 and resp["error"], body[:40]
    ok = {"name": "capital.json", "qParams": {"pinnedIds": []}, "labels": {}}
    assert request("POST", "/api/save", ok)[0] == 200
    assert json.loads((folder / "capital.json").read_bytes()) == json.loads(before)


def test_idle_slow_and_unfinished_clients_are_cut_off_without_blocking_others(served):
    import socket
    import time

    _, request = served
    server = request.start(timeout=0.5, read_deadline=1.5)
    addr = server.server_address[:2]
    idle = socket.create_connection(addr, timeout=30)  # says nothing at all
    unfinished = socket.create_connection(addr, timeout=30)  # a POST that never ends
    unfinished.sendall(
        b"POST /api/save HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"name": '
    )
    slow = socket.create_connection(addr, timeout=30)  # slowloris: a byte every 0.2 s
    assert request("GET", "/api/list", srv=server)[0] == 200  # others are served meanwhile
    sent = 0
    for byte in b"GET /api/list HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200:
        try:
            slow.sendall(bytes([byte]))
        except OSError:
            break  # the server closed it: the read deadline works
        sent += 1
        time.sleep(0.2)
        if sent == 5:
            assert request("GET", "/api/list", srv=server)[0] == 200
    assert sent < 240, "the slow client was never cut off"
    for sock in (idle, unfinished, slow):
        try:
            rest = sock.recv(65536)
            while rest and sock.recv(65536):
                pass
        except (ConnectionResetError, TimeoutError):
            rest = b""
        assert not rest or status_of(rest) in (400, 408), rest
        sock.close()
    assert request("GET", "/api/list", srv=server)[0] == 200


def test_connections_are_bounded_and_extra_ones_get_503(served):
    import socket
    import time

    _, request = served
    server = request.start(max_threads=3, timeout=30)
    held = [socket.create_connection(server.server_address[:2], timeout=30) for _ in range(3)]
    for _ in range(200):  # wait until the server has accepted all three
        if server._active == 3:
            break
        time.sleep(0.05)
    assert server._active == 3
    assert status_of(raw_request(server, b"GET /api/list HTTP/1.0\r\nHost: x\r\n\r\n")) == 503
    for sock in held:
        sock.close()
    for _ in range(200):
        if server._active == 0:
            break
        time.sleep(0.05)
    assert request("GET", "/api/list", srv=server)[0] == 200


def _post_head(length: int) -> bytes:
    return (
        b"POST /api/save HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )


def _wait_until(condition, seconds: float = 10.0) -> None:
    import time

    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.02)
    assert condition()


def test_bodies_held_at_once_are_capped_and_the_excess_gets_503_retry_after(served):
    import socket

    _, request = served
    server = request.start(max_body=1000, max_body_total=2500, timeout=30)
    server.bodies.wait = 0.3
    addr = server.server_address[:2]
    held = [socket.create_connection(addr, timeout=30) for _ in range(2)]
    for sock in held:  # two 1000-byte bodies announced, a few bytes sent: 2000 bytes held
        sock.sendall(_post_head(1000) + b'{"name": ')
    _wait_until(lambda: server.bodies.held == 2000)

    conn = http.client.HTTPConnection(*addr, timeout=30)
    conn.request("POST", "/api/save", b" " * 1000, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 503 and resp.getheader("Retry-After") == "1", body
    assert "busy" in body["error"] and server.bodies.held == 2000
    small = json.dumps(SAVE).encode()  # still fits next to the two held bodies
    assert request("POST", "/api/save", small, srv=server)[0] == 200

    held[0].sendall(b" " * (1000 - len(b'{"name": ')))  # completes as malformed JSON
    assert status_of(held[0].recv(65536)) == 400
    _wait_until(lambda: server.bodies.held == 1000)  # given back, error or not
    padded = small + b" " * (1000 - len(small))
    assert request("POST", "/api/save", padded, srv=server)[0] == 200  # now it fits
    for sock in held:
        sock.close()
    _wait_until(lambda: server.bodies.held == 0)  # a client that vanished gives it back too


def test_a_body_budget_below_one_body_is_refused(tmp_path):
    from wiremap.errors import WiremapError

    with pytest.raises(WiremapError, match="max_body_total=10 is below max_body=100"):
        make_server(tmp_path, "127.0.0.1", 0, max_body=100, max_body_total=10)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600])
def test_save_keeps_the_file_mode_and_leaves_no_temp_files(served, mode):
    folder, request = served
    (folder / "capital.json").chmod(mode)
    assert request("POST", "/api/save", SAVE)[0] == 200
    assert (folder / "capital.json").stat().st_mode & 0o777 == mode
    assert sorted(p.name for p in folder.iterdir()) == ["capital.json"]


def test_concurrent_saves_and_garbage_never_corrupt_the_graph(served):
    folder, request = served
    graph = json.loads((folder / "capital.json").read_text())
    feats = [n["node_id"] for n in graph["nodes"] if n["feature_type"].startswith("cross")]
    edits = [{"name": "capital.json", "qParams": {"pinnedIds": feats[: i + 1]}} for i in range(6)]
    garbage = [b'{"name": "capital.json", "qParams": {"pinnedIds": [', b"\x00" * 1000]
    results = []

    def post(body):
        results.append(request("POST", "/api/save", body)[0])

    threads = [threading.Thread(target=post, args=(b,)) for b in edits * 3 + garbage * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(results)) == [200, 400]
    saved = json.loads((folder / "capital.json").read_text())
    assert saved["qParams"]["pinnedIds"] in [e["qParams"]["pinnedIds"] for e in edits]
    assert saved["nodes"] == graph["nodes"] and saved["links"] == graph["links"]
    assert sorted(p.name for p in folder.iterdir()) == ["capital.json"]


def test_errors_expose_no_absolute_paths_or_exception_text(served, monkeypatch, tmp_path):
    from wiremap.attribution.viewer import server as server_mod
    from wiremap.errors import WiremapError

    folder, request = served
    status, body = request("GET", "/api/list")
    assert body["folder"] == "graphs" and str(tmp_path) not in json.dumps(body)

    def broken(obj, pinned):
        raise RuntimeError(f"secret detail in {tmp_path}/private/file.bin")

    monkeypatch.setattr(server_mod, "pinned_scores", broken)
    status, body = request("POST", "/api/scores", {"name": "capital.json", "pinnedIds": []})
    assert status == 500 and "secret" not in body["error"] and str(tmp_path) not in body["error"]

    def user_error(obj, pinned):
        raise WiremapError(f"cannot open {tmp_path}/models/tc/config.json; check the folder")

    monkeypatch.setattr(server_mod, "pinned_scores", user_error)
    status, body = request("POST", "/api/scores", {"name": "capital.json", "pinnedIds": []})
    assert status == 422 and str(tmp_path) not in body["error"]
    assert "config.json; check the folder" in body["error"]
    for status, body in [
        request("GET", "/api/nothing/else"),
        request("POST", "/api/save", b"{oops"),
        request("GET", "/api/graph?name=missing.json"),
    ]:
        assert status >= 400 and str(tmp_path) not in body["error"]


def test_public_message_cuts_folders():
    from wiremap.attribution.viewer.guard import public_message

    root = Path("/home/me/graphs")
    text = "no file /home/me/graphs/g.json; see /opt/models/tc/config.json or C:\\Users\\me\\x.json"
    out = public_message(text, root)
    assert "/home" not in out and "/opt" not in out and "Users" not in out
    assert "graphs/g.json" in out and "…/config.json" in out and "x.json" in out
    assert (
        public_message("'nodes' must be a list (1/2 done)") == "'nodes' must be a list (1/2 done)"
    )


def test_steer_takes_no_paths_from_the_request_and_no_remote_code(served, tmp_path):
    folder, request = served
    loads = []
    srv = request.start(steerer=Steerer(loader=lambda m, t: loads.append((m, t)) or "MODEL"))
    graph = json.loads((folder / "capital.json").read_text())
    feat = next(n for n in graph["nodes"] if n["feature_type"].startswith("cross"))["node_id"]
    for extra in [{"model": "/etc"}, {"transcoders": "/tmp"}, {"metadata": {}}]:
        body = {"name": "capital.json", "nodes": [feat], **extra}
        status, resp = request("POST", "/api/steer", body, srv=srv)
        assert status == 400 and "metadata" in resp["error"], extra
    remote = tmp_path / "remote_model"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "x.Model"}}))
    (folder / "remote.json").write_text(
        json.dumps(make_graph_json(info={"model": str(remote), "transcoders": "t"}))
    )
    status, resp = request("POST", "/api/steer", {"name": "remote.json", "nodes": [feat]}, srv=srv)
    assert status == 422 and "own Python code" in resp["error"]
    assert str(tmp_path) not in resp["error"] and loads == []


def test_serve_bind_problems_are_one_clear_line(served, capsys):
    from wiremap.cli import main
    from wiremap.errors import WiremapError

    folder, request = served
    busy = request.start().server_address[1]
    for args, words in [
        (["--port", str(busy)], "already in use"),
        (["--host", "999.1.1.1", "--port", "0"], "not an address of this machine"),
        (["--port", "70000"], "not a port"),
    ]:
        assert main(["serve", str(folder), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    with pytest.raises(WiremapError, match="already in use"):
        make_server(folder, "127.0.0.1", busy)
