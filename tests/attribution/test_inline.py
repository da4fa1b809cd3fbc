"""`wiremap.show`: the standalone viewer page inline in Jupyter, through an iframe's srcdoc."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from html.parser import HTMLParser

import pytest
from test_prune import hand_graph

import wiremap
from wiremap.attribution.export import graph_to_json, write_graph_json
from wiremap.attribution.html import render_html
from wiremap.errors import WiremapError

NASTY = 'say "hi" & </script><script>alert(1)</script> \u2028'


class _Tags(HTMLParser):
    """Top-level tags of the notebook cell's HTML, with their (unescaped) attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _cell_tags(view) -> list[tuple[str, dict]]:
    parser = _Tags()
    parser.feed(view._repr_html_())
    return parser.tags


def _embedded_graph(page: str) -> dict:
    start = page.index('<script id="wiremap-graph" type="application/json">')
    body = page[page.index(">", start) + 1 : page.index("</script>", start)]
    return json.loads(body)


def test_show_puts_the_standalone_page_in_one_iframe_srcdoc():
    graph = hand_graph()
    view = wiremap.show(graph, height=500, node_threshold=0.8, edge_threshold=1.0)
    expected = graph_to_json(graph, node_threshold=0.8, edge_threshold=1.0)
    assert view.graph_json == expected
    tags = _cell_tags(view)
    assert [t for t, _ in tags] == ["iframe"]  # the page's own tags stay inside the attribute
    attrs = tags[0][1]
    assert attrs["srcdoc"] == render_html(expected)  # the same page write_html writes
    assert "height: 500px" in attrs["style"]
    assert _embedded_graph(attrs["srcdoc"]) == expected
    assert "static/viewer.js" not in attrs["srcdoc"]  # scripts inlined: no server needed


def test_a_prompt_with_quotes_and_script_tags_cannot_escape_the_iframe():
    graph = dataclasses.replace(hand_graph(), prompt=NASTY)
    view = wiremap.show(graph)
    tags = _cell_tags(view)
    assert [t for t, _ in tags] == ["iframe"]
    page = tags[0][1]["srcdoc"]
    own = render_html(view.graph_json).lower().count("</script>")
    assert page.lower().count("</script>") == own  # the prompt adds no script end
    assert _embedded_graph(page)["metadata"]["prompt"] == NASTY


def test_show_takes_graph_json_or_its_path_and_saves_the_page(tmp_path):
    graph = hand_graph()
    path = tmp_path / "g.json"
    write_graph_json(graph, path, node_threshold=0.8)
    obj = json.loads(path.read_text(encoding="utf-8"))
    assert wiremap.show(obj).graph_json == obj
    view = wiremap.show(str(path))
    assert view.graph_json == obj and "GraphView('<s> x'" in repr(view)
    saved = view.save(tmp_path / "pages" / "g.html")
    assert saved.read_text(encoding="utf-8") == render_html(obj)


def test_show_refuses_what_it_cannot_show(tmp_path):
    with pytest.raises(WiremapError, match="no graph JSON file at"):
        wiremap.show(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(WiremapError, match="is not JSON"):
        wiremap.show(tmp_path / "bad.json")
    with pytest.raises(WiremapError, match="invalid graph JSON"):
        wiremap.show({"nodes": []})
    with pytest.raises(WiremapError, match="not int"):
        wiremap.show(3)
    with pytest.raises(WiremapError, match="apply to a Graph only"):
        wiremap.show({"nodes": [], "links": []}, node_threshold=0.5)
    with pytest.raises(WiremapError, match="height is in pixels"):
        wiremap.show(hand_graph(), height=5)


def test_show_needs_no_ipython():
    code = "import sys, wiremap; wiremap.show; print('IPython' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
