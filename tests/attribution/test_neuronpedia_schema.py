"""Graph files other tools open: Neuronpedia's schema and upload rules, circuit-tracer's layout.

`np_problems` is a checker written here from the rules of Neuronpedia's graph schema
(`apps/webapp/app/api/graph/graph-schema.json`: required keys, JSON types per field) and of
its upload route (slug and scan only `[a-zA-Z0-9_.-]`), independent of wiremap's own
`validate_graph_json`, so a bug in the exporter's check cannot hide a bug in the exporter.
Tests marked `interop` use circuit-tracer's own classes (README, "Looking at a graph").
With `jsonschema` importable and WIREMAP_NEURONPEDIA_SCHEMA naming a local copy of that
schema file, one test also validates our JSON against the file itself (nothing is fetched).
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from test_prune import random_dag_graph
from test_viewer_browser import demo_card

from wiremap.attribution.export import cantor, uncantor, write_graph_json
from wiremap.attribution.features import (
    FeatureStore,
    anthropic_feature,
    write_feature_jsons,
    write_layer,
)
from wiremap.attribution.viewer.graphfile import ViewerError, list_graphs, read_graph
from wiremap.attribution.viewer.subgraph import pinned_scores
from wiremap.errors import WiremapError

# ---- the rules, as (JSON types) / {"required": [...], "fields": {...}} / ["array of", rule] --
STR, NUM, INT, OBJ, ARR = ("string",), ("number",), ("integer",), ("object",), ("array",)
NODE = {
    "required": ["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"],
    "fields": {
        "node_id": STR,
        "feature": ("integer", "null"),
        "layer": ("string", "integer"),
        "ctx_idx": INT,
        "feature_type": STR,
        "jsNodeId": STR,
        "clerp": STR,
        "influence": ("number", "null"),
        "activation": ("number", "null"),
    },
}
METADATA = {
    "required": ["slug", "scan", "prompt_tokens", "prompt"],
    "fields": {
        "slug": STR,
        "scan": STR,
        "prompt_tokens": ["array of", STR],
        "prompt": STR,
        "node_threshold": NUM,
        "feature_details": {
            "fields": {k: STR for k in ("feature_json_base_url", "neuronpedia_source_set")}
        },
        "info": {
            "fields": {
                "description": STR,
                "creator_name": STR,
                "creator_url": STR,
                "source_urls": ARR,
                "create_time_ms": NUM,
                "generator": {"fields": {k: STR for k in ("name", "version", "url", "email")}},
            }
        },
        "generation_settings": {
            "fields": {
                "max_n_logits": INT,
                "desired_logit_prob": NUM,
                "batch_size": INT,
                "max_feature_nodes": INT,
            }
        },
        "pruning_settings": {"fields": {"node_threshold": NUM, "edge_threshold": NUM}},
    },
}
GRAPH = {
    "required": ["metadata", "qParams", "nodes", "links"],
    "fields": {
        "metadata": METADATA,
        "qParams": {
            "fields": {
                "pinnedIds": ["array of", STR],
                "supernodes": ARR,
                "linkType": STR,
                "clickedId": STR,
                "sg_pos": STR,
            }
        },
        "nodes": ["array of", NODE],
        "links": [
            "array of",
            {
                "required": ["source", "target", "weight"],
                "fields": {"source": STR, "target": STR, "weight": NUM},
            },
        ],
    },
}
UPLOAD_NAME = re.compile(r"[a-zA-Z0-9_.-]+")


def _type_ok(value, types) -> bool:
    checks = {
        "string": lambda v: isinstance(v, str),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "null": lambda v: v is None,
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
    }
    return any(checks[t](value) for t in types)


def _check(value, rule, where: str, out: list[str]) -> None:
    if isinstance(rule, tuple):
        if not _type_ok(value, rule):
            out.append(f"{where}: {value!r:.40} is not {' or '.join(rule)}")
    elif isinstance(rule, list):  # ["array of", item rule]
        if not isinstance(value, list):
            out.append(f"{where}: not an array")
            return
        for i, item in enumerate(value):
            _check(item, rule[1], f"{where}[{i}]", out)
    else:
        if not isinstance(value, dict):
            out.append(f"{where}: not an object")
            return
        out += [f"{where}: misses {k!r}" for k in rule.get("required", []) if k not in value]
        for key, sub in rule["fields"].items():
            if key in value:
                _check(value[key], sub, f"{where}.{key}", out)


def np_problems(obj) -> list[str]:
    """What Neuronpedia's schema and upload route would refuse in `obj` (empty = accepted)."""
    out: list[str] = []
    _check(obj, GRAPH, "graph", out)
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    for key in ("slug", "scan"):
        value = meta.get(key) if isinstance(meta, dict) else None
        if isinstance(value, str) and not UPLOAD_NAME.fullmatch(value):
            out.append(f"metadata.{key} {value!r} has characters the upload refuses")
    return out


