"""The encoder, the ReLU / JumpReLU and the sparsity penalties as one cache-friendly pass.

    out = fused_encode(x, tc.W_enc, tc.b_enc, theta, c * tc.decoder_norms())
    sparsity = lam * out.tanh_sum / n_tokens                  # Σ tanh(c·‖W_dec‖·a) per token
    preact = lam_p * (out.gap_sum * norms).sum() / n_tokens   # Σ ReLU(θ − h)·‖W_dec‖ per token
    y_hat = tc.decode(out.a)                                  # a in the matmul dtype

Same values and gradients as `pre_activations` → `activation` → `losses.tanh_sparsity_loss`
→ `losses.preact_loss` (tests hold them equal), without their cost: unfused, a step makes
about thirty passes over [N, L, F], each a fresh allocation, and is memory-bound. Here one
matmul per layer writes the pre-activations straight into `a`'s storage, and all the
elementwise work of a layer (bias, threshold, penalties, statistics; in backward the
gradients of pre-activations, θ and ‖W_dec‖) is one function per direction,
`_forward_pass` and `_backward_pass`, run by one of these backends (`backend()` says which,
`use()` picks one):

- "compiled": `torch.compile` of those two functions, one generated kernel per pass (Triton
  on CUDA, C++/OpenMP on CPU). The default wherever it works, for layer blocks of at least
  `MIN_COMPILE_ELEMENTS`. The first step compiles (seconds; Inductor caches the result on
  disk for later processes); tokens per step can change without compiling again.
- "eager": the same functions op by op (on CPU over row chunks that stay in cache), for
  small blocks and where compiling is off or unavailable: `WIREMAP_COMPILE=0`,
  `TORCHDYNAMO_DISABLE=1`, Windows, no Triton on CUDA, or a first compile that failed (no
  C++ compiler on CPU; one warning says so).

`bench/fused_kernels.py` times both, and the unfused reference, on whole training steps.

Saved for backward: `a` itself and a 2-byte mask of the JumpReLU threshold window. Fired is
`a != 0` (θ ≥ 0, so pre > θ gives a > 0); below-threshold is its complement, which differs
from `pre < θ` only where pre == θ exactly. Under bf16 autocast the matmuls run in bf16 and
the elementwise math in float32, as unfused; `a` is stored in bf16, the dtype the decoder
reads, so backward evaluates the tanh penalty's derivative at the bf16-rounded activations
(relative rounding error at most 2⁻⁸) and a step moves half as many bytes for `a`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Iterator
from typing import Literal, NamedTuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)

Backend = Literal["compiled", "eager"]
CHUNK_ELEMENTS = 1 << 18
"""Elements per eager chunk on CPU: 1 MiB of float32, so its temporaries stay in cache.
Elsewhere a chunk is a whole layer (small chunks would only multiply kernel launches)."""
MIN_COMPILE_ELEMENTS = 1 << 20
"""Smaller layer blocks [N, F] run eagerly unless `use("compiled")` says otherwise: there the
eager passes take a millisecond or less, and a first compile takes seconds (debug runs and
tests: 512 tokens × 256 features)."""
RECOMPILE_LIMIT = 32
"""Compiled variants allowed per pass (dtype × ReLU / fixed / learned θ × which gradients
arrive), above torch's default of 8 so a process that trains several kinds never falls back."""
_chosen: Backend | None = None
_compile_failed = False


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


# ---- backends ------------------------------------------------------------------------------


def backend(device: torch.device | str) -> Backend:
    """The backend the passes take on `device` for blocks of `MIN_COMPILE_ELEMENTS` or more
    (smaller ones run eagerly unless `use("compiled")`); see the module docstring."""
    if _chosen is not None:
        return _chosen
    return "compiled" if _compile_works(torch.device(device).type) else "eager"


@contextlib.contextmanager
def use(name: Backend | None) -> Iterator[None]:
    """Within this block the passes take backend `name` (None: the automatic choice)."""
    global _chosen
    before, _chosen = _chosen, name
    try:
        yield
    finally:
        _chosen = before


