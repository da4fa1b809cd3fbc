"""A graph shown inline in Jupyter, with no server: the standalone viewer page in an iframe.

    import wiremap
    wiremap.show(graph)            # a Graph (pruned here), a graph JSON object or a .json path
    view = wiremap.show(graph, height=800, node_threshold=0.7)
    view.save("dallas.html")       # the same page as a file

The page is `wiremap.attribution.html.render_html`'s (JS, CSS and graph inlined), put into the
iframe's `srcdoc` attribute so its scripts run inside the notebook; Jupyter displays the
returned object through its `_repr_html_`, so nothing here imports IPython.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from wiremap.errors import WiremapError


class GraphView:
    """The viewer page of one graph JSON object; Jupyter shows it inline."""

    def __init__(self, graph_json: dict[str, Any], height: int = 640) -> None:
        from wiremap.attribution.html import render_html

        if int(height) < 100:
            raise WiremapError(f"show(): height is in pixels, at least 100; got {height}")
        self.graph_json = graph_json
        self.height = int(height)
        self.page = render_html(graph_json)

    def _repr_html_(self) -> str:
        # quote=True escapes both quote kinds, so the page cannot end the attribute early
        doc = html.escape(self.page, quote=True)
        return (
            f'<iframe srcdoc="{doc}" style="width: 100%; height: {self.height}px; '
            'border: 1px solid #ddd;" title="wiremap graph"></iframe>'
        )

    def save(self, path: str | Path) -> Path:
        """Write the standalone page (opens from disk with no server)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.page, encoding="utf-8")
        return path

    def __repr__(self) -> str:
        meta = self.graph_json.get("metadata", {})
        return (
            f"GraphView({meta.get('prompt', '')!r}, {len(self.graph_json['nodes'])} nodes, "
            f"{len(self.graph_json['links'])} links)"
        )


def show(graph: Any, height: int = 640, **kwargs: Any) -> GraphView:
    """The graph, displayable inline in Jupyter (the last expression of a cell shows it).

    `graph`: a `wiremap.Graph` (pruned and budgeted here; keyword arguments go to
    `graph_to_json`: `result=`, `node_threshold=`, `edges_per_node=`, `labels=`, ...), a graph
    JSON object (what `write_graph_json` writes) or the path of such a JSON file.
    """
    return GraphView(_graph_json(graph, kwargs), height=height)


def _graph_json(graph: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    from wiremap.attribution.export import graph_to_json, validate_graph_json
    from wiremap.attribution.graph import Graph

    if isinstance(graph, Graph):
        return graph_to_json(graph, **kwargs)
    if kwargs:
        raise WiremapError(
            f"show(): {', '.join(sorted(kwargs))} apply to a Graph only; this graph is already "
            "pruned JSON, so pass the Graph itself to prune it differently"
        )
    if isinstance(graph, (str, Path)):
        graph = _read_json(Path(graph))
    if not isinstance(graph, dict):
        raise WiremapError(
            f"show() takes a wiremap.Graph, a graph JSON object or a .json path, not "
            f"{type(graph).__name__}"
        )
    validate_graph_json(graph)
    return graph


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise WiremapError(f"show(): no graph JSON file at {path}; write one with write_graph_json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise WiremapError(
            f"show(): {path} is not JSON ({err}); give the path of a graph JSON file"
        ) from None