# ---- our files against those rules ---------------------------------------------------------
def uncapped_graph(seed: int = 3):
    g = random_dag_graph(seed=seed)
    g.settings = {
        "model": "/home/me/models/My Model v2/",  # a path: not a valid scan as it is
        "transcoders": "/home/me/tc",
        "max_n_logits": 10,
        "desired_logit_prob": 0.95,
        "max_feature_nodes": None,  # uncapped
        "batch_size": 256,
        "n_active_features": g.n_features,
        "dtype": torch.float32,
    }
    return g


def test_checker_refuses_what_the_schema_refuses():
    obj = {"metadata": {"slug": "a b", "scan": "x", "prompt": "p"}, "qParams": {}, "nodes": []}
    obj["nodes"].append({"node_id": "1", "feature": "7", "layer": 0.5, "ctx_idx": 0})
    obj["metadata"]["generation_settings"] = {"max_feature_nodes": None}
    problems = "\n".join(np_problems(obj))
    for expected in (
        "graph: misses 'links'",
        "metadata: misses 'prompt_tokens'",
        "max_feature_nodes: None is not integer",
        "nodes[0]: misses 'clerp'",
        "nodes[0].feature: '7' is not integer or null",
        "nodes[0].layer: 0.5 is not string or integer",
        "metadata.slug 'a b' has characters",
    ):
        assert expected in problems


