"""A static PNG of a (pruned) graph JSON, for papers and notebooks (needs matplotlib).

    from wiremap.attribution.png import write_png
    write_png(graph_json_obj, "graph.png")                        # caps below
    write_png(graph_json_obj, "graph.png", max_nodes=None, max_edges=None)   # everything

Same layout as the viewer: token positions on x, layers on y (embeddings at the bottom,
logits on top), features as circles, error nodes as diamonds, edges blue (positive) or red
(negative) with width proportional to |weight|.

A real model's pruned graph has ~1,000 features and (after the JSON's edge budget) up to
20,000 links, which no picture can show. So the PNG draws:
- the `max_nodes` (300) most influential feature and error nodes (lowest `influence` rank),
  plus every token, logit, pinned node and supernode member;
- each supernode (`qParams.supernodes`, `[label, id, ...]`) as one labelled hexagon at its
  members' centre, their links merged (summed per other end, links inside it dropped);
- among what is drawn, at most `max_edges` (600) links, each among the `edges_per_node` (4)
  strongest inputs of its target or outputs of its source, every node's strongest first:
  the JSON's edge budget applied again (`wiremap.attribution.budget`);
- the logits spread along the top row, each labelled "token p", the labels laid out in rows
  so that no two overlap.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wiremap.attribution.budget import budget_order, edge_scores
from wiremap.attribution.subgraph import node_kind
from wiremap.errors import WiremapError
from wiremap.fileio import atomic_path

POS, NEG = "#2166ac", "#b2182b"
MAX_NODES = 300
MAX_EDGES = 600
EDGES_PER_NODE = 4
NODE_STEP = 0.14  # token units per node in a crowded cell
MAX_COL_UNITS = 2.5  # a cell wider than this stacks its nodes in staggered sub-rows
MAX_SUB_ROWS = 3
SUB_ROW_GAP = 0.24  # rows apart
MAX_WIDTH_IN = 36.0  # figure width cap (inches); wider graphs squeeze their nodes
LABEL_FONT = 7  # points, logit labels
LABEL_GAP = 4.0  # pixels between two logit labels in a row


@dataclass
class Drawing:
    """What the PNG shows: node positions (x in token units, y in rows), nodes, links."""

    pos: dict[str, tuple[float, float]]
    nodes: list[dict[str, Any]]  # drawn nodes; a supernode has feature_type "supernode"
    links: list[dict[str, Any]]  # drawn links between drawn node ids
    n_pos: int
    n_layers: int
    columns: list[float]  # x where each position's column starts, then the right end
    members: dict[str, list[str]] = field(default_factory=dict)  # supernode id -> member ids


# ---- what to draw ------------------------------------------------------------------------
def _shape(graph: dict) -> tuple[int, int]:
    """(n_pos, n_layers) of a graph JSON."""
    nodes = graph["nodes"]
    layers = [int(n["layer"]) for n in nodes if node_kind(n) in ("feature", "error")]
    n_pos = max(
        [len(graph["metadata"].get("prompt_tokens", []))]
        + [int(n.get("ctx_idx") or 0) + 1 for n in nodes]
    )
    return n_pos, max(layers) + 1 if layers else 0


def _kept_nodes(graph: dict, max_nodes: int | None) -> list[dict]:
    """Tokens, logits, pinned nodes, supernode members, and the most influential others."""
    q = graph.get("qParams") or {}
    always = set(q.get("pinnedIds") or []) | {m for s in q.get("supernodes") or [] for m in s[1:]}
    ranked = [n for n in graph["nodes"] if node_kind(n) in ("feature", "error")]
    ranked.sort(key=lambda n: 1.0 if n.get("influence") is None else n["influence"])
    chosen = {n["node_id"] for n in ranked[:max_nodes]} | always
    return [
        n for n in graph["nodes"] if node_kind(n) in ("token", "logit") or n["node_id"] in chosen
    ]


def _sub_rows(n: int) -> int:
    """How many staggered sub-rows a cell of n nodes uses, so no column grows too wide."""
    return min(MAX_SUB_ROWS, max(1, math.ceil(n * NODE_STEP / MAX_COL_UNITS)))


def column_edges(cells: dict[tuple[int, int], list], n_pos: int) -> list[float]:
    """x where each position's column starts (and, last, where the final one ends): a
    column is one unit wide, or NODE_STEP per node of its most crowded sub-row if more."""
    need = [1.0] * n_pos
    for (_, col), cell in cells.items():
        need[col] = max(need[col], NODE_STEP * math.ceil(len(cell) / _sub_rows(len(cell))))
    return [0.0, *np.cumsum(need).tolist()]


def node_positions(
    graph: dict, nodes: list[dict] | None = None
) -> tuple[dict[str, tuple[float, float]], list[float]]:
    """({node_id: (x, y)}, column edges): y = row; nodes of a cell spread across its column;
    the logits in unit slots along the top row, right-aligned, most probable first."""
    nodes = graph["nodes"] if nodes is None else nodes
    n_pos, n_layers = _shape(graph)
    cells: dict[tuple[int, int], list[dict]] = defaultdict(list)
    logits = []
    for n in nodes:
        kind = node_kind(n)
        if kind == "logit":
            logits.append(n)
            continue
        row = 0 if kind == "token" else int(n["layer"]) + 1
        cells[(row, int(n.get("ctx_idx") or 0))].append(n)
    edges = column_edges(cells, n_pos)
    pos = {}
    for (row, col), cell in cells.items():
        cell.sort(key=lambda n: n.get("influence") or 0.0)
        width, k = edges[col + 1] - edges[col], _sub_rows(len(cell))
        per_row = math.ceil(len(cell) / k)
        for i, n in enumerate(cell):
            x = edges[col] + width * (i // k + 1) / (per_row + 1)
            pos[n["node_id"]] = (x, row + SUB_ROW_GAP * (i % k - (k - 1) / 2))
    logits.sort(key=lambda n: -(n.get("token_prob") or 0.0))
    slot = min(1.0, edges[-1] / max(1, len(logits)))
    for i, n in enumerate(logits):
        x = edges[-1] - (len(logits) - i - 0.5) * slot
        pos[n["node_id"]] = (x, float(n_layers + 1))
    return pos, edges


def _merge_supernodes(graph: dict, nodes: list[dict], pos: dict) -> dict[str, list[str]]:
    """Replace each supernode's members by one node at their centre (in `nodes` and `pos`)."""
    present = {n["node_id"] for n in nodes}
    members: dict[str, list[str]] = {}
    taken: set[str] = set()  # a node listed in two supernodes joins the first
    for k, group in enumerate((graph.get("qParams") or {}).get("supernodes") or []):
        ids = [m for m in dict.fromkeys(group[1:]) if m in present and m not in taken]
        if not ids:
            continue
        taken.update(ids)
        sid = f"supernode:{k}"
        members[sid] = ids
        xs, ys = zip(*(pos[m] for m in ids), strict=True)
        pos[sid] = (float(np.mean(xs)), float(np.mean(ys)))
        nodes.append({"node_id": sid, "feature_type": "supernode", "clerp": group[0]})
    merged = {m for ids in members.values() for m in ids}
    nodes[:] = [n for n in nodes if n["node_id"] not in merged]
    for m in merged:
        del pos[m]
    return members


