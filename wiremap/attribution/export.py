"""Graph JSON for viewers (DESIGN.md §8), its schema check, and a text summary of paths.

    result = write_graph_json(graph, "graph.json", node_threshold=0.8, edge_threshold=0.98)
    validate_graph_json(json.load(open("graph.json")))   # raises WiremapError on problems
    print(summarize_paths(graph, k=5, result=result))
    subgraph_scores(graph, ["3_12_5", "5_7_6"])            # scores of pinned node ids
    write_graph_json(graph, "g.json", edges_per_node=None, max_edges=None)   # every edge
    write_graph_json(graph, "graphs/", slug="france", scan="gpt2")  # graphs/france.json

Files: the graph goes to `{slug}.json` (pass a folder, or a `.json` path whose name is the
slug) and its entry into `graph-metadata.json` in the same folder (updated, never
clobbered: other graphs' entries stay), the layout circuit-tracer's frontend serves.
`slug` and `scan` must match `[a-zA-Z0-9_.-]+` (Neuronpedia's upload refuses others); the
default slug comes from the prompt, the default scan from the model's name.

Edge budget: the pruned graph of a real model can hold ~200,000 edges (17 MB of JSON). The
JSON keeps, for every node, its `edges_per_node` strongest incoming and outgoing edges (by
the pruning edge score) and at most `max_edges` in all (`wiremap.attribution.budget`
says exactly how); `metadata.edge_budget` records it. Scores in `metadata.scores` are always
those of the pruned graph with all its edges.

Node ids: feature `"{layer}_{feature}_{pos}"`, error `"{layer}_-1_{pos}"` (never a feature
id, since features are >= 0), token `"E_{token_id}_{pos}"`, logit
`"{n_layers + 1}_{token_id}_{pos}"`; a logit target without a real token id (a custom
direction) uses `-(index + 1)` in place of the token id so every id stays unique.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wiremap.attribution.budget import budget_order, budget_record, check_budget, edge_scores
from wiremap.attribution.graph import Graph
from wiremap.attribution.prune import PruneResult, graph_scores, logit_weights, prune_graph
from wiremap.errors import WiremapError
from wiremap.fileio import atomic_write

SCHEMA_VERSION = 1
# Default edge budget: a 1,000-feature graph keeps its strongest links in ~1.5 MB of JSON.
EDGES_PER_NODE = 16
MAX_EDGES = 20_000
FEATURE_TYPES = ("cross layer transcoder", "mlp reconstruction error", "embedding", "logit")
METADATA_FILE = "graph-metadata.json"  # the graph index circuit-tracer's frontend reads
NAME_RE = re.compile(r"[a-zA-Z0-9_.-]+")  # what Neuronpedia accepts for slug and scan
# generation_settings keys Neuronpedia's schema types; others pass as they are
INT_SETTINGS = ("max_n_logits", "batch_size", "max_feature_nodes")
Labels = Mapping[tuple[int, int], str]  # (layer, feature) -> short description


def cantor(layer: int, feature: int) -> int:
    """Cantor pairing of (layer, feature): one integer per feature across layers."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def uncantor(z: int) -> tuple[int, int]:
    """(layer, feature) of a Cantor-paired id: the inverse of `cantor`."""
    w = (math.isqrt(8 * z + 1) - 1) // 2
    feature = z - w * (w + 1) // 2
    return w - feature, feature


# ---- node ids and names ------------------------------------------------------------------
def _logit_token_ids(graph: Graph) -> list[int]:
    seen: set[int] = set()
    out = []
    for i, tok in enumerate(graph.logit_tokens.tolist()):
        tok = tok if tok >= 0 and tok not in seen else -(i + 1)
        seen.add(tok)
        out.append(tok)
    return out


def node_ids(graph: Graph) -> list[str]:
    """The JSON id of every node, in the graph's node order."""
    ids = [f"{l}_{f}_{p}" for l, p, f in graph.active_features.tolist()]
    ids += [f"{l}_-1_{p}" for l in range(graph.n_layers) for p in range(graph.n_pos)]
    ids += [f"E_{tok}_{p}" for p, tok in enumerate(graph.input_ids.tolist())]
    last, logit_layer = graph.n_pos - 1, graph.n_layers + 1
    ids += [f"{logit_layer}_{tok}_{last}" for tok in _logit_token_ids(graph)]
    return ids