def test_uncapped_graph_json_passes_neuronpedia_rules(tmp_path):
    g = uncapped_graph()
    write_graph_json(g, tmp_path, feature_json_base_url="https://example.org/features/x")
    slug = json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"][0]["slug"]
    obj = json.loads((tmp_path / f"{slug}.json").read_text())
    assert np_problems(obj) == []
    meta = obj["metadata"]
    assert meta["scan"] == "My-Model-v2" and meta["slug"] == slug == "p"
    settings = meta["generation_settings"]
    assert settings["max_feature_nodes"] == g.n_features and settings["max_feature_nodes_uncapped"]
    assert meta["feature_details"] == {"feature_json_base_url": "https://example.org/features/x"}
    assert meta["transcoder_list"] == [] and meta["schema_version"] == 1
    assert {(n["run_idx"], n["reverse_ctx_idx"]) for n in obj["nodes"]} == {(0, 0)}
    errors = [n["node_id"] for n in obj["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert errors and all(re.fullmatch(r"\d+_-1_\d+", e) for e in errors)


def test_against_the_schema_file_itself(tmp_path):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    schema = os.environ.get("WIREMAP_NEURONPEDIA_SCHEMA")
    if not schema:
        pytest.skip("set WIREMAP_NEURONPEDIA_SCHEMA to a local copy of graph-schema.json")
    write_graph_json(uncapped_graph(), tmp_path, slug="g", feature_json_base_url="https://x/f")
    obj = json.loads((tmp_path / "g.json").read_text())
    jsonschema.validate(obj, json.loads(open(schema, encoding="utf-8").read()))
    bad = {
        **obj,
        "metadata": {**obj["metadata"], "generation_settings": {"max_feature_nodes": None}},
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json.loads(open(schema, encoding="utf-8").read()))


def test_graph_metadata_is_updated_not_clobbered(tmp_path):
    foreign = {"slug": "theirs", "scan": "gemma-2-2b", "prompt": "x", "prompt_tokens": ["x"]}
    (tmp_path / "graph-metadata.json").write_text(json.dumps({"graphs": [foreign]}))
    g = uncapped_graph()
    write_graph_json(g, tmp_path, slug="one", scan="tiny", node_threshold=0.7)
    write_graph_json(g, tmp_path / "two.json", scan="tiny")
    write_graph_json(g, tmp_path, slug="one", scan="tiny", node_threshold=0.9)  # rewritten
    graphs = json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]
    assert [e["slug"] for e in graphs] == ["theirs", "two", "one"]
    assert graphs[0] == foreign and graphs[2]["node_threshold"] == 0.9
    assert set(graphs[2]) == {
        "slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold",
        "schema_version",
    }  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [
        "graph-metadata.json", "one.json", "two.json"
    ]  # fmt: skip
    assert [e["name"] for e in list_graphs(tmp_path)] == ["one.json", "two.json"]
    (tmp_path / "graph-metadata.json").write_text("[1, 2]")
    with pytest.raises(WiremapError, match="not a graph index"):
        write_graph_json(g, tmp_path, slug="three")


@pytest.mark.parametrize(
    ("where", "kwargs", "match"),
    [
        ("", {"slug": "my graph"}, "slug 'my graph' is not allowed"),
        ("", {"scan": "org/model"}, "scan 'org/model' is not allowed"),
        ("g.json", {"slug": "other"}, "name the file other.json"),
        ("bad name.json", {}, "slug 'bad name' is not allowed"),
    ],
)
def test_bad_names_are_refused(tmp_path, where, kwargs, match):
    with pytest.raises(WiremapError, match=match):
        write_graph_json(uncapped_graph(), tmp_path / where, **kwargs)


# ---- circuit-tracer's graphs in our reader ------------------------------------------------
def ct_style_json(collide: bool = False) -> dict:
    """A graph laid out as circuit-tracer 0.5 writes it (its Node/Metadata fields, error ids
    `0_{layer}_{pos}`, no info / generation_settings / pruning_settings)."""
    tokens = ["<bos>", " cat", " sat"]

    def node(node_id, feature, layer, pos, kind, **extra):
        return {
            "node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos,
            "feature_type": kind, "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
            "reverse_ctx_idx": 0, "jsNodeId": node_id, "clerp": "", "influence": 0.3,
            "activation": None, **extra,
        }  # fmt: skip

    feat = 1 if collide else 5  # layer-0 feature 1 at pos 2 is "0_1_2": error (1, 2)'s id
    nodes = [
        node("E_7_1", 1, "E", 1, "embedding"),
        node("E_8_2", 2, "E", 2, "embedding"),
        node(f"0_{feat}_2", cantor(0, feat), "0", 2, "cross layer transcoder", activation=2.5),
        node("0_1_2", -1, "1", 2, "mlp reconstruction error"),
        node("3_42_2", 42, "3", 2, "logit", token_prob=0.6, is_target_logit=True,
             clerp='Output " on" (p=0.600)'),
    ]  # fmt: skip
    links = [
        {"source": "E_7_1", "target": f"0_{feat}_2", "weight": 1.5},
        {"source": "E_8_2", "target": f"0_{feat}_2", "weight": 0.5},
        {"source": f"0_{feat}_2", "target": "3_42_2", "weight": 2.0},
        {"source": "0_1_2", "target": "3_42_2", "weight": -1.0},
    ]
    metadata = {
        "slug": "cat", "scan": "gemma-2-2b", "transcoder_list": [], "prompt_tokens": tokens,
        "prompt": "<bos> cat sat", "node_threshold": 0.8, "schema_version": 1,
    }  # fmt: skip
    q = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q, "nodes": nodes, "links": links}


