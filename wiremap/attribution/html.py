"""One self-contained HTML file showing a graph JSON: the viewer page with its JS, CSS and
the graph inlined, so it opens from disk with no server and no network (no steering).

    from wiremap.attribution.html import write_html
    write_html(graph_json_obj, "graph.html")
"""

from __future__ import annotations

import json
from pathlib import Path

from wiremap.errors import WiremapError
from wiremap.fileio import atomic_write

STATIC = Path(__file__).parent / "viewer" / "static"
CSS_TAG = '<link rel="stylesheet" href="static/viewer.css">'
JS_TAG = '<script src="static/viewer.js"></script>'


def render_html(graph: dict) -> str:
    """The standalone page as a string."""
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    css = (STATIC / "viewer.css").read_text(encoding="utf-8")
    js = (STATIC / "viewer.js").read_text(encoding="utf-8")
    if CSS_TAG not in page or JS_TAG not in page or "</script" in js.lower():
        raise WiremapError("the viewer's static files changed shape; reinstall wiremap")
    data = _script_safe_json(graph)
    title = f"<title>wiremap · {_escape(graph.get('metadata', {}).get('prompt', ''))[:80]}</title>"
    page = page.replace("<title>wiremap viewer</title>", title)
    page = page.replace(CSS_TAG, f"<style>\n{css}</style>")
    inline = f'<script id="wiremap-graph" type="application/json">{data}</script>\n'
    return page.replace(JS_TAG, inline + f"<script>\n{js}</script>")


def write_html(graph: dict, path: str | Path) -> Path:
    """Write the standalone page for `graph` (a graph JSON object) to `path`."""
    if not isinstance(graph, dict) or "nodes" not in graph or "links" not in graph:
        raise WiremapError("write_html needs a graph JSON object {metadata, qParams, nodes, links}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, render_html(graph))
    return path


def _script_safe_json(obj: dict) -> str:
    # '<' escaped so no string in the graph (a token "</script>") can end the script block
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _escape(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
