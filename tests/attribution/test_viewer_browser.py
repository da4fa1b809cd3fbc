"""End to end in headless Chromium: load a graph, hover and click a node, pin, group two nodes
into a supernode, save, reload and find the supernode, take a screenshot; and the
standalone HTML export opened from disk.

Chromium is driven over the DevTools protocol through `--remote-debugging-pipe` (JSON
messages separated by NUL bytes on file descriptors 3 and 4), so the test needs nothing
beyond the standard library and Debian's `chromium` package. Set WIREMAP_SCREENSHOT=path
to keep the screenshot (the README's docs/viewer.png is made that way).
"""

from __future__ import annotations

import base64
import fcntl
import itertools
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_viewer_server import cantor, make_graph_json

from wiremap.attribution.features import write_layer
from wiremap.attribution.html import write_html
from wiremap.attribution.viewer.server import make_server

CHROMIUM = next(
    (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
    "--window-size=1500,950",
]
TIMEOUT = 30.0


class Browser:
    """A minimal DevTools-protocol client over Chromium's pipe transport."""

    def __init__(self, profile: Path):
        to_child, self._w = os.pipe()  # we write commands, Chromium reads them on fd 3
        self._r, from_child = os.pipe()  # Chromium writes replies on fd 4
        # park the child's ends above 4 so the dup2 onto 3 and 4 cannot clobber them
        a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child))
        os.close(to_child)
        os.close(from_child)

        def wire() -> None:  # runs in the child before exec; pass_fds keeps 3 and 4 open
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=wire,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(a)
        os.close(b)
        self._next = 0
        self._replies: dict[int, dict] = {}
        self._events: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.session = self._attach()

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._r, 65536):
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._cond:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()
                    else:
                        self._events.put(msg)

    def send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        with self._cond:
            ok = self._cond.wait_for(lambda: self._next in self._replies, timeout=TIMEOUT)
        assert ok, f"Chromium did not answer {method}"
        reply = self._replies.pop(self._next)
        assert "error" not in reply, reply["error"]
        return reply["result"]

    def _attach(self) -> str:
        targets = self.send("Target.getTargets", session=False)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        got = self.send(
            "Target.attachToTarget", {"targetId": page["targetId"], "flatten": True}, session=False
        )
        return got["sessionId"]

    def js(self, expression: str):
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str):
        end = time.monotonic() + TIMEOUT
        while time.monotonic() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {expression}")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def mouse(self, kind: str, x: float, y: float, modifiers: int = 0) -> None:
        self.send(
            "Input.dispatchMouseEvent",
            {
                "type": kind,
                "x": x,
                "y": y,
                "button": "left",
                "clickCount": 1,
                "modifiers": modifiers,
            },
        )

    def centre(self, selector: str) -> tuple[float, float]:
        box = self.js(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            "el.scrollIntoView({block: 'center', inline: 'center'});"
            "const r = el.getBoundingClientRect();"
            "return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        return box[0], box[1]

    def click(self, selector: str, modifiers: int = 0) -> None:
        x, y = self.centre(selector)
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y, modifiers)
        self.mouse("mouseReleased", x, y, modifiers)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
        finally:
            os.close(self._w)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    b.send("Page.enable")
    b.send(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1500, "height": 950, "deviceScaleFactor": 1, "mobile": False},
    )
    yield b
    b.close()


def demo_card(layer: int, f: int) -> dict:
    """A hand-made card in the stored format (real cards are tested in test_features.py)."""
    words = ["The", " capital", " of", " France", " is", " Paris", ".", " Its", " river"]
    acts = []
    for k in range(4):
        values = [0.0] * len(words)
        values[3], values[5] = 3.0 - 0.5 * k, 1.0 + 0.2 * k
        acts.append(
            {
                "tokens": words,
                "values": values,
                "maxValue": max(values),
                "minValue": 0.0,
                "maxValueTokenIndex": 3,
                "qualifyingTokenIndex": 3,
                "dataIndex": 100 * k + f,
            }
        )
    return {
        "modelId": "demo",
        "layer": str(layer),
        "index": f,
        "maxActApprox": 3.0,
        "frac_nonzero": 0.004,
        "freq_hist_data_bar_values": [0.5, 1.0, 2.0, 2.8],
        "freq_hist_data_bar_heights": [40, 22, 9, 3],
        "pos_str": [" Paris", " Lyon", " French"],
        "pos_values": [1.2, 0.9, 0.7],
        "neg_str": [" London", " Berlin"],
        "neg_values": [-0.8, -0.6],
        "activations": acts,
    }