def _merged_links(graph: dict, drawn: set[str], members: dict[str, list[str]]) -> list[dict]:
    """Links between drawn nodes, members mapped to their supernode, parallel links summed."""
    owner = {m: sid for sid, ids in members.items() for m in ids}
    summed: dict[tuple[str, str], float] = defaultdict(float)
    for ln in graph["links"]:
        s, t = owner.get(ln["source"], ln["source"]), owner.get(ln["target"], ln["target"])
        if s != t and s in drawn and t in drawn:
            summed[(s, t)] += float(ln["weight"])
    return [{"source": s, "target": t, "weight": w} for (s, t), w in summed.items() if w != 0]


def _chosen_links(
    nodes: list[dict], links: list[dict], per_node: int | None, max_edges: int | None
) -> list[dict]:
    """The links the edge budget keeps among the drawn ones (strongest per node first)."""
    if not links:
        return []
    index = {n["node_id"]: i for i, n in enumerate(nodes)}
    tgt = np.array([index[ln["target"]] for ln in links])
    src = np.array([index[ln["source"]] for ln in links])
    weight = np.array([ln["weight"] for ln in links])
    w = np.array([(n.get("token_prob") or 0.0) * (node_kind(n) == "logit") for n in nodes])
    scores = edge_scores(tgt, src, weight, w, len(nodes))
    return [links[i] for i in budget_order(tgt, src, scores, per_node, max_edges).tolist()]