def node_name(graph: Graph, i: int, labels: Labels | None = None) -> str:
    """Readable name: "L3 F12 @' Dallas'", "error L2@5", "tok ' Dallas'", "logit ' Austin'"."""
    kind = graph.node_kind(i)
    if kind == "feature":
        layer, pos, feat = graph.active_features[i].tolist()
        label = (labels or {}).get((layer, feat))
        suffix = f" [{label}]" if label else ""
        return f"L{layer} F{feat} @'{graph.token_strings[pos]}'{suffix}"
    if kind == "error":
        layer, pos = graph.node_layer_pos(i)
        return f"error L{layer}@{pos}"
    if kind == "token":
        return f"tok '{graph.token_strings[i - graph.token_slice.start]}'"
    return f"logit '{graph.logit_strings[i - graph.logit_slice.start]}'"


# ---- JSON nodes --------------------------------------------------------------------------
def _node(
    node_id: str, feature: int, layer: str, pos: int, kind: str, js_id: str, clerp: str,
    activation: float | None = None, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    """One JSON node with circuit-tracer's fields (one run, positions counted from the start)."""
    return {
        "token_prob": 0.0,
        "is_target_logit": False,
        "node_id": node_id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": pos,
        "feature_type": kind,
        "jsNodeId": js_id,
        "clerp": clerp,
        "activation": activation,
        **extra,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
    }


def _feature_node(graph: Graph, i: int, node_id: str, labels: Labels | None) -> dict[str, Any]:
    layer, pos, feat = graph.active_features[i].tolist()
    label = (labels or {}).get((layer, feat), "")
    kind, js_id, act = "cross layer transcoder", f"{layer}_{feat}-0", float(graph.activations[i])
    return _node(node_id, cantor(layer, feat), str(layer), pos, kind, js_id, label, act)


def _error_node(graph: Graph, i: int, node_id: str) -> dict[str, Any]:
    layer, pos = graph.node_layer_pos(i)
    clerp = f"Error: layer {layer} at '{graph.token_strings[pos]}'"
    kind, js_id = "mlp reconstruction error", f"{layer}_-1-{pos}"
    return _node(node_id, -1, str(layer), pos, kind, js_id, clerp)


def _token_node(graph: Graph, i: int, node_id: str) -> dict[str, Any]:
    pos = i - graph.token_slice.start
    clerp = f'Embedding: "{graph.token_strings[pos]}"'
    return _node(node_id, pos, "E", pos, "embedding", f"E_{int(graph.input_ids[pos])}-{pos}", clerp)


def _logit_node(graph: Graph, i: int, node_id: str) -> dict[str, Any]:
    j = i - graph.logit_slice.start
    tok = _logit_token_ids(graph)[j]
    prob = float(graph.logit_probs[j])
    pos = graph.n_pos - 1
    clerp = f'Output "{graph.logit_strings[j]}" (p={prob:.3f})'
    top = graph.logit_slice.start + j == graph.top_logit
    layer = str(graph.n_layers + 1)
    return _node(
        node_id, tok, layer, pos, "logit", f"L_{tok}-{pos}", clerp,
        token_prob=prob, is_target_logit=top,
    )  # fmt: skip


def _json_node(graph: Graph, i: int, node_id: str, labels: Labels | None) -> dict[str, Any]:
    kind = graph.node_kind(i)
    if kind == "feature":
        return _feature_node(graph, i, node_id, labels)
    if kind == "error":
        return _error_node(graph, i, node_id)
    if kind == "token":
        return _token_node(graph, i, node_id)
    return _logit_node(graph, i, node_id)


# ---- the whole document ------------------------------------------------------------------
def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:64] or "graph"


def default_scan(settings: dict) -> str:
    """The model's name (last path part of a hub id or folder) in Neuronpedia's characters."""
    name = str(settings.get("scan") or settings.get("model") or "wiremap")
    name = re.split(r"[\\/]", name.rstrip("/\\"))[-1]
    return re.sub(r"[^a-zA-Z0-9_.-]+", "-", name).strip("-") or "wiremap"


