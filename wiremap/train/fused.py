"""The encoder, the ReLU / JumpReLU and the sparsity penalties as one cache-friendly pass.

    out = fused_encode(x, tc.encoder_weight, tc.encoder_bias, theta, c * tc.decoder_norms())
    sparsity = lam * out.tanh_sum / n_tokens                  # Σ tanh(c·‖W_dec‖·a) per token
    preact = lam_p * (out.gap_sum * norms).sum() / n_tokens   # Σ ReLU(θ − h)·‖W_dec‖ per token
    y_hat = tc.decode(out.a)                                  # a in the matmul dtype

Same values and gradients as `pre_activations` → `activation` → `losses.tanh_sparsity_loss`
→ `losses.preact_loss` (tests hold them equal), without their cost: unfused, a step makes
about thirty passes over [N, L, F], each a fresh allocation that the CPU allocator returns
to the OS, and is memory-bound. Here one matmul per layer writes the pre-activations
straight into `a`'s storage, and every elementwise step (bias, threshold, penalties,
statistics; in backward the gradients of pre-activations, θ and ‖W_dec‖) runs in one pass
per layer: on CPU as a compiled C loop (`native.py`, when a C compiler is available), else
as PyTorch ops over row chunks that stay in cache (GPU: whole layers).

Saved for backward: `a` itself and a 2-byte mask of the JumpReLU threshold window. Fired is
`a != 0` (θ ≥ 0, so pre > θ gives a > 0); below-threshold is its complement, which differs
from `pre < θ` only where pre == θ exactly. Under bf16 autocast the matmuls run in bf16 and
the elementwise math in float32, as unfused; `a` is stored in bf16, the dtype the decoder
reads, so backward evaluates the tanh penalty's derivative at the bf16-rounded activations
(relative rounding error at most 2⁻⁸) and a step moves half as many bytes for `a`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from wiremap.train import native

CHUNK_ELEMENTS = 1 << 18
"""Elements per elementwise chunk on CPU: 1 MiB of float32, so its temporaries stay in cache.
On GPUs a chunk is a whole layer (small chunks would only multiply kernel launches)."""


class FusedEncoding(NamedTuple):
    a: Tensor
    """[N, L, F] feature activations in the matmul dtype (a view of a layer-major tensor)."""
    tanh_sum: Tensor
    """Σ over tokens, layers and features of tanh(cn · a) (scalar)."""
    gap_sum: Tensor
    """[L, F]: Σ over tokens of ReLU(θ − pre)."""
    active: Tensor
    """[L, F]: tokens on which each feature fired (no gradient)."""
    window: Tensor | None
    """[L, N, F] 0/1 (bfloat16): pre-activations within ε/2 of θ, where θ's straight-through
    gradient reads ∂L/∂a although a = 0 (None unless θ learns)."""


def fused_encode(
    x: Tensor,
    w_enc: Tensor,
    b_enc: Tensor,
    theta: Tensor | None,
    cn: Tensor,
    *,
    bandwidth: float = 1e-3,
    mm_dtype: torch.dtype = torch.float32,
) -> FusedEncoding:
    """x [N, L, d], W_enc [L, F, d], b_enc [L, F], θ [L, F] (None = ReLU), cn = c·‖W_dec‖ [L, F].

    `mm_dtype` is the matmul dtype (bfloat16 under bf16 autocast); everything elementwise is
    float32. Gradients flow to x, W_enc, b_enc, θ (JumpReLU straight-through estimator with a
    rectangle kernel of width `bandwidth`) and cn.
    """
    a, tanh_sum, gap_sum, active, window = _FusedEncode.apply(
        x, w_enc, b_enc, theta, cn, float(bandwidth), mm_dtype
    )
    return FusedEncoding(a.transpose(0, 1), tanh_sum, gap_sum, active, window)


def _chunks(t: Tensor) -> list[slice]:
    n_rows, n_cols = t.shape
    if t.device.type != "cpu":
        return [slice(0, n_rows)]
    rows = max(1, CHUNK_ELEMENTS // max(1, n_cols))
    return [slice(s, min(s + rows, n_rows)) for s in range(0, n_rows, rows)]


class _FusedEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_enc, b_enc, theta, cn, bandwidth, mm_dtype):
        n, n_layers, _ = x.shape
        f = w_enc.shape[1]
        a = x.new_empty(n_layers, n, f, dtype=mm_dtype)
        learn_theta = theta is not None and theta.requires_grad
        # bf16 holds 0/1 exactly, and bf16 compares and multiplies are faster than uint8 ones
        window = torch.empty_like(a, dtype=torch.bfloat16) if learn_theta else None
        gap, below, active = (x.new_zeros(n_layers, f, dtype=torch.float32) for _ in range(3))
        tanh_sum = x.new_zeros((), dtype=torch.float32)
        for layer in range(n_layers):
            torch.mm(x[:, layer].to(mm_dtype), w_enc[layer].to(mm_dtype).T, out=a[layer])
            outs = _at(layer, a, window)
            stats = _at(layer, gap, below, active)
            th = None if theta is None else theta[layer]
            tanh_sum += _threshold_layer(b_enc[layer], th, cn[layer], bandwidth, outs, stats)
        ctx.save_for_backward(x, w_enc, theta, cn, a, window, below)
        ctx.bandwidth, ctx.mm_dtype = bandwidth, mm_dtype
        ctx.mark_non_differentiable(*(t for t in (active, window) if t is not None))
        ctx.set_materialize_grads(False)  # unused outputs get None, not zeros
        return a, tanh_sum, gap, active, window

    @staticmethod
    def backward(ctx, grad_a, grad_tanh, grad_gap, _grad_active, _grad_window):
        x, w_enc, theta, cn, a, window, below = ctx.saved_tensors
        grads = _Grads(x, w_enc, theta, cn, ctx.needs_input_grad, ctx.mm_dtype)
        grad_tanh = cn.new_zeros(()) if grad_tanh is None else grad_tanh.float()
        grad_gap = torch.zeros_like(cn) if grad_gap is None else grad_gap.float()
        for layer in range(a.shape[0]):
            g_a, win = _at(layer, grad_a, window)
            g_window = _grad_layer(
                a[layer], g_a, grad_tanh, grad_gap[layer], cn[layer], win, grads, layer
            )
            grads.encoder(layer)
            if grads.theta is not None:  # straight-through window term + preact term
                g_theta = g_window * (-theta[layer] / ctx.bandwidth)
                grads.theta[layer] = g_theta + grad_gap[layer] * below[layer]
        return grads.x, grads.w_enc, grads.b_enc, grads.theta, grads.cn, None, None


def _at(layer: int, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    return tuple(None if t is None else t[layer] for t in tensors)


def _threshold_layer(b_enc, theta, cn, bandwidth, outs, stats) -> Tensor:
    """One layer, in place: a [N, F] holds W_enc x (no bias) -> a; returns Σ tanh(cn·a).

    Accumulates stats = (gap, below, active): Σ ReLU(θ − pre), #not fired, #fired per feature.
    Masks are float (float compares and multiplies are several times faster than bool ones
    on CPU), and tanh is 2σ(2z) − 1 (σ is vectorised where tanh is not, and exact at a = 0).
    """
    a, window = outs
    gap, below, active = stats
    if native.supports(a):
        gap_sum, fired, tanh = native.forward(a, window, b_enc, theta, cn, bandwidth)
        gap.sub_(gap_sum)
        active.add_(fired)
        below.add_(a.shape[0] - fired)
        return tanh.sum(dtype=torch.float64).float()
    total = a.new_zeros((), dtype=torch.float32)
    cn2 = 2 * cn
    in_place = a.dtype == torch.float32
    for rows in _chunks(a):
        p = (a[rows] if in_place else a[rows].float()).add_(b_enc)
        d = p if theta is None else p - theta
        gap.sub_(d.clamp_max(0).sum(0))
        on = torch.gt(d, 0, out=torch.empty_like(p))
        fired = on.sum(0)
        active.add_(fired)
        below.add_(p.shape[0] - fired)
        if window is not None:
            torch.lt(d.abs_(), bandwidth / 2, out=window[rows])
        s = torch.sigmoid(p.mul_(on) * cn2)
        total += s.sum().mul_(2).sub_(s.numel())
        if not in_place:
            a[rows].copy_(p)
    return total


class _Grads:
    """Gradient buffers of the fused encoder's inputs (None where no gradient is needed)."""

    def __init__(self, x, w_enc, theta, cn, needs, mm_dtype) -> None:
        n_layers, f, _ = w_enc.shape
        self.x = torch.zeros_like(x) if needs[0] else None
        self.w_enc = torch.empty_like(w_enc) if needs[1] else None
        self.b_enc = w_enc.new_empty(n_layers, f) if needs[2] else None
        self.theta = torch.empty_like(theta) if theta is not None and needs[3] else None
        self.cn = torch.empty_like(cn) if needs[4] else None
        self.pre = x.new_empty(x.shape[0], f, dtype=mm_dtype)
        """One layer's pre-activation gradient [N, F], in the matmul dtype."""
        self._x, self._w, self.mm_dtype = x, w_enc, mm_dtype

    def encoder(self, layer: int) -> None:
        """W_enc and x gradients of one layer from `self.pre`."""
        g, dt = self.pre, self.mm_dtype
        if self.w_enc is not None:
            self.w_enc[layer] = g.T @ self._x[:, layer].to(dt)
        if self.x is not None:
            self.x[:, layer] = g @ self._w[layer].to(dt)


