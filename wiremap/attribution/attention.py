"""Why attention attended: head loadings of edges and QK attributions (DESIGN.md §11).

    loads = head_loadings(rm, graph, source, target)     # which heads carry an edge
    loads.heads            # [layers between, n_heads], + loads.residual == graph edge
    qk = qk_attribution(rm, graph, layer=2, head=1, query_pos=7, key_pos=3)
    qk.top(5)              # (query node, key node, contribution) that make the score

Head loadings. In the frozen model (frozen.py) an edge s → t is linear in the value
path, so it is a sum over paths. Every path either stays in the residual stream (skip
connections and transcoder skips, same position: the residual share) or passes through a
first attention head (l, h). That head's share is
`Σ_q G_l[q, h] · P_h[q, p_s] · V_h(r_l)` with r_l the source's write carried to layer l by
the residual stream alone, V_h the head's value map, P_h its frozen pattern and G_l the
target's gradient at the head's output (which carries every later path). Shares and
residual sum exactly to the edge.

QK attributions. The pre-softmax score of head h at (q, k) is `scaling · ⟨q_vec, k_vec⟩`,
with q_vec = R_q W_Q N_q x_q + bias (frozen norm N, rotary R). The residual stream x_q is
the sum of the node writes at q before the layer (features' decoders, error nodes, the
token embedding, what each earlier attention block added `A_{layer}_{pos}`, and a
remainder `R_{layer}_{pos}`: biases and transcoder skips), so the score splits into
(query node, key node) pairs plus bias terms. The queries and keys are computed by the
model's own attention module (rotary, grouped heads, LayerNorm centring included) on a
batch with one node's write per row. Gemma-2's soft-capping is applied after the bilinear
score: `.score` is the pre-cap score and `.capped_score` the capped one. A key outside the
causal mask or the head's sliding window, and models with q/k norms (not bilinear), are
refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from wiremap.attribution.attribute import FINAL, RowEngine, _column_map, _Targets
from wiremap.attribution.graph import Graph
from wiremap.attribution.renamed import include_bos_of, renamed_keywords
from wiremap.attribution.sources import SourceTable
from wiremap.attribution.targets import demeaned_unembedding
from wiremap.errors import WiremapError
from wiremap.models.frozen import _frozen_attention_fn
from wiremap.models.hooks import capture, hooks_removed, tensor_hook

HEADS_NAME = "wiremap_heads"
BATCH_ELEMENTS = 2**27
"""Default cap on a head-loadings batch's per-layer tensors (elements; 512 MiB in fp32)."""
QK_NAME = "wiremap_qk"


# -- attention functions that record what a head sees ------------------------------------
@dataclass
class _Record:
    """What one attention call saw; `zero` makes the call output zeros (residual-only runs)."""

    zero: bool = False
    pattern: Tensor | None = None  # [1, H, q, k]
    value: Tensor | None = None  # [b, H_kv, k, dh]
    out: Tensor | None = None  # [b, q, H, dh]
    query: Tensor | None = None  # [b, H, q, dh] (QK capture)
    key: Tensor | None = None  # [b, H_kv, k, dh]
    kwargs: dict = field(default_factory=dict)


def _heads_fn(module, query, key, value, attention_mask, **kwargs):
    """The frozen attention function, recording its pattern, values and output."""
    rec: _Record = module._wiremap_record
    out, pattern = _frozen_attention_fn(module, query, key, value, attention_mask, **kwargs)
    if rec.zero:
        out = torch.zeros_like(out)
    rec.pattern, rec.value, rec.out = pattern, value, out
    return out, pattern


def _qk_fn(module, query, key, value, attention_mask, **kwargs):
    """Records the queries and keys the module computed (output: zeros, unused)."""
    rec: _Record = module._wiremap_record
    rec.query, rec.key, rec.kwargs = query, key, kwargs
    b, h, n, dh = query.shape
    return query.new_zeros(b, n, h, dh), None


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name, fn in ((HEADS_NAME, _heads_fn), (QK_NAME, _qk_fn)):
        if name not in ALL_ATTENTION_FUNCTIONS:
            ALL_ATTENTION_FUNCTIONS.register(name, fn)
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


@contextmanager
def _recording(rm, name: str = HEADS_NAME, zero: bool = False) -> Iterator[list[_Record]]:
    """Inside `rm.frozen(...)`: attention calls go through `name`; one record per layer."""
    _register()
    attns = [rm.adapter.module(rm.model, layer, rm.adapter.attn) for layer in range(rm.n_layers)]
    records = [_Record(zero=zero) for _ in attns]
    config = rm.model.config
    previous = config._attn_implementation
    try:
        for attn, rec in zip(attns, records, strict=True):
            attn._wiremap_record = rec
        config._attn_implementation = name
        yield records
    finally:
        config._attn_implementation = previous
        for attn in attns:
            attn.__dict__.pop("_wiremap_record", None)


