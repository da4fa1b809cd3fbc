"""The viewer on a real-model-sized graph: file sizes and the page's own timings, with and
without the edge budget, measured in one run (needs Chromium, as
tests/attribution/test_viewer_browser.py).

    python bench/viewer.py                       # 1,000 features, 30 layers, 10 positions
    python bench/viewer.py --features 2000 --repeat 5

The synthetic graph (wiremap.attribution.viewer.synthetic) has the shape of SmolLM2-135M's
pruned graph for "The capital of France is" (995 features, ~220k edges). Each variant is
written as JSON and as a standalone HTML page, opened in headless Chromium, and timed with
performance.now() in the page: `ready` (navigation to first render done: parse + layout +
draw), `render` (one redraw), `hover` (the handler plus the style/layout it causes),
`hover→frame` (until the next frame is painted), `click` (the side panel). Medians of
--repeat page loads. Timings on a loaded machine are noisy: compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMED = ("ready", "render", "render all", "hover", "hover→frame", "click")
sys.path.insert(0, str(ROOT / "tests"))  # the DevTools client lives with the browser test


def variants(args) -> dict[str, dict]:
    from wiremap.attribution.viewer.synthetic import synthetic_graph, synthetic_graph_json

    graph = synthetic_graph(n_features=args.features, n_layers=args.layers, n_pos=args.pos)
    return {
        "budget (default)": synthetic_graph_json(graph),
        "no budget": synthetic_graph_json(graph, edges_per_node=None, max_edges=None),
    }


def measure(browser, page: Path, repeat: int) -> dict[str, float]:
    from test_viewer_browser import measure_big_graph

    runs = [measure_big_graph(browser, page) for _ in range(repeat)]
    pick = {
        "ready": lambda r: r["timings"]["ready"],
        "render": lambda r: r["timings"]["render"],
        "render all": lambda r: r["all"]["render"],
        "hover": lambda r: r["hover"],
        "hover→frame": lambda r: r["hoverFrame"],
        "click": lambda r: r["click"],
    }
    out = {k: statistics.median(f(r) for r in runs) for k, f in pick.items()}
    out["links drawn"] = runs[0]["all"]["drawn"]["edges"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", type=int, default=1000)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--pos", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    from test_viewer_browser import CHROMIUM, Browser

    from wiremap.attribution.html import write_html

    if CHROMIUM is None:
        sys.exit("needs Chromium (apt-get install -y chromium)")
    start = time.perf_counter()
    graphs = variants(args)
    print(f"graphs built and exported in {time.perf_counter() - start:.1f} s")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        browser = Browser(Path(tmp) / "profile")
        browser.send("Page.enable")
        try:
            for name, obj in graphs.items():
                json_path = Path(tmp) / "g.json"
                json_path.write_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
                page = write_html(obj, Path(tmp) / "g.html")
                n_feat = sum(n["feature_type"] == "cross layer transcoder" for n in obj["nodes"])
                rows[name] = {
                    "features": n_feat,
                    "links": len(obj["links"]),
                    "JSON MB": json_path.stat().st_size / 1e6,
                    "HTML MB": page.stat().st_size / 1e6,
                    **measure(browser, page, args.repeat),
                }
        finally:
            browser.close()
    report(rows)


def report(rows: dict[str, dict]) -> None:
    names = list(rows)
    keys = list(rows[names[0]])
    print(f"{'':<14}" + "".join(f"{n:>18}" for n in names) + f"{'ratio':>10}")
    for k in keys:
        a, b = (rows[n][k] for n in names)
        ratio = f"{b / a:>10.1f}" if a else f"{'':>10}"
        unit = " ms" if k in TIMED else ""
        print(f"{k + unit:<14}" + "".join(f"{rows[n][k]:>18,.2f}" for n in names) + ratio)
    print("(ratio = no budget / budget; ms are medians of the page's performance.now())")


if __name__ == "__main__":
    main()