def write_demo_cards(folder: Path, n_layers: int = 4, n_features: int = 200) -> None:
    folder.mkdir(parents=True)
    layers = {
        str(i): write_layer(folder, i, [demo_card(i, f) for f in range(n_features)])
        for i in range(n_layers)
    }
    (folder / "index.json").write_text(json.dumps({"layers": layers}))


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "graphs"
    folder.mkdir()
    write_demo_cards(tmp_path / "tc" / "features")
    graph = make_graph_json(info={"transcoders": str(tmp_path / "tc")})
    (folder / "capital.json").write_text(json.dumps(graph))
    (folder / "broken.json").write_text("{not a graph")
    srv = make_server(folder, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, folder
    srv.shutdown()
    srv.server_close()


def _features(graph: dict, k: int) -> list[str]:
    feats = [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    feats.sort(key=lambda n: n["influence"])  # the most influential are visible at any pruning
    return [n["node_id"] for n in feats[:k]]


def test_viewer_end_to_end(browser, server, tmp_path):
    srv, folder = server
    host, port = srv.server_address[:2]
    graph = json.loads((folder / "capital.json").read_text())
    first, second = _features(graph, 2)
    browser.goto(f"http://{host}:{port}/#capital.json")
    browser.wait_for("document.querySelectorAll('#graph .node').length > 10", "the graph")
    sel = lambda i: f'#graph .node[data-id="{i}"]'  # noqa: E731

    # hover: the node's edges light up
    x, y = browser.centre(sel(first))
    browser.mouse("mouseMoved", x, y)
    assert browser.js("document.getElementById('graph').classList.contains('hovering')")
    assert browser.js("document.querySelectorAll('.edge.hl-in, .edge.hl-out').length") > 0

    # click: details with strongest inputs and outputs
    browser.click(sel(first))
    panel = browser.wait_for("document.getElementById('node-panel').innerText", "node panel")
    assert first in panel and "Strongest inputs" in panel and "Strongest outputs" in panel
    browser.wait_for("document.querySelectorAll('#feature-card .context').length === 4", "card")
    assert "Paris" in browser.js("document.getElementById('feature-card').innerText")

    # pin one with the button, the other with shift-click; group them into a supernode
    browser.js("document.getElementById('pin-button').click()")
    browser.click(sel(second), modifiers=8)  # 8 = shift
    pinned = browser.js(
        "[...document.querySelectorAll('#pinned-list li')].map(li => li.dataset.id)"
    )
    assert pinned == [first, second]
    browser.wait_for("!!document.getElementById('pinned-scores')", "pinned-subgraph scores")
    browser.js("document.querySelectorAll('#pinned-list .tick').forEach(b => b.click())")
    browser.js("document.getElementById('supernode-label').value = 'capital city'")
    browser.js("document.getElementById('group').click()")
    assert (
        browser.js("document.querySelector('#supernode-list li').dataset.label") == "capital city"
    )

    # save, check the file, reload, find the supernode again
    browser.js("document.getElementById('save').click()")
    browser.wait_for("document.getElementById('status').textContent.startsWith('saved')", "save")
    saved = json.loads((folder / "capital.json").read_text())
    assert saved["qParams"]["supernodes"] == [["capital city", first, second]]
    assert saved["qParams"]["pinnedIds"] == [first, second]
    browser.send("Page.reload")
    browser.wait_for("document.querySelectorAll('#supernode-list li').length === 1", "reload")
    labels = browser.js(
        "[...document.querySelectorAll('#graph .sn-label')].map(t => t.textContent)"
    )
    assert labels == ["capital city"]
    browser.click(sel(first))
    browser.wait_for(
        "document.getElementById('node-panel').innerText.includes('Strongest')",
        "node panel after reload",
    )
    browser.wait_for("!!document.getElementById('pinned-scores')", "scores after reload")
    browser.wait_for("document.querySelectorAll('#feature-card .context').length", "card")
    out = Path(os.environ.get("WIREMAP_SCREENSHOT") or tmp_path / "viewer.png")
    assert browser.screenshot(out).read_bytes()[:4] == b"\x89PNG"


def test_bad_graph_file_shows_an_error(browser, server):
    srv, _ = server
    host, port = srv.server_address[:2]
    browser.goto(f"http://{host}:{port}/#broken.json")
    text = browser.wait_for("document.querySelector('#status.error')?.textContent", "an error")
    assert "broken.json" in text and "not valid JSON" in text


def test_standalone_html_opens_from_disk(browser, tmp_path):
    graph = make_graph_json(seed=2)
    page = write_html(graph, tmp_path / "graph.html")
    browser.goto(page.as_uri())
    n = browser.wait_for("document.querySelectorAll('#graph .node').length", "standalone graph")
    assert n > 10
    assert browser.js("getComputedStyle(document.getElementById('steer-panel')).display") == "none"
    assert browser.js("document.getElementById('save').textContent") == "Download JSON"
    assert (
        browser.js("document.getElementById('prompt').textContent") == graph["metadata"]["prompt"]
    )


def test_crowded_position_still_fits_the_view(browser, tmp_path):
    # One position with 80 features used to make every column 80 nodes wide, pushing most of
    # the prompt off screen.
    graph = make_graph_json(seed=2)
    crowd = [
        {**n, "node_id": f"0_{1000 + i}_2", "feature": cantor(0, 1000 + i), "ctx_idx": 2}
        for i, n in enumerate([graph["nodes"][0]] * 80)
    ]
    graph["nodes"] += crowd
    browser.goto(write_html(graph, tmp_path / "crowded.html").as_uri())
    browser.wait_for("document.querySelectorAll('#graph .node').length", "crowded graph")
    width = browser.js("Number(document.querySelector('#graph-wrap svg').getAttribute('width'))")
    visible = browser.js("document.getElementById('graph-wrap').clientWidth")
    assert width <= visible + 1


# ---- a real-model-sized graph --------------------------------------------------------------
def shown_ids(graph: dict, threshold: float = 0.8) -> set[str]:
    """The nodes the viewer shows with its prune slider at `threshold` (see viewer.js)."""
    return {
        n["node_id"]
        for n in graph["nodes"]
        if n["feature_type"] in ("embedding", "logit")
        or n["influence"] is None
        or n["influence"] <= threshold
    }


def visible_counts(graph: dict, threshold: float = 0.8, max_edges: int = 8000) -> tuple[int, int]:
    """(nodes, links) the viewer should draw at that threshold, with its link cap."""
    shown = shown_ids(graph, threshold)
    links = sum(1 for ln in graph["links"] if ln["source"] in shown and ln["target"] in shown)
    return len(shown), min(links, max_edges)


def first_links(graph: dict, k: int) -> set[tuple[str, str]]:
    """The first k (source, target) links in the budget's order, ranked by |weight|."""
    from wiremap.attribution.budget import budget_order, json_edge_arrays

    ids, tgt, src, weight = json_edge_arrays(graph)
    order = budget_order(tgt, src, np.abs(weight), None, k)
    return {(ids[src[i]], ids[tgt[i]]) for i in order.tolist()}


HOVER_AND_CLICK = """(async (id) => {
  const V = window.wiremapViewer, S = V.state, svg = document.getElementById('graph');
  const node = document.querySelector(`#graph .node[data-id="${id}"]`);
  const frame = () => new Promise((r) => requestAnimationFrame(() => r()));
  let t0 = performance.now();
  node.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
  svg.getBoundingClientRect();  // style and layout of what the hover changed
  const hover = performance.now() - t0;
  await frame();
  const hoverFrame = performance.now() - t0;
  const lit = document.querySelectorAll('.hl-edges .edge').length;
  node.dispatchEvent(new MouseEvent('mouseout', {bubbles: true}));
  const cleared = !svg.classList.contains('hovering')
    && document.querySelectorAll('.hl-edges .edge').length === 0;
  t0 = performance.now();
  node.dispatchEvent(new MouseEvent('click', {bubbles: true}));
  document.getElementById('node-panel').getBoundingClientRect();
  const click = performance.now() - t0;
  return {hover, hoverFrame, lit, cleared, click,
          panel: document.getElementById('node-panel').innerText};
})"""


def measure_big_graph(browser, page) -> dict:
    """Open `page`, wait for the first render, hover and click the busiest feature; the
    page's own timings (performance.now(), ms) and what it drew."""
    browser.goto(page.as_uri())
    browser.wait_for("window.wiremapViewer && window.wiremapViewer.state.timings.ready", "render")
    state = browser.js(
        "(() => { const S = wiremapViewer.state; return {timings: S.timings, drawn: S.drawn,"
        " nodes: document.querySelectorAll('#graph .node').length,"
        " segments: [...document.querySelectorAll('#graph .edges path')]"
        ".reduce((k, p) => k + p.getAttribute('d').split('M').length - 1, 0)}; })()"
    )
    busiest = browser.js(
        "(() => { const S = wiremapViewer.state; let best = null, most = -1;"
        " for (const [id, el] of S.nodeEls) { if (!el.classList.contains('feature')) continue;"
        " const k = S.incoming.get(id).length + S.outgoing.get(id).length;"
        " if (k > most) { most = k; best = id; } } return best; })()"
    )
    state.update(browser.js(f"{HOVER_AND_CLICK}({json.dumps(busiest)})"), node=busiest)
    state["all"] = browser.js(SHOW_ALL)
    return state


SHOW_ALL = """(async () => {
  const S = wiremapViewer.state, slider = document.getElementById('prune');
  slider.value = '1';
  slider.dispatchEvent(new Event('input'));
  await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
  return {drawn: {...S.drawn}, render: S.timings.render,
          nodes: document.querySelectorAll('#graph .node').length,
          links: S.drawnLinks.map((l) => [l.source, l.target])};
})()"""


def test_real_model_sized_graph_renders_and_responds(browser, tmp_path):
    from wiremap.attribution.viewer.synthetic import synthetic_graph_json

    graph = synthetic_graph_json()  # ~1,000 features, 30 layers, 10 positions, edge budget
    n_features = sum(n["feature_type"] == "cross layer transcoder" for n in graph["nodes"])
    assert n_features > 950 and len(graph["links"]) > 10_000
    state = measure_big_graph(browser, write_html(graph, tmp_path / "big.html"))
    nodes, links = visible_counts(graph)
    assert state["drawn"] == {"nodes": nodes, "edges": links}
    assert state["nodes"] == nodes and state["segments"] == links
    assert state["timings"]["render"] > 0
    # hover lit the node's own links (all of them, drawn or not); click filled the panel
    shown = shown_ids(graph)
    own_in = sum(ln["target"] == state["node"] and ln["source"] in shown for ln in graph["links"])
    own_out = sum(ln["source"] == state["node"] and ln["target"] in shown for ln in graph["links"])
    assert state["lit"] == min(own_in, 300) + min(own_out, 300) > 0
    assert state["cleared"]  # leaving the node takes its links down again
    assert state["node"] in state["panel"] and "Strongest inputs" in state["panel"]
    # the ten logit boxes do not overlap (crowded, every other one is raised)
    boxes = browser.js(
        "[...document.querySelectorAll('#graph .node.logit rect')].map(r => {"
        " const b = r.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; })"
    )
    assert len(boxes) == 10
    for (l1, t1, r1, b1), (l2, t2, r2, b2) in itertools.combinations(boxes, 2):
        assert r1 <= l2 or r2 <= l1 or b1 <= t2 or b2 <= t1
    # prune slider at 1: every node, and links up to the viewer's cap
    nodes_all, links_all = visible_counts(graph, threshold=1.0)
    assert nodes_all == len(graph["nodes"])
    assert state["all"]["drawn"] == {"nodes": nodes_all, "edges": links_all}
    assert state["all"]["nodes"] == nodes_all
    # the drawn links are the first ones of the edge budget's order (by |weight|)
    assert {tuple(x) for x in state["all"]["links"]} == first_links(graph, links_all)
    print(
        f"\n1,000-feature graph: {nodes} nodes, {links} links drawn; ready "
        f"{state['timings']['ready']:.0f} ms, render {state['timings']['render']:.0f} ms, hover "
        f"{state['hover']:.1f} ms ({state['hoverFrame']:.1f} to the next frame), "
        f"click {state['click']:.1f} ms; all {nodes_all} nodes, {links_all} links: render "
        f"{state['all']['render']:.0f} ms"
    )
