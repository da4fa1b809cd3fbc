"""Sparse training compute: the encoder's backward and the decode over active features only.

    bags, values = topk_bags(idx, values, F)      # idx, values [N, L, k] from pre (no grad)
    a = relu(gather_pre(values, layer_major(x), W_enc_rows, b_enc_rows, bags))  # [nnz]
    y_hat = decode(tc, bags, a, n_tokens)         # Σ_active a_i W_dec[i] + b_dec  [N, L, d]

Per token a TopK layer has k active features, so everything except the encoder's forward
matmul is O(k·d) work instead of O(F·d) (DESIGN.md §12):
- decode: ŷ_b = Σ_{e in bag b} a_e W[row_e] (`embedding_bag` with per-sample weights);
- its backward: ∂a_e = W[row_e]·∂ŷ_{bag_e} (row dots: `sampled_addmm`, an SDDMM), and
  ∂W[r] = Σ_{e: row_e = r} a_e ∂ŷ_{bag_e}, again an embedding_bag, over the transposed
  pattern (entries grouped by row): only active rows of W are touched and nothing of size
  [nnz, d] is materialised;
- the encoder's backward (TopK, BatchTopK, AuxK): ∂loss/∂pre is zero off the active set, so
  ∂W_enc[r] = Σ_{e: row_e = r} ∂pre_e x_{bag_e} (the same transposed embedding_bag) and
  ∂b_enc[r] = Σ_{e: row_e = r} ∂pre_e.

Layout: bag `l·N + n` is token n at layer l, row `l·F + f` is feature f of layer l. So a PLT
decodes all layers in one call against W_dec viewed as [L·F, d], the encoder's backward is
one call against W_enc viewed as [L·F, d], and a CLT's source layer i is one contiguous
slice of the bags, decoded against W_dec_i viewed as [F, (L−i)·d].

The sparse math runs in float32 with autocast off: the gathers are memory-bound, so bf16
would save little and round more. Values and gradients equal the dense reference path to
float32 rounding, and to bf16 rounding under bf16 autocast (tests/train/test_sparse.py).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor
from torch.nn import functional as F

from wiremap.models.activations import BatchTopK, TopK

MAX_DENSITY = 0.02
"""ReLU / JumpReLU batches decode sparsely when at most this share of [N, L, F] is active.

`python bench/train.py --only density --layers 1 --d-model 576 --features 4608
--batch-size 1024` (JumpReLU PLT forward + backward, sparse / dense decode time), on one CPU
thread: 0.72 at 0.5% density, 0.79 at 1%, 0.87 at 2%, 1.10 at 5%, 1.59 at 10%. The sparse
decode's fixed cost is three passes over [N, L, F] (the mask, `nonzero`, the zero-filled
gradient of `a`) against three dense matmuls that it removes. With two threads on a 2-core
machine loaded 5x over, those passes slowed more than the matmuls and the sparse decode lost
even at 0.5%; not measured on a GPU."""


class Bags:
    """A sparse [n_bags, n_rows] pattern in CSR order: entry e adds row `rows[e]` to bag
    `bag[e]`; entries are sorted by bag."""

    def __init__(self, bag: Tensor, rows: Tensor, n_bags: int, n_rows: int) -> None:
        self.bag, self.rows, self.n_bags, self.n_rows = bag, rows, n_bags, n_rows
        self.offsets = _starts(bag, n_bags)
        """[n_bags]: index of each bag's first entry."""

    @functools.cached_property
    def by_row(self) -> tuple[Tensor, Tensor, Tensor]:
        """The transposed pattern: (order of entries grouped by row, their bags, row starts)."""
        _, order = _sort(self.rows, stable=True)
        return order, self.bag[order], _starts(self.rows[order], self.n_rows)

    def active(self, values: Tensor) -> Tensor:
        """[n_rows]: how many entries of each row hold a nonzero value (float32, no grad)."""
        fired = (values.detach() != 0).float()
        return torch.bincount(self.rows, weights=fired, minlength=self.n_rows)

    def layer(self, i: int, n_tokens: int, n_features: int) -> tuple[Bags, slice]:
        """Layer i's bags alone (bags = tokens, rows = features), and its slice of entries."""
        bounds = torch.tensor([i * n_tokens, (i + 1) * n_tokens], device=self.bag.device)
        lo, hi = torch.searchsorted(self.bag, bounds).tolist()
        sub = Bags(self.bag[lo:hi] - i * n_tokens, self.rows[lo:hi] - i * n_features,
                   n_tokens, n_features)  # fmt: skip
        return sub, slice(lo, hi)


