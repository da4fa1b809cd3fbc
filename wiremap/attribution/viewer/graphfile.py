"""Graph JSON files as the viewer sees them: safe paths, checked loading, saved edits.

    path = graph_path(root, "graph.json")          # refuses ../, symlinks out of root, ...
    obj = read_graph(path)                         # parsed + checked (DESIGN.md §8)
    apply_edits(obj, {"pinnedIds": [...], "supernodes": [["label", id, ...]]}, {id: "label"})
    write_graph(path, obj)                         # atomic replace

Every problem raises `ViewerError(status, message)`, which the server turns into a JSON
error response, so one bad file never takes the server down.

Reading follows Neuronpedia's graph schema, not only what wiremap writes: a graph from
circuit-tracer (no `info` / `generation_settings` / `pruning_settings`, error ids
`0_{layer}_{pos}` in 0.5) opens too; node kinds come from `feature_type`, never from ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wiremap.fileio import atomic_write

MAX_GRAPH_BYTES = 256 * 2**20  # beyond this a browser cannot draw the graph anyway
MAX_LABEL_CHARS = 500
NOT_GRAPHS = ("graph-metadata.json",)  # circuit-tracer's index of the folder's graphs
QPARAM_KEYS = ("pinnedIds", "supernodes", "clickedId", "linkType", "sg_pos")


class ViewerError(Exception):
    """A request the viewer refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after  # seconds, sent as a Retry-After header (503)


def graph_path(root: Path, name: Any) -> Path:
    """The file `name` inside `root`, refusing anything that could leave `root`."""
    if not isinstance(name, str) or not name:
        raise ViewerError(400, "missing graph name; pass ?name=<file>.json from /api/list")
    bad = "/" in name or "\\" in name or "\0" in name or name.startswith(".") or len(name) > 255
    if bad or not name.endswith(".json"):
        raise ViewerError(
            403, f"refused graph name {name!r}: give a .json file name from /api/list"
        )
    root = root.resolve()
    path = (root / name).resolve()  # follows symlinks, so a link pointing outside is caught
    if path.parent != root:
        raise ViewerError(403, f"refused {name!r}: it resolves outside the served folder")
    if not path.is_file():
        raise ViewerError(404, f"no graph file {name!r} in the served folder; see /api/list")
    return path


def list_graphs(root: Path) -> list[dict[str, Any]]:
    """Graph JSON files directly inside `root` (Graph.save sidecars `*.meta.json` excluded)."""
    out = []
    for path in sorted(root.iterdir()):
        name = path.name
        skip = name.endswith(".meta.json") or name.startswith(".") or name in NOT_GRAPHS
        if not name.endswith(".json") or skip:
            continue
        try:
            graph_path(root, name)
        except ViewerError:
            continue  # e.g. a symlink leading out of the folder: not offered at all
        out.append({"name": name, "bytes": path.stat().st_size})
    return out


def read_graph(path: Path) -> dict[str, Any]:
    """Parse and check one graph file; a broken file raises ViewerError(422)."""
    size = path.stat().st_size
    if size > MAX_GRAPH_BYTES:
        raise ViewerError(
            413, f"{path.name} is {size / 2**20:.0f} MiB, too large to draw; prune it harder"
        )
    try:
        obj = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ViewerError(422, f"{path.name} is not valid JSON ({err}); re-export it") from err
    problems = check_graph(obj)
    if problems:
        raise ViewerError(422, f"{path.name} is not a graph JSON file: " + "; ".join(problems))
    return obj


def check_graph(obj: Any) -> list[str]:
    """Problems that would stop the viewer from drawing `obj` (empty list = fine)."""
    if not isinstance(obj, dict):
        return ["the top level must be an object {metadata, qParams, nodes, links}"]
    problems = [f"missing key {k!r}" for k in ("metadata", "nodes", "links") if k not in obj]
    if problems:
        return problems
    nodes, links = obj["nodes"], obj["links"]
    if not isinstance(nodes, list) or not isinstance(links, list):
        return ["'nodes' and 'links' must be lists"]
    ids = set()
    for i, node in enumerate(nodes):
        if not isinstance(node, dict) or not isinstance(node.get("node_id"), str):
            return [f"node {i} has no string node_id"]
        if node["node_id"] in ids:
            return [_duplicate_problem(nodes, node["node_id"])]
        ids.add(node["node_id"])
    for i, link in enumerate(links):
        ok = isinstance(link, dict) and isinstance(link.get("weight"), (int, float))
        if not ok or link.get("source") not in ids or link.get("target") not in ids:
            return [f"link {i} must be {{source, target, weight}} between existing nodes"]
    if not isinstance(obj.get("qParams", {}), dict):
        return ["'qParams' must be an object"]
    return _exporter_problems(obj)


