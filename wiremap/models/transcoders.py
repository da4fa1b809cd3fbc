"""Transcoder architectures (per-layer and cross-layer, with or without skip), by name.

    tc = build_transcoder("clt", n_layers=4, d_model=64, d_transcoder=256, activation="topk", k=8)
    y_hat, a = tc(x)                  # x [..., L, d] -> y_hat [..., L, d], a [..., L, F]
    a3 = tc.encode(x[..., 3, :], 3)   # one layer: x [..., d] -> a [..., F]
    vecs = tc.decoder(3)              # [F, n_out, d]: what features of layer 3 write

Architectures: `plt` (one transcoder per layer), `skip_plt`, `clt` (features of layer i
write to every layer j >= i), `skip_clt`. A new one is one subclass with
`@register_transcoder("name")`.

Parameters carry the field's names (SAELens, circuit-tracer) and are stacked over layers so
the math is batched: `W_enc [L, F, d]`, `b_enc [L, F]`, `b_dec [L, d]`, `W_skip [L, d_out,
d_in]` or None (skip(x) = W_skip @ x, initialised to zero); PLT `W_dec [L, F, d]`; CLT
`W_dec` = ParameterList of `[F, L - i, d]` (grouped by source layer, the export layout; None
when lazily loaded). One layer is an index: `W_enc[layer] [F, d]`, `b_enc[layer] [F]`,
`b_dec[layer] [d]`, `W_skip[layer] [d, d]`; the decoders through `decoder(layer) [F, n_out, d]`
(lazy CLTs read it from disk), thresholds through `threshold(layer) [F] | None`.
Every per-layer method takes `(x, layer)`, and without `layer` works on all layers at once:
`pre_activations`, `encode`, `skip`.

Until 0.1 the parameters were `encoder_weight`, `encoder_bias`, `decoder_weight`,
`decoder_bias`, `skip_weight`: state dicts, Lightning checkpoints and safetensors files with
those keys still load (a load_state_dict pre-hook renames them), and the old attribute names
and the methods `encode_layer`, `pre_activation`, `skip_layer` still work for this version,
with a DeprecationWarning.

Layer index `i` means the i-th covered layer; `config["layers"][i]` is the model layer.
Normalisation lives outside the module; `fold_normalisation` makes the raw-activation
equivalent of a model trained on scaled activations.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wiremap.errors import WiremapError, deprecated
from wiremap.models.activations import Activation, build_activation
from wiremap.models.registry import Registry

TRANSCODERS: Registry[type[Transcoder]] = Registry("transcoder architecture")
# parameter names until 0.1 -> the field's names (old checkpoints are renamed on load)
OLD_PARAMETER_NAMES = {
    "encoder_weight": "W_enc",
    "encoder_bias": "b_enc",
    "decoder_weight": "W_dec",
    "decoder_bias": "b_dec",
    "skip_weight": "W_skip",
}
INPUT_HOOKS = ("mlp_in", "resid_mid")
OUTPUT_HOOKS = ("mlp_out",)

# Reads the decoder of source layer i, optionally only some features: (i, features) -> W_dec_i
DecoderLoader = Callable[[int, "Tensor | None"], Tensor]


def register_transcoder(
    name: str, *, replace: bool = False
) -> Callable[[type[Transcoder]], type[Transcoder]]:
    """Class decorator: make a `Transcoder` subclass buildable by `name` (a taken name raises
    a WiremapError unless `replace=True`)."""
    return TRANSCODERS.register_class(name, attr="arch", replace=replace)


def build_transcoder(
    arch: str,
    n_layers: int,
    d_model: int,
    d_transcoder: int,
    activation: str = "relu",
    k: int | None = None,
    *,
    input_hook: str = "mlp_in",
    output_hook: str = "mlp_out",
    model_name: str | None = None,
    layers: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    **act_kwargs: Any,
) -> Transcoder:
    """Build a registered transcoder; `build_transcoder(**tc.config)` rebuilds `tc`'s shape."""
    cls = TRANSCODERS.lookup(arch)
    act = build_activation(activation, n_layers, d_transcoder, k=k, **act_kwargs)
    tc = cls(
        n_layers,
        d_model,
        d_transcoder,
        act,
        input_hook=input_hook,
        output_hook=output_hook,
        model_name=model_name,
        layers=layers,
    )
    return tc.to(device=device, dtype=dtype)