def _compile_works(device_type: str) -> bool:
    if _compile_failed or os.environ.get("WIREMAP_COMPILE", "1") == "0":
        return False
    if os.environ.get("TORCHDYNAMO_DISABLE", "0") not in ("", "0") or sys.platform == "win32":
        return False
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    return device_type == "cpu"


@functools.cache
def _compiled(fn):
    # One graph per variant; N is marked dynamic on each call, so a smaller last batch or a
    # validation batch reuses it instead of compiling again. The default mode: these are
    # pointwise + reduction kernels with nothing for max-autotune to tune, and
    # reduce-overhead's CUDA graphs would need static copies of the blocks they write in place.
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _run(fn, a: Tensor, *args) -> Tensor:
    """`fn` (a pass over one layer's [N, F] block) on the backend for `a`'s device."""
    global _compile_failed
    big = a.numel() >= MIN_COMPILE_ELEMENTS or _chosen == "compiled"
    if big and backend(a.device) == "compiled":
        rows = [t for t in (a, *args) if isinstance(t, Tensor) and t.dim() == 2]
        for t in rows:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return _compiled(fn)(a, *args)
        except torch._dynamo.exc.BackendCompilerFailed as err:  # e.g. no C++ compiler
            _compile_failed = True
            log.warning(
                "torch.compile failed (%s), so the fused encoder runs its eager loop; install a "
                "C++ compiler (CPU) or Triton (CUDA), or set WIREMAP_COMPILE=0 to silence "
                "this", str(err).splitlines()[0],
            )  # fmt: skip
    return sum(fn(a[rows], *_rows(args, rows)) for rows in _chunks(a))


def _rows(args: tuple, rows: slice) -> list:
    return [t[rows] if isinstance(t, Tensor) and t.dim() == 2 else t for t in args]