def check_name(kind: str, value: str) -> str:
    """`value` if it is a valid slug/scan, else WiremapError naming the allowed characters."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise WiremapError(
            f"{kind} {value!r} is not allowed: use only letters, digits, '_', '.' and '-' "
            f"(Neuronpedia refuses others), e.g. --{kind} my-graph"
        )
    return value


def _jsonable(value: Any) -> Any:
    # settings may hold dtypes, paths or tensors: keep JSON plain
    return json.loads(json.dumps(value, default=str))


def generation_settings(graph: Graph) -> dict:
    """graph.settings as JSON, with the keys Neuronpedia types as integers made integers.

    An uncapped graph (max_feature_nodes None) records the features it could visit (every
    active one) and `max_feature_nodes_uncapped: true`.
    """
    settings = _jsonable(graph.settings)
    if "max_feature_nodes" in settings and settings["max_feature_nodes"] is None:
        settings["max_feature_nodes"] = int(settings.get("n_active_features") or graph.n_features)
        settings["max_feature_nodes_uncapped"] = True
    for key in INT_SETTINGS:
        if key in settings and not _is_int(settings[key]):
            settings.pop(key)  # e.g. a batch size chosen later: not an integer to record
    return settings


def _metadata(graph: Graph, result: PruneResult, slug: str | None, scan: str | None) -> dict:
    from wiremap import __version__

    settings = generation_settings(graph)
    return {
        "slug": check_name("slug", slug) if slug else _slug(graph.prompt),
        "scan": check_name("scan", scan) if scan else default_scan(settings),
        "transcoder_list": [],  # circuit-tracer: per-layer sources of a "custom-" scan only
        "prompt": graph.prompt,
        "prompt_tokens": list(graph.token_strings),
        "node_threshold": result.settings["node_threshold"],
        "schema_version": SCHEMA_VERSION,
        "info": _info(settings, __version__),
        "generation_settings": settings,
        "pruning_settings": dict(result.settings),
        "scores": result.scores,
    }


def _info(settings: dict, version: str) -> dict:
    # The viewer rebuilds the replacement model from these to steer.
    info = {"generator": {"name": "wiremap", "version": version}}
    for key in ("model", "transcoders"):
        if settings.get(key):
            info[key] = str(settings[key])
    return info


def graph_to_json(
    graph: Graph,
    result: PruneResult | None = None,
    labels: Labels | None = None,
    slug: str | None = None,
    scan: str | None = None,
    pinned_ids: Iterable[str] = (),
    supernodes: Iterable[list[str]] = (),
    edges_per_node: int | None = EDGES_PER_NODE,
    max_edges: int | None = MAX_EDGES,
    feature_json_base_url: str | None = None,
    **prune_kwargs: Any,
) -> dict[str, Any]:
    """The graph JSON of DESIGN.md §8 for the pruned graph (pruned here unless `result`).

    Links are the pruned graph's edges within the edge budget (`edges_per_node` strongest in
    and out per node, `max_edges` in all; None = no limit); scores are the unbudgeted ones.
    `feature_json_base_url`: where viewers fetch `{url}/{node.feature}.json` feature cards
    (`metadata.feature_details`; see `wiremap.attribution.features.write_feature_jsons`).
    """
    check_budget(edges_per_node, max_edges)
    result = result or prune_graph(graph, **prune_kwargs)
    ids = node_ids(graph)
    kept = result.node_mask.nonzero().reshape(-1).tolist()
    cumulative = result.cumulative_influence.tolist()
    nodes = []
    for i in kept:
        node = _json_node(graph, i, ids[i], labels)
        node["influence"] = cumulative[i]
        nodes.append(node)
    links, budget = _budgeted_links(graph, result, ids, edges_per_node, max_edges)
    q_params = {
        "pinnedIds": list(pinned_ids),
        "supernodes": [list(s) for s in supernodes],
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
    }
    metadata = {**_metadata(graph, result, slug, scan), "edge_budget": budget}
    if feature_json_base_url:
        metadata["feature_details"] = {"feature_json_base_url": feature_json_base_url}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


def _budgeted_links(
    graph: Graph, result: PruneResult, ids: list[str], per_node: int | None, max_edges: int | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The JSON links the edge budget keeps (in adjacency order), and its metadata record."""
    targets, sources, weights = (t.detach().cpu().double().numpy() for t in result.edges())
    targets, sources = targets.astype(np.int64), sources.astype(np.int64)
    probs = logit_weights(graph).cpu().double().numpy()
    scores = edge_scores(targets, sources, weights, probs, graph.n_nodes)
    keep = np.sort(budget_order(targets, sources, scores, per_node, max_edges))
    links = [
        # 7 significant digits: float32's precision, in half the characters of a float64
        {"source": ids[s], "target": ids[t], "weight": float(f"{w:.7g}")}
        for t, s, w in zip(
            targets[keep].tolist(), sources[keep].tolist(), weights[keep].tolist(), strict=True
        )
    ]
    return links, budget_record(per_node, max_edges, len(targets), len(links))


