"""The frozen language model used for exact attribution (DESIGN.md §5).

    with freeze(model, input_ids, skip=tc_skip, input_hook="mlp_in") as lin:
        run = lin.forward(writes={3: delta}, embed_write=None)
        run.reads[4]          # transcoder input at layer 4        [batch, pos, d]
        run.final             # final norm output (read by the unembedding)
        lin.reference.reads   # the same tensors from the clean run (constants)

On entry one clean forward pass records the constants of the prompt: the queries and
keys of every attention call, the scale of every norm, and each MLP block's output minus
its skip path. Inside the context the model is then an affine function of what is
written to the residual stream:
- attention runs the model's own eager attention function with the *recorded* (detached)
  queries and keys, so the pattern is constant and only values carry the input (sliding
  windows, soft-capping and grouped queries come with the function);
- every norm uses its recorded scale: RMSNorm `x·s·w` (Gemma `x·s·(1+w)`), LayerNorm
  `(x − mean x)·s·w + b`;
- each MLP block (for Gemma/OLMo-2 including its post-norm) outputs
  `skip(x) + (mlp_out − skip(x))_clean + write`, where `write` is an optional addition at
  that layer: the hook attribution differentiates and interventions add to.
The final norm is frozen too; logit soft-capping is not part of `run.final`.

The frozen model evaluated on the prompt equals the clean model (up to rounding), and on
any prefix of the prompt it equals the clean model on that prefix (everything is causal).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from wiremap.models.adapters import Adapter, get_adapter, get_module
from wiremap.models.hooks import (
    StopForward,
    _first_tensor,
    _output_tensor,
    hooks_removed,
    stoppable,
    tensor_hook,
)

ATTN_NAME = "wiremap_frozen"
SkipFn = Callable[[int, Tensor], Tensor]  # (layer, x [..., d]) -> skip(x) [..., d]


@dataclass
class FrozenRun:
    """Tensors of one forward pass through the (frozen or clean) model."""

    resid0: Tensor | None = None
    """Input of the first layer (token embedding, plus learned positions / scaling)."""
    reads: dict[int, Tensor] = field(default_factory=dict)
    """Transcoder input (at the input hook) per layer."""
    mlp_outs: dict[int, Tensor] = field(default_factory=dict)
    """What each MLP block added to the residual stream."""
    final: Tensor | None = None
    """Output of the final norm: the unembedding's input."""


@dataclass
class _State:
    recording: bool = True
    qk: dict[nn.Module, tuple[Tensor, Tensor]] = field(default_factory=dict)
    scales: dict[nn.Module, Tensor] = field(default_factory=dict)


class FrozenModel:
    """Handle on a model made linear around one prompt; see the module docstring."""

    def __init__(self, model, adapter: Adapter, input_ids: Tensor, input_hook: str, skip):
        self.model, self.adapter, self.input_hook = model, adapter, input_hook
        self.input_ids = input_ids
        self.skip = skip
        self.n_layers = adapter.n_layers(model)
        self.base = get_module(model, adapter.layers.rsplit(".", 1)[0])
        self.reference: FrozenRun = FrozenRun()
        self.mlp_consts: dict[int, Tensor] = {}

    def forward(
        self,
        input_ids: Tensor | None = None,
        writes: dict[int, Tensor] | None = None,
        embed_write: Tensor | None = None,
        stop_after: int | None = None,
    ) -> FrozenRun:
        """Run the frozen model (on the prompt, or a prefix of it) and return its tensors.

        `writes[l]` is added to the residual with layer l's MLP output; `embed_write` to the
        first layer's input. Both broadcast against `[batch, pos, d_model]`. With
        `stop_after=l` the pass ends once the transcoder input of layer l is read.
        """
        ids = self.input_ids if input_ids is None else input_ids
        run = FrozenRun()
        handles = self._record_hooks(run, embed_write, stop_after)
        with stoppable(), hooks_removed(handles), _patched_mlps(self, run, writes or {}):
            self.base(input_ids=ids, use_cache=False)
        return run

    def logits(self, final: Tensor) -> Tensor:
        """Pre-soft-cap logits from final norm outputs."""
        return get_module(self.model, self.adapter.unembed)(final)

    def _record_hooks(self, run: FrozenRun, embed_write: Tensor | None, stop_after) -> list:
        adapter, model = self.adapter, self.model

        def first_layer(_m, args, kwargs):
            h = _first_tensor(args, kwargs)
            if embed_write is not None:
                h = h + embed_write
            run.resid0 = h
            return _replace_first(args, kwargs, h)

        handles = [adapter.layer(model, 0).register_forward_pre_hook(first_layer, with_kwargs=True)]
        for layer in range(self.n_layers):
            module, side = adapter.hook_site(model, layer, self.input_hook)
            handles.append(_keep(module, side, run.reads, layer, stop=layer == stop_after))
            out_module, _ = adapter.hook_site(model, layer, "mlp_out")
            handles.append(_keep(out_module, "output", run.mlp_outs, layer))
        final_norm = get_module(model, adapter.final_norm)
        handles.append(final_norm.register_forward_hook(lambda _m, _a, out: _set_final(run, out)))
        return handles


