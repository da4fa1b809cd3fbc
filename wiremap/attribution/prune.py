"""Influence, pruning and scores of an attribution graph (DESIGN.md §7).

    result = prune_graph(graph, node_threshold=0.8, edge_threshold=0.98)
    result.node_mask                 # [N] bool, nodes kept
    result.adjacency                 # pruned signed adjacency (kept edges only)
    result.scores["full"], result.scores["pruned"]   # {"replacement": x, "completeness": y}
    prune_graph(graph, node_pool="features")         # wiremap's earlier node rule (see below)
    graph_scores(graph)                              # scores of the full graph
    graph_scores(graph, keep_nodes=[3, 17, 40])      # scores of a pinned subgraph

Â = |A| with rows normalised to sum 1, w = logit probabilities on the logit nodes, and the
influence I = w(Â + Â² + …) by power iteration (the graph is a DAG, so the iteration ends
exactly after at most depth steps). Everything runs on one of two interchangeable backends:
a dense N×N matrix for small graphs and (rows, cols, values) triplets with scatter-adds
for large ones, so long prompts never materialise or sort an N×N matrix.

Node pool. The node threshold is a share of the influence summed over a pool of nodes.
With `node_pool="all"` (the default) the pool is every node, tokens included, exactly as
circuit-tracer's `prune_graph` does: same thresholds, same nodes and edges. With
`node_pool="features"` (wiremap's earlier rule) it is the feature and error nodes only;
token influence no longer counts towards the threshold, so the same threshold keeps more
features (a superset). Tokens and logits are always kept; the edge rule is the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from wiremap.attribution.graph import Graph, coo_triplets
from wiremap.errors import WiremapError

# Past this many nodes the auto backend works on sparse triplets (a dense 2048² float32
# matrix is 16 MiB; sorting every entry of a larger one is what runs out of memory).
DENSE_MAX_NODES = 2048
Backend = Literal["auto", "dense", "sparse"]
NodePool = Literal["all", "features"]
NODE_POOLS = ("all", "features")


# ---- two backends with one interface -------------------------------------------------------
class DenseMatrix:
    """An N×N matrix held densely."""

    def __init__(self, m: Tensor) -> None:
        self.m = m

    @property
    def n(self) -> int:
        return self.m.shape[0]

    def abs_normalised(self) -> DenseMatrix:
        a = self.m.abs()
        sums = a.sum(1, keepdim=True)
        # rows that sum to zero (tokens, errors) stay zero
        return DenseMatrix(torch.where(sums > 0, a / sums.clamp_min(1e-30), 0.0))

    def vecmat(self, x: Tensor) -> Tensor:
        return x @ self.m

    def restrict(self, keep: Tensor) -> DenseMatrix:
        return DenseMatrix(self.m * keep[:, None] * keep[None, :])

    def scale_rows(self, v: Tensor) -> DenseMatrix:
        return DenseMatrix(self.m * v[:, None])

    def values(self) -> Tensor:
        return self.m.reshape(-1)

    def where_values(self, mask: Tensor) -> DenseMatrix:
        return DenseMatrix(self.m * mask.reshape(self.m.shape))

    def row_sum_over(self, cols: Tensor) -> Tensor:
        return self.m @ cols.to(self.m.dtype)

    def row_nnz(self) -> Tensor:
        return (self.m != 0).sum(1)

    def col_nnz(self) -> Tensor:
        return (self.m != 0).sum(0)

    def fold_columns(self, src: Tensor, dst: Tensor) -> DenseMatrix:
        m = self.m.clone()
        m.index_add_(1, dst, m[:, src])
        m[:, src] = 0
        m[src, :] = 0
        return DenseMatrix(m)

    def to_tensor(self) -> Tensor:
        return self.m


class SparseMatrix:
    """An N×N matrix held as (rows, cols, values) triplets with unique (row, col) pairs."""

    def __init__(self, rows: Tensor, cols: Tensor, vals: Tensor, n: int) -> None:
        self.rows, self.cols, self.vals, self._n = rows, cols, vals, n

    @classmethod
    def summed(cls, rows: Tensor, cols: Tensor, vals: Tensor, n: int) -> SparseMatrix:
        """From triplets that may repeat a (row, col): repeated entries are summed, signed."""
        m = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n)).coalesce()
        r, c = m.indices()
        return cls(r, c, m.values(), n)

    @property
    def n(self) -> int:
        return self._n

    def _like(self, vals: Tensor, keep: Tensor | None = None) -> SparseMatrix:
        if keep is None:
            return SparseMatrix(self.rows, self.cols, vals, self.n)
        return SparseMatrix(self.rows[keep], self.cols[keep], vals[keep], self.n)

    def abs_normalised(self) -> SparseMatrix:
        a = self.vals.abs()
        sums = torch.zeros(self.n, dtype=a.dtype, device=a.device).index_add_(0, self.rows, a)
        return self._like(a / sums[self.rows].clamp_min(1e-30))

    def vecmat(self, x: Tensor) -> Tensor:
        out = torch.zeros(self.n, dtype=x.dtype, device=x.device)
        return out.index_add_(0, self.cols, self.vals * x[self.rows])

    def restrict(self, keep: Tensor) -> SparseMatrix:
        return self._like(self.vals, keep[self.rows] & keep[self.cols])

    def scale_rows(self, v: Tensor) -> SparseMatrix:
        return self._like(self.vals * v[self.rows])

    def values(self) -> Tensor:
        return self.vals

    def where_values(self, mask: Tensor) -> SparseMatrix:
        return self._like(self.vals, mask)

    def row_sum_over(self, cols: Tensor) -> Tensor:
        out = torch.zeros(self.n, dtype=self.vals.dtype, device=self.vals.device)
        return out.index_add_(0, self.rows, self.vals * cols[self.cols])

    def row_nnz(self) -> Tensor:
        return torch.bincount(self.rows[self.vals != 0], minlength=self.n)

    def col_nnz(self) -> Tensor:
        return torch.bincount(self.cols[self.vals != 0], minlength=self.n)

    def fold_columns(self, src: Tensor, dst: Tensor) -> SparseMatrix:
        col_map = torch.arange(self.n, device=self.cols.device)
        col_map[src] = dst
        dropped = torch.zeros(self.n, dtype=torch.bool, device=self.rows.device)
        dropped[src] = True
        keep = ~dropped[self.rows]
        indices = torch.stack([self.rows[keep], col_map[self.cols[keep]]])
        # coalesce sums the folded entries that now share (row, error column)
        m = torch.sparse_coo_tensor(
            indices, self.vals[keep], (self.n, self.n), check_invariants=False
        )
        m = m.coalesce()
        rows, cols = m.indices()
        return SparseMatrix(rows, cols, m.values(), self.n)

    def to_tensor(self) -> Tensor:
        indices = torch.stack([self.rows, self.cols])
        # Triplets always come from a coalesced tensor or a row-major nonzero(), and
        # filtering keeps their order, so they are already sorted and unique.
        return torch.sparse_coo_tensor(
            indices, self.vals, (self.n, self.n), is_coalesced=True, check_invariants=False
        )


Matrix = DenseMatrix | SparseMatrix


def as_matrix(adjacency: Tensor, backend: Backend = "auto") -> Matrix:
    """Wrap an adjacency (dense, COO or CSR) in the backend asked for, in float32."""
    if backend not in ("auto", "dense", "sparse"):
        raise WiremapError(f"unknown backend {backend!r}; choose auto, dense or sparse")
    n = adjacency.shape[0]
    dense_input = adjacency.layout == torch.strided
    if backend == "dense" or (backend == "auto" and dense_input and n <= DENSE_MAX_NODES):
        m = adjacency if dense_input else adjacency.to_dense()
        return DenseMatrix(m.float())
    rows, cols, vals = coo_triplets(adjacency)
    return SparseMatrix(rows, cols, vals.float(), n)


# ---- influence ---------------------------------------------------------------------------
def logit_weights(graph: Graph, device: torch.device | None = None) -> Tensor:
    """w: [N] logit probabilities on the logit nodes, zero elsewhere."""
    w = torch.zeros(graph.n_nodes, device=device or graph.logit_probs.device)
    w[graph.logit_slice] = graph.logit_probs.float().to(w.device)
    return w


def influence(normalised: Matrix, w: Tensor) -> Tensor:
    """I = w(Â + Â² + …): each node's total (abs, normalised) effect on the weighted logits."""
    x, total = w, torch.zeros_like(w)
    for _ in range(normalised.n + 1):
        x = normalised.vecmat(x)
        # In a DAG, w·Âᵏ is exactly zero once k exceeds the depth (0·finite = 0).
        if not bool(x.any()):
            return total
        total += x
    raise WiremapError(
        "the adjacency has a cycle (influence did not vanish after N steps); an attribution "
        "graph must only link sources at lower layers or earlier positions to their targets"
    )