def _duplicate_problem(nodes: list, node_id: str) -> str:
    kinds = {n.get("feature_type") for n in nodes if n.get("node_id") == node_id}
    if "mlp reconstruction error" in kinds and len(kinds) > 1:  # circuit-tracer 0.5's ids
        return (
            f"node_id {node_id!r} names both an error node and a feature (circuit-tracer "
            "0.5 writes error ids '0_{layer}_{pos}', which can collide); regenerate the "
            "graph with a newer circuit-tracer or wiremap, whose error ids are "
            "'{layer}_-1_{pos}'"
        )
    return f"duplicate node_id {node_id!r}"


def _exporter_problems(obj: dict) -> list[str]:
    """The exporter's check against Neuronpedia's schema (not only wiremap's own fields)."""
    from wiremap.attribution.export import graph_json_problems

    return [str(p) for p in graph_json_problems(obj, strict=False)[:20]]


def apply_edits(obj: dict, qparams: Any, labels: Any) -> dict:
    """Put pinned ids, supernodes and feature labels (node `clerp`) into the graph."""
    by_id = {n["node_id"]: n for n in obj["nodes"]}
    qparams = _checked_qparams({} if qparams is None else qparams, by_id)
    labels = _checked_labels({} if labels is None else labels, by_id)
    obj.setdefault("qParams", {}).update(qparams)
    for node_id, text in labels.items():
        by_id[node_id]["clerp"] = text
    return obj


def _checked_qparams(qparams: Any, by_id: dict) -> dict:
    if not isinstance(qparams, dict):
        raise ViewerError(400, "'qParams' must be an object")
    unknown = set(qparams) - set(QPARAM_KEYS)
    if unknown:
        raise ViewerError(400, f"unknown qParams keys {sorted(unknown)}; allowed: {QPARAM_KEYS}")
    qparams = dict(qparams)
    if "pinnedIds" in qparams:
        qparams["pinnedIds"] = _checked_ids(qparams["pinnedIds"], by_id, "'pinnedIds'")
    if "supernodes" in qparams:
        qparams["supernodes"] = _checked_supernodes(qparams["supernodes"], by_id)
    for key in ("clickedId", "linkType", "sg_pos"):
        if key in qparams and qparams[key] is None:
            qparams[key] = ""  # the schema wants strings; "" means none
        if key in qparams:
            _check_text(qparams[key], f"qParams {key!r}")
    if qparams.get("clickedId") and qparams["clickedId"] not in by_id:
        raise ViewerError(400, "'clickedId' must be a node id of this graph or empty")
    return qparams


def _checked_ids(ids: Any, by_id: dict, what: str) -> list[str]:
    """A list of distinct node ids of this graph (so at most one entry per node)."""
    if not isinstance(ids, list):
        raise ViewerError(400, f"{what} must be a list of node ids of this graph")
    seen: set[str] = set()
    for node_id in ids:
        if not isinstance(node_id, str) or node_id not in by_id:
            raise ViewerError(
                400, f"{what} must hold node ids of this graph; got {_short(node_id)}"
            )
        if node_id in seen:
            raise ViewerError(400, f"{what} lists {_short(node_id)} more than once")
        seen.add(node_id)
    return ids


def _checked_supernodes(groups: Any, by_id: dict) -> list[list[str]]:
    """[[label, node_id, ...], ...]; a node belongs to at most one supernode (as in the viewer)."""
    shape = "'supernodes' must be a list of [label, node_id, ...] groups of this graph"
    if not isinstance(groups, list):
        raise ViewerError(400, shape)
    members: list[str] = []
    for group in groups:
        if not isinstance(group, list) or len(group) < 2:
            raise ViewerError(400, shape)
        _check_text(group[0], "a supernode label")
        members += group[1:]
    _checked_ids(members, by_id, "the supernodes' members")
    return groups


def _checked_labels(labels: Any, by_id: dict) -> dict:
    if not isinstance(labels, dict):
        raise ViewerError(400, "'labels' must be an object {node_id: label}")
    for node_id, text in labels.items():
        if node_id not in by_id:
            raise ViewerError(400, f"bad label for {_short(node_id)}: not a node id of this graph")
        _check_text(text, f"the label of {_short(node_id)}")
    return labels


def _check_text(text: Any, what: str) -> None:
    if not isinstance(text, str) or len(text) > MAX_LABEL_CHARS:
        raise ViewerError(400, f"{what} must be a string of at most {MAX_LABEL_CHARS} characters")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def write_graph(path: Path, obj: dict) -> None:
    """Replace `path` atomically (`fileio.atomic_write`: temp file, fsync, rename), keeping
    the file's mode. A crash mid-write leaves the old file; two saves in a row leave one of
    them whole.
    """
    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    atomic_write(path, data.encode("utf-8"))