class Transcoder(nn.Module):
    """Shared math and per-layer accessors; subclasses own the decoder layout."""

    arch: ClassVar[str] = ""
    has_skip: ClassVar[bool] = False
    cross_layer: ClassVar[bool] = False

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        d_transcoder: int,
        activation: Activation,
        *,
        input_hook: str = "mlp_in",
        output_hook: str = "mlp_out",
        model_name: str | None = None,
        layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _check_hooks(input_hook, output_hook)
        self.n_layers, self.d_model, self.d_transcoder = n_layers, d_model, d_transcoder
        self.input_hook, self.output_hook, self.model_name = input_hook, output_hook, model_name
        self.layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
        if len(self.layers) != n_layers:
            raise WiremapError(f"`layers` lists {len(self.layers)} layers but n_layers={n_layers}")
        self.activation = activation
        # (registration order fixes the optimiser's parameter order: keep it for resuming)
        self.W_enc = nn.Parameter(torch.empty(n_layers, d_transcoder, d_model))
        self.b_enc = nn.Parameter(torch.zeros(n_layers, d_transcoder))
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_model))
        skip = torch.zeros(n_layers, d_model, d_model) if self.has_skip else None
        self.W_skip = nn.Parameter(skip) if skip is not None else None
        bound = 1.0 / math.sqrt(d_transcoder)
        nn.init.uniform_(self.W_enc, -bound, bound)
        self.register_load_state_dict_pre_hook(_rename_old_keys)

    @property
    def decoder_init_bound(self) -> float:
        """W_dec ~ U(±1/√(L·d)) (DESIGN.md §3)."""
        return 1.0 / math.sqrt(self.n_layers * self.d_model)

    @property
    def config(self) -> dict[str, Any]:
        """Everything `build_transcoder(**config)` needs to rebuild this architecture."""
        return {
            "arch": self.arch,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_transcoder": self.d_transcoder,
            **self.activation.config(),
            "input_hook": self.input_hook,
            "output_hook": self.output_hook,
            "model_name": self.model_name,
            "layers": list(self.layers),
        }

    # -- encoder ---------------------------------------------------------------------
    def pre_activations(self, x: Tensor, layer: int | None = None) -> Tensor:
        """W_enc x + b_enc: x [..., L, d] -> [..., L, F]; with `layer`, x [..., d] -> [..., F]."""
        if layer is not None:
            return x @ self.W_enc[layer].T + self.b_enc[layer]
        return torch.einsum("...ld,lfd->...lf", x, self.W_enc) + self.b_enc

    def encode(self, x: Tensor, layer: int | None = None) -> Tensor:
        """Activations: x [..., L, d] -> a [..., L, F]; with `layer`, x [..., d] -> a [..., F]."""
        return self.activation(self.pre_activations(x, layer), layer)

    # -- skip ------------------------------------------------------------------------
    def skip(self, x: Tensor, layer: int | None = None) -> Tensor:
        """W_skip x: x [..., L, d] -> [..., L, d], or one `layer` (zeros without a skip path)."""
        if self.W_skip is None:
            return torch.zeros_like(x)
        if layer is not None:
            return x @ self.W_skip[layer].T
        return torch.einsum("...li,loi->...lo", x, self.W_skip)

    # -- full pass -------------------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [..., L, d] -> (y_hat [..., L, d], a [..., L, F])."""
        a = self.encode(x)
        y_hat = self.decode(a)
        if self.W_skip is not None:
            y_hat = y_hat + self.skip(x)
        return y_hat, a

    def decode(self, a: Tensor) -> Tensor:
        """a [..., L, F] -> sum of decoder writes + b_dec [..., L, d] (no skip)."""
        raise NotImplementedError

    def decoder(self, layer: int, features: Tensor | None = None) -> Tensor:
        """Decoder vectors of features at `layer`: [F (or len(features)), n_out, d]."""
        raise NotImplementedError

    def decoder_norms(self) -> Tensor:
        """[L, F]: norm of each feature's decoders concatenated over its output layers."""
        raise NotImplementedError

    def n_out(self, layer: int) -> int:
        """How many output layers a feature of `layer` writes to."""
        return self.n_layers - layer if self.cross_layer else 1

    def threshold(self, layer: int) -> Tensor | None:
        """JumpReLU threshold [F] (in pre-activation units); None for other activations."""
        return self.activation.threshold(layer)

    def set_activation(self, activation: Activation) -> None:
        """Swap the activation (e.g. a BatchTopK turned into a JumpReLU for inference)."""
        self.activation = activation

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def _scale_decoders_(self, out_scale: Tensor) -> None:
        """Divide every decoder vector writing to layer l by out_scale[l] (in place)."""
        raise NotImplementedError

    # -- names until 0.1 (one more version, with a DeprecationWarning) ----------------
    def encode_layer(self, x: Tensor, layer: int) -> Tensor:
        deprecated("Transcoder.encode_layer(x, layer)", "encode(x, layer)")
        return self.encode(x, layer)

    def pre_activation(self, x: Tensor, layer: int) -> Tensor:
        deprecated("Transcoder.pre_activation(x, layer)", "pre_activations(x, layer)")
        return self.pre_activations(x, layer)

    def skip_layer(self, x: Tensor, layer: int) -> Tensor:
        deprecated("Transcoder.skip_layer(x, layer)", "skip(x, layer)")
        return self.skip(x, layer)


