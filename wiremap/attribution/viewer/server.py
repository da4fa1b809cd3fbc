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

Every request must carry an allowed Host header; POSTs must be JSON from this origin
(guard.py). Connections are bounded in number and time (ViewerServer), request bodies in
size each (`max_body`) and together (`max_body_total`, guard.BodyBudget); error answers
name no absolute path and no exception text.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from wiremap.attribution.subgraph import node_kind, pinned_scores
from wiremap.attribution.viewer.graphfile import (
    ViewerError,
    apply_edits,
    graph_path,
    list_graphs,
    read_graph,
    write_graph,
)
from wiremap.attribution.viewer.guard import (
    BodyBudget,
    allowed_hosts,
    body_length,
    check_host,
    check_write,
    public_message,
    read_json_body,
)
from wiremap.attribution.viewer.steer import Steerer, model_source
from wiremap.errors import WiremapError

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/viewer.js": ("viewer.js", "text/javascript; charset=utf-8"),
    "/static/viewer.css": ("viewer.css", "text/css; charset=utf-8"),
}
MAX_BODY_BYTES = 20 * 2**20
MAX_BODY_TOTAL = 64 * 2**20  # bodies held at once, all connections together (about three big)
IDLE_TIMEOUT_S = 10.0  # a connection silent this long is closed (socket timeout)
READ_DEADLINE_S = 30.0  # a request (line, headers, body) must arrive within this, however slow
MAX_THREADS = 64  # connections served at once; more are answered 503 at once
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_SLOW = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class ViewerServer(ThreadingHTTPServer):
    """Serves one folder of graph JSON files; holds the caches shared by request threads.

    One thread per connection, at most `max_threads`; every socket times out after
    `timeout` idle seconds, and a watchdog closes connections whose request has not fully
    arrived after `read_deadline` seconds (a client trickling bytes never holds a thread).
    """

    daemon_threads = True
    request_queue_size = 128  # a burst of connections waits in the kernel, not refused by it

    def __init__(
        self,
        address,
        root: Path,
        steerer: Steerer | None = None,
        features_dir: Path | None = None,
        max_body: int = MAX_BODY_BYTES,
        extra_hosts: tuple[str, ...] = (),
        timeout: float = IDLE_TIMEOUT_S,
        read_deadline: float = READ_DEADLINE_S,
        max_threads: int = MAX_THREADS,
        family: int = socket.AF_INET,
        max_body_total: int = MAX_BODY_TOTAL,
    ):
        self.root = Path(root).resolve()
        self.steerer = steerer or Steerer()
        self.features_dir = features_dir
        self.max_body = max_body
        self.bodies = BodyBudget(max_body_total)
        self.allowed = allowed_hosts(address[0], extra_hosts)
        self.idle_timeout, self.read_deadline, self.max_threads = (
            timeout,
            read_deadline,
            max_threads,
        )
        self.save_lock = threading.Lock()
        self._stores: dict[Path, Any] = {}
        self._lock = threading.Lock()
        self._active = 0
        self._reading: dict[ViewerHandler, float] = {}  # handler -> deadline of its request
        self._closed = threading.Event()
        self.address_family = family
        super().__init__(address, ViewerHandler)
        threading.Thread(target=self._watchdog, daemon=True, name="wiremap-watchdog").start()

    # ---- connections: bounded threads, read deadlines -----------------------------------
    def process_request(self, request, client_address) -> None:
        with self._lock:
            busy = self._active >= self.max_threads
            self._active += not busy
        if busy:
            _send_now(request, _BUSY)
            return self.shutdown_request(request)
        t = threading.Thread(target=self._serve_counted, args=(request, client_address))
        t.daemon = True
        t.start()

    def _serve_counted(self, request, client_address) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._active -= 1

    def reading(self, handler: ViewerHandler, done: bool = False) -> None:
        """Start (or end, `done`) the read deadline of `handler`'s current request."""
        with self._lock:
            if done:
                self._reading.pop(handler, None)
            else:
                self._reading[handler] = time.monotonic() + self.read_deadline

    def _watchdog(self) -> None:
        while not self._closed.wait(min(1.0, self.read_deadline / 4)):
            now = time.monotonic()
            with self._lock:
                late = [h for h, deadline in self._reading.items() if deadline < now]
                for handler in late:
                    del self._reading[handler]
            for handler in late:
                _send_now(handler.connection, _SLOW)
                try:
                    handler.connection.shutdown(socket.SHUT_RDWR)  # unblocks its recv
                except OSError:
                    pass

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that went away or timed out: nothing to report
        super().handle_error(request, client_address)

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()

    def feature_store(self, obj: dict):
        """The FeatureStore for a graph: --features, else `<info.transcoders>/features`."""
        from wiremap.attribution.features import FeatureStore

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


def _send_now(sock: socket.socket, data: bytes) -> None:
    """Send a short answer without ever blocking the calling thread."""
    try:
        sock.send(data, getattr(socket, "MSG_DONTWAIT", 0))
    except OSError:
        pass