def _set_final(run: FrozenRun, out) -> None:
    run.final = _output_tensor(out)


def _keep(module: nn.Module, side: str, slot: dict, layer: int, stop: bool = False):
    def store(t: Tensor) -> None:
        slot[layer] = t
        if stop:
            raise StopForward

    return tensor_hook(module, side, store)


def _replace_first(args: tuple, kwargs: dict, value: Tensor):
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


@contextmanager
def freeze(
    model: nn.Module,
    input_ids: Tensor,
    *,
    adapter: Adapter | None = None,
    input_hook: str = "mlp_in",
    skip: SkipFn | None = None,
) -> Iterator[FrozenModel]:
    """Freeze `model` around the prompt `input_ids` [1, pos]; see the module docstring."""
    adapter = adapter or get_adapter(model)
    lin = FrozenModel(model, adapter, input_ids, input_hook, skip)
    state = _State()
    with _frozen_attention(model, adapter, state), _frozen_norms(model, adapter, state):
        with torch.no_grad():
            lin.reference = lin.forward()
        lin.mlp_consts = _mlp_constants(lin)
        state.recording = False
        yield lin


def _mlp_constants(lin: FrozenModel) -> dict[int, Tensor]:
    ref = lin.reference
    consts = {}
    with torch.no_grad():
        for layer in range(lin.n_layers):
            out = ref.mlp_outs[layer]
            if lin.skip is not None:
                out = out - lin.skip(layer, ref.reads[layer])
            consts[layer] = out
    return consts


# -- MLP blocks ------------------------------------------------------------------------
@contextmanager
def _patched_mlps(lin: FrozenModel, run: FrozenRun, writes: dict[int, Tensor]):
    """While recording: nothing. Frozen: each MLP block = skip(x) + constant + write."""
    if not lin.mlp_consts:
        yield
        return
    adapter, model = lin.adapter, lin.model
    patches = []
    for layer in range(lin.n_layers):
        out_module, _ = adapter.hook_site(model, layer, "mlp_out")
        mlp = adapter.module(model, layer, adapter.mlp)
        fn = _frozen_block(lin, run, layer, writes.get(layer))
        patches.append((out_module, fn))
        if mlp is not out_module:
            # the real MLP's output is ignored by the frozen post-norm: skip its compute
            patches.append((mlp, _passthrough))
    with _forward_patches(patches):
        yield


def _passthrough(x, *args, **kwargs):
    return x


def _frozen_block(lin: FrozenModel, run: FrozenRun, layer: int, write: Tensor | None):
    const = lin.mlp_consts[layer]

    def forward(x, *args, **kwargs):
        n_pos = x.shape[-2]
        out = const[..., :n_pos, :]
        if lin.skip is not None:
            out = out + lin.skip(layer, run.reads[layer])
        if write is not None:
            out = out + write
        return out

    return forward


@contextmanager
def _forward_patches(patches: list[tuple[nn.Module, Callable]]):
    """Replace `module.forward` on instances (hooks keep firing); restored in `finally`."""
    done = []
    try:
        for module, fn in patches:
            module.forward = fn
            done.append(module)
        yield
    finally:
        for module in done:
            del module.forward


# -- norms -----------------------------------------------------------------------------
def _norm_modules(model: nn.Module, adapter: Adapter) -> list[nn.Module]:
    names = (adapter.attn_norm, adapter.mlp_norm, adapter.post_attn_norm)
    mods = [
        adapter.module(model, layer, name)
        for layer in range(adapter.n_layers(model))
        for name in names
        if name
    ]
    return [*mods, get_module(model, adapter.final_norm)]