def _sort(keys: Tensor, stable: bool = False) -> tuple[Tensor, Tensor]:
    """`keys.sort(dim=-1)`, single-threaded on CPU: torch's parallel CPU sort of these index
    lists (~10^4-10^6 entries) took 200-400 ms with 2 threads on a loaded 2-core machine,
    1.3 ms with one (32k entries; bench/train.py's sparse rows)."""
    if keys.device.type != "cpu":
        return keys.sort(dim=-1, stable=stable)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return keys.sort(dim=-1, stable=stable)
    finally:
        torch.set_num_threads(threads)


def _starts(sorted_keys: Tensor, n: int) -> Tensor:
    """Start of each key's run in a sorted list of keys in [0, n) (an empty run starts where
    the next one does)."""
    counts = torch.bincount(sorted_keys, minlength=n)
    return torch.cumsum(counts, 0) - counts


# -- building bags ----------------------------------------------------------------------------
def _bags(layer: Tensor, token: Tensor, feature: Tensor, shape) -> Bags:
    """Layer-major entries sorted by (layer, token) -> Bags over rows l·F + f."""
    n_layers, n_tokens, n_features = shape
    return Bags(layer * n_tokens + token, layer * n_features + feature,
                n_layers * n_tokens, n_layers * n_features)  # fmt: skip


def topk_bags(idx: Tensor, values: Tensor, n_features: int) -> tuple[Bags, Tensor]:
    """Per token and layer choices idx, values [N, L, k] -> (Bags, values [N·L·k]).

    Features are sorted within each bag (cuSPARSE's SDDMM wants sorted CSR columns)."""
    n, n_layers, k = idx.shape
    idx, order = _sort(idx.transpose(0, 1))  # [L, N, k]
    values = values.transpose(0, 1).gather(-1, order)
    dev = idx.device
    layer = torch.arange(n_layers, device=dev)[:, None, None].expand(-1, n, k)
    token = torch.arange(n, device=dev)[None, :, None].expand(n_layers, -1, k)
    bags = _bags(layer.reshape(-1), token.reshape(-1), idx.reshape(-1), (n_layers, n, n_features))
    return bags, values.reshape(-1)