def plan_drawing(
    graph: dict,
    max_nodes: int | None = MAX_NODES,
    max_edges: int | None = MAX_EDGES,
    edges_per_node: int | None = EDGES_PER_NODE,
) -> Drawing:
    """Choose the nodes and links to draw and where (see the module doc for the caps)."""
    n_pos, n_layers = _shape(graph)
    nodes = _kept_nodes(graph, max_nodes)
    pos, columns = node_positions(graph, nodes)
    members = _merge_supernodes(graph, nodes, pos)
    links = _merged_links(graph, set(pos), members)
    links = _chosen_links(nodes, links, edges_per_node, max_edges)
    return Drawing(pos, nodes, links, n_pos, n_layers, columns, members)


# ---- drawing -----------------------------------------------------------------------------
def draw_graph(graph: dict, dpi: int = 150, **caps: Any):
    """(matplotlib Figure, Drawing) for a graph JSON object; `caps` go to `plan_drawing`."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise WiremapError("PNG export needs matplotlib: pip install matplotlib") from err
    d = plan_drawing(graph, **caps)
    width = min(MAX_WIDTH_IN, max(6.0, 1.0 * d.columns[-1]))
    height = max(4.0, 0.42 * (d.n_layers + 2), 0.3 * width)
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _draw_links(ax, d)
    _draw_nodes(ax, d)
    _decorate(ax, graph, d)
    rows_height = _label_logits(ax, d)
    prompt = str(graph["metadata"].get("prompt", ""))[:100]
    ax.set_title(prompt, fontsize=9, pad=14 + rows_height)  # above the logit labels
    return fig, d


def write_png(graph: dict, path: str | Path, dpi: int = 150, **caps: Any) -> Path:
    """Render `graph` (a graph JSON object) to a PNG file at `path`."""
    fig, _ = draw_graph(graph, dpi=dpi, **caps)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def _draw_links(ax, d: Drawing) -> None:
    from matplotlib.collections import LineCollection

    links = sorted(d.links, key=lambda ln: abs(ln["weight"]))  # strongest on top
    top = max([abs(ln["weight"]) for ln in links] + [1e-12])
    ax.add_collection(
        LineCollection(
            [(d.pos[ln["source"]], d.pos[ln["target"]]) for ln in links],
            colors=[POS if ln["weight"] >= 0 else NEG for ln in links],
            linewidths=[0.3 + 2.7 * abs(ln["weight"]) / top for ln in links],
            alpha=0.45,
            zorder=1,
        )
    )


STYLE = {
    "feature": ("o", "white", 36),
    "error": ("D", "#bbbbbb", 28),
    "token": ("s", "#eef3f8", 60),
    "logit": ("s", "#fdf1e6", 60),
    "supernode": ("h", "#ffe9a8", 260),
}


def _draw_nodes(ax, d: Drawing) -> None:
    for kind, (marker, colour, size) in STYLE.items():
        xy = [d.pos[n["node_id"]] for n in d.nodes if _kind(n) == kind]
        if xy:
            xs, ys = zip(*xy, strict=True)
            ax.scatter(
                xs, ys, marker=marker, s=size, c=colour, edgecolors="#444", linewidths=0.8, zorder=2
            )
    for n in d.nodes:
        if _kind(n) == "supernode":
            x, y = d.pos[n["node_id"]]
            text = f"{n['clerp']} ({len(d.members[n['node_id']])})"
            ax.annotate(
                text, (x, y), xytext=(9, -3), textcoords="offset points", fontsize=7, zorder=3,
                fontweight="bold", gid="supernode-label",
            )  # fmt: skip


def _kind(node: dict) -> str:
    return "supernode" if node.get("feature_type") == "supernode" else node_kind(node)


def _decorate(ax, graph: dict, d: Drawing) -> None:
    tokens = list(graph["metadata"].get("prompt_tokens", []))
    tokens += [str(i) for i in range(len(tokens), d.n_pos)]
    mids = [(a + b) / 2 for a, b in zip(d.columns[:-1], d.columns[1:], strict=True)]
    ax.set_xticks(mids, tokens, fontsize=8)
    ax.set_yticks(range(d.n_layers + 2), ["Emb", *[f"L{i}" for i in range(d.n_layers)], "Logit"])
    ax.tick_params(axis="y", labelsize=7 if d.n_layers > 16 else 8)
    ax.set_xlim(0, d.columns[-1])
    ax.set_ylim(-0.6, d.n_layers + 1.4)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


# ---- logit labels that never overlap -----------------------------------------------------
def logit_label(node: dict) -> str:
    """'token 0.42' from a logit node's clerp 'Output "token" (p=0.420)', on one line (a
    newline or tab token is shown escaped, as \\n or \\t)."""
    clerp = str(node.get("clerp") or "")
    match = re.fullmatch(r'Output "(.*)" \(p=([0-9.]+)\)', clerp, flags=re.DOTALL)
    text = f"{match[1]} {float(match[2]):.2f}" if match else clerp
    return text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _label_logits(ax, d: Drawing) -> float:
    """One label above each logit, centred on it where the axes allow. Labels are placed left
    to right, each in the lowest row where it starts LABEL_GAP pixels after that row's last
    label ends; rows stack upwards, so labels never overlap however many or long they are."""
    logits = sorted((n for n in d.nodes if _kind(n) == "logit"), key=lambda n: d.pos[n["node_id"]])
    renderer = ax.figure.canvas.get_renderer()
    left_edge, _ = ax.transAxes.transform((0.0, 0.0))
    right_edge, _ = ax.transAxes.transform((1.0, 0.0))
    row_ends: list[float] = []  # pixel x where each row's last label ends
    placed = []
    row_px = 1.6 * LABEL_FONT * ax.figure.dpi / 72
    for n in logits:
        xy = d.pos[n["node_id"]]
        node_x = ax.transData.transform(xy)[0]
        probe = ax.text(0, 0, logit_label(n), fontsize=LABEL_FONT)
        width = probe.get_window_extent(renderer).width
        probe.remove()
        start = max(left_edge, min(node_x - width / 2, right_edge - width))
        row = next((r for r, end in enumerate(row_ends) if end + LABEL_GAP <= start), None)
        if row is None:
            row = len(row_ends)
            row_ends.append(0.0)
        row_ends[row] = start + width
        placed.append((row, n, xy, (start - node_x, 9 + row * row_px)))
    # upper rows first, so the white boxes of lower labels hide leader lines passing behind
    for row, n, xy, offset in sorted(placed, key=lambda p: -p[0]):
        _place_label(ax, n, xy, offset, row)
    return len(row_ends) * row_px * 72 / ax.figure.dpi


def _place_label(ax, node: dict, xy: tuple[float, float], offset_px, row: int) -> None:
    points = 72 / ax.figure.dpi
    ax.annotate(
        logit_label(node),
        xy,
        xytext=(offset_px[0] * points, offset_px[1] * points),
        textcoords="offset points",
        ha="left",
        va="bottom",
        fontsize=LABEL_FONT,
        gid="logit-label",
        annotation_clip=False,
        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"},
        arrowprops={"arrowstyle": "-", "color": "#bbbbbb", "lw": 0.5} if row else None,
    )