class ViewerHandler(BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "wiremap-viewer"

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # StreamRequestHandler sets it on the socket
        super().setup()

    def handle_one_request(self) -> None:
        self.server.reading(self)
        try:
            super().handle_one_request()
        finally:
            self.server.reading(self, done=True)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    # ---- dispatch -----------------------------------------------------------------------
    def do_GET(self) -> None:
        self.server.reading(self, done=True)
        url = urlsplit(self.path)
        if not self._host_ok():
            return
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
            host = check_host(self.headers, self.server.allowed)
            if route is None:
                raise ViewerError(404, "no such endpoint")
            check_write(self.headers, host)
            length = body_length(self.headers, self.server.max_body)
            with self.server.bodies.hold(length):  # given back once answered
                body = read_json_body(self.rfile, length)
                self.server.reading(self, done=True)  # read in time; what follows may take long
                self._answer(route, body)
        except ViewerError as err:  # refused before the route ran (_answer catches its own)
            self.server.reading(self, done=True)
            self.close_connection = True  # an unread body must not be parsed as a request
            retry = {"Retry-After": str(err.retry_after)} if err.retry_after else {}
            return self._send_json(err.status, {"error": err.message}, retry)

    def _host_ok(self) -> bool:
        try:
            check_host(self.headers, self.server.allowed)
        except ViewerError as err:
            self.close_connection = True
            self._send_json(err.status, {"error": err.message})
            return False
        return True

    def _answer(self, route, arg) -> None:
        if route is None:
            return self._send_json(404, {"error": "no such endpoint"})
        try:
            self._send_json(200, route(arg))
        except ViewerError as err:
            self._send_error(err.status, err.message)
        except WiremapError as err:
            self._send_error(422, str(err))
        except OSError as err:  # e.g. a full disk or a read-only folder while saving
            reason = err.strerror or "input/output error"
            self._send_error(507, f"could not read or write a file in the folder: {reason}")
        except Exception:  # a bug or a bad file must never take the server down
            traceback.print_exc(file=sys.stderr)
            self._send_error(500, "internal error; the server's terminal shows the details")

    def _send_error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": public_message(message, self.server.root)})

    # ---- endpoints ----------------------------------------------------------------------
    def api_list(self, query: dict) -> dict:
        return {
            "folder": self.server.root.name,  # its name only: no absolute path to a client
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
        from wiremap.attribution.viewer.steer import feature_triple

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
    def _static(self, name: str, ctype: str) -> None:
        self._send(200, (STATIC / name).read_bytes(), ctype)

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False, allow_nan=False, default=str)
        self._send(status, data.encode("utf-8"), "application/json; charset=utf-8", headers)

    def _send(self, status: int, data: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # the page talks only to this server: no CDN, no other origin
        self.send_header(
            "Content-Security-Policy",
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "frame-ancestors 'none'",
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
    *,
    allow_hosts: tuple[str, ...] | list[str] = (),
    timeout: float = IDLE_TIMEOUT_S,
    read_deadline: float = READ_DEADLINE_S,
    max_threads: int = MAX_THREADS,
    max_body_total: int = MAX_BODY_TOTAL,
) -> ViewerServer:
    """A bound (not yet serving) server; every bind problem is one WiremapError."""
    root = Path(root)
    if not root.is_dir():
        raise WiremapError(f"{root} is not a folder; pass the folder holding your graph JSON files")
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise WiremapError(f"--port {port} is not a port; give 1-65535, or 0 for a free one")
    if max_body_total < max_body:
        raise WiremapError(
            f"max_body_total={max_body_total} is below max_body={max_body}: the largest body "
            "allowed could never be read; give max_body_total >= max_body"
        )
    features = Path(features_dir) if features_dir is not None else None
    limits = dict(timeout=timeout, read_deadline=read_deadline, max_threads=max_threads)
    limits.update(max_body_total=max_body_total)
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return ViewerServer(
            (host, port),
            root,
            steerer,
            features,
            max_body,
            tuple(allow_hosts),
            **limits,
            family=family,
        )
    except (OSError, UnicodeError) as err:
        raise WiremapError(bind_problem(host, port, err)) from None


def bind_problem(host: str, port: int, err: Exception) -> str:
    """One line saying why (host, port) cannot be served, and what to do instead."""
    code = getattr(err, "errno", None)
    if isinstance(err, (socket.gaierror, UnicodeError)) or code == errno.EADDRNOTAVAIL:
        return (
            f"--host {host!r} is not an address of this machine; use 127.0.0.1 (this machine "
            "only) or one of its own IP addresses"
        )
    if code == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is already in use (another `wiremap serve`?); pick another "
            "with --port N, or --port 0 for a free one"
        )
    if code == errno.EACCES:
        return f"not allowed to listen on port {port}; use a port above 1023 (e.g. --port 8000)"
    return f"cannot listen on {host}:{port}: {err.strerror or err}"