def batch_topk_bags(idx: Tensor, values: Tensor, n_tokens: int, n_features: int):
    """Per layer choices over the batch, idx into [N·F] and values [L, k·N] -> (Bags, values)."""
    n_layers, m = idx.shape
    idx, order = _sort(idx)  # (token, feature) order within each layer
    values = values.gather(-1, order)
    layer = torch.arange(n_layers, device=idx.device)[:, None].expand(-1, m).reshape(-1)
    idx = idx.reshape(-1)
    bags = _bags(layer, idx // n_features, idx % n_features, (n_layers, n_tokens, n_features))
    return bags, values.reshape(-1)


def dense_bags(a_lm: Tensor, window: Tensor | None = None) -> tuple[Bags, Tensor]:
    """Layer-major activations a [L, N, F] (ReLU / JumpReLU) -> (Bags, values), the values
    still attached to `a_lm`'s graph: the nonzero entries, plus those where `window` (a 0/1
    mask) is set. Those hold a = 0 but JumpReLU's θ gradient reads ∂L/∂a there."""
    mask = a_lm.detach() != 0
    if window is not None:
        mask |= window != 0
    layer, token, feature = mask.nonzero(as_tuple=True)
    return _bags(layer, token, feature, a_lm.shape), a_lm[layer, token, feature]


def active_bags(activation, pre: Tensor) -> tuple[Bags, Tensor]:
    """TopK / BatchTopK applied to pre-activations [N, L, F] (no grad) -> (Bags, the chosen
    pre-activations, before the ReLU)."""
    n, _, n_features = pre.shape
    if isinstance(activation, BatchTopK):
        values, idx = activation.select(pre)
        return batch_topk_bags(idx, values, n, n_features)
    if isinstance(activation, TopK):
        values, idx = pre.topk(activation.k, dim=-1, sorted=False)
        return topk_bags(idx, values, n_features)
    raise TypeError(f"no sparse selection for {type(activation).__name__}")


def worth_it(n_active: float, n_total: int) -> bool:
    """Whether a ReLU / JumpReLU batch should decode sparsely (see MAX_DENSITY)."""
    return n_active <= MAX_DENSITY * n_total


def layer_major(t: Tensor) -> Tensor:
    """[N, L, d] -> [L·N, d] (bag order)."""
    return t.transpose(0, 1).reshape(-1, t.shape[-1])


# -- the sparse primitives -------------------------------------------------------------------
def _bag_sum(bags: Bags, weights: Tensor, table: Tensor) -> Tensor:
    """[n_bags, D]: Σ_{e in bag} weights_e table[rows_e]."""
    return F.embedding_bag(bags.rows, table, bags.offsets, mode="sum",
                           per_sample_weights=weights.to(table.dtype))  # fmt: skip


def _row_sum(bags: Bags, weights: Tensor, table: Tensor) -> Tensor:
    """[n_rows, D]: Σ_{e: rows_e = r} weights_e table[bag_e] (the transposed bag sum)."""
    order, bag, starts = bags.by_row
    w = weights.to(table.dtype)[order]
    return F.embedding_bag(bag, table.contiguous(), starts, mode="sum", per_sample_weights=w)


def _row_dots(bags: Bags, table: Tensor, g: Tensor) -> Tensor:
    """[nnz]: table[rows_e] · g[bag_e], i.e. (g @ tableᵀ) sampled at the pattern (SDDMM).

    `sampled_addmm` computes only the nnz dot products, without gathering [nnz, D] rows
    (17x faster than index_select + vecdot in chunks on CPU, bench/train.py's shapes)."""
    ends = bags.offsets.new_full((1,), bags.rows.shape[0])
    crow = torch.cat([bags.offsets, ends])
    zeros = g.new_zeros(bags.rows.shape[0])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the op is tested here
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, bags.rows, zeros, (bags.n_bags, bags.n_rows),
                                          check_invariants=False)  # fmt: skip
    return torch.sparse.sampled_addmm(pattern, g, table.T, beta=0.0).values()


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, table: Tensor, bags: Bags) -> Tensor:
        ctx.save_for_backward(values, table)
        ctx.bags = bags
        return _bag_sum(bags, values, table)

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, table = ctx.saved_tensors
        grad = grad.float().contiguous()
        g_values = _row_dots(ctx.bags, table, grad) if ctx.needs_input_grad[0] else None
        g_table = None
        if ctx.needs_input_grad[1]:
            g_table = _row_sum(ctx.bags, values, grad)
        return g_values, g_table, None


class _GatherPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, x, w_enc, b_enc, bags):
        ctx.save_for_backward(x, w_enc)
        ctx.bags = bags
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w_enc = ctx.saved_tensors
        bags, needs = ctx.bags, ctx.needs_input_grad
        grad = grad.float()
        g_x = _bag_sum(bags, grad, w_enc) if needs[1] else None
        g_w = _row_sum(bags, grad, x).to(w_enc.dtype) if needs[2] else None
        g_b = None
        if needs[3]:
            g_b = grad.new_zeros(bags.n_rows).index_add_(0, bags.rows, grad)
        return None, g_x, g_w, g_b, None


