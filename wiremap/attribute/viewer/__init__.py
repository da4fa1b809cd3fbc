"""Local offline viewer for attribution graph JSON files.

    wiremap serve graphs/                       # http://127.0.0.1:8000
    from wiremap.attribute.viewer.server import make_server

`server.py` (HTTP, standard library only), `guard.py` (Host, origin and body checks of
each request), `graphfile.py` (safe paths, checked loading,
saved edits), `subgraph.py` (scores of a pinned subgraph), `steer.py` (interventions),
`budget.py` (the edge budget that keeps large graphs readable), `synthetic.py`
(real-model-sized graphs for tests and benches), `static/` (the page: plain JS/SVG, no
build step, nothing fetched from the network).
"""
