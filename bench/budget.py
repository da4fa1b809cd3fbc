"""Which features does a budget keep? Visiting orders compared against the uncapped graph.

    python bench/budget.py --transcoders wiremap_out/demo/clt          # the organism
    python bench/budget.py --model <smollm2 .gguf> --transcoders <plt folder> \\
        --prompt "The capital of France is" --budgets 250 500 1000

For a prompt, the uncapped graph (every active feature visited) gives each feature's
influence on the logits (DESIGN.md §7). Then for each budget N and each visiting order the
capped graph is built, and the table shows:
- overlap@N: the share of the top-N features by uncapped influence that the order kept;
- infl kept: the share of the uncapped graph's total feature influence held by the kept ones;
- the capped graph's replacement / completeness scores (unvisited features count as error)
  and those of its pruned graph (node 0.8, edge 0.98);
- seconds and backward passes.
Orders: `direct` ranks once by direct effect on the logits; `per batch` re-ranks by
influence through the rows computed so far after every batch of `--batch-size`;
`default` re-ranks after every batch or every budget/4 visits, whichever is sooner (what
`attribute` does); `batch/4` after every quarter batch (smaller batches, more passes).
Timings are from one run on a possibly busy machine: compare within a row group.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

ORDERS = {"direct": 0, "per batch": "batch", "default": None, "batch/4": "quarter"}


def load(args):
    from wiremap.models.replacement import ReplacementModel

    if args.model is None:  # the organism, with the demo's transcoders
        from wiremap.demo import DALLAS, replacement_model
        from wiremap.models.organism import load_organism, organism_path

        model, tokenizer = load_organism()
        rm = replacement_model(model, tokenizer, str(organism_path()), args.transcoders)
        return rm, args.prompt or DALLAS
    rm = ReplacementModel.from_pretrained(args.model, args.transcoders, check_model_name=False)
    return rm, args.prompt or "The capital of France is"


def uncapped_influence(graph) -> torch.Tensor:
    """[n_feat] influence of every feature in the uncapped graph."""
    from wiremap.attribution.prune import as_matrix, influence, logit_weights

    normalised = as_matrix(graph.adjacency).abs_normalised()
    return influence(normalised, logit_weights(graph))[graph.feature_slice]


def compare(rm, prompt: str, budgets: list[int], batch_size: int) -> None:
    from wiremap.attribution.attribute import attribute
    from wiremap.attribution.prune import graph_scores, prune_graph

    start = time.perf_counter()
    full = attribute(prompt, rm, verbose=False, batch_size=batch_size)
    full_s = time.perf_counter() - start
    infl = uncapped_influence(full)
    key = {tuple(f): i for i, f in enumerate(full.active_features.tolist())}
    sc = graph_scores(full)
    print(
        f"prompt {prompt!r}: {full.n_pos} tokens, {full.n_features} active features; uncapped: "
        f"{full.settings['n_backward_passes']} passes, {full_s:.1f} s, replacement "
        f"{sc['replacement']:.3f}, completeness {sc['completeness']:.3f}; "
        f"load {os.getloadavg()[0]:.1f}"
    )
    head = f"{'N':>6} {'order':>10} {'overlap@N':>9} {'infl kept':>9} {'repl':>6} {'compl':>6} "
    print(head + f"{'pruned r/c':>12} {'seconds':>8} {'passes':>6}")
    for n in budgets:
        top = set(infl.topk(min(n, infl.numel())).indices.tolist())
        for name, every in ORDERS.items():
            every = {"batch": batch_size, "quarter": max(1, batch_size // 4)}.get(every, every)
            start = time.perf_counter()
            g = attribute(
                prompt, rm, verbose=False, max_feature_nodes=n, batch_size=batch_size,
                rerank_every=every,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            kept = [key[tuple(f)] for f in g.active_features.tolist()]
            overlap = len(top.intersection(kept)) / max(len(top), 1)
            share = float(infl[kept].sum() / infl.sum())
            s, p = graph_scores(g), prune_graph(g).scores["pruned"]
            print(
                f"{n:>6} {name:>10} {overlap:>9.3f} {share:>9.3f} {s['replacement']:>6.3f} "
                f"{s['completeness']:>6.3f} {p['replacement']:>5.3f}/{p['completeness']:.3f} "
                f"{seconds:>8.1f} {g.settings['n_backward_passes']:>6}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model (default: the organism)")
    parser.add_argument("--transcoders", required=True, help="exported transcoders folder")
    parser.add_argument("--prompt", default=None, help="prompt (default: per model)")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="feature budgets")
    parser.add_argument("--batch-size", type=int, default=256, help="targets per backward pass")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rm, prompt = load(args)
    n_feat = rm.run(rm.tokenize(prompt)).activations.coalesce().values().ne(0).sum()
    budgets = args.budgets or [max(1, int(n_feat) // d) for d in (16, 8, 4)]
    compare(rm, prompt, budgets, args.batch_size)


if __name__ == "__main__":
    main()
