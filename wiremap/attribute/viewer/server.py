"""The local viewer's HTTP server (standard library only).

    server = make_server("graphs/", host="127.0.0.1", port=8000)
    server.serve_forever()                      # or: wiremap serve graphs/

JSON endpoints (errors are `{"error": message}` with a 4xx/5xx status):
    GET  /api/list                               graph files in the folder
    GET  /api/graph?name=G.json                  one graph JSON (checked)
    GET  /api/feature?name=G.json&node=ID        the feature card of a feature node
    POST /api/save    {name, qParams, labels}    pinned ids, supernodes, labels into the file
    POST /api/scores  {name, pinnedIds}          replacement/completeness of a pinned subgraph
    POST /api/steer   {name, nodes, scale | ablate, all_positions, max_new_tokens, top_k}
Static: / (index.html), /static/viewer.js, /static/viewer.css — a fixed list, nothing else.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from wiremap.attribute.viewer.graphfile import (
    ViewerError,
    apply_edits,
    graph_path,
    list_graphs,
    read_graph,
    write_graph,
)
from wiremap.attribute.viewer.steer import Steerer, model_source
from wiremap.attribute.viewer.subgraph import node_kind, pinned_scores
from wiremap.errors import WiremapError

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/viewer.js": ("viewer.js", "text/javascript; charset=utf-8"),
    "/static/viewer.css": ("viewer.css", "text/css; charset=utf-8"),
}
MAX_BODY_BYTES = 20 * 2**20


class ViewerServer(ThreadingHTTPServer):
    """Serves one folder of graph JSON files; holds the caches shared by request threads."""

    daemon_threads = True

    def __init__(
        self,
        address,
        root: Path,
        steerer: Steerer | None = None,
        features_dir: Path | None = None,
        max_body: int = MAX_BODY_BYTES,
    ):
        self.root = Path(root).resolve()
        self.steerer = steerer or Steerer()
        self.features_dir = features_dir
        self.max_body = max_body
        self.save_lock = threading.Lock()
        self._stores: dict[Path, Any] = {}
        super().__init__(address, ViewerHandler)

    def feature_store(self, obj: dict):
        """The FeatureStore for a graph: --features, else `<info.transcoders>/features`."""
        from wiremap.attribute.features import FeatureStore

        folder = self.features_dir
        if folder is None:
            source = model_source(obj["metadata"])
            if source is None:
                raise ViewerError(
                    404,
                    "graph has no metadata.info.transcoders; start the "
                    "server with --features DIR to show feature cards",
                )
            folder = Path(source[1]) / "features"
        folder = Path(folder).resolve()
        if folder not in self._stores:
            try:
                self._stores[folder] = FeatureStore(folder)
            except WiremapError as err:
                raise ViewerError(404, str(err)) from err
        return self._stores[folder]


class ViewerHandler(BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "wiremap-viewer"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    # ---- dispatch -----------------------------------------------------------------------
    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path in STATIC_FILES:
            return self._static(*STATIC_FILES[url.path])
        routes = {
            "/api/list": self.api_list,
            "/api/graph": self.api_graph,
            "/api/feature": self.api_feature,
        }
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        self._answer(routes.get(url.path), query)

    def do_POST(self) -> None:
        routes = {
            "/api/save": self.api_save,
            "/api/scores": self.api_scores,
            "/api/steer": self.api_steer,
        }
        route = routes.get(urlsplit(self.path).path)
        try:
            body = self._read_json_body() if route else None
        except ViewerError as err:
            self.close_connection = True  # an unread body must not be parsed as a request
            return self._send_json(err.status, {"error": err.message})
        self._answer(route, body)

    def _answer(self, route, arg) -> None:
        if route is None:
            return self._send_json(404, {"error": f"no such endpoint {self.path!r}"})
        try:
            self._send_json(200, route(arg))
        except ViewerError as err:
            self._send_json(err.status, {"error": err.message})
        except WiremapError as err:
            self._send_json(422, {"error": str(err)})
        except Exception as err:  # a bug or a bad file must never take the server down
            traceback.print_exc(file=sys.stderr)
            self._send_json(500, {"error": f"internal error: {type(err).__name__}: {err}"})

    # ---- endpoints ----------------------------------------------------------------------
    def api_list(self, query: dict) -> dict:
        return {
            "folder": str(self.server.root),
            "graphs": list_graphs(self.server.root),
            "steering": True,
        }

    def api_graph(self, query: dict) -> dict:
        return read_graph(graph_path(self.server.root, query.get("name")))

    def api_feature(self, query: dict) -> dict:
        obj = read_graph(graph_path(self.server.root, query.get("name")))
        node = {n["node_id"]: n for n in obj["nodes"]}.get(query.get("node"))
        if node is None or node_kind(node) != "feature":
            raise ViewerError(404, f"{query.get('node')!r} is not a feature node of this graph")
        from wiremap.attribute.viewer.steer import feature_triple

        layer, _, feat = feature_triple(node, node["node_id"])
        return self.server.feature_store(obj).card(layer, feat)

    def api_save(self, body: dict) -> dict:
        path = graph_path(self.server.root, body.get("name"))
        with self.server.save_lock:
            obj = apply_edits(read_graph(path), body.get("qParams"), body.get("labels"))
            write_graph(path, obj)
        return {"saved": path.name, "qParams": obj["qParams"]}

    def api_scores(self, body: dict) -> dict:
        obj = read_graph(graph_path(self.server.root, body.get("name")))
        pinned = body.get("pinnedIds", [])
        if not isinstance(pinned, list) or not all(isinstance(p, str) for p in pinned):
            raise ViewerError(400, "'pinnedIds' must be a list of node id strings")
        return {"pinned": pinned_scores(obj, pinned), "graph": obj["metadata"].get("scores")}

    def api_steer(self, body: dict) -> dict:
        obj = read_graph(graph_path(self.server.root, body.get("name")))
        return self.server.steerer.steer(obj, body)

    # ---- I/O ----------------------------------------------------------------------------
    def _read_json_body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ViewerError(411, "send a Content-Length header with the JSON body")
        if int(length) > self.server.max_body:
            raise ViewerError(413, f"request body over {self.server.max_body} bytes refused")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ViewerError(400, f"malformed JSON body: {err}") from err
        if not isinstance(body, dict):
            raise ViewerError(400, "the JSON body must be an object")
        return body

    def _static(self, name: str, ctype: str) -> None:
        self._send(200, (STATIC / name).read_bytes(), ctype)

    def _send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj, ensure_ascii=False, allow_nan=False, default=str)
        self._send(status, data.encode("utf-8"), "application/json; charset=utf-8")

    def _send(self, status: int, data: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # the page talks only to this server: no CDN, no other origin
        self.send_header(
            "Content-Security-Policy",
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
        )
        self.end_headers()
        self.wfile.write(data)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_warning(host: str) -> str | None:
    """A warning for binding beyond this machine (anyone who can reach it can edit files)."""
    if is_loopback(host):
        return None
    return (
        f"warning: serving on {host}, not loopback: anyone who can reach this address can "
        "read and edit the graphs in the folder and run the model; use --host 127.0.0.1 "
        "unless you mean it"
    )


def make_server(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    steerer: Steerer | None = None,
    features_dir: str | Path | None = None,
    max_body: int = MAX_BODY_BYTES,
) -> ViewerServer:
    root = Path(root)
    if not root.is_dir():
        raise WiremapError(f"{root} is not a folder; pass the folder holding your graph JSON files")
    features = Path(features_dir) if features_dir is not None else None
    return ViewerServer((host, port), root, steerer, features, max_body)