def write_graph_json(
    graph: Graph, path: str | Path, result: PruneResult | None = None, **kwargs: Any
) -> PruneResult:
    """Prune (unless `result`), write `{slug}.json`, check it, list it in graph-metadata.json.

    `path`: a folder (the file is `{slug}.json` in it) or a `.json` file, whose name is then
    the slug (an explicit `slug` must agree). Keyword arguments: the pruning's
    (`node_threshold`, `edge_threshold`, `backend`, `node_pool`) and `graph_to_json`'s,
    among them `slug`, `scan` and the edge budget `edges_per_node` and `max_edges`.
    """
    prune_keys = ("node_threshold", "edge_threshold", "backend", "node_pool")
    result = result or prune_graph(graph, **{k: kwargs.pop(k) for k in prune_keys if k in kwargs})
    path, kwargs["slug"] = graph_file(path, kwargs.get("slug"), graph.prompt)
    obj = graph_to_json(graph, result=result, **kwargs)
    validate_graph_json(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
    add_graph_metadata(path.parent, obj["metadata"])
    return result


def graph_file(path: str | Path, slug: str | None, prompt: str) -> tuple[Path, str]:
    """(file to write, slug) for a folder or a `.json` path; see `write_graph_json`."""
    path = Path(path)
    if path.suffix != ".json" or path.is_dir():
        slug = check_name("slug", slug) if slug else _slug(prompt)
        return path / f"{slug}.json", slug
    if slug and slug != path.stem:
        raise WiremapError(
            f"slug {slug!r} but file {path.name!r}: viewers load `{{slug}}.json`; name the "
            f"file {slug}.json, or pass its folder and the slug names the file"
        )
    return path, check_name("slug", path.stem)


def metadata_entry(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A graph's entry in graph-metadata.json (the fields circuit-tracer writes there)."""
    keys = ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold")
    return {**{k: metadata[k] for k in keys if k in metadata}, "schema_version": SCHEMA_VERSION}


def add_graph_metadata(folder: str | Path, metadata: Mapping[str, Any]) -> Path:
    """Put this graph's entry into `folder/graph-metadata.json`, replacing one with its slug."""
    index = Path(folder) / METADATA_FILE
    with _folder_lock(Path(folder)):
        graphs = _read_index(index)
        graphs = [g for g in graphs if g.get("slug") != metadata["slug"]]
        graphs.append(metadata_entry(metadata))
        atomic_write(index, json.dumps({"graphs": graphs}, ensure_ascii=False, indent=1))
    return index


def _read_index(index: Path) -> list[dict]:
    if not index.exists():
        return []
    try:
        graphs = json.loads(index.read_text(encoding="utf-8"))["graphs"]
    except (ValueError, KeyError, TypeError) as err:
        raise WiremapError(
            f"{index} is not a graph index ({{'graphs': [...]}}): {err}; move it away and "
            "write the graph again"
        ) from None
    if not isinstance(graphs, list):
        raise WiremapError(f"{index}: 'graphs' is not a list; move the file away and retry")
    return [g for g in graphs if isinstance(g, dict)]


class _folder_lock:
    """An advisory lock on `folder/.graph-metadata.lock`, so parallel writers keep all entries."""

    def __init__(self, folder: Path):
        self.path = folder / ".graph-metadata.lock"

    def __enter__(self):
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in __exit__
        try:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): writers are not serialised
            pass
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()  # closing releases the lock


def subgraph_scores(graph: Graph, ids: Iterable[str]) -> dict[str, float]:
    """Replacement/completeness scores of the subgraph made of these node ids (e.g. pinnedIds)."""
    ids = list(ids)
    index = {node_id: i for i, node_id in enumerate(node_ids(graph))}
    unknown = [n for n in ids if n not in index]
    if unknown:
        raise WiremapError(f"unknown node ids {unknown[:5]}; use ids from this graph's JSON")
    return graph_scores(graph, keep_nodes=[index[n] for n in ids])


# ---- schema check ------------------------------------------------------------------------
def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_str(x: Any) -> bool:
    return isinstance(x, str)


# Neuronpedia's graph schema: required of every graph, whoever wrote it
_NODE_CHECKS: dict[str, tuple[str, Any]] = {
    "node_id": ("a string", lambda x: isinstance(x, str) and x != ""),
    "feature": ("an integer or null", lambda x: x is None or _is_int(x)),
    "layer": ("a string or an integer", lambda x: isinstance(x, str) or _is_int(x)),
    "ctx_idx": ("an integer >= 0", lambda x: _is_int(x) and x >= 0),
    "feature_type": ("a string", _is_str),
    "jsNodeId": ("a string", _is_str),
    "clerp": ("a string", _is_str),
}
# and what wiremap writes on top (strict check of our own files)
_OUR_NODE_CHECKS: dict[str, tuple[str, Any]] = {
    "feature": ("an integer", _is_int),
    "layer": ("a string", _is_str),
    "feature_type": (f"one of {FEATURE_TYPES}", lambda x: x in FEATURE_TYPES),
    "influence": ("a number or null", lambda x: x is None or _is_number(x)),
    "activation": ("a number or null", lambda x: x is None or _is_number(x)),
    "token_prob": ("a number", _is_number),
    "is_target_logit": ("a boolean", lambda x: isinstance(x, bool)),
    "run_idx": ("an integer", _is_int),
    "reverse_ctx_idx": ("an integer", _is_int),
}
_METADATA_CHECKS: dict[str, tuple[str, Any]] = {
    "slug": ("a string", _is_str),
    "scan": ("a string", _is_str),
    "prompt": ("a string", _is_str),
    "prompt_tokens": ("a list of strings", lambda x: _list_of(x, str)),
}
_OUR_METADATA_CHECKS: dict[str, tuple[str, Any]] = {
    "slug": ("letters, digits, '_', '.', '-'", lambda x: _is_str(x) and NAME_RE.fullmatch(x)),
    "scan": ("letters, digits, '_', '.', '-'", lambda x: _is_str(x) and NAME_RE.fullmatch(x)),
    "transcoder_list": ("a list of strings", lambda x: _list_of(x, str)),
    "node_threshold": ("a number", _is_number),
    "schema_version": (f"{SCHEMA_VERSION}", lambda x: x == SCHEMA_VERSION),
    "info": ("an object with generator {name, version}", lambda x: _has_generator(x)),
    "generation_settings": ("an object", lambda x: isinstance(x, dict)),
    "pruning_settings": ("an object", lambda x: isinstance(x, dict)),
}
# optional in the schema, typed when present
_OPTIONAL_METADATA: dict[str, tuple[str, Any]] = {
    "node_threshold": ("a number", _is_number),
    "info": ("an object", lambda x: isinstance(x, dict)),
    "feature_details": ("an object of strings", lambda x: _dict_of(x, str)),
    "generation_settings": (
        f"an object whose {INT_SETTINGS} are integers",
        lambda x: isinstance(x, dict) and all(_is_int(x[k]) for k in INT_SETTINGS if k in x),
    ),
    "pruning_settings": (
        "an object whose thresholds are numbers",
        lambda x: (
            isinstance(x, dict)
            and all(_is_number(x[k]) for k in ("node_threshold", "edge_threshold") if k in x)
        ),
    ),
}
_QPARAMS_CHECKS: dict[str, tuple[str, Any]] = {
    "pinnedIds": ("a list of node ids", lambda x: _list_of(x, str)),
    "supernodes": ("a list of [label, nodeId, ...] lists", lambda x: _supernodes_ok(x)),
    "linkType": ("a string", lambda x: isinstance(x, str)),
    "clickedId": ("a string", lambda x: isinstance(x, str)),
    "sg_pos": ("a string", lambda x: isinstance(x, str)),
}


def _list_of(x: Any, kind: type) -> bool:
    return isinstance(x, list) and all(isinstance(v, kind) for v in x)


def _dict_of(x: Any, kind: type) -> bool:
    return isinstance(x, dict) and all(isinstance(v, kind) for v in x.values())


def _has_generator(info: Any) -> bool:
    gen = info.get("generator") if isinstance(info, dict) else None
    return isinstance(gen, dict) and "name" in gen and "version" in gen


def _supernodes_ok(x: Any) -> bool:
    return isinstance(x, list) and all(_list_of(s, str) and len(s) >= 1 for s in x)


def _check_fields(
    obj: Any, checks: dict, where: str, problems: list[str], optional: bool = False
) -> None:
    if not isinstance(obj, dict):
        problems.append(f"{where} is not an object")
        return
    for key, (expected, ok) in checks.items():
        if key not in obj or (optional and obj[key] is None):  # null = absent when optional
            if not optional:
                problems.append(f"{where} misses {key!r}")
        elif not ok(obj[key]):
            problems.append(f"{where}.{key} should be {expected}, got {obj[key]!r:.60}")


def _check_nodes(nodes: Any, problems: list[str], strict: bool) -> set[str]:
    if not isinstance(nodes, list):
        problems.append("nodes is not a list")
        return set()
    seen: set[str] = set()
    for k, node in enumerate(nodes):
        _check_fields(node, _NODE_CHECKS, f"nodes[{k}]", problems)
        if strict and isinstance(node, dict):
            _check_fields(node, _OUR_NODE_CHECKS, f"nodes[{k}]", problems)
        node_id = node.get("node_id") if isinstance(node, dict) else None
        if node_id in seen:
            problems.append(f"duplicate node id {node_id!r} (nodes[{k}])")
        if isinstance(node_id, str):
            seen.add(node_id)
    return seen


def _check_links(links: Any, ids: set[str], problems: list[str]) -> None:
    if not isinstance(links, list):
        problems.append("links is not a list")
        return
    for k, link in enumerate(links):
        if not isinstance(link, dict):
            problems.append(f"links[{k}] is not an object")
            continue
        for end in ("source", "target"):
            if end not in link:
                problems.append(f"links[{k}] misses {end!r}")
            elif link[end] not in ids:
                problems.append(f"links[{k}].{end} {link[end]!r} is not a node id")
        if not _is_number(link.get("weight")):
            problems.append(f"links[{k}].weight should be a finite number")


def _check_references(q: Any, ids: set[str], problems: list[str]) -> None:
    if not isinstance(q, dict):
        return
    refs = list(q.get("pinnedIds") or []) if _list_of(q.get("pinnedIds"), str) else []
    if _supernodes_ok(q.get("supernodes")):
        refs += [n for s in q["supernodes"] for n in s[1:]]
    if isinstance(q.get("clickedId"), str) and q["clickedId"]:
        refs.append(q["clickedId"])
    problems += [f"qParams refers to unknown node id {r!r}" for r in refs if r not in ids]


def graph_json_problems(obj: Any, strict: bool = True) -> list[str]:
    """Every way `obj` departs from the graph JSON schema (empty when it is valid).

    strict=False: Neuronpedia's graph schema (what any tool's graph must hold: circuit-
    tracer's, say) plus links and qParams that refer to existing nodes; strict=True adds
    every field wiremap writes.
    """
    if not isinstance(obj, dict):
        return ["the document is not a JSON object"]
    top = ("metadata", "qParams", "nodes", "links")
    problems = [f"top level misses {k!r}" for k in top if k not in obj]
    meta = obj.get("metadata")
    if "metadata" in obj:
        _check_fields(meta, _METADATA_CHECKS, "metadata", problems)
    if isinstance(meta, dict):
        _check_fields(meta, _OPTIONAL_METADATA, "metadata", problems, optional=True)
        if strict:
            _check_fields(meta, _OUR_METADATA_CHECKS, "metadata", problems)
    if "qParams" in obj:
        _check_fields(obj["qParams"], _QPARAMS_CHECKS, "qParams", problems, optional=not strict)
    ids = _check_nodes(obj.get("nodes", []), problems, strict)
    _check_links(obj.get("links", []), ids, problems)
    _check_references(obj.get("qParams"), ids, problems)
    return problems


def validate_graph_json(obj: Any, max_listed: int = 20, strict: bool = True) -> None:
    """Raise WiremapError listing the problems if `obj` is not a valid graph JSON document."""
    problems = graph_json_problems(obj, strict)
    if problems:
        listed = "; ".join(problems[:max_listed])
        more = f" (and {len(problems) - max_listed} more)" if len(problems) > max_listed else ""
        raise WiremapError(
            f"invalid graph JSON, {len(problems)} problem(s): {listed}{more}. Regenerate it "
            "with `wiremap attribute` or fix these fields (schema: DESIGN.md §8)"
        )


# ---- strongest paths ---------------------------------------------------------------------
def _incoming_shares(result: PruneResult) -> dict[int, list[tuple[int, float, float]]]:
    """target -> [(source, share of the target's kept |input|, signed weight)]."""
    targets, sources, weights = (t.tolist() for t in result.edges())
    totals: dict[int, float] = defaultdict(float)
    for t, w in zip(targets, weights, strict=True):
        totals[t] += abs(w)
    incoming: dict[int, list[tuple[int, float, float]]] = defaultdict(list)
    for t, s, w in zip(targets, sources, weights, strict=True):
        incoming[t].append((s, abs(w) / totals[t], w))
    return incoming


def strongest_paths(
    graph: Graph, result: PruneResult, k: int = 5, target: int | None = None
) -> list[tuple[float, int, list[int]]]:
    """The k paths from token nodes to `target` (default: top logit) with the largest product
    of normalised edge weights, as (product, sign, [token, ..., target]).

    Each kept edge weighs |A[t,s]| / Σ_s' |A[t,s']| over the target's kept inputs, so a
    path's product is the share of the target's attribution that flows along it. Best-first
    search on -log weights; popping each node at most k times yields the k best (DAG).
    """
    target = graph.top_logit if target is None else target
    incoming = _incoming_shares(result)
    token_nodes = range(graph.token_slice.start, graph.token_slice.stop)
    heap: list[tuple[float, int, tuple[int, ...]]] = [(0.0, 1, (target,))]
    pops: dict[int, int] = defaultdict(int)
    found = []
    while heap and len(found) < k:
        cost, sign, path = heapq.heappop(heap)
        node = path[-1]
        pops[node] += 1
        if pops[node] > k:
            continue
        if node in token_nodes:
            found.append((math.exp(-cost), sign, list(reversed(path))))
            continue
        for source, share, weight in incoming.get(node, []):
            step_sign = sign if weight >= 0 else -sign
            heapq.heappush(heap, (cost - math.log(share), step_sign, (*path, source)))
    return found


def summarize_paths(
    graph: Graph,
    k: int = 5,
    result: PruneResult | None = None,
    labels: Labels | None = None,
    **prune_kwargs: Any,
) -> str:
    """A text summary: scores, then the k strongest token-to-top-logit paths."""
    result = result or prune_graph(graph, **prune_kwargs)
    top = graph.top_logit
    j = top - graph.logit_slice.start
    full, pruned = result.scores["full"], result.scores["pruned"]
    n_feat = int(result.node_mask[graph.feature_slice].sum())
    lines = [
        f"prompt: {graph.prompt!r}",
        f"scores: replacement {full['replacement']:.3f}, completeness {full['completeness']:.3f}"
        f" (full graph); {pruned['replacement']:.3f}, {pruned['completeness']:.3f} (pruned: "
        f"{n_feat} features, {result.n_edges} edges)",
        f"top {k} paths to {node_name(graph, top)} (p={float(graph.logit_probs[j]):.3f}), "
        "as the share of its attribution along each path:",
    ]
    paths = strongest_paths(graph, result, k, top)
    if not paths:
        lines.append("  (no path from a prompt token survives pruning; lower the thresholds)")
    for rank, (share, sign, path) in enumerate(paths, 1):
        names = " -> ".join(node_name(graph, i, labels) for i in path)
        lines.append(f"{rank:>3}. {100 * share:5.1f}% ({'+' if sign > 0 else '-'})  {names}")
    return "\n".join(lines)


# ---- optional "heads" block (head loadings and QK pairs, attribute/attention.py) --------
def add_heads_block(path: str | Path, block: dict[str, Any]) -> None:
    """Add the optional top-level "heads" block to the graph JSON at `path` (checked)."""
    path = Path(path)
    obj = json.loads(path.read_text(encoding="utf-8"))
    ids = {n.get("node_id") for n in obj.get("nodes", [])}
    edges = block.get("edges") if isinstance(block, dict) else None
    if not isinstance(edges, list) or any(
        e.get("source") not in ids or e.get("target") not in ids for e in edges
    ):
        raise WiremapError("the heads block must list edges between nodes of the graph JSON")
    obj["heads"] = block
    validate_graph_json(obj)
    atomic_write(path, json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
