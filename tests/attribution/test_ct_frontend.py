"""One of our graph folders opened in circuit-tracer's own frontend, in headless Chromium.

Needs: Chromium (`apt-get install -y chromium`), circuit-tracer's frontend (from the installed
package, or the `frontend/assets` folder of a checkout named by $CIRCUIT_TRACER_FRONTEND;
never copied here; README "Looking at a graph")
and npm with registry access: the page loads d3, d3-jetpack, dagre and pako from CDNs, so
the test fetches them with `npm pack` into a temporary folder and serves them locally in
their place. Missing any of these skips the test and says which. The script tags that point
at a CDN are rewritten when index.html is served; the two CDN scripts with no npm package
(a dev hot-reload client and a .npy reader, neither used to draw a graph) become stubs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_prune import random_dag_graph
from test_viewer_browser import CHROMIUM, Browser

from wiremap.attribution.export import write_graph_json

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)"
)
# npm package -> the file of it the page needs
PACKAGES = {
    "d3@7.9.2": "package/dist/d3.min.js",
    "d3-collection@1.0.7": "package/dist/d3-collection.min.js",
    "d3-jetpack@2.3.0": "package/build/d3-jetpack.cjs",
    "dagre@0.8.5": "package/dist/dagre.min.js",
    "pako@2.1.0": "package/dist/pako.min.js",
}
# d3-jetpack's browser build replaces window.d3 (and its d3 bundle holds two copies of
# d3-selection), so its CommonJS build is run against the page's d3 v7 instead, with
# d3-collection (d3 v7 dropped `nest`) loaded beside it; jetpack only adds what d3 lacks.
JETPACK = """(function () {
  var d3v7 = window.d3;
  function cjs(src, req) {
    var module = {exports: {}};
    new Function('exports', 'module', 'require', src)(module.exports, module, req);
    return module.exports;
  }
  var collection = cjs(%s, function () { return {}; });
  var jetpack = cjs(%s, function (name) { return name === 'd3-collection' ? collection : d3v7; });
  for (var k in jetpack) if (!(k in d3v7)) d3v7[k] = jetpack[k];
  // the page's jetpack gives conventions a c.drawAxis(svg) method; npm's has d3.drawAxis(c)
  d3v7.conventions = function (opts) {
    var c = jetpack.conventions(opts);
    c.drawAxis = function (svg) { return jetpack.drawAxis(Object.assign({}, c, {svg: svg})); };
    return c;
  };
})();"""
STUBS = {  # CDN scripts with no npm package, not used to draw a graph
    "hotserver": "",  # a dev hot-reload client
    "npy": "window.npyjs = {parse() { throw new Error('npy is not served in this test') }};",
}


def ct_frontend() -> Path:
    """The frontend assets: $CIRCUIT_TRACER_FRONTEND (e.g. from a git checkout), else the
    installed package's."""
    if os.environ.get("CIRCUIT_TRACER_FRONTEND"):
        return Path(os.environ["CIRCUIT_TRACER_FRONTEND"])
    spec = importlib.util.find_spec("circuit_tracer")
    if spec is None or spec.origin is None:
        pytest.skip("circuit-tracer is not installed (README, 'Looking at a graph')")
    assets = Path(spec.origin).parent / "frontend" / "assets"
    if not (assets / "index.html").is_file():
        pytest.skip(f"circuit-tracer at {assets.parent.parent} has no frontend/assets")
    return assets


def npm_libs(folder: Path) -> dict[str, bytes]:
    """CDN script key -> JavaScript, from `npm pack` (skips without npm or the registry)."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: it fetches d3, dagre and pako for the page")
    js = {}
    for package, member in PACKAGES.items():
        try:
            got = subprocess.run(
                ["npm", "pack", package, "--silent"],
                cwd=folder,
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            pytest.skip(f"`npm pack {package}` failed (no registry access?): {err}")
        with tarfile.open(folder / got.stdout.strip().splitlines()[-1]) as tar:
            js[package.split("@")[0]] = tar.extractfile(member).read().decode("utf-8")
    jetpack = JETPACK % (json.dumps(js["d3-collection"]), json.dumps(js["d3-jetpack"]))
    libs = {"d3.js": js["d3"], "jetpack": jetpack, "dagre": js["dagre"], "pako": js["pako"]}
    return {k: v.encode("utf-8") for k, v in (libs | STUBS).items()}


def local_index(assets: Path, libs: dict[str, bytes]) -> bytes:
    """circuit-tracer's index.html with each CDN script pointed at /lib/<key>."""

    def local(match: re.Match) -> str:
        url = match.group(1)
        key = next((k for k in libs if k in url.rsplit("/", 1)[-1]), None)
        assert key is not None, f"no local copy for {url}: add it to LIBS or STUBS"
        return f"src='/lib/{key}'"

    html = (assets / "index.html").read_text(encoding="utf-8")
    return re.sub(r"src=['\"](https?://[^'\"]+)['\"]", local, html).encode()


def serve(assets: Path, data: Path, libs: dict[str, bytes]) -> ThreadingHTTPServer:
    """circuit-tracer's local-server routes: /data/ and /graph_data/ from `data`, the rest
    static from its frontend folder."""
    index = local_index(assets, libs)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            body, ctype = self._body(path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", ctype)
            self.end_headers()
            self.wfile.write(body or b"")

        def _body(self, path: str) -> tuple[bytes | None, str]:
            if path in ("/", "/index.html"):
                return index, "text/html"
            if path.startswith("/lib/"):
                return libs.get(path[5:]), "text/javascript"
            for prefix, root in (("/data/", data), ("/graph_data/", data), ("/", assets)):
                if path.startswith(prefix):
                    file = (root / path[len(prefix) :]).resolve()
                    inside = file.is_relative_to(root.resolve()) and file.is_file()
                    kind = {".js": "text/javascript", ".css": "text/css"}.get(file.suffix)
                    return (file.read_bytes() if inside else None), kind or "application/json"
            return None, "text/plain"

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def drawn_expected(obj: dict) -> int:
    """Nodes the frontend draws at its default pruning slider (= metadata.node_threshold)."""
    t = obj["metadata"]["node_threshold"]
    kinds = ("embedding", "logit")
    return sum(n["feature_type"] in kinds or n["influence"] <= t for n in obj["nodes"])


def test_our_graph_in_circuit_tracer_frontend(tmp_path):
    assets = ct_frontend()
    libs = npm_libs(tmp_path)
    data = tmp_path / "graphs"
    write_graph_json(random_dag_graph(seed=1), data, slug="ours", scan="tiny")
    write_graph_json(random_dag_graph(seed=2), data, slug="second", scan="tiny")
    obj = json.loads((data / "ours.json").read_text())
    server = serve(assets, data, libs)
    browser = Browser(tmp_path / "profile")
    try:
        browser.send("Page.enable")
        browser.goto(f"http://127.0.0.1:{server.server_port}/index.html?slug=ours")
        count = "document.querySelectorAll('.link-graph text.node').length"
        drawn = browser.wait_for(count, "circuit-tracer's link graph to draw our nodes")
        options = browser.js(
            "[...document.querySelectorAll('select.graph-prompt-select option')].map(o => o.value)"
        )
    finally:
        browser.close()
        server.shutdown()
    assert options == ["ours", "second"]  # both graphs, from graph-metadata.json
    assert drawn == drawn_expected(obj) > 10  # every node its slider keeps, drawn