def cutoff(scores: Tensor, threshold: float) -> float:
    """Score of the entry at which the descending cumulative sum first reaches threshold·total.

    Keeping `scores >= cutoff` keeps the shortest prefix reaching the threshold (plus ties).
    """
    total = scores.sum()
    if total <= 0:
        return float("inf")
    ordered = scores.sort(descending=True).values
    cum = ordered.cumsum(0) / total
    target = torch.tensor([threshold], dtype=cum.dtype, device=cum.device)
    i = int(torch.searchsorted(cum, target).clamp_max(len(ordered) - 1))
    return float(ordered[i])


def cumulative_fraction(scores: Tensor) -> Tensor:
    """For each entry, the share of the total held by it and every entry ranked above it."""
    order = torch.argsort(scores, descending=True, stable=True)
    total = scores.sum()
    cum = scores[order].cumsum(0) / (total if total > 0 else 1.0)
    out = torch.empty_like(cum)
    out[order] = cum
    return out


def edge_scores(normalised: Matrix, w: Tensor) -> Tensor:
    """`Â[t,s]·(I_t + w_t)` of every stored entry of a row-normalised matrix (its order)."""
    return normalised.scale_rows(influence(normalised, w) + w).values()


# ---- scores ------------------------------------------------------------------------------
def scores_of(
    normalised: Matrix, infl: Tensor, w: Tensor, is_token: Tensor, is_error: Tensor
) -> dict[str, float]:
    """Replacement and completeness (DESIGN.md §7) from Â, I, w and [N] bool node masks."""
    tokens, errors = infl[is_token].sum(), infl[is_error].sum()
    replacement = tokens / (tokens + errors) if tokens + errors > 0 else torch.tensor(0.0)
    non_error = 1.0 - normalised.row_sum_over(is_error.to(infl.dtype))
    out = infl + w
    completeness = (non_error * out).sum() / out.sum() if out.sum() > 0 else torch.tensor(0.0)
    return {"replacement": float(replacement), "completeness": float(completeness)}