# -- head loadings -------------------------------------------------------------------------
@dataclass
class HeadLoadings:
    """How an edge s → t splits over the attention heads of the layers between them."""

    source: int
    target: int
    layers: list[int]  # the layers whose heads can carry the edge
    heads: Tensor  # [len(layers), n_heads] share of the edge through each head first
    residual: float  # share that never passes through attention
    edge: float  # the graph's edge A[t, s]

    @property
    def total(self) -> float:
        return float(self.heads.sum()) + self.residual

    def top(self, n: int = 5) -> list[tuple[int, int, float]]:
        """The `n` heads with the largest |share|: (layer, head, share)."""
        flat = self.heads.reshape(-1)
        order = flat.abs().argsort(descending=True)[:n].tolist()
        n_heads = self.heads.shape[1]
        return [(self.layers[i // n_heads], i % n_heads, float(flat[i])) for i in order]


def head_loadings(rm, graph: Graph, source: int | str, target: int | str) -> HeadLoadings:
    """The per-(layer, head) split of the graph's edge A[target, source] (module docstring)."""
    return head_loadings_batch(rm, graph, [(source, target)])[0]


def head_loadings_batch(
    rm,
    graph: Graph,
    pairs: Sequence[tuple[int | str, int | str]],
    target_batch: int | None = None,
    source_batch: int | None = None,
    *,
    batch_size: int | None = None,
) -> list[HeadLoadings]:
    """Head loadings of many edges (source, target) in the order given.

    One residual-only forward pass per `source_batch` sources and one batched backward
    pass per `target_batch` targets (`batch_size`: its old name, this version only); a
    target's gradients are dropped once its edges are done.
    None: up to 64 targets / 128 sources, fewer where a batch's per-layer tensors
    (batch × positions × d_model × layers) would pass `BATCH_ELEMENTS`.
    """
    target_batch, _ = renamed_keywords(
        "head_loadings_batch", target_batch, False, batch_size=batch_size
    )
    ids = _index_of(graph)
    pairs = [(_node(graph, ids, s), _node(graph, ids, t)) for s, t in pairs]
    for s, t in pairs:
        _check_edge(graph, s, t)
    if not pairs:
        return []
    # by position, so that a batch runs on a short prefix of the prompt
    sources = sorted({s for s, _ in pairs}, key=lambda s: (graph.node_layer_pos(s)[1], s))
    targets = sorted({t for _, t in pairs})
    per_row = graph.n_pos * rm.d_model * (rm.n_layers + 1)
    fits = max(1, BATCH_ELEMENTS // per_row)
    target_batch, source_batch = target_batch or min(64, fits), source_batch or min(128, fits)
    input_ids = graph.input_ids.to(rm.device)
    with torch.no_grad():
        table = SourceTable.build(rm, rm.run(input_ids), include_bos=include_bos_of(graph.settings))
    out: dict[tuple[int, int], HeadLoadings] = {}
    edges = _edges(graph, pairs)
    with rm.frozen(input_ids) as lin:
        carried = _residual_only(rm, lin, graph, table, sources, source_batch)
        for start in range(0, len(targets), target_batch):
            chunk = targets[start : start + target_batch]
            grads = dict(zip(chunk, _head_gradients(rm, lin, graph, chunk), strict=True))
            for s, t in pairs:
                if t in grads:
                    out[s, t] = _loadings(graph, s, t, carried, grads[t], edges[s, t])
    return [out[pair] for pair in pairs]


def strongest_edges(result, n: int) -> list[tuple[int, int]]:
    """(source, target) of a pruned graph's `n` strongest kept edges (by |weight|)."""
    targets, sources, weights = result.edges()
    order = weights.abs().argsort(descending=True)[:n].tolist()
    return [(int(sources[i]), int(targets[i])) for i in order]


@dataclass
class _Carried:
    """Each source's write carried by the residual stream alone (no attention anywhere),
    read at the source's own position (the only one it reaches)."""

    row: dict[int, int]  # graph source index -> row
    values: Tensor  # [S, L, H_kv, dh] every layer's values (minus those of no write)
    reads: dict[int, Tensor]  # per target site (layer or FINAL) [S, d]


@dataclass
class _Gradients:
    """One target's gradient at every head's value input, per layer [H, pos, dh]."""

    site: int
    pos: int
    vector: Tensor
    by_value: list[Tensor | None]


def _residual_only(rm, lin, graph: Graph, table, sources: list[int], chunk: int) -> _Carried:
    values, reads = [], {}
    for start in range(0, len(sources), chunk):
        mine = sources[start : start + chunk]
        pos = torch.tensor([graph.node_layer_pos(s)[1] for s in mine], device=rm.device)
        rows = torch.arange(1, len(mine) + 1, device=rm.device)
        n = int(pos.max()) + 1  # causal: the prefix up to the last source is enough
        embed, writes = _source_writes(graph, table, mine, n)
        with _recording(rm, zero=True) as records, torch.no_grad():
            run = lin.forward(lin.input_ids[:, :n], writes=writes, embed_write=embed)
        # row 0 has no write: subtracting it leaves the linear part
        per_layer = [(r.value - r.value[:1])[rows, :, pos] for r in records]
        values.append(torch.stack(per_layer, dim=1))
        sites = {**run.reads, FINAL: run.final}
        for site, x in sites.items():
            reads.setdefault(site, []).append((x - x[:1])[rows, pos])
    return _Carried(
        {s: i for i, s in enumerate(sources)},
        torch.cat(values),
        {site: torch.cat(parts) for site, parts in reads.items()},
    )


def _source_writes(graph: Graph, table: SourceTable, sources: list[int], n_pos: int):
    """(embed [S+1, n_pos, d], {layer: [S+1, n_pos, d]}): row i+1 holds source i's write.

    A source's write is the sum of its table columns' writes: a visited feature's decoder
    writes, or an error node with the unvisited features folded into it (as in the graph).
    """
    visited = _visited(graph, table)
    col_map = _column_map(table, visited)
    n = len(sources) + 1
    lookup = torch.full((graph.n_nodes + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(sources)] = torch.arange(1, n)
    cmap = torch.cat([col_map, torch.tensor([graph.n_nodes])]).to(table.tokens.device)
    lookup = lookup.to(table.tokens.device)
    d = table.tokens.shape[-1]
    writes = {}
    for block in table.blocks:
        rows = lookup[cmap[block.cols[:n_pos]]]  # [pos, slots]
        pos, slot = (rows >= 0).nonzero(as_tuple=True)
        if pos.numel():
            w = table.tokens.new_zeros(n, n_pos, d)
            w.index_put_((rows[pos, slot], pos), block.writes[pos, :, slot], accumulate=True)
            writes[block.out] = w
    embed = table.tokens.new_zeros(n, n_pos, d)
    tok_rows = lookup[cmap[table.token_start + torch.arange(n_pos, device=cmap.device)]]
    pos = (tok_rows >= 0).nonzero().flatten()
    embed[tok_rows[pos], pos] = table.tokens[pos]
    return embed, writes


def _visited(graph: Graph, table: SourceTable) -> Tensor:
    """Table index of each of the graph's features."""
    index = {tuple(f): i for i, f in enumerate(table.features.cpu().tolist())}
    try:
        return torch.tensor([index[tuple(f)] for f in graph.active_features.tolist()])
    except KeyError as err:
        raise WiremapError(
            f"feature {err.args[0]} of the graph is not active under these transcoders; "
            "compute head loadings with the model and transcoders that made the graph"
        ) from None


def _head_gradients(rm, lin, graph: Graph, targets: list[int]) -> list[_Gradients]:
    """Gradient of each target at every head's output, moved back onto the head's keys."""
    tg = _targets(rm, graph, targets)
    n_pos = int(tg.pos.max()) + 1
    top = lin.n_layers if bool((tg.site == FINAL).any()) else int(tg.site.max())
    ids = lin.input_ids[:, :n_pos]
    dtype = next(rm.model.parameters()).dtype
    embed = torch.zeros(1, n_pos, rm.d_model, dtype=dtype, device=ids.device, requires_grad=True)
    stop = None if top == lin.n_layers else top
    with _recording(rm) as records, torch.enable_grad():
        run = lin.forward(ids, embed_write=embed, stop_after=stop)
        outputs, inject = RowEngine._injections(run, tg, n_pos)
        layers = [i for i, rec in enumerate(records) if rec.out is not None and i <= top]
        got = torch.autograd.grad(
            outputs,
            [records[i].out for i in layers],
            inject,
            is_grads_batched=True,
            allow_unused=True,
        )
    by_value: list[list[Tensor | None]] = [[None] * rm.n_layers for _ in targets]
    for layer, g in zip(layers, got, strict=True):
        if g is None:
            continue
        # [B, q, H, dh] at the head's output -> [B, H, k, dh] at its value (frozen pattern)
        pattern = records[layer].pattern[0].to(g.dtype)
        moved = torch.einsum("hqk,bqhd->bhkd", pattern, g[:, 0])
        for b in range(len(targets)):
            by_value[b][layer] = moved[b]
    return [
        _Gradients(int(tg.site[b]), int(tg.pos[b]), tg.vectors[b], by_value[b])
        for b in range(len(targets))
    ]


def _targets(rm, graph: Graph, nodes: list[int]) -> _Targets:
    sites, pos, vectors = [], [], []
    for t in nodes:
        if graph.node_kind(t) == "feature":
            layer, p, f = graph.active_features[t].tolist()
            sites.append(layer)
            pos.append(p)
            vectors.append(rm.transcoders.W_enc[layer][f].float())
        else:
            j = t - graph.logit_slice.start
            token = int(graph.logit_tokens[j])
            if token < 0:
                raise WiremapError(
                    f"target {graph.logit_strings[j]!r} is a custom direction the graph file "
                    "does not store; pick a feature or token logit as the edge's target"
                )
            sites.append(FINAL)
            pos.append(graph.n_pos - 1)
            vectors.append(demeaned_unembedding(rm, torch.tensor([token], device=rm.device))[0])
    return _Targets(
        site=torch.tensor(sites), pos=torch.tensor(pos), vectors=torch.stack(vectors).to(rm.device)
    )


def _loadings(graph: Graph, s: int, t: int, carried: _Carried, g: _Gradients, edge: float):
    row = carried.row[s]
    layer_s, p_s = graph.node_layer_pos(s)
    first = 0 if layer_s is None else layer_s + 1
    last = len(g.by_value) - 1 if g.site == FINAL else g.site
    layers = list(range(first, last + 1))
    n_heads = next((x.shape[0] for x in g.by_value if x is not None), 0)
    heads = torch.zeros(len(layers), n_heads, dtype=torch.float64)
    for i, layer in enumerate(layers):
        gv = g.by_value[layer]
        if gv is None:
            continue
        value = carried.values[row, layer]  # [H_kv, dh]
        group = gv.shape[0] // value.shape[0]
        heads[i] = (gv[:, p_s] * value.repeat_interleave(group, 0).to(gv.dtype)).sum(-1).double()
    residual = 0.0  # the residual stream alone keeps the write at the source's position
    if p_s == g.pos:
        residual = float(carried.reads[g.site][row].to(g.vector.dtype) @ g.vector)
    return HeadLoadings(s, t, layers, heads, residual, edge)


def _edges(graph: Graph, pairs: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """The graph's A[t, s] of each (s, t), from a dense or sparse adjacency."""
    if not graph.is_sparse:
        return {(s, t): float(graph.adjacency[t, s]) for s, t in pairs}
    rows, cols, values = graph.adjacency_coo()
    keys = rows.long() * graph.n_nodes + cols.long()
    keys, order = keys.sort()
    wanted = torch.tensor([t * graph.n_nodes + s for s, t in pairs], dtype=torch.long)
    at = torch.searchsorted(keys, wanted).clamp_max(max(keys.numel() - 1, 0))
    found = keys.numel() > 0
    out = {}
    for (s, t), w, i in zip(pairs, wanted.tolist(), at.tolist(), strict=True):
        out[s, t] = float(values[order[i]]) if found and int(keys[i]) == w else 0.0
    return out


def _check_edge(graph: Graph, s: int, t: int) -> None:
    if graph.node_kind(s) == "logit" or graph.node_kind(t) not in ("feature", "logit"):
        raise WiremapError(
            f"edge {s} -> {t} is not a graph edge: sources are features, errors or tokens, "
            "targets are features or logits"
        )


def _index_of(graph: Graph) -> dict[str, int]:
    from wiremap.attribution.export import node_ids

    return {node_id: i for i, node_id in enumerate(node_ids(graph))}


def _node(graph: Graph, ids: dict[str, int], node: int | str) -> int:
    if isinstance(node, str) and not node.lstrip("-").isdigit():
        if node not in ids:
            raise WiremapError(f"unknown node id {node!r}; use a node id from this graph's JSON")
        return ids[node]
    i = int(node)
    if not 0 <= i < graph.n_nodes:
        raise WiremapError(f"node index {i} is outside the graph (0..{graph.n_nodes - 1})")
    return i


# -- QK attributions -----------------------------------------------------------------------
@dataclass
class QKAttribution:
    """The pre-softmax score of one head at (query_pos, key_pos), split into node pairs."""

    layer: int
    head: int
    query_pos: int
    key_pos: int
    query_nodes: list[str]  # node ids (graph JSON), then A_{l}_{pos} per earlier attention
    # block, and last the remainder R_{layer}_{pos} (biases, transcoder skips)
    key_nodes: list[str]
    pairs: Tensor  # [n_query, n_key] contribution of each (query node, key node) pair
    bias_terms: dict[str, Tensor]  # "query_bias" [n_key], "key_bias" [n_query], "both" []
    softcap: float | None = None  # the model's attention soft-cap, applied after the score

    @property
    def score(self) -> float:
        """The pre-softmax (pre-cap) score: pairs plus bias terms."""
        bias = sum(float(v.sum()) for v in self.bias_terms.values())
        return float(self.pairs.sum()) + bias

    @property
    def capped_score(self) -> float:
        s = self.score
        return (
            s
            if not self.softcap
            else float(torch.tanh(torch.tensor(s / self.softcap)) * self.softcap)
        )

    def row_sums(self) -> Tensor:
        """[n_query]: each query node's whole contribution (its pairs and the key bias)."""
        return self.pairs.sum(1) + self.bias_terms["key_bias"]

    def col_sums(self) -> Tensor:
        """[n_key]: each key node's whole contribution (its pairs and the query bias)."""
        return self.pairs.sum(0) + self.bias_terms["query_bias"]

    def top(self, n: int = 10) -> list[tuple[str, str, float]]:
        """The `n` largest |terms|: (query node, key node, value); "bias" for a bias side."""
        names_q = [*self.query_nodes, "bias"]
        names_k = [*self.key_nodes, "bias"]
        full = torch.zeros(len(names_q), len(names_k), dtype=self.pairs.dtype)
        full[:-1, :-1] = self.pairs
        full[-1, :-1] = self.bias_terms["query_bias"]
        full[:-1, -1] = self.bias_terms["key_bias"]
        full[-1, -1] = self.bias_terms["both"]
        flat = full.reshape(-1)
        order = flat.abs().argsort(descending=True)[:n].tolist()
        n_k = len(names_k)
        return [(names_q[i // n_k], names_k[i % n_k], float(flat[i])) for i in order]


def qk_attribution(
    rm, prompt_or_graph: str | Graph, layer: int, head: int, query_pos: int, key_pos: int
) -> QKAttribution:
    """Split head `head` of `layer`'s score at (query_pos, key_pos) into node pairs.

    With a graph, nodes are the graph's (unvisited features folded into their error node,
    as in the graph); with a prompt, every active feature is a node.
    """
    return qk_attributions(rm, prompt_or_graph, [(layer, head, query_pos, key_pos)])[0]


def qk_attributions(
    rm, prompt_or_graph: str | Graph, requests: Sequence[tuple[int, int, int, int]]
) -> list[QKAttribution]:
    """`qk_attribution` for many (layer, head, query_pos, key_pos), sharing the passes."""
    out = _qk_batch(rm, prompt_or_graph, requests)
    for x in out:
        if isinstance(x, WiremapError):
            raise x
    return out


def _qk_batch(rm, prompt_or_graph, requests) -> list[QKAttribution | WiremapError]:
    """Like `qk_attributions`, a refused request (sliding window) giving its error instead."""
    graph = prompt_or_graph if isinstance(prompt_or_graph, Graph) else None
    ids = graph.input_ids.to(rm.device) if graph is not None else rm.tokenize(prompt_or_graph)
    for request in requests:
        _check_qk(rm, *request, len(ids))
    with torch.no_grad():
        table = SourceTable.build(rm, rm.run(ids), include_bos=True)
    names, col_map = _qk_nodes(graph, table, ids)
    done: dict[tuple[int, int, int], tuple] = {}
    out = []
    with rm.frozen(ids) as lin, torch.no_grad():
        calls = {}
        for layer in sorted({r[0] for r in requests}):
            n_pos = max(r[2] for r in requests if r[0] == layer) + 1  # causal: a prefix will do
            calls[layer] = _attention_call(rm, lin, layer, n_pos)
        for layer, head, query_pos, key_pos in requests:
            where = (layer, query_pos, key_pos)
            if where not in done:
                resid, attn, call = calls[layer]
                q_ids, q_w = _position_writes(table, col_map, names, layer, query_pos, resid, attn)
                k_ids, k_w = _position_writes(table, col_map, names, layer, key_pos, resid, attn)
                q, k, kw = _project(rm, layer, call, (query_pos, q_w), (key_pos, k_w))
                done[where] = (q_ids, k_ids, q, k, kw)
            out.append(_split(layer, head, query_pos, key_pos, *done[where]))
    return out


def _split(layer, head, query_pos, key_pos, q_ids, k_ids, q, k, kw) -> QKAttribution | WiremapError:
    """The pair matrix and bias terms of one head from the projected rows (row 0: zeros)."""
    try:
        _check_window(kw, layer, query_pos, key_pos)
    except WiremapError as err:
        return err
    group = q.shape[1] // k.shape[1]
    qh, kh = q[:, head], k[:, head // group]  # [1 + n, dh]
    q0, k0 = qh[0], kh[0]  # the bias: queries and keys of an all-zero residual stream
    qs, ks = qh[1 : 1 + len(q_ids)] - q0, kh[1 + len(q_ids) :] - k0
    scale = kw.get("scaling") or q.shape[-1] ** -0.5
    bias = {"query_bias": scale * ks @ q0, "key_bias": scale * qs @ k0, "both": scale * q0 @ k0}
    return QKAttribution(
        layer,
        head,
        query_pos,
        key_pos,
        q_ids,
        k_ids,
        scale * qs @ ks.T,
        {name: v.double().cpu() for name, v in bias.items()},
        kw.get("softcap"),
    )


def _check_qk(rm, layer: int, head: int, query_pos: int, key_pos: int, n_pos: int) -> None:
    extra = [n for n in rm.adapter.extra_norms if _has(rm, layer, n)]
    if extra:
        raise WiremapError(
            f"{rm.adapter.name} normalises queries and keys ({', '.join(extra)}): the score is "
            "not bilinear in the residual stream, so QK attributions are not exact; use a "
            "model without q/k norms"
        )
    if not 0 <= layer < rm.n_layers:
        raise WiremapError(f"layer {layer} is outside the model (0..{rm.n_layers - 1})")
    n_heads = int(rm.model.config.num_attention_heads)
    if not 0 <= head < n_heads:
        raise WiremapError(f"head {head} is outside layer {layer}'s heads (0..{n_heads - 1})")
    if not 0 <= key_pos <= query_pos < n_pos:
        raise WiremapError(
            f"positions query={query_pos}, key={key_pos}: use 0 <= key_pos <= query_pos < "
            f"{n_pos} (attention is causal: a query attends to itself and earlier positions)"
        )


def _has(rm, layer: int, relpath: str) -> bool:
    module = rm.adapter.layer(rm.model, layer)
    for part in relpath.split("."):
        module = getattr(module, part, None)
        if module is None:
            return False
    return True


def _check_window(kwargs: dict, layer: int, query_pos: int, key_pos: int) -> None:
    window = kwargs.get("sliding_window")
    if window and query_pos - key_pos >= window:
        raise WiremapError(
            f"layer {layer} attends within a sliding window of {window} tokens: query "
            f"{query_pos} cannot see key {key_pos}; pick a key within {window - 1} tokens"
        )


def _qk_nodes(graph: Graph | None, table: SourceTable, ids: Tensor) -> tuple[list[str], Tensor]:
    """(node id of each node column, node column of each table column)."""
    if graph is not None:
        from wiremap.attribution.export import node_ids

        return node_ids(graph), _column_map(table, _visited(graph, table))
    # the ids of export.node_ids, for a graph whose nodes are all the table's sources
    names = [f"{l}_{f}_{p}" for l, p, f in table.features.tolist()]
    names += [f"{l}_-1_{p}" for l in range(table.n_layers) for p in range(table.n_pos)]
    names += [f"E_{tok}_{p}" for p, tok in enumerate(ids.tolist())]
    return names, torch.arange(table.n_cols)


def _attention_call(rm, lin, layer: int, n_pos: int):
    """(residual stream before `layer` [n_pos, d], what each earlier attention block added to
    it {layer: [n_pos, d]}, the attention module's (args, kwargs) at `layer`)."""
    ad = rm.adapter
    attn = ad.module(rm.model, layer, ad.attn)
    seen, added = {}, {}

    def keep(_m, args, kwargs):
        seen["call"] = (args, kwargs)

    handles = [attn.register_forward_pre_hook(keep, with_kwargs=True)]
    for earlier in range(layer):
        block_out = ad.module(rm.model, earlier, ad.post_attn_norm or ad.attn)
        handles.append(tensor_hook(block_out, "output", partial(added.__setitem__, earlier)))
    with hooks_removed(handles), capture(rm.model, ["resid_pre"], [layer], ad) as c:
        lin.forward(lin.input_ids[:, :n_pos], stop_after=layer)
    return c["resid_pre"][layer][0], {k: v[0] for k, v in added.items()}, seen["call"]


def _position_writes(table, col_map, names, layer: int, pos: int, resid: Tensor, attn: dict):
    """(node ids, writes [n, d]) of what writes at `pos` before `layer`: the graph's nodes,
    each earlier attention block (`A_{layer}_{pos}`), and the remainder `R_{layer}_{pos}`
    (biases and transcoder skips)."""
    n_nodes = len(names)
    total = resid.new_zeros(n_nodes + 1, resid.shape[-1])  # last: padding scratch
    cmap = torch.cat([col_map, torch.tensor([n_nodes])]).to(resid.device)
    for block in table.blocks:
        if block.out < layer:
            total.index_add_(0, cmap[block.cols[pos]], block.writes[pos].T.to(total.dtype))
    total[cmap[table.token_start + pos]] += table.tokens[pos].to(total.dtype)
    total = total[:-1]
    used = (total != 0).any(-1).nonzero().flatten()
    attn_ids = [f"A_{earlier}_{pos}" for earlier in sorted(attn)]
    writes = torch.cat([total[used], *(attn[e][pos][None].to(total.dtype) for e in sorted(attn))])
    rest = resid[pos] - writes.sum(0)
    node_list = [names[i] for i in used.tolist()] + attn_ids + [f"R_{layer}_{pos}"]
    return node_list, torch.cat([writes, rest[None]])


def _project(rm, layer: int, call, query: tuple[int, Tensor], key: tuple[int, Tensor]):
    """Queries [1+n, H, dh] at the query position and keys [1+n, H_kv, dh] at the key
    position of the rows: row 0 all zeros, then one row per write (query writes at the
    query position, then key writes at the key position). The model's own norm (frozen)
    and attention module compute projections, rotary and grouping; rows go in chunks.
    """
    from wiremap.models.frozen import _replace_first

    args, kwargs = call
    hidden = args[0] if args else kwargs["hidden_states"]
    n_pos, d = hidden.shape[-2], hidden.shape[-1]
    (q_pos, q_writes), (k_pos, k_writes) = query, key
    writes = torch.cat(
        [hidden.new_zeros(1, d), q_writes.to(hidden.dtype), k_writes.to(hidden.dtype)]
    )
    pos = torch.tensor([q_pos] * (1 + len(q_writes)) + [k_pos] * len(k_writes))
    chunk = max(1, min(256, BATCH_ELEMENTS // (n_pos * d)))
    ad = rm.adapter
    attn = ad.module(rm.model, layer, ad.attn)
    norm = ad.module(rm.model, layer, ad.attn_norm) if ad.attn_norm else None
    qs, ks = [], []
    with _recording(rm, QK_NAME) as records:
        for start in range(0, len(writes), chunk):
            part = writes[start : start + chunk]
            x = hidden.new_zeros(len(part), n_pos, d)
            x[torch.arange(len(part)), pos[start : start + chunk]] = part
            a, kw = _replace_first(args, kwargs, norm(x) if norm is not None else x)
            attn(*a, **kw)
            qs.append(records[layer].query[:, :, q_pos])
            ks.append(records[layer].key[:, :, k_pos])
        kwargs_seen = records[layer].kwargs
    return torch.cat(qs), torch.cat(ks), kwargs_seen


# -- which heads move information between two positions --------------------------------
@dataclass
class PositionHeads:
    """The heads that carry a pruned graph's strongest edges from one position to another."""

    source_pos: int
    target_pos: int
    loadings: list[HeadLoadings]  # the edges looked at, strongest first
    heads: list[tuple[int, int, float]]  # (layer, head, share of Σ|edge|), largest first

    @property
    def carried(self) -> float:
        """Σ |edge| over the edges looked at."""
        return sum(abs(x.edge) for x in self.loadings)


def heads_between(
    rm,
    graph: Graph,
    result,
    source_pos: int,
    target_pos: int | None = None,
    n_edges: int = 10,
    sources: Sequence[int] | None = None,
) -> PositionHeads:
    """Rank heads by the share they carry of the `n_edges` strongest kept edges from nodes at
    `source_pos` (or only `sources`, graph node indices) to nodes at `target_pos` (default:
    the last position). An edge's head share counts with the edge's sign, so a head that
    carries an edge in its direction scores positive."""
    target_pos = graph.n_pos - 1 if target_pos is None else target_pos
    allowed = set(sources) if sources is not None else None
    picked = []
    for t, s, w in zip(*(x.tolist() for x in result.edges()), strict=True):
        kind = graph.node_kind(s)
        if kind == "logit" or graph.node_layer_pos(s)[1] != source_pos:
            continue
        if graph.node_layer_pos(t)[1] != target_pos or (allowed is not None and s not in allowed):
            continue
        picked.append((abs(w), s, t))
    picked.sort(reverse=True)
    loads = head_loadings_batch(rm, graph, [(s, t) for _, s, t in picked[:n_edges]])
    total = sum(abs(x.edge) for x in loads) or 1.0
    score: dict[tuple[int, int], float] = {}
    for x in loads:
        sign = 1.0 if x.edge >= 0 else -1.0
        for i, layer in enumerate(x.layers):
            for h, share in enumerate(x.heads[i].tolist()):
                score[layer, h] = score.get((layer, h), 0.0) + sign * share / total
    ranked = sorted(((l, h, v) for (l, h), v in score.items()), key=lambda r: -r[2])
    return PositionHeads(source_pos, target_pos, loads, ranked)


# -- the graph JSON's "heads" block ----------------------------------------------------------
HEADS_PER_EDGE = 8
"""Heads listed per edge in the graph JSON (largest |share| first)."""
QK_EDGES = 20
"""Strongest edges whose top heads get QK pairs in the graph JSON."""
QK_HEADS = 2
"""Top heads of each of those edges that get QK pairs."""
QK_PAIRS = 10
"""QK terms stored per (head, query, key)."""


def heads_block(
    rm,
    graph: Graph,
    links: list[dict],
    n_edges: int = 1000,
    qk_edges: int = QK_EDGES,
    qk_heads: int = QK_HEADS,
) -> dict:
    """The graph JSON's optional "heads" block for its `n_edges` strongest links.

    `edges`: per link its residual share and top heads `{layer, head, share, qk}`, where
    `qk` names an entry of `qk`: the head's top QK terms at (query = the target's position,
    key = the source's) for the top heads of the `qk_edges` strongest links. `names`: a
    readable name for every node id the block mentions.
    """
    from wiremap.attribution.export import node_name

    links = sorted(links, key=lambda link: -abs(link["weight"]))[:n_edges]
    loads = head_loadings_batch(rm, graph, [(link["source"], link["target"]) for link in links])
    requests: dict[str, tuple[int, int, int, int]] = {}
    edges = []
    for rank, (link, load) in enumerate(zip(links, loads, strict=True)):
        p_t, p_s = graph.node_layer_pos(load.target)[1], graph.node_layer_pos(load.source)[1]
        heads = []
        for i, (layer, head, share) in enumerate(load.top(HEADS_PER_EDGE)):
            item = {"layer": layer, "head": head, "share": _short(share)}
            if rank < qk_edges and i < qk_heads:
                item["qk"] = key = f"{layer}_{head}_{p_t}_{p_s}"
                requests[key] = (layer, head, p_t, p_s)
            heads.append(item)
        edges.append(
            {
                "source": link["source"],
                "target": link["target"],
                "weight": link["weight"],
                "residual": _short(load.residual),
                "heads": heads,
            }
        )
    found = _qk_batch(rm, graph, list(requests.values())) if requests else []
    qk = {key: _qk_entry(r, x) for (key, r), x in zip(requests.items(), found, strict=True)}
    index = _index_of(graph)
    mentioned = {n for e in qk.values() for q, k, _ in e.get("pairs", []) for n in (q, k)}
    mentioned |= {n for e in edges for n in (e["source"], e["target"])}
    names = {
        n: node_name(graph, index[n]) if n in index else _other_name(graph, n) for n in mentioned
    }
    n_heads = int(rm.model.config.num_attention_heads)
    return {"n_heads": n_heads, "edges": edges, "qk": qk, "names": names}


def _qk_entry(request: tuple[int, int, int, int], qk: QKAttribution | WiremapError) -> dict:
    where = dict(zip(("layer", "head", "query_pos", "key_pos"), request, strict=True))
    if isinstance(qk, WiremapError):  # e.g. a key outside the head's sliding window
        return {**where, "refused": str(qk)}
    pairs = [[q, k, _short(v)] for q, k, v in qk.top(QK_PAIRS)]
    entry = {**where, "score": _short(qk.score), "pairs": pairs}
    if qk.softcap:
        entry["capped_score"] = _short(qk.capped_score)
    return entry


def readable(graph: Graph, node_id: str, labels=None) -> str:
    """A readable name for a node id of a QK term (graph nodes, `R_…` remainders, "bias")."""
    from wiremap.attribution.export import node_name

    index = _index_of(graph)
    if node_id in index:
        return node_name(graph, index[node_id], labels)
    return _other_name(graph, node_id)


def _other_name(graph: Graph, node_id: str) -> str:
    if node_id.startswith("A_"):
        layer, pos = (int(x) for x in node_id.split("_")[1:])
        return f"attn L{layer} @'{graph.token_strings[pos]}'"
    if node_id.startswith("R_"):
        layer, pos = (int(x) for x in node_id.split("_")[1:])
        return f"biases before L{layer} @'{graph.token_strings[pos]}'"
    if node_id == "bias":
        return "bias"
    return node_id  # a feature that the graph folded away (no name stored)


def _short(x: float) -> float:
    return float(f"{x:.5g}")
