"""Transcoder architectures (per-layer and cross-layer, with or without skip), by name.

    tc = build_transcoder("clt", n_layers=4, d_model=64, d_transcoder=256, activation="topk", k=8)
    y_hat, a = tc(x)                  # x [..., L, d] -> y_hat [..., L, d], a [..., L, F]
    a3 = tc.encode_layer(x[..., 3, :], 3)
    vecs = tc.decoder(3)              # [F, n_out, d]: what features of layer 3 write

Architectures: `plt` (one transcoder per layer), `skip_plt`, `clt` (features of layer i
write to every layer j >= i), `skip_clt`. A new one is one subclass with
`@register_transcoder("name")`.

Parameters are stacked over layers so the math is batched:
`encoder_weight [L, F, d]`, `encoder_bias [L, F]`, `decoder_bias [L, d]`,
`skip_weight [L, d_out, d_in]` (skip(x) = W_skip @ x, initialised to zero); PLT
`decoder_weight [L, F, d]`; CLT `decoder_weight` = ParameterList of `[F, L - i, d]`
(grouped by source layer, the export layout). The interface of INTERFACES.md reads them
per layer: `W_enc(layer) [F, d]`, `b_enc(layer) [F]`, `b_dec(layer) [d]`,
`W_skip(layer) [d, d] | None`, `decoder(layer) [F, n_out, d]`, `threshold(layer) [F] | None`.

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

from wiremap.errors import WiremapError
from wiremap.models.activations import Activation, build_activation

TRANSCODERS: dict[str, type[Transcoder]] = {}
INPUT_HOOKS = ("mlp_in", "resid_mid")
OUTPUT_HOOKS = ("mlp_out",)

# Reads the decoder of source layer i, optionally only some features: (i, features) -> W_dec_i
DecoderLoader = Callable[[int, "Tensor | None"], Tensor]


def register_transcoder(name: str) -> Callable[[type[Transcoder]], type[Transcoder]]:
    """Class decorator: make a `Transcoder` subclass buildable by `name`."""

    def add(cls: type[Transcoder]) -> type[Transcoder]:
        cls.arch = name
        TRANSCODERS[name] = cls
        return cls

    return add


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
    if arch not in TRANSCODERS:
        raise WiremapError(
            f"unknown transcoder architecture {arch!r}; choose one of {', '.join(TRANSCODERS)}"
        )
    act = build_activation(activation, n_layers, d_transcoder, k=k, **act_kwargs)
    tc = TRANSCODERS[arch](
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
        self.encoder_weight = nn.Parameter(torch.empty(n_layers, d_transcoder, d_model))
        self.encoder_bias = nn.Parameter(torch.zeros(n_layers, d_transcoder))
        self.decoder_bias = nn.Parameter(torch.zeros(n_layers, d_model))
        skip = torch.zeros(n_layers, d_model, d_model) if self.has_skip else None
        self.skip_weight = nn.Parameter(skip) if skip is not None else None
        bound = 1.0 / math.sqrt(d_transcoder)
        nn.init.uniform_(self.encoder_weight, -bound, bound)

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
    def pre_activation(self, x: Tensor, layer: int) -> Tensor:
        """x [..., d] -> W_enc[layer] x + b_enc[layer]  [..., F]."""
        return x @ self.encoder_weight[layer].T + self.encoder_bias[layer]

    def pre_activations(self, x: Tensor) -> Tensor:
        """x [..., L, d] -> pre-activations of every layer [..., L, F] (one batched matmul)."""
        pre = torch.einsum("...ld,lfd->...lf", x, self.encoder_weight)
        return pre + self.encoder_bias

    def encode(self, x: Tensor) -> Tensor:
        """x [..., L, d] -> feature activations a [..., L, F]."""
        return self.activation(self.pre_activations(x))

    def encode_layer(self, x: Tensor, layer: int) -> Tensor:
        """x [..., d] at one layer -> a [..., F]."""
        return self.activation(self.pre_activation(x, layer), layer)

    # -- skip ------------------------------------------------------------------------
    def skip(self, x: Tensor) -> Tensor:
        """x [..., L, d] -> W_skip x [..., L, d] (zeros without a skip connection)."""
        if self.skip_weight is None:
            return torch.zeros_like(x)
        return torch.einsum("...li,loi->...lo", x, self.skip_weight)

    def skip_layer(self, x: Tensor, layer: int) -> Tensor:
        """x [..., d] -> W_skip[layer] x [..., d] (zeros without a skip connection)."""
        if self.skip_weight is None:
            return torch.zeros_like(x)
        return x @ self.skip_weight[layer].T

    # -- full pass -------------------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [..., L, d] -> (y_hat [..., L, d], a [..., L, F])."""
        a = self.encode(x)
        y_hat = self.decode(a)
        if self.skip_weight is not None:
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

    # -- per-layer accessors (INTERFACES.md) -----------------------------------------
    def W_enc(self, layer: int) -> Tensor:
        return self.encoder_weight[layer]

    def b_enc(self, layer: int) -> Tensor:
        return self.encoder_bias[layer]

    def b_dec(self, layer: int) -> Tensor:
        return self.decoder_bias[layer]

    def W_skip(self, layer: int) -> Tensor | None:
        """[d_out, d_in]: skip_layer(x) = W_skip @ x; None without a skip connection."""
        return None if self.skip_weight is None else self.skip_weight[layer]

    def threshold(self, layer: int) -> Tensor | None:
        """JumpReLU threshold [F] (in pre-activation units); None for other activations."""
        return self.activation.threshold(layer)

    def set_activation(self, activation: Activation) -> None:
        """Swap the activation (e.g. a BatchTopK turned into a JumpReLU for inference)."""
        self.activation = activation

    @property
    def device(self) -> torch.device:
        return self.encoder_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder_weight.dtype

    def _scale_decoders_(self, out_scale: Tensor) -> None:
        """Divide every decoder vector writing to layer l by out_scale[l] (in place)."""
        raise NotImplementedError


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
        self.decoder_weight = nn.Parameter(w)

    def decode(self, a: Tensor) -> Tensor:
        y = torch.einsum("...lf,lfd->...ld", a, self.decoder_weight)
        return y + self.decoder_bias

    def decoder(self, layer: int, features: Tensor | None = None) -> Tensor:
        w = self.decoder_weight[layer]
        w = w if features is None else w[features]
        return w.unsqueeze(1)

    def decoder_norms(self) -> Tensor:
        return self.decoder_weight.norm(dim=-1)

    def _scale_decoders_(self, out_scale: Tensor) -> None:
        _div_(self.decoder_weight, out_scale[:, None, None])


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
            self.decoder_weight = None
            return
        bound = self.decoder_init_bound
        self.decoder_weight = nn.ParameterList(
            nn.Parameter(torch.empty(d_transcoder, n_layers - i, d_model).uniform_(-bound, bound))
            for i in range(n_layers)
        )

    @property
    def lazy(self) -> bool:
        return self.decoder_weight is None

    def decoder(self, layer: int, features: Tensor | None = None) -> Tensor:
        if self.decoder_weight is None:
            w = self.decoder_loader(layer, features)
            return w.to(device=self.device, dtype=self.dtype)
        w = self.decoder_weight[layer]
        return w if features is None else w[features]

    def decode(self, a: Tensor) -> Tensor:
        # One matmul per source layer: a^i [..., F] @ W_dec_i [F, (L-i)·d], left-padded to
        # [..., L·d] and summed. Out-of-place adds keep backward cheap (no zero-filled slice
        # gradients); starting from the fp32 bias accumulates in fp32 under bf16 autocast.
        out = self.decoder_bias.reshape(-1)
        for i, a_i in enumerate(a.unbind(-2)):
            part = a_i @ self.decoder(i).reshape(self.d_transcoder, -1)
            out = out + F.pad(part, (i * self.d_model, 0))
        return out.reshape(*a.shape[:-2], self.n_layers, self.d_model)

    def decoder_norms(self) -> Tensor:
        return torch.stack(
            [self.decoder(i).pow(2).sum(dim=(1, 2)).sqrt() for i in range(self.n_layers)]
        )

    def _scale_decoders_(self, out_scale: Tensor) -> None:
        if self.decoder_weight is None:
            raise WiremapError(
                "cannot fold normalisation into lazily loaded decoders; load with lazy=False"
            )
        for i, w in enumerate(self.decoder_weight):
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
    _div_(tc.encoder_weight, 1 / s_in[:, None, None])
    _div_(tc.decoder_bias, s_out[:, None])
    if tc.skip_weight is not None:
        _div_(tc.skip_weight, (s_out / s_in)[:, None, None])
    tc._scale_decoders_(s_out)