def _scores(graph: Graph, normalised: Matrix, infl: Tensor, w: Tensor) -> dict[str, float]:
    is_token = torch.zeros(graph.n_nodes, dtype=torch.bool, device=w.device)
    is_token[graph.token_slice] = True
    is_error = torch.zeros_like(is_token)
    is_error[graph.error_slice] = True
    return scores_of(normalised, infl, w, is_token, is_error)


def node_mask_from(graph: Graph, keep_nodes: Tensor | Iterable[int]) -> Tensor:
    """A [N] bool mask from a bool mask or node indices."""
    keep = torch.as_tensor(keep_nodes if isinstance(keep_nodes, Tensor) else list(keep_nodes))
    if keep.dtype == torch.bool:
        if keep.shape != (graph.n_nodes,):
            raise WiremapError(f"keep_nodes mask has shape {tuple(keep.shape)}, need (N,)")
        return keep
    keep = keep.long().reshape(-1)
    if keep.numel() and (keep.min() < 0 or keep.max() >= graph.n_nodes):
        raise WiremapError(f"keep_nodes has indices outside 0..{graph.n_nodes - 1}")
    mask = torch.zeros(graph.n_nodes, dtype=torch.bool)
    mask[keep] = True
    return mask


def graph_scores(
    graph: Graph, keep_nodes: Tensor | Iterable[int] | None = None, backend: Backend = "auto"
) -> dict[str, float]:
    """Replacement and completeness scores of the graph, or of the subgraph `keep_nodes`.

    For a subgraph, each feature not kept has its outgoing effect folded into the error node
    at its (layer, pos), i.e. it counts as unexplained. Errors, tokens and logits are always
    part of the computation, whatever `keep_nodes` says.
    """
    matrix = as_matrix(graph.adjacency, backend)
    if keep_nodes is not None:
        keep = node_mask_from(graph, keep_nodes).to(graph.active_features.device)
        removed = (~keep[graph.feature_slice]).nonzero().reshape(-1)
        dst = graph.feature_error_indices()[removed]
        matrix = matrix.fold_columns(_on(removed, matrix), _on(dst, matrix))
    normalised = matrix.abs_normalised()
    w = logit_weights(graph, _device(matrix))
    return _scores(graph, normalised, influence(normalised, w), w)


# ---- pruning -----------------------------------------------------------------------------
@dataclass
class PruneResult:
    """What `prune_graph` keeps, with the influence it ranked by and the scores."""

    node_mask: Tensor  # [N] bool: nodes kept
    adjacency: Tensor  # [N, N] signed raw A on kept edges only (dense or sparse COO)
    influence: Tensor  # [N] influence I of each node on the full graph
    cumulative_influence: Tensor  # [N] rank fraction of I within the node pool (lower = stronger)
    scores: dict[str, dict[str, float]]  # {"full": {...}, "pruned": {...}}
    settings: dict[str, float | str] = field(default_factory=dict)  # thresholds and node pool

    def edges(self) -> tuple[Tensor, Tensor, Tensor]:
        """(targets, sources, weights) of the kept edges."""
        return coo_triplets(self.adjacency)

    @property
    def n_edges(self) -> int:
        return int(self.edges()[0].numel())


def _feature_error_mask(graph: Graph, device: torch.device) -> Tensor:
    mask = torch.zeros(graph.n_nodes, dtype=torch.bool, device=device)
    mask[: graph.error_slice.stop] = True
    return mask


