"""Local offline viewer for attribution graph JSON files.

    wiremap serve graphs/                       # http://127.0.0.1:8000
    from wiremap.attribution.viewer.server import make_server

`server.py` (HTTP, standard library only), `guard.py` (Host, origin and body checks of
each request), `graphfile.py` (safe paths, checked loading,
saved edits), `subgraph.py` (scores of a pinned subgraph), `steer.py` (interventions),
`budget.py` (the edge budget that keeps large graphs readable), `synthetic.py`
(real-model-sized graphs for tests and benches), `static/` (the page: plain JS/SVG, no
build step, nothing fetched from the network).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def serve(
    folder: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    features: str | Path | None = None,
    *,
    allow_hosts: Iterable[str] = (),
    block: bool = True,
    verbose: bool = False,
) -> Any:
    """Serve the graph JSON files of `folder` in the local viewer (`wiremap serve`).

    `block=True` serves until Ctrl-C; `block=False` serves from a background thread and
    returns the server at once (`server.shutdown()` stops it; `server.server_address` is
    where it listens, `port=0` picks a free port). `allow_hosts`: further host names the
    page may be opened under (loopback names and `host` always are). `verbose`: print the
    address (and a warning when `host` is not loopback). Returns the `ViewerServer`.
    """
    from wiremap.attribution.viewer.server import host_warning, make_server

    server = make_server(folder, host, port, features_dir=features, allow_hosts=tuple(allow_hosts))
    warning = host_warning(host)
    if verbose and warning:  # after a successful bind, so a failed start warns of nothing
        print(warning, file=sys.stderr)
    if verbose:
        where, at = server.server_address[:2]
        where = f"[{where}]" if ":" in where else where
        print(f"wiremap viewer: serving {server.root} at http://{where}:{at}/  (Ctrl-C stops)")
    if not block:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return server