def x_then_layer(x: Any, layer: Any, method: str) -> tuple[Tensor, int]:
    """`(x, layer)` for a `method(x, layer)` that took `(layer, x)` until 0.1 (then warns)."""
    if isinstance(x, int) and isinstance(layer, Tensor):
        deprecated(
            f"{method}(layer, x)", f"{method}(x, layer), the order of every per-layer method"
        )
        return layer, x
    return x, layer


def _old_name_alias(old: str, new: str) -> property:
    def get(self: Transcoder):
        deprecated(f"Transcoder.{old}", new)
        return getattr(self, new)

    return property(get, doc=f"Deprecated alias of `{new}` (the parameter's name until 0.1).")


for _old, _new in OLD_PARAMETER_NAMES.items():
    setattr(Transcoder, _old, _old_name_alias(_old, _new))


def rename_old_keys(state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Rename (in place) a transcoder state dict's keys from the names used until 0.1
    (`{prefix}encoder_weight`, `{prefix}decoder_weight.3`, ...) to the field's names."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        head, dot, tail = key[len(prefix) :].partition(".")
        if head in OLD_PARAMETER_NAMES:
            state_dict[f"{prefix}{OLD_PARAMETER_NAMES[head]}{dot}{tail}"] = state_dict.pop(key)
    return state_dict


def _rename_old_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    # load_state_dict pre-hook: also runs for a transcoder inside a LightningModule checkpoint
    rename_old_keys(state_dict, prefix)


def _check_hooks(input_hook: str, output_hook: str) -> None:
    if input_hook not in INPUT_HOOKS:
        raise WiremapError(
            f"transcoder input hook {input_hook!r} is not supported; use one of {INPUT_HOOKS}"
        )
    if output_hook not in OUTPUT_HOOKS:
        raise WiremapError(
            f"transcoder output hook {output_hook!r} is not supported; use one of {OUTPUT_HOOKS}"
        )


@register_transcoder("plt")
class PerLayerTranscoder(Transcoder):
    """One transcoder per layer: ŷ^l = W_dec^l a^l + b_dec^l (+ W_skip^l x^l)."""

    def __init__(self, n_layers: int, d_model: int, d_transcoder: int, activation, **kw) -> None:
        super().__init__(n_layers, d_model, d_transcoder, activation, **kw)
        bound = self.decoder_init_bound
        w = torch.empty(n_layers, d_transcoder, d_model).uniform_(-bound, bound)
        self.W_dec = nn.Parameter(w)

    def decode(self, a: Tensor) -> Tensor:
        y = torch.einsum("...lf,lfd->...ld", a, self.W_dec)
        return y + self.b_dec

    def decoder(self, layer: int, features: Tensor | None = None) -> Tensor:
        w = self.W_dec[layer]
        w = w if features is None else w[features]
        return w.unsqueeze(1)

    def decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=-1)

    def _scale_decoders_(self, out_scale: Tensor) -> None:
        _div_(self.W_dec, out_scale[:, None, None])


@register_transcoder("skip_plt")
class SkipPerLayerTranscoder(PerLayerTranscoder):
    """PLT with a linear skip path W_skip (initialised to zero)."""

    has_skip = True