def prune_nodes(
    graph: Graph, infl: Tensor, node_threshold: float, pool: NodePool = "all"
) -> Tensor:
    """Keep the nodes whose influence reaches the cutoff of `node_threshold` of the pool's
    total (the pool: every node, or feature/error nodes only); tokens and logits always."""
    prunable = _feature_error_mask(graph, infl.device)
    if pool == "all":  # circuit-tracer: cumulate over every node, keep all >= the cutoff
        keep = infl >= cutoff(infl, node_threshold)
    else:
        scores = torch.where(prunable, infl, 0.0)
        keep = (scores >= cutoff(scores, node_threshold)) & (scores > 0)
    return keep | ~prunable


def prune_edges(
    graph: Graph, matrix: Matrix, node_mask: Tensor, w: Tensor, edge_threshold: float
) -> tuple[Matrix, Tensor]:
    """Edge score Â'[t,s]·(I'_t + w_t) on the node-pruned graph; keep edges up to the threshold.

    Then repeatedly drop features with no kept incoming or outgoing edge and errors with no
    kept outgoing edge (errors have no inputs) until nothing changes.
    """
    sub = matrix.restrict(node_mask)
    scores = edge_scores(sub.abs_normalised(), w)
    kept = sub.where_values((scores >= cutoff(scores, edge_threshold)) & (scores > 0))
    prunable = _feature_error_mask(graph, node_mask.device)
    needs_input = torch.zeros_like(prunable)
    needs_input[graph.feature_slice] = True
    while True:
        connected = (kept.col_nnz() > 0) & ((kept.row_nnz() > 0) | ~needs_input)
        new_mask = node_mask & (connected | ~prunable)
        if torch.equal(new_mask, node_mask):
            return kept, node_mask
        node_mask = new_mask
        kept = kept.restrict(node_mask)


def node_cumulative_influence(
    graph: Graph, infl: Tensor, w: Tensor, pool: NodePool = "all"
) -> Tensor:
    """Rank fraction per node (lower = stronger), ranked within the pruning's node pool.

    "all": every node ranked together by I (circuit-tracer's `influence` field); "features":
    features+errors ranked together by I, tokens by I, logits by w.
    """
    if pool == "all":
        return cumulative_fraction(infl)
    out = torch.ones_like(infl)
    fe = slice(0, graph.error_slice.stop)
    out[fe] = cumulative_fraction(infl[fe])
    out[graph.token_slice] = cumulative_fraction(infl[graph.token_slice])
    out[graph.logit_slice] = cumulative_fraction(w[graph.logit_slice])
    return out


def check_thresholds(node_threshold: float, edge_threshold: float) -> None:
    """WiremapError unless both thresholds lie in (0, 1] (cheap: call before attributing)."""
    for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 < t <= 1.0:
            raise WiremapError(
                f"{name}={t} is outside (0, 1]; use e.g. 0.8 for nodes, 0.98 for edges"
            )


def prune_graph(
    graph: Graph,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    backend: Backend = "auto",
    node_pool: NodePool = "all",
) -> PruneResult:
    """Prune nodes by influence, then edges by edge score; score the full and pruned graphs.

    `node_pool`: what the node threshold is a share of (module doc): "all" nodes, as
    circuit-tracer does (default), or "features" (feature and error nodes only).
    """
    if node_pool not in NODE_POOLS:
        raise WiremapError(f"node_pool={node_pool!r}: choose 'all' (circuit-tracer) or 'features'")
    check_thresholds(node_threshold, edge_threshold)
    matrix = as_matrix(graph.adjacency, backend)
    if not bool(torch.isfinite(matrix.values()).all()):
        raise WiremapError("the adjacency holds NaN or inf; re-run the attribution in float32")
    w = logit_weights(graph, _device(matrix))
    normalised = matrix.abs_normalised()
    infl = influence(normalised, w)
    node_mask = prune_nodes(graph, infl, node_threshold, node_pool)
    kept, node_mask = prune_edges(graph, matrix, node_mask, w, edge_threshold)
    scores = {
        "full": _scores(graph, normalised, infl, w),
        "pruned": graph_scores(graph, node_mask, backend),
    }
    return PruneResult(
        node_mask=node_mask,
        adjacency=kept.to_tensor(),
        influence=infl,
        cumulative_influence=node_cumulative_influence(graph, infl, w, node_pool),
        scores=scores,
        settings={
            "node_threshold": node_threshold,
            "edge_threshold": edge_threshold,
            "node_pool": node_pool,
        },
    )


def _device(matrix: Matrix) -> torch.device:
    return matrix.m.device if isinstance(matrix, DenseMatrix) else matrix.vals.device


def _on(t: Tensor, matrix: Matrix) -> Tensor:
    return t.to(_device(matrix))