def sparse_decode(values: Tensor, table: Tensor, bags: Bags) -> Tensor:
    """values [nnz], table [n_rows, D] -> [n_bags, D]: Σ_{e in bag} values_e table[rows_e].

    Backward touches only the used rows of `table`, in O(nnz·D)."""
    with torch.autocast(values.device.type, enabled=False):
        return _Decode.apply(values.float(), table, bags)


def gather_pre(values: Tensor, x: Tensor, w_enc: Tensor, b_enc: Tensor, bags: Bags) -> Tensor:
    """The pre-activations `values` [nnz] (= w_enc[rows]·x[bag] + b_enc[rows], computed by
    the caller's dense matmul) as a differentiable function of x [n_bags, d], w_enc
    [n_rows, d] and b_enc [n_rows], whose backward is O(nnz·d)."""
    return _GatherPre.apply(values, x, w_enc, b_enc, bags)


# -- transcoder-level helpers ----------------------------------------------------------------
def encode(tc, x: Tensor, pre: Tensor) -> tuple[Bags, Tensor]:
    """TopK / BatchTopK activations of x [N, L, d] from its pre-activations [N, L, F] (no
    grad): (Bags, values [nnz]) with gradient to W_enc and b_enc through the active set."""
    bags, values = active_bags(tc.activation, pre)
    return bags, torch.relu(_gather_layers(tc, values, x, bags))


def _gather_layers(tc, values: Tensor, x: Tensor, bags: Bags) -> Tensor:
    """`gather_pre` against every layer's encoder at once (x [N, L, d])."""
    w_enc, b_enc = tc.W_enc.flatten(0, 1), tc.b_enc.flatten()
    return gather_pre(values, layer_major(x), w_enc, b_enc, bags)


def decoder_writes(tc, bags: Bags, values: Tensor, n_tokens: int) -> Tensor:
    """Σ over active features of a_i W_dec[i], without b_dec: [N, L, d]."""
    n_layers, d = tc.n_layers, tc.d_model
    if not tc.cross_layer:
        y = sparse_decode(values, tc.W_dec.flatten(0, 1), bags)
        return y.view(n_layers, n_tokens, d).transpose(0, 1)
    out = None
    for i in range(n_layers):
        sub, part = bags.layer(i, n_tokens, tc.d_transcoder)
        y = sparse_decode(values[part], tc.decoder(i).flatten(1), sub)  # [N, (L−i)·d]
        y = F.pad(y, (i * d, 0))
        out = y if out is None else out + y
    return out.view(n_tokens, n_layers, d)


def decode(tc, bags: Bags, values: Tensor, n_tokens: int) -> Tensor:
    """Σ over active features of a_i W_dec[i] + b_dec: [N, L, d] in float32."""
    return decoder_writes(tc, bags, values, n_tokens) + tc.b_dec


def auxk_loss(tc, x: Tensor, pre: Tensor, dead: Tensor, residual: Tensor, k_aux: int) -> Tensor:
    """`losses.auxk_loss` (the dense reference, same value and gradients) with the dead
    features' k_aux largest pre-activations encoded and decoded sparsely.

    x, residual [N, L, d]; pre [N, L, F] without gradient (the sparse gather carries it)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    n, n_layers, n_features = pre.shape
    k = min(k_aux, n_features)
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    # beyond the most dead features of any layer, topk would only add -inf entries (zeros)
    values, idx = masked.topk(min(k, int(dead.sum(-1).max())), dim=-1, sorted=False)
    bags, values = topk_bags(idx, values, n_features)
    values = torch.relu(_gather_layers(tc, values, x, bags))
    e_hat = decoder_writes(tc, bags, values, n)
    e = residual.detach()
    variance = (e - e.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    scale = min(1.0, n_dead / (k * n_layers))
    return scale * (e_hat - e).pow(2).sum() / variance


def to_coo(bags: Bags, values: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """The activations as a detached sparse COO tensor of `shape` [N, L, F]."""
    n, _, n_features = shape
    layer, token = bags.bag // n, bags.bag % n
    indices = torch.stack([token, layer, bags.rows % n_features])
    return torch.sparse_coo_tensor(indices, values.detach(), shape, check_invariants=False)