def test_circuit_tracer_graph_opens_in_our_reader(tmp_path):
    path = tmp_path / "cat.json"
    path.write_text(json.dumps(ct_style_json()))
    obj = read_graph(path)
    assert np_problems(obj) == []
    scores = pinned_scores(obj, ["0_5_2"])  # its error node is found by feature_type
    assert scores["replacement"] == pytest.approx(2 / 3) and scores["n_features"] == 1
    assert pinned_scores(obj, [])["replacement"] == pytest.approx(0.0)
    path.write_text(json.dumps(ct_style_json(collide=True)))
    with pytest.raises(ViewerError, match="names both an error node and a feature") as err:
        read_graph(path)
    assert err.value.status == 422


@pytest.mark.interop
def test_each_tool_reads_the_other_graph(tmp_path):
    """Our JSON through circuit-tracer's pydantic model; its writer's nodes in our reader."""
    models = pytest.importorskip("circuit_tracer.frontend.graph_models")
    write_graph_json(uncapped_graph(), tmp_path, slug="ours", scan="tiny")
    ours = json.loads((tmp_path / "ours.json").read_text())
    parsed = models.Model.model_validate(ours)
    assert len(parsed.nodes) == len(ours["nodes"]) and parsed.metadata.slug == "ours"
    nodes = [
        models.Node.token_node(0, 7),
        models.Node.feature_node(0, 3, 1, influence=0.2, activation=1.0),
        models.Node.error_node(0, 1, influence=0.4),
        models.Node.logit_node(1, 9, " x", num_layers=2, target_logit=True, token_prob=0.5),
    ]
    links = [
        {"source": nodes[0].node_id, "target": nodes[1].node_id, "weight": 1.0},
        {"source": nodes[1].node_id, "target": nodes[3].node_id, "weight": 1.0},
        {"source": nodes[2].node_id, "target": nodes[3].node_id, "weight": 1.0},
    ]
    meta = models.Metadata(
        slug="theirs", scan="x", transcoder_list=[], prompt_tokens=["a", "b"], prompt="a b"
    )
    q = models.QParams(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos="")
    theirs = models.Model(metadata=meta, qParams=q, nodes=nodes, links=links)
    (tmp_path / "theirs.json").write_text(theirs.model_dump_json())
    obj = read_graph(tmp_path / "theirs.json")
    assert pinned_scores(obj, [nodes[1].node_id])["replacement"] == pytest.approx(0.5)


# ---- per-feature JSON -------------------------------------------------------------------
def test_anthropic_feature_format():
    card = demo_card(2, 17)
    card["activations"][2].update(binMin=0.5, binMax=1.5, binContains=0.3)
    card["activations"][3].update(binMin=1.5, binMax=2.5, binContains=0.3)
    body = anthropic_feature(card, cantor(2, 17))
    assert body["index"] == cantor(2, 17) and uncantor(body["index"]) == (2, 17)
    names = [q["quantile_name"] for q in body["examples_quantiles"]]
    assert names == ["Top activations", "Interval 1 (1.5 to 2.5)", "Interval 2 (0.5 to 1.5)"]
    first = body["examples_quantiles"][0]["examples"][0]
    assert first["tokens"][3] == " France" and first["tokens_acts_list"][3] == 3.0
    assert first["train_token_ind"] == 3 and first["is_repeated_datapoint"] is False
    assert body["top_logits"] == [" Paris", " Lyon", " French"]
    assert body["bottom_logits"] == [" London", " Berlin"]
    assert (body["act_min"], body["act_max"]) == (0.0, 3.0)
    assert body["quantile_values"] == [1.5, 0.5] and body["activation_frequency"] == 0.004


