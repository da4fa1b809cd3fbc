"""The static PNG: caps on drawn nodes and links, supernodes drawn as one node, logit labels
that never overlap, and a real-model-sized graph drawn end to end."""

from __future__ import annotations

import itertools

import pytest
from test_viewer_server import make_graph_json

pytest.importorskip("matplotlib")

from matplotlib.text import Text  # noqa: E402

from wiremap.attribution.png import draw_graph, logit_label, plan_drawing, write_png  # noqa: E402
from wiremap.attribution.subgraph import node_kind  # noqa: E402
from wiremap.attribution.viewer.synthetic import synthetic_graph, synthetic_graph_json  # noqa: E402


@pytest.fixture(scope="module")
def big_json():
    graph = synthetic_graph(n_features=300, n_layers=12, n_pos=8, inputs_per_node=60, seed=3)
    return synthetic_graph_json(graph)


def _drawn_kinds(drawing) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in drawing.nodes:
        kind = n["feature_type"] if n["feature_type"] == "supernode" else node_kind(n)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def test_caps_on_drawn_nodes_and_links(big_json):
    d = plan_drawing(big_json, max_nodes=40, max_edges=70, edges_per_node=3)
    kinds = _drawn_kinds(d)
    assert kinds["feature"] + kinds.get("error", 0) == 40
    assert (kinds["token"], kinds["logit"]) == (8, 10)  # all tokens and logits, always
    inner = [n for n in big_json["nodes"] if node_kind(n) in ("feature", "error")]
    inner.sort(key=lambda n: n["influence"])
    drawn = {n["node_id"] for n in d.nodes}
    assert {n["node_id"] for n in inner[:40]} <= drawn  # the most influential ones
    assert len(d.links) == 70 and all(ln["source"] in drawn for ln in d.links)
    # each drawn link is among the 3 strongest of its target's inputs or its source's outputs
    everything = plan_drawing(big_json, max_nodes=40, max_edges=None, edges_per_node=None)
    assert len(everything.links) > 3 * len(d.links)
    d3 = plan_drawing(big_json, max_nodes=40, max_edges=None, edges_per_node=3)
    assert {(x["source"], x["target"]) for x in d.links} <= {
        (x["source"], x["target"]) for x in d3.links
    }


def test_supernode_is_drawn_as_one_node():
    graph = make_graph_json(seed=1)
    feats = [n["node_id"] for n in graph["nodes"] if node_kind(n) == "feature"][:3]
    graph["qParams"]["supernodes"] = [["capital city", *feats]]
    plain = plan_drawing(make_graph_json(seed=1), max_nodes=None, max_edges=None)
    d = plan_drawing(graph, max_nodes=None, max_edges=None, edges_per_node=None)
    ids = {n["node_id"] for n in d.nodes}
    assert "supernode:0" in ids and not ids & set(feats)
    assert len(d.nodes) == len(plain.nodes) - 3 + 1 and d.members["supernode:0"] == feats
    # its links are its members' links, summed per other end; none inside the group
    for ln in d.links:
        assert ln["source"] != ln["target"]
    out = {ln["target"]: ln["weight"] for ln in d.links if ln["source"] == "supernode:0"}
    expected: dict[str, float] = {}
    for ln in graph["links"]:
        if ln["source"] in feats and ln["target"] not in feats:
            expected[ln["target"]] = expected.get(ln["target"], 0.0) + ln["weight"]
    assert out == pytest.approx({t: w for t, w in expected.items() if w != 0})
    fig, _ = draw_graph(graph, dpi=60)
    labels = [t.get_text() for t in fig.axes[0].texts if t.get_gid() == "supernode-label"]
    assert labels == ["capital city (3)"]


def _many_logits_graph(n_logits: int = 10) -> dict:
    graph = make_graph_json(seed=2)
    logit = next(n for n in graph["nodes"] if node_kind(n) == "logit")
    graph["nodes"] = [n for n in graph["nodes"] if node_kind(n) != "logit"]
    graph["links"] = [ln for ln in graph["links"] if not ln["target"].startswith("5_")]
    for i in range(n_logits):
        p = 0.5 / (i + 1)
        name = f" a rather long answer number {i}"
        graph["nodes"].append(
            {**logit, "node_id": f"5_{400 + i}_5", "feature": 400 + i, "token_prob": p,
             "clerp": f'Output "{name}" (p={p:.3f})'}
        )  # fmt: skip
        source = graph["nodes"][i]["node_id"]
        graph["links"].append({"source": source, "target": f"5_{400 + i}_5", "weight": 1.0})
    return graph


def test_logit_labels_never_overlap():
    fig, d = draw_graph(_many_logits_graph(), dpi=80)
    fig.canvas.draw()  # places the annotations where the saved picture has them
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.axes[0].texts if t.get_gid() == "logit-label"]
    assert len(texts) == 10 and all("long answer" in t.get_text() for t in texts)
    # the text's own box (an Annotation's extent would include its leader line)
    boxes = [Text.get_window_extent(t, renderer) for t in texts]
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    # the labels are wider than their slots, so the layout had to stack them
    assert len({round(b.y0) for b in boxes}) > 1


def test_write_png_of_a_real_model_sized_graph(big_json, tmp_path):
    path = write_png(big_json, tmp_path / "big.png", dpi=60)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = plan_drawing(big_json)
    assert len(d.links) <= 600 and _drawn_kinds(d)["feature"] <= 300


def test_logit_label_is_one_line():
    assert logit_label({"clerp": 'Output " Paris" (p=0.750)'}) == " Paris 0.75"
    assert logit_label({"clerp": 'Output "\n" (p=0.007)'}) == "\\n 0.01"
    assert logit_label({"clerp": "a\tcustom direction"}) == "a\\tcustom direction"
