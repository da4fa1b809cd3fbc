"""Cost of head loadings and QK attributions, relative to the graph's own attribution.

    python bench/attention.py                  # 32 tokens, 1,000 edges
    python bench/attention.py --threads 1 --edges 1000 --tokens 64 --budget 2000

Model and transcoders as in bench/attribute.py (random 8-layer Llama, d_model 256, TopK
PLT with 4096 features per layer). In one process: the attribution graph of the prompt
(timed), its pruning, the head loadings of the pruned graph's `--edges` strongest edges
(`head_loadings_batch`), one QK attribution (last layer, last query position: the most
nodes), and `heads_block` (what `wiremap attribute --heads` adds: loadings
plus QK pairs of the top heads of the 20 strongest edges). Times are wall-clock seconds
after a warm-up; the load average is printed because the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from attribute import _prompt, _setup  # noqa: E402  (bench/attribute.py: same model)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(root: Path, n_edges: int, n_tokens: int, budget: int | None, threads: int | None):
    import torch

    from wiremap.attribution.attention import (
        head_loadings_batch,
        heads_block,
        qk_attribution,
        strongest_edges,
    )
    from wiremap.attribution.attribute import attribute
    from wiremap.attribution.export import graph_to_json
    from wiremap.attribution.prune import prune_graph

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    rm = _setup(root)
    prompt = _prompt(rm, n_tokens)
    warm = attribute(_prompt(rm, 8), rm, verbose=False)  # allocator, first-call overheads
    head_loadings_batch(rm, warm, strongest_edges(prune_graph(warm), 5))
    graph, t_graph = _timed(lambda: attribute(prompt, rm, max_feature_nodes=budget, verbose=False))
    result = prune_graph(graph)  # the default thresholds, as `wiremap attribute`
    pairs = strongest_edges(result, n_edges)
    loads, t_heads = _timed(lambda: head_loadings_batch(rm, graph, pairs))
    scale = max(abs(x.edge) for x in loads)
    err = max(abs(x.total - x.edge) for x in loads) / scale
    # the most nodes: last layer, last query position, a key halfway
    layer, head, q_pos, k_pos = graph.n_layers - 1, 0, graph.n_pos - 1, graph.n_pos // 2
    qk, t_qk = _timed(lambda: qk_attribution(rm, graph, layer, head, q_pos, k_pos))
    links = graph_to_json(graph, result=result, edges_per_node=None, max_edges=None)["links"]
    block, t_block = _timed(lambda: heads_block(rm, graph, links, n_edges=n_edges))
    print(
        f"{graph.n_pos} tokens, {graph.n_features} feature nodes, {result.n_edges} pruned "
        f"edges, threads="
        f"{torch.get_num_threads()}, load={os.getloadavg()[0]:.1f}\n"
        f"  attribution graph:            {t_graph:7.2f} s\n"
        f"  head loadings, {len(loads):>5} edges:   {t_heads:7.2f} s  "
        f"({t_heads / t_graph:.2f}x the graph; max |heads+residual-edge| {err:.1e} x max|edge|)\n"
        f"  one QK attribution:           {t_qk:7.2f} s  ({t_qk / t_graph:.3f}x; "
        f"{len(qk.query_nodes)} x {len(qk.key_nodes)} pairs)\n"
        f"  heads block (--heads {n_edges}):    {t_block:7.2f} s  ({t_block / t_graph:.2f}x; "
        f"{len(block['edges'])} edges, QK of {len(block['qk'])} heads)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", type=int, default=1000, help="edges whose heads are split")
    parser.add_argument("--tokens", type=int, default=32, help="prompt length")
    parser.add_argument("--budget", type=int, default=None, help="max_feature_nodes")
    parser.add_argument("--root", default=None, help="folder for the model (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="wiremap-bench-"))
    run(root, args.edges, args.tokens, args.budget, args.threads)


if __name__ == "__main__":
    main()