def test_feature_jsons_for_a_graph(tmp_path):
    g = uncapped_graph()
    cards = tmp_path / "cards"
    cards.mkdir()
    layers = {
        str(i): write_layer(cards, i, [demo_card(i, f) for f in range(100)])
        for i in range(g.n_layers)
    }
    (cards / "index.json").write_text(json.dumps({"layers": layers}))
    write_graph_json(g, tmp_path / "out", slug="g", feature_json_base_url="features/x")
    obj = json.loads((tmp_path / "out" / "g.json").read_text())
    n = write_feature_jsons(obj, FeatureStore(cards), tmp_path / "out" / "features" / "x")
    feats = {nd["feature"] for nd in obj["nodes"] if nd["feature_type"] == "cross layer transcoder"}
    assert n == len(feats) > 0
    for fid in feats:
        body = json.loads((tmp_path / "out" / "features" / "x" / f"{fid}.json").read_text())
        layer, index = uncantor(fid)
        assert body["index"] == fid and body["transcoder_id"].endswith(f"layer_{layer}:{index}")


def test_attribute_cli_writes_a_viewer_folder(tiny_model_dir, tmp_path, capsys):
    from wiremap.cli import main
    from wiremap.models.formats import save_transcoders
    from wiremap.models.transcoders import build_transcoder

    path = tiny_model_dir("llama", n_layers=3)
    tc = tmp_path / "tc"
    save_transcoders(build_transcoder("plt", 3, 32, 48, model_name=str(path)), tc)
    (tc / "features").mkdir()
    layers = {str(i): write_layer(tc / "features", i, [demo_card(i, f) for f in range(48)])
              for i in range(3)}  # fmt: skip
    (tc / "features" / "index.json").write_text(json.dumps({"layers": layers}))
    args = ["attribute", "--model", str(path), "--transcoders", str(tc), "--quiet"]
    out = tmp_path / "graphs"
    for slug, prompt in (("moon", "The cat sees the moon."), ("sun", "The dog sees the sun.")):
        cmd = [*args, "--prompt", prompt, "--out", str(out), "--slug", slug, "--scan", "tiny"]
        assert main(cmd) == 0
    graphs = json.loads((out / "graph-metadata.json").read_text())["graphs"]
    assert [(g["slug"], g["scan"]) for g in graphs] == [("moon", "tiny"), ("sun", "tiny")]
    obj = json.loads((out / "moon.json").read_text())
    assert np_problems(obj) == []
    assert obj["metadata"]["feature_details"] == {"feature_json_base_url": "features/tiny"}
    assert obj["metadata"]["pruning_settings"]["node_pool"] == "all"
    assert isinstance(obj["metadata"]["generation_settings"]["max_feature_nodes"], int)
    feats = {n["feature"] for n in obj["nodes"] if n["feature_type"] == "cross layer transcoder"}
    assert feats and all((out / "features" / "tiny" / f"{f}.json").is_file() for f in feats)
    assert (out / "moon.safetensors").is_file() and (out / "moon.meta.json").is_file()
    capsys.readouterr()
    assert main([*args, "--prompt", "x", "--out", str(out), "--slug", "a b"]) == 2
    assert "slug 'a b' is not allowed" in capsys.readouterr().err


def test_viewer_scores_are_the_pruning_code_on_the_json_links():
    """pinned_scores on a graph JSON's links equals graph_scores on the pruned Graph."""
    import copy

    from wiremap.attribution.export import graph_to_json, node_ids
    from wiremap.attribution.prune import graph_scores, prune_graph

    g = random_dag_graph(n_feat=50, seed=4)
    result = prune_graph(g, 0.9, 0.95)
    obj = graph_to_json(g, result=result, edges_per_node=None, max_edges=None)
    pruned = copy.copy(g)
    pruned.adjacency = result.adjacency.to_dense()
    ids, kept = node_ids(g), result.node_mask[: g.n_features].nonzero().flatten().tolist()
    for keep in (kept[::3], kept, []):
        expected = graph_scores(pruned, keep_nodes=keep)
        got = pinned_scores(obj, [ids[i] for i in keep])
        assert got["replacement"] == pytest.approx(expected["replacement"], rel=1e-5)
        assert got["completeness"] == pytest.approx(expected["completeness"], rel=1e-5)
    assert got["replacement"] < pinned_scores(obj, [ids[i] for i in kept])["replacement"]
