"""Pruning a long-prompt attribution graph: sparse vs dense backend, measured in one run.

    python bench/prune.py                    # 8 layers, 400 positions, 4096 features
    python bench/prune.py --pos 1000 --features 8192 --no-dense

Each backend runs in its own subprocess so that peak RSS growth is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def synthetic_graph(n_layers: int, n_pos: int, n_feat: int, nnz_per_row: int, seed: int = 0):
    """A random DAG-shaped graph: each target reads only from lower layers or tokens."""
    from wiremap.attribution.graph import Graph

    g = torch.Generator().manual_seed(seed)
    layer = torch.randint(0, n_layers, (n_feat,), generator=g).sort().values
    pos = torch.randint(1, n_pos, (n_feat,), generator=g)
    feats = torch.stack([layer, pos, torch.arange(n_feat)], 1)
    n_err, n_log = n_layers * n_pos, 10
    n = n_feat + n_err + n_pos + n_log
    src_layer = torch.cat(
        [
            layer,
            torch.arange(n_layers).repeat_interleave(n_pos),
            torch.full((n_pos,), -1),
            torch.full((n_log,), 10**6),
        ]
    )
    order = torch.argsort(src_layer, stable=True)
    tgt_layer = torch.cat(
        [layer, torch.full((n_err + n_pos,), -(10**6)), torch.full((n_log,), n_layers)]
    )
    targets = torch.cat([torch.arange(n_feat), torch.arange(n - n_log, n)])
    n_allowed = torch.searchsorted(src_layer[order], tgt_layer[targets])
    targets, n_allowed = targets[n_allowed > 0], n_allowed[n_allowed > 0]
    rows = targets.repeat_interleave(nnz_per_row)
    pick = torch.rand(rows.numel(), generator=g) * n_allowed.repeat_interleave(nnz_per_row)
    cols = order[pick.long()]
    vals = torch.randn(rows.numel(), generator=g)
    adj = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n)).coalesce()
    probs = torch.rand(n_log, generator=g)
    probs = probs / probs.sum() * 0.95
    tokens = [str(i) for i in range(n_pos)]
    logits = [str(i) for i in range(n_log)]
    return Graph(
        "x", torch.arange(n_pos), tokens, feats, torch.rand(n_feat),
        torch.arange(n_log), probs, logits, adj, n_layers,
    )  # fmt: skip


def run_one(backend: str, args) -> dict:
    from wiremap.attribution.prune import prune_graph

    graph = synthetic_graph(args.layers, args.pos, args.features, args.edges_per_row)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = prune_graph(graph, backend=backend)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "backend": backend,
        "nodes": graph.n_nodes,
        "nnz": int(graph.adjacency._nnz()),
        "seconds": seconds,
        "rss_growth_mib": (peak - base) / 1024,
        "kept_nodes": int(result.node_mask.sum()),
        "kept_edges": int(result.n_edges),
        "scores": result.scores,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--pos", type=int, default=400)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--edges-per-row", type=int, default=300)
    p.add_argument("--no-dense", action="store_true", help="skip the dense backend")
    p.add_argument("--child", choices=["sparse", "dense"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args)))
        return
    results = {}
    for backend in ["sparse"] + ([] if args.no_dense else ["dense"]):
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child", backend],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[backend] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[backend]
        print(
            f"{backend:>6}: {r['nodes']} nodes, {r['nnz']} edges -> {r['seconds']:.2f} s, "
            f"peak RSS +{r['rss_growth_mib']:.0f} MiB, kept {r['kept_nodes']} nodes / "
            f"{r['kept_edges']} edges, scores {r['scores']}"
        )
    if "dense" in results:
        s, d = results["sparse"], results["dense"]
        print(
            f"dense/sparse: time x{d['seconds'] / s['seconds']:.1f}, "
            f"memory +{d['rss_growth_mib']:.0f} MiB vs +{s['rss_growth_mib']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
