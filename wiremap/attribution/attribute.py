"""Attribution graphs with exact edges (DESIGN.md §6).

    rm = ReplacementModel.from_pretrained("path/to/model", "path/to/transcoders")
    graph = attribute("The capital of France is", rm, max_feature_nodes=2000)
    graph.adjacency[graph.logit_slice]       # direct effects on the logit targets

Every edge is `A[t, s] = ⟨∂pre_t/∂(residual write of s), write of s⟩` in the frozen model
(attention patterns, norm scales and MLP outputs held at their values on the prompt), so
the graph is exact: adding a source's write in the frozen model changes each target by its
column, and with biases removed each row sums to its target's value.

How the rows are computed: one forward pass of the frozen model (batch 1) on the prefix
that the batch needs, then one batched vector–Jacobian product (`is_grads_batched`) that
carries many targets at once — each target's encoder row (or logit direction) is the
gradient at its own (layer, pos) — and a contraction of the resulting residual gradients
with every source's write. Rows are visited sorted by (layer, pos), so a batch runs back
only through the layers below its targets and over the positions up to theirs; no batch of
an uncapped graph spans two layers (`layer_batches`).

With `max_feature_nodes`, features are visited best-first: after the logit rows, the
unvisited features with the largest influence on the logits (DESIGN.md §7, computed from
the rows so far) are taken a batch at a time. The features never visited are not nodes;
their edges are folded into the error node at their (layer, pos), so each row still sums
to its target's value.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from wiremap.attribution.graph import Graph
from wiremap.attribution.memory import (
    CHUNK_ELEMENTS,
    DENSE_MAX_NODES,
    GraphCounts,
    check_clean_pass,
    free_bytes,
    oom_guard,
    plan_memory,
)
from wiremap.attribution.renamed import renamed_keywords
from wiremap.attribution.sources import SourceTable
from wiremap.attribution.targets import LogitTargets, select_targets
from wiremap.errors import WiremapError
from wiremap.models.frozen import FrozenModel
from wiremap.models.threads import ThreadGovernor, threads_for_load

FINAL = -1  # site of the logit targets: the final norm's output


@dataclass
class _Targets:
    """A batch of targets: each reads `vectors[i]` at (site[i], pos[i])."""

    site: Tensor  # [B] layer of the read, or FINAL
    pos: Tensor  # [B]
    vectors: Tensor  # [B, d]


class RowEngine:
    """Computes adjacency rows for batches of targets through one frozen model."""

    def __init__(self, lin: FrozenModel, table: SourceTable, threads: ThreadGovernor | None = None):
        self.lin, self.table, self.threads = lin, table, threads
        self.n_backward = 0

    def rows(self, targets: _Targets, out: Tensor | None = None) -> Tensor:
        """[B, n_cols] edges from every source to each target (written into `out` if given)."""
        if self.threads is not None:
            self.threads.refresh()  # the load may have changed since the last batch
        n_pos = int(targets.pos.max()) + 1
        top = self.lin.n_layers if bool((targets.site == FINAL).any()) else int(targets.site.max())
        ids = self.lin.input_ids[:, :n_pos]
        d = self.table.tokens.shape[-1]
        dtype = self.table.tokens.dtype
        embed = torch.zeros(1, n_pos, d, dtype=dtype, device=ids.device, requires_grad=True)
        writes = {
            layer: torch.zeros(1, n_pos, d, dtype=dtype, device=ids.device, requires_grad=True)
            for layer in range(top)
        }
        stop = None if top == self.lin.n_layers else top
        with torch.enable_grad():
            run = self.lin.forward(ids, writes=writes, embed_write=embed, stop_after=stop)
            outputs, grads = self._injections(run, targets, n_pos)
            leaves = [embed, *writes.values()]
            got = torch.autograd.grad(
                outputs, leaves, grads, is_grads_batched=True, allow_unused=True
            )
        self.n_backward += 1
        g_embed = got[0][:, 0]
        g_writes = [None if g is None else g[:, 0] for g in got[1:]]
        if out is not None and out.device != g_embed.device:
            out.copy_(self.table.contract(g_embed, g_writes, n_pos))
            return out
        return self.table.contract(g_embed, g_writes, n_pos, out)

    @staticmethod
    def _injections(run, targets: _Targets, n_pos: int) -> tuple[list[Tensor], list[Tensor]]:
        outputs, grads = [], []
        batch = targets.site.numel()
        rows = torch.arange(batch, device=targets.pos.device)
        for site in torch.unique(targets.site).tolist():
            out = run.final if site == FINAL else run.reads[site]
            mine = targets.site == site
            g = out.new_zeros(batch, *out.shape)  # [B, 1, n_pos, d]
            g[rows[mine], 0, targets.pos[mine]] = targets.vectors[mine].to(out.dtype)
            outputs.append(out)
            grads.append(g)
        return outputs, grads


def attribute(
    prompt: str,
    model,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    target_tokens: list[str | int] | None = None,
    target_directions=None,
    max_feature_nodes: int | None = None,
    target_batch: int | None = None,
    include_bos: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    memory_limit: int | None = None,
    rerank_every: int | None = None,
    verbose: bool = False,
    batch_size: int | None = None,
    zero_bos: bool | None = None,
) -> Graph:
    """The attribution graph of `prompt` under the replacement model `model` (module docstring).

    `target_batch`: targets per backward pass. `include_bos`: features and errors at the
    first position (BOS) are sources too (by default they are not: DESIGN.md §6).
    `batch_size` / `zero_bos` are the old names (`zero_bos = not include_bos`), accepted
    for this version with a DeprecationWarning.
    `max_feature_nodes` / `target_batch` None: chosen to fit in memory (`memory.py`), which
    is what is free on the device and host, or `memory_limit` bytes when given. The plan
    is in `graph.settings["memory"]`. With a budget, features are visited best-first and
    re-ranked after every `rerank_every` visits (None: every batch, or often enough that
    the budget is re-ranked 4 times; 0: ranked once, by direct effects on the logits).
    It runs where `model` is; `device` / `dtype` move it for this call only (it is put
    back as it was). `verbose`: progress on stderr (off by default). Intra-op threads are
    fitted to the idle cores while it runs (`models/threads.py`; `WIREMAP_THREADS=N` fixes
    them) and restored to the caller's count afterwards.
    """
    target_batch, include_bos = renamed_keywords(
        "attribute", target_batch, include_bos, batch_size=batch_size, zero_bos=zero_bos
    )
    with threads_for_load() as threads, _moved(model, device, dtype) as rm:
        return _attribute(
            prompt,
            rm,
            max_n_logits=max_n_logits,
            desired_logit_prob=desired_logit_prob,
            target_tokens=target_tokens,
            target_directions=target_directions,
            max_feature_nodes=max_feature_nodes,
            target_batch=target_batch,
            include_bos=include_bos,
            memory_limit=memory_limit,
            rerank_every=rerank_every,
            verbose=verbose,
            threads=threads,
        )


def _attribute(
    prompt: str,
    rm,
    *,
    max_n_logits: int,
    desired_logit_prob: float,
    target_tokens: list[str | int] | None,
    target_directions,
    max_feature_nodes: int | None,
    target_batch: int | None,
    include_bos: bool,
    memory_limit: int | None,
    rerank_every: int | None,
    verbose: bool,
    threads: ThreadGovernor | None = None,
) -> Graph:
    start = time.perf_counter()
    if target_batch is not None and target_batch < 1:
        raise WiremapError(f"target_batch={target_batch}; use a positive number of targets")
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise WiremapError(f"max_feature_nodes={max_feature_nodes}; use a non-negative number")
    ids = rm.tokenize(prompt)
    host_free, device_free = _free_memory(rm, memory_limit)
    check_clean_pass(rm, len(ids), device_free or host_free)
    with oom_guard(None, "the clean pass"):
        run = rm.run(ids)
        targets = select_targets(
            rm,
            run.logits[-1],
            max_n_logits=max_n_logits,
            desired_logit_prob=desired_logit_prob,
            target_tokens=target_tokens,
            target_directions=target_directions,
        )
        table = SourceTable.build(rm, run, include_bos=include_bos)
    del run
    _log(verbose, f"{len(ids)} tokens, {table.n_features} active features, {len(targets)} logits")
    counts = GraphCounts.from_table(rm, table, len(targets))
    plan = plan_memory(
        counts,
        budget=max_feature_nodes,
        target_batch=target_batch,
        host_free=host_free,
        device_free=device_free,
    )
    _log(verbose and plan.note is not None, str(plan.note))
    with oom_guard(plan):
        graph, n_backward = _compute(
            rm, prompt, ids, table, targets, plan, rerank_every, verbose, threads
        )
    options = dict(
        max_n_logits=max_n_logits,
        desired_logit_prob=desired_logit_prob,
        max_feature_nodes=plan.max_feature_nodes,
        # "batch_size": the name of this setting in Neuronpedia's generation_settings
        batch_size=plan.target_batch,
        rerank_every=rerank_every,
        include_bos=include_bos,
    )
    seconds = time.perf_counter() - start
    graph.settings = _settings(rm, table, options, n_backward, seconds)
    graph.settings["memory"] = plan.as_settings()
    if threads is not None:
        graph.settings["threads"] = threads.threads
    _log(verbose, f"done: {n_backward} backward passes, {graph.settings['seconds']:.2f} s")
    return graph


def _compute(
    rm, prompt, ids, table, targets, plan, rerank_every, verbose, threads=None
) -> tuple[Graph, int]:
    budget = plan.max_feature_nodes
    # uncapped graphs of moderate size are written straight into a dense adjacency
    dense = _dense_buffer(table, len(targets), budget)
    with rm.frozen(ids) as lin:
        engine = RowEngine(lin, table, threads)
        logit_rows = engine.rows(_logit_targets(targets, len(ids)))
        out = None if dense is None else dense[: table.n_features, : table.n_cols]
        visited, feature_rows = _visit_features(
            engine, rm, table, targets, logit_rows, plan, rerank_every, verbose, out
        )
    if dense is not None:
        dense[table.n_cols :, : table.n_cols] = logit_rows
        return _graph(rm, prompt, ids, table, targets, visited, dense), engine.n_backward
    adjacency = _assemble(table, targets, visited, feature_rows, logit_rows.cpu())
    del feature_rows
    return _graph(rm, prompt, ids, table, targets, visited.sort().values, adjacency), (
        engine.n_backward
    )


def _free_memory(rm, limit: int | None) -> tuple[int, int | None]:
    """(host bytes, device bytes or None when the model runs on the host) free to use."""
    on_gpu = rm.device.type == "cuda"
    if limit is not None:
        return int(limit), int(limit) if on_gpu else None
    return free_bytes("cpu"), free_bytes(rm.device) if on_gpu else None


@contextmanager
def _moved(model, device=None, dtype=None) -> Iterator:
    """`model` on `device` / in `dtype` inside the block, as it was (every tensor) after it.

    Going to a narrower dtype and back would round the caller's weights, so that is refused.
    """
    from wiremap.models.loading import resolve_device, resolve_dtype

    kwargs = {}
    if device is not None and resolve_device(device) != model.device:
        kwargs["device"] = resolve_device(device)
    if dtype is not None and resolve_dtype(dtype) != next(model.parameters()).dtype:
        kwargs["dtype"] = resolve_dtype(dtype)
    if not kwargs:
        yield model
        return
    before = [(t.device, t.dtype) for t in _tensors(model)]
    _check_lossless(before, kwargs.get("dtype"))
    model.to(**kwargs)
    try:
        yield model
    finally:
        for t, (dev, dt) in zip(_tensors(model), before, strict=True):
            t.data = t.data.to(device=dev, dtype=dt)


def _tensors(model) -> list[Tensor]:
    return [*model.parameters(), *model.buffers()]


def _check_lossless(placements, dtype) -> None:
    for _, dt in placements:
        if dtype is not None and dt.is_floating_point and torch.promote_types(dt, dtype) != dtype:
            raise WiremapError(
                f"dtype={dtype} would round the model's {dt} weights (attribute() puts the "
                "model back as it was after the call); load the model in that dtype instead "
                "(ReplacementModel.from_pretrained(..., dtype=...))"
            )


def _logit_targets(targets: LogitTargets, n_pos: int) -> _Targets:
    n = len(targets)
    return _Targets(
        site=torch.full((n,), FINAL, dtype=torch.long),
        pos=torch.full((n,), n_pos - 1, dtype=torch.long),
        vectors=targets.directions,
    )


def _feature_targets(rm, table: SourceTable, which: Tensor) -> _Targets:
    feats = table.features[which]
    vectors = feats.new_zeros(feats.shape[0], rm.d_model, dtype=table.tokens.dtype)
    for layer in torch.unique(feats[:, 0]).tolist():
        mine = feats[:, 0] == layer
        vectors[mine] = rm.transcoders.W_enc[layer][feats[mine, 2]].to(vectors.dtype)
    return _Targets(site=feats[:, 0].cpu(), pos=feats[:, 1].cpu(), vectors=vectors)


# -- visiting features -------------------------------------------------------------------
def _uncapped(table: SourceTable, budget: int | None) -> bool:
    return budget is None or budget >= table.n_features


def _dense_buffer(table: SourceTable, n_logits: int, budget: int | None) -> Tensor | None:
    n_nodes = table.n_cols + n_logits
    if not _uncapped(table, budget) or n_nodes > DENSE_MAX_NODES:
        return None
    # every feature row and logit row is written over the source columns later; zero only
    # the rest (a full memset of the matrix was a third of a small graph's time)
    dense = table.tokens.new_empty(n_nodes, n_nodes, device="cpu")
    dense[:, table.n_cols :] = 0  # nothing has a logit as its source
    dense[table.n_features : table.n_cols] = 0  # error and token nodes have no inputs
    return dense


def _visit_features(engine, rm, table, targets, logit_rows, plan, rerank_every, verbose, out):
    """(visited feature indices, their rows [n_visited, n_cols], written into `out` if given)."""
    budget, target_batch = plan.max_feature_nodes, plan.target_batch
    if _uncapped(table, budget):
        order = torch.arange(table.n_features)
        rows = _rows_in_batches(engine, rm, table, order, target_batch, verbose, out)
        return order, rows
    every = default_rerank(budget, target_batch) if rerank_every is None else rerank_every
    return _best_first(engine, rm, table, targets, logit_rows, budget, target_batch, every, verbose)


RERANKS = 4
"""Fewest re-rankings a budget gets by default (bench/budget.py: with one ranking per batch
of 256, small budgets were ranked once, by direct effects alone, and kept fewer of the
most influential features)."""


def default_rerank(budget: int, target_batch: int) -> int:
    """Visits between re-rankings: one batch, or less so a budget is re-ranked RERANKS times."""
    return max(1, min(target_batch, -(-budget // RERANKS)))


def _rows_in_batches(engine, rm, table, order: Tensor, target_batch: int, verbose: bool, out):
    if out is None:
        out = torch.empty(order.numel(), table.n_cols, dtype=table.tokens.dtype)
    rows, start = out, 0
    for size in layer_batches(table.features[order, 0].cpu(), target_batch):
        which = order[start : start + size]
        engine.rows(_feature_targets(rm, table, which), out=rows[start : start + size])
        start += size
        _log(verbose, f"  rows {start}/{order.numel()}", end="\r")
    _log(verbose and order.numel() > 0, "")
    return rows


def layer_batches(layers: Tensor, target_batch: int) -> list[int]:
    """Sizes of consecutive batches over targets sorted by layer: no batch spans two layers,
    and each layer's targets are split into equal batches of at most `target_batch`.

    A batch costs its size x the layers below its highest target x the positions up to its
    last one, so a batch that ran on from the end of one layer into the next paid for every
    position and one more layer for all its targets (bench/attribute.py --size large: 14%
    fewer row-layer-positions than fixed slices of `target_batch`, for a few more passes).
    """
    sizes = []
    for n in torch.unique_consecutive(layers, return_counts=True)[1].tolist():
        k = -(-n // target_batch)
        sizes += [n // k + (i < n % k) for i in range(k)]
    return sizes


def _best_first(engine, rm, table, targets, logit_rows, budget, target_batch, every, verbose):
    """Visit the most influential unvisited features, re-ranked after every `every` visits.

    `every` = 0 ranks once, by the direct effects on the logits. Rows are computed
    `target_batch` targets at a time and kept (and ranked) on the CPU.
    """
    logit_rows = logit_rows.cpu()
    rows = torch.empty(budget, table.n_cols, dtype=logit_rows.dtype)
    visited = torch.zeros(table.n_features, dtype=torch.bool)
    order: list[int] = []
    weights = targets.probs.float().cpu().to(logit_rows.dtype)
    queue = torch.empty(0, dtype=torch.long)
    n_feat = table.n_features
    while len(order) < budget:
        if every > 0 or not order:
            score = feature_influence(logit_rows, rows[: len(order)], order, weights, n_feat)
            score[visited] = -1.0
            top = score.topk(min(budget - len(order), n_feat))
            queue = top.indices[top.values >= 0]
        take, queue = (queue[:every], queue[every:]) if every > 0 else (queue, queue[:0])
        if take.numel() == 0:
            break
        for picked in take.split(target_batch):
            # sorted by (layer, pos): the batch runs back through as few layers as possible
            picked = picked.sort().values
            done = len(order)
            engine.rows(_feature_targets(rm, table, picked), out=rows[done : done + picked.numel()])
            visited[picked] = True
            order.extend(picked.tolist())
            _log(verbose, f"  visited {len(order)}/{budget} features", end="\r")
    _log(verbose, "")
    order_t = torch.tensor(order, dtype=torch.long)
    return order_t, rows[: len(order)]


def feature_influence(
    logit_rows: Tensor, feature_rows: Tensor, order: list[int], weights: Tensor, n_feat: int
) -> Tensor:
    """[n_feat] influence of each feature on the weighted logits through the rows so far.

    I = w(Â + Â² + …) with Â the absolute rows normalised to sum 1 (DESIGN.md §7); rows
    not computed yet count as zero. Only visited features pass influence on, so the series
    runs on the visited × visited block (the graph is a DAG: it ends), and one product
    with the visited rows spreads the result over every feature.
    """
    direct = _propagate(weights, logit_rows, n_feat)
    if not order:
        return direct
    idx = torch.tensor(order, dtype=torch.long)
    block = _normalised_columns(feature_rows, idx)  # [V, V]
    y = x = direct[idx]
    for _ in range(idx.numel()):
        x = x @ block
        y = y + x
        if float(x.abs().sum()) <= 1e-12 * float(y.abs().sum()):
            break
    return direct + _propagate(y, feature_rows, n_feat)


def _normalised_columns(rows: Tensor, idx: Tensor) -> Tensor:
    """Â[:, idx] for Â = |rows| / Σ|rows|, a chunk of rows at a time."""
    chunk = max(1, CHUNK_ELEMENTS // max(rows.shape[1], 1))
    out = rows.new_empty(rows.shape[0], idx.numel())
    for start in range(0, rows.shape[0], chunk):
        a = rows[start : start + chunk].abs()
        out[start : start + chunk] = a[:, idx] / a.sum(1, keepdim=True).clamp_min(1e-30)
    return out


def _propagate(x: Tensor, rows: Tensor, n_feat: int) -> Tensor:
    """x @ Â[:, :n_feat] for the rows Â = |rows| / Σ|rows|, a chunk of rows at a time."""
    chunk = max(1, CHUNK_ELEMENTS // max(rows.shape[1], 1))
    out = rows.new_zeros(n_feat)
    for xs, rs in zip(x.split(chunk), rows.split(chunk), strict=True):
        a = rs.abs()
        out += (xs / a.sum(1).clamp_min(1e-30)) @ a[:, :n_feat]
    return out


# -- the graph ---------------------------------------------------------------------------
def _assemble(table, targets, visited, feature_rows, logit_rows) -> Tensor:
    """The graph's adjacency from rows in visit order, a chunk of rows at a time.

    Graph nodes are the visited features sorted by (layer, pos, feature); unvisited
    features are folded into the error node at their (layer, pos), so each row still sums
    to its target's value. No full-size copy of the rows is made.
    """
    order = torch.argsort(visited)
    col_map = _column_map(table, visited[order])
    n_vis, n_logits = visited.numel(), len(targets)
    n_nodes = n_vis + table.n_layers * table.n_pos + table.n_pos + n_logits
    logit_start = n_nodes - n_logits
    sink = _DenseSink(n_nodes) if n_nodes <= DENSE_MAX_NODES else _CooSink(n_nodes)
    chunk = max(1, CHUNK_ELEMENTS // max(table.n_cols, n_nodes))
    for start in range(0, n_vis, chunk):
        which = order[start : start + chunk]
        sink.add(start, _fold(feature_rows[which], col_map, n_nodes))
    sink.add(logit_start, _fold(logit_rows, col_map, n_nodes))
    return sink.result(logit_rows.dtype)


def _fold(rows: Tensor, col_map: Tensor, n_nodes: int) -> Tensor:
    """[n, n_cols] source columns -> [n, n_nodes] graph columns (summing folded ones)."""
    folded = rows.new_zeros(rows.shape[0], n_nodes)
    folded.index_add_(1, col_map, rows)
    return folded


class _DenseSink:
    def __init__(self, n_nodes: int) -> None:
        self.n, self.parts = n_nodes, []

    def add(self, row0: int, rows: Tensor) -> None:
        self.parts.append((row0, rows))

    def result(self, dtype: torch.dtype) -> Tensor:
        dense = torch.zeros(self.n, self.n, dtype=dtype)
        for row0, rows in self.parts:
            dense[row0 : row0 + rows.shape[0]] = rows
        return dense


class _CooSink:
    """Non-zeros of rows added in increasing row order: a coalesced COO matrix."""

    def __init__(self, n_nodes: int) -> None:
        self.n, self.indices, self.values = n_nodes, [], []

    def add(self, row0: int, rows: Tensor) -> None:
        r, c = rows.nonzero(as_tuple=True)  # row-major: sorted
        self.indices.append(torch.stack([r + row0, c]))
        self.values.append(rows[r, c])

    def result(self, dtype: torch.dtype) -> Tensor:
        indices = torch.cat(self.indices, dim=1)
        values = torch.cat(self.values).to(dtype)
        shape = (self.n, self.n)
        return torch.sparse_coo_tensor(
            indices, values, shape, is_coalesced=True, check_invariants=False
        )


def _graph(rm, prompt, ids, table, targets, visited, adjacency) -> Graph:
    return Graph(
        prompt=prompt,
        input_ids=ids.cpu(),
        token_strings=rm.token_strings(ids),
        active_features=table.features[visited].cpu(),
        activations=table.activations[visited].cpu(),
        logit_tokens=targets.tokens.cpu(),
        logit_probs=targets.probs.cpu(),
        logit_strings=targets.strings,
        adjacency=adjacency,
        n_layers=table.n_layers,
    )


def _column_map(table: SourceTable, visited: Tensor) -> Tensor:
    """Graph column of every source column (unvisited features -> their error node)."""
    n_vis = visited.numel()
    col = torch.empty(table.n_cols, dtype=torch.long)
    layer, pos = table.features[:, 0].cpu(), table.features[:, 1].cpu()
    col[: table.n_features] = n_vis + layer * table.n_pos + pos
    col[visited] = torch.arange(n_vis)
    col[table.n_features :] = n_vis + torch.arange(table.n_cols - table.n_features)
    return col


def _settings(rm, table, options: dict, n_backward: int, seconds: float) -> dict:
    return {
        "model": rm.model_name,
        "transcoders": rm.transcoders_path,
        "transcoder_arch": rm.transcoders.arch,
        **options,
        "dtype": str(next(rm.model.parameters()).dtype).removeprefix("torch."),
        "device": str(rm.device),
        "n_active_features": table.n_features,
        "n_backward_passes": n_backward,
        "seconds": round(seconds, 3),
    }


def _log(verbose: bool, msg: str, end: str = "\n") -> None:
    if verbose:
        print(msg, end=end, file=sys.stderr, flush=True)
