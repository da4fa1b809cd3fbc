"""A static PNG of a (pruned) graph JSON, for papers and notebooks (needs matplotlib).

    from wiremap.attribute.png import write_png
    write_png(graph_json_obj, "graph.png")

Same layout as the viewer: token positions on x, layers on y (embeddings at the bottom,
logits on top), features as circles, error nodes as diamonds, edges blue (positive) or red
(negative) with width proportional to |weight|.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from wiremap.attribute.viewer.subgraph import node_kind
from wiremap.errors import WiremapError

POS, NEG = "#2166ac", "#b2182b"
MAX_EDGES = 3000


def node_positions(graph: dict) -> tuple[dict[str, tuple[float, float]], int, int]:
    """{node_id: (x, y)} with x in token units and y in rows; also (n_pos, n_layers)."""
    nodes = graph["nodes"]
    layers = [int(n["layer"]) for n in nodes if node_kind(n) in ("feature", "error")]
    n_layers = max(layers) + 1 if layers else 0
    n_pos = max(
        [len(graph["metadata"].get("prompt_tokens", []))]
        + [int(n.get("ctx_idx") or 0) + 1 for n in nodes]
    )
    rows = {"token": lambda n: 0, "logit": lambda n: n_layers + 1}
    cells: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for n in nodes:
        row = rows.get(node_kind(n), lambda n: int(n["layer"]) + 1)(n)
        cells[(row, int(n.get("ctx_idx") or 0))].append(n)
    pos = {}
    for (row, col), cell in cells.items():
        cell.sort(key=lambda n: n.get("influence") or 0.0)
        for i, n in enumerate(cell):
            pos[n["node_id"]] = (col + (i + 1) / (len(cell) + 1), float(row))
    return pos, n_pos, n_layers


def write_png(graph: dict, path: str | Path, dpi: int = 150) -> Path:
    """Render `graph` (a graph JSON object) to a PNG file at `path`."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure
    except ImportError as err:
        raise WiremapError("PNG export needs matplotlib: pip install matplotlib") from err
    pos, n_pos, n_layers = node_positions(graph)
    fig = Figure(figsize=(max(6.0, 1.3 * n_pos), max(4.0, 0.6 * (n_layers + 2))), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    links = sorted(graph["links"], key=lambda ln: abs(ln["weight"]))[-MAX_EDGES:]
    top = max([abs(ln["weight"]) for ln in links] + [1e-12])
    segs = [(pos[ln["source"]], pos[ln["target"]]) for ln in links]
    ax.add_collection(
        LineCollection(
            segs,
            colors=[POS if ln["weight"] >= 0 else NEG for ln in links],
            linewidths=[0.3 + 2.7 * abs(ln["weight"]) / top for ln in links],
            alpha=0.45,
            zorder=1,
        )
    )
    _draw_nodes(ax, graph, pos)
    _decorate(ax, graph, n_pos, n_layers)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _draw_nodes(ax, graph: dict, pos: dict) -> None:
    style = {
        "feature": ("o", "white", 36),
        "error": ("D", "#bbbbbb", 28),
        "token": ("s", "#eef3f8", 60),
        "logit": ("s", "#fdf1e6", 60),
    }
    for kind, (marker, colour, size) in style.items():
        xy = [pos[n["node_id"]] for n in graph["nodes"] if node_kind(n) == kind]
        if xy:
            xs, ys = zip(*xy, strict=True)
            ax.scatter(
                xs, ys, marker=marker, s=size, c=colour, edgecolors="#444", linewidths=0.8, zorder=2
            )
    for n in graph["nodes"]:
        if node_kind(n) == "logit":
            x, y = pos[n["node_id"]]
            match = re.match(r'^Output "(.*)" \(p=([0-9.]+)\)$', str(n.get("clerp") or ""))
            text = f"{match[1]} {float(match[2]):.2f}" if match else str(n.get("clerp") or "")
            ax.annotate(
                text,
                (x, y),
                xytext=(2, 7),
                textcoords="offset points",
                ha="left",
                rotation=35,
                fontsize=7,
            )


def _decorate(ax, graph: dict, n_pos: int, n_layers: int) -> None:
    tokens = list(graph["metadata"].get("prompt_tokens", []))
    tokens += [str(i) for i in range(len(tokens), n_pos)]
    ax.set_xticks([p + 0.5 for p in range(n_pos)], tokens, fontsize=8)
    ax.set_yticks(range(n_layers + 2), ["Emb", *[f"L{i}" for i in range(n_layers)], "Logit"])
    ax.set_xlim(0, n_pos)
    ax.set_ylim(-0.6, n_layers + 1.8)
    ax.set_title(str(graph["metadata"].get("prompt", ""))[:100], fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