def _grad_layer(a, grad_a, grad_tanh, grad_gap, cn, window, grads, layer) -> Tensor:
    """One layer's pre-activation gradient into `grads.pre`; returns Σ window·∂L/∂a [F].

    d tanh(cn·a) = 4σ(1 − σ) with σ = σ(2·cn·a): ∂/∂a = cn·4σ(1−σ), ∂/∂cn = a·4σ(1−σ).
    """
    k, below_grad = 4 * grad_tanh * cn, -grad_gap
    if native.supports(a):
        sums = native.backward(a, grad_a, window, grads.pre, cn, k, below_grad)
    else:
        sums = _grad_chunks(a, grad_a, cn, k, below_grad, window, grads.pre)
    g_window, g_cn, g_b = sums
    if grads.cn is not None:
        grads.cn[layer] = g_cn * (4 * grad_tanh)
    if grads.b_enc is not None:
        grads.b_enc[layer] = g_b
    return g_window


def _grad_chunks(a, grad_a, cn, k, below_grad, window, pre) -> tuple[Tensor, Tensor, Tensor]:
    """`_grad_layer`'s PyTorch loop over row chunks: fills `pre`, returns its per-feature sums."""
    f = a.shape[1]
    g_window, g_cn, g_b = (a.new_zeros(f, dtype=torch.float32) for _ in range(3))
    cn2 = 2 * cn
    same = pre.dtype == torch.float32
    for rows in _chunks(a):
        a_c = a[rows].float()
        s = torch.sigmoid(a_c * cn2)
        u = torch.addcmul(s, s, s, value=-1)  # σ(1 − σ)
        g_cn += (a_c * u).sum(0)
        g = u.mul_(k)
        if grad_a is not None:
            g += grad_a[rows]
        if window is not None:
            g_window += (g * window[rows].float()).sum(0)
        # fired (a > 0): ∂L/∂a; below θ: the pre-activation loss's −∂L/∂gap
        out = pre[rows] if same else None
        out = torch.addcmul(below_grad, torch.sign(a_c), g.sub_(below_grad), out=out)
        g_b += out.sum(0)
        if not same:
            pre[rows].copy_(out)
    return g_window, g_cn, g_b