def _eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise AttributeError(f"{type(norm).__name__} has no eps attribute")


def _compute_dtype(x: Tensor) -> torch.dtype:
    # norms compute in float32 at least (as the models do); float64 stays float64
    return torch.promote_types(x.dtype, torch.float32)


def _scale(x: Tensor, kind: str, eps: float) -> Tensor:
    x = x.to(_compute_dtype(x))
    if kind == "layernorm":
        return torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps)
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _apply_frozen(norm: nn.Module, x: Tensor, s: Tensor, kind: str) -> Tensor:
    s = s[..., : x.shape[-2], :]
    dtype = _compute_dtype(x)
    w = norm.weight.to(dtype) if getattr(norm, "weight", None) is not None else None
    if kind == "rmsnorm_plus_one":
        w = 1.0 + w
    xf = x.to(dtype)
    if kind == "layernorm":
        xf = xf - xf.mean(-1, keepdim=True)
    # one multiply by the constant (scale · weight): the backward is one multiply too
    y = xf * (s * w if w is not None else s)
    if kind == "layernorm" and getattr(norm, "bias", None) is not None:
        y = y + norm.bias.to(dtype)
    return y.to(x.dtype)


@contextmanager
def _frozen_norms(model: nn.Module, adapter: Adapter, state: _State):
    kind = adapter.norm_kind
    patches = []
    for norm in dict.fromkeys(_norm_modules(model, adapter)):  # unique, ordered
        original = norm.forward

        def forward(x, *args, _norm=norm, _orig=original, **kwargs):
            if state.recording:
                state.scales[_norm] = _scale(x.detach(), kind, _eps(_norm))
                return _orig(x, *args, **kwargs)
            return _apply_frozen(_norm, x, state.scales[_norm], kind)

        patches.append((norm, forward))
    with _forward_patches(patches):
        yield


# -- attention -------------------------------------------------------------------------
def _eager_for(module: nn.Module) -> Callable:
    """The model's own eager attention function (it keeps soft-capping, GQA, windows)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    return fn


def _frozen_attention_fn(module, query, key, value, attention_mask, **kwargs):
    state: _State = module._wiremap_frozen
    eager = _eager_for(module)
    if state.recording:
        state.qk[module] = (query.detach(), key.detach())
        return eager(module, query, key, value, attention_mask, **kwargs)
    q, k = state.qk[module]
    n = value.shape[-2]
    with torch.no_grad():
        # the model's own function gives the pattern (masks, windows, soft-capping)
        _, pattern = eager(module, q[..., :n, :], k[..., :n, :], value, attention_mask, **kwargs)
    return apply_pattern(pattern, value), pattern


def apply_pattern(pattern: Tensor, value: Tensor) -> Tensor:
    """pattern [1, H, q, k] (constant), value [b, H_kv, k, dh] -> output [b, q, H, dh].

    Written per head as `linear(vᵀ, P)` (= vᵀ Pᵀ) with the constant pattern as the weight:
    the batched backward (`is_grads_batched`) of a linear layer folds the batch into its
    rows, where that of `matmul`/`mm` copies the pattern once per row of the batch.
    """
    n_heads, n_kv = pattern.shape[1], value.shape[1]
    group = n_heads // n_kv  # grouped-query attention: head h reads kv head h // group
    kv = [v.transpose(-1, -2) for v in value.unbind(1)]  # [b, dh, k] each
    heads = []
    for h in range(n_heads):
        out = nn.functional.linear(kv[h // group], pattern[0, h].to(value.dtype))  # [b, dh, q]
        heads.append(out.transpose(-1, -2))
    return torch.stack(heads, dim=2)


def _register_attention() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ATTN_NAME not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(ATTN_NAME, _frozen_attention_fn)
        # the eager functions expect the eager (additive float) mask
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


@contextmanager
def _frozen_attention(model: nn.Module, adapter: Adapter, state: _State):
    _register_attention()
    attns = [adapter.module(model, layer, adapter.attn) for layer in range(adapter.n_layers(model))]
    previous = model.config._attn_implementation
    try:
        for attn in attns:
            attn._wiremap_frozen = state
        model.config._attn_implementation = ATTN_NAME
        yield
    finally:
        model.config._attn_implementation = previous
        for attn in attns:
            attn.__dict__.pop("_wiremap_frozen", None)