@register_transcoder("clt")
class CrossLayerTranscoder(Transcoder):
    """Features of layer i write to every layer j >= i: ŷ^j = Σ_{i<=j} W_dec^{i→j} a^i + b_dec^j.

    With `decoder_loader` (lazy loading) the decoders stay on disk and are read per layer.
    """

    cross_layer = True

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        d_transcoder: int,
        activation,
        decoder_loader: DecoderLoader | None = None,
        **kw,
    ) -> None:
        super().__init__(n_layers, d_model, d_transcoder, activation, **kw)
        self.decoder_loader = decoder_loader
        if decoder_loader is not None:
            self.W_dec = None
            return
        bound = self.decoder_init_bound
        self.W_dec = nn.ParameterList(
            nn.Parameter(torch.empty(d_transcoder, n_layers - i, d_model).uniform_(-bound, bound))
            for i in range(n_layers)
        )

    @property
    def lazy(self) -> bool:
        return self.W_dec is None

    def decoder(self, layer: int, features: Tensor | None = None) -> Tensor:
        if self.W_dec is None:
            w = self.decoder_loader(layer, features)
            return w.to(device=self.device, dtype=self.dtype)
        w = self.W_dec[layer]
        return w if features is None else w[features]

    def decode(self, a: Tensor) -> Tensor:
        # One matmul per source layer: a^i [..., F] @ W_dec_i [F, (L-i)·d], left-padded to
        # [..., L·d] and summed. Out-of-place adds keep backward cheap (no zero-filled slice
        # gradients); starting from the fp32 bias accumulates in fp32 under bf16 autocast.
        out = self.b_dec.reshape(-1)
        for i, a_i in enumerate(a.unbind(-2)):
            part = a_i @ self.decoder(i).reshape(self.d_transcoder, -1)
            out = out + F.pad(part, (i * self.d_model, 0))
        return out.reshape(*a.shape[:-2], self.n_layers, self.d_model)

    def decoder_norms(self) -> Tensor:
        return torch.stack(
            [self.decoder(i).pow(2).sum(dim=(1, 2)).sqrt() for i in range(self.n_layers)]
        )

    def _scale_decoders_(self, out_scale: Tensor) -> None:
        if self.W_dec is None:
            raise WiremapError(
                "cannot fold normalisation into lazily loaded decoders; load with lazy=False"
            )
        for i, w in enumerate(self.W_dec):
            _div_(w, out_scale[i:][None, :, None])


@register_transcoder("skip_clt")
class SkipCrossLayerTranscoder(CrossLayerTranscoder):
    """CLT with a linear skip path W_skip per layer (initialised to zero)."""

    has_skip = True


def _per_layer(scale: Tensor | Sequence[float] | float, n_layers: int, name: str) -> Tensor:
    t = torch.as_tensor(scale, dtype=torch.float64).flatten()
    if t.numel() == 1:
        t = t.expand(n_layers)
    if t.numel() != n_layers or not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise WiremapError(
            f"{name} must hold {n_layers} positive finite per-layer scales; got {t.tolist()}"
        )
    return t


def fold_normalisation(
    transcoder: Transcoder,
    in_scale: Tensor | Sequence[float] | float,
    out_scale: Tensor | Sequence[float] | float,
) -> Transcoder:
    """A copy of `transcoder` that works on raw activations.

    `transcoder` was trained on x_norm = x·in_scale[l] to predict y_norm = y·out_scale[l].
    The copy computes y from x: W_enc·in_scale, W_dec/out_scale (of the *target* layer),
    b_dec/out_scale, W_skip·in_scale/out_scale. Pre-activations are unchanged by this
    fold, so feature activations — and JumpReLU/BatchTopK thresholds, which live in
    pre-activation units — are unchanged too; TopK is scale-free. (The classic bug is
    folding the input scale into b_enc or the activations without moving the thresholds.)
    """
    s_in = _per_layer(in_scale, transcoder.n_layers, "in_scale")
    s_out = _per_layer(out_scale, transcoder.n_layers, "out_scale")
    folded = copy.deepcopy(transcoder)
    with torch.no_grad():
        _fold_(folded, s_in, s_out)
    return folded


def _div_(p: Tensor, divisor: Tensor) -> None:
    # Scale in float64 then cast back, so folding adds no rounding beyond the final cast.
    p.copy_((p.double() / divisor.to(p.device)).to(p.dtype))


def _fold_(tc: Transcoder, s_in: Tensor, s_out: Tensor) -> None:
    _div_(tc.W_enc, 1 / s_in[:, None, None])
    _div_(tc.b_dec, s_out[:, None])
    if tc.W_skip is not None:
        _div_(tc.W_skip, (s_out / s_in)[:, None, None])
    tc._scale_decoders_(s_out)