def _chunks(t: Tensor) -> list[slice]:
    n_rows, n_cols = t.shape
    if t.device.type != "cpu":
        return [slice(0, n_rows)]
    rows = max(1, CHUNK_ELEMENTS // max(1, n_cols))
    return [slice(s, min(s + rows, n_rows)) for s in range(0, n_rows, rows)]


# ---- the two passes (pure PyTorch: run eagerly or compiled) --------------------------------


def _forward_pass(a, window, b, theta, cn2, half_bw: float) -> Tensor:
    """In place: a [N, F] holds W_enc x (no bias) -> activations; window <- |pre − θ| < ε/2.

    Returns per-feature sums over tokens [3, F]: Σ min(pre − θ, 0), #fired, Σ tanh(cn·a).
    Written for eager speed too (Inductor fuses it either way): in-place ops on fresh
    temporaries, float masks (float compares and multiplies are several times faster than
    bool ones on CPU), tanh as 2σ(2z) − 1 (σ is vectorised where tanh is not; exact at 0).
    """
    in_place = a.dtype == torch.float32
    p = (a if in_place else a.float()).add_(b)
    d = p if theta is None else p - theta
    gap = d.clamp_max(0).sum(0)
    on = torch.gt(d, 0, out=torch.empty_like(p))
    fired = on.sum(0)
    if window is not None:  # d is a temporary here (θ learns)
        torch.lt(d.abs_(), half_bw, out=window)
    s = torch.sigmoid(p.mul_(on) * cn2)
    if not in_place:
        a.copy_(p)
    return torch.stack([gap, fired, s.sum(0).mul_(2).sub_(p.shape[0])])


def _backward_pass(a, grad_a, window, pre, cn2, k, below) -> Tensor:
    """The pre-activation gradient into `pre` [N, F]; returns per-feature sums [3, F]:
    Σ g·window, Σ a·σ(1−σ), Σ pre (the bias gradient).

    With σ = σ(2·cn·a), d tanh(cn·a) = 4σ(1 − σ): g = k·σ(1−σ) + ∂L/∂a (k = 4·cn·∂L/∂Σtanh).
    Fired (a > 0): g; below θ: the pre-activation loss's −∂L/∂gap (`below`).
    """
    a_f = a.float()
    s = torch.sigmoid(a_f * cn2)
    u = torch.addcmul(s, s, s, value=-1)  # σ(1 − σ)
    g_cn = (a_f * u).sum(0)
    g = u.mul_(k)
    if grad_a is not None:
        g += grad_a
    g_window = torch.zeros_like(cn2) if window is None else (g * window).sum(0)
    out = torch.addcmul(below, torch.sign(a_f), g.sub_(below))  # a ≥ 0: g if fired, else below
    pre.copy_(out)
    return torch.stack([g_window, g_cn, out.sum(0)])


# ---- autograd ------------------------------------------------------------------------------


class _FusedEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_enc, b_enc, theta, cn, bandwidth, mm_dtype):
        n, n_layers, _ = x.shape
        f = w_enc.shape[1]
        a = x.new_empty(n_layers, n, f, dtype=mm_dtype)
        learn_theta = theta is not None and theta.requires_grad
        # bf16 holds 0/1 exactly, and bf16 compares and multiplies are faster than uint8 ones
        window = torch.empty_like(a, dtype=torch.bfloat16) if learn_theta else None
        sums = x.new_empty(n_layers, 3, f, dtype=torch.float32)
        for layer in range(n_layers):
            torch.mm(x[:, layer].to(mm_dtype), w_enc[layer].to(mm_dtype).T, out=a[layer])
            th = None if theta is None else theta[layer].float()
            win = None if window is None else window[layer]
            args = (b_enc[layer].float(), th, 2 * cn[layer].float(), bandwidth / 2)
            sums[layer] = _run(_forward_pass, a[layer], win, *args)
        gap, active = -sums[:, 0], sums[:, 1]
        below = n - active
        tanh_sum = sums[:, 2].sum(dtype=torch.float64).float()
        ctx.save_for_backward(x, w_enc, theta, cn, a, window, below)
        ctx.bandwidth, ctx.mm_dtype = bandwidth, mm_dtype
        ctx.mark_non_differentiable(*(t for t in (active, window) if t is not None))
        ctx.set_materialize_grads(False)  # unused outputs get None, not zeros
        return a, tanh_sum, gap, active, window

    @staticmethod
    def backward(ctx, grad_a, grad_tanh, grad_gap, _grad_active, _grad_window):
        x, w_enc, theta, cn, a, window, below = ctx.saved_tensors
        grads = _Grads(x, w_enc, theta, cn, ctx.needs_input_grad, ctx.mm_dtype)
        grad_tanh = cn.new_zeros((), dtype=torch.float32) if grad_tanh is None else grad_tanh
        grad_gap = torch.zeros_like(cn, dtype=torch.float32) if grad_gap is None else grad_gap
        grad_tanh, grad_gap = grad_tanh.float(), grad_gap.float()
        for layer in range(a.shape[0]):
            g_a, win = _at(layer, grad_a, window)
            g_window = _grad_layer(
                a[layer], g_a, grad_tanh, grad_gap[layer], cn[layer].float(), win, grads, layer
            )
            grads.encoder(layer)
            if grads.theta is not None:  # straight-through window term + preact term
                g_theta = g_window * (-theta[layer] / ctx.bandwidth)
                grads.theta[layer] = g_theta + grad_gap[layer] * below[layer]
        return grads.x, grads.w_enc, grads.b_enc, grads.theta, grads.cn, None, None


def _at(layer: int, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    return tuple(None if t is None else t[layer] for t in tensors)


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
    """One layer's pre-activation gradient into `grads.pre`; returns Σ window·∂L/∂a [F]."""
    k, below_grad = 4 * grad_tanh * cn, -grad_gap
    grad_a = None if grad_a is None else grad_a.to(a.dtype)
    sums = _run(_backward_pass, a, grad_a, window, grads.pre, 2 * cn, k, below_grad)
    g_window, g_cn, g_b = sums
    if grads.cn is not None:
        grads.cn[layer] = g_cn * (4 * grad_tanh)
    if grads.b_enc is not None:
        grads.b_enc[layer] = g_b
    return g_window
