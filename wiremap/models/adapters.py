"""Language-model adapters: where each architecture keeps its layers, norms and MLPs.

Every supported Hugging Face architecture is one `Adapter` entry in `ADAPTERS`, written
as data (how it differs from Llama's layout); `register_adapter` adds one, and refuses a
name or `model_type` that already has an adapter unless `replace=True`. Code elsewhere
asks the adapter ("which module produces `mlp_out` at layer 3?")
instead of branching on the architecture.

    adapter = get_adapter(model)
    module, side = adapter.hook_site(model, layer=3, hook="mlp_out")

Hook points (DESIGN.md §2):
- `resid_pre`: the decoder layer's input (the residual stream before attention);
- `resid_mid`: the residual after attention, i.e. the input of the MLP's norm
  (for parallel-attention models, GPT-NeoX, that is the layer's input);
- `mlp_in`: what the MLP consumes; `mlp_out`: what the MLP block adds to the residual;
- `resid_post`: the decoder layer's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from wiremap.errors import WiremapError
from wiremap.models.registry import Registry

HOOKS = ("resid_pre", "resid_mid", "mlp_in", "mlp_out", "resid_post")
Side = Literal["input", "output"]
NormKind = Literal["layernorm", "rmsnorm", "rmsnorm_plus_one"]


@dataclass(frozen=True)
class Adapter:
    """Where one architecture keeps its parts. Paths are dotted attribute names."""

    name: str
    """Short architecture name shown to users."""
    model_types: tuple[str, ...]
    """Hugging Face `config.model_type` values this adapter serves."""
    layers: str
    """Path from the causal-LM model to the `ModuleList` of decoder layers."""
    embed: str
    """Path to the token embedding."""
    final_norm: str
    """Path to the norm applied before the unembedding."""
    unembed: str
    """Path to the unembedding (LM head)."""
    attn: str
    """Attention module, relative to a decoder layer."""
    mlp: str
    """MLP module, relative to a decoder layer."""
    norm_kind: NormKind
    """How the norms compute: `layernorm`, `rmsnorm` (x·s·w) or `rmsnorm_plus_one` (x·s·(1+w))."""
    attn_norm: str | None
    """Norm applied to the attention's input, relative to a layer (None if absent)."""
    mlp_norm: str | None
    """Norm whose output the MLP consumes (None when the MLP reads the residual directly)."""
    post_attn_norm: str | None = None
    """Norm applied to the attention's output before it joins the residual (Gemma, OLMo-2)."""
    post_mlp_norm: str | None = None
    """Norm applied to the MLP's output before it joins the residual (Gemma, OLMo-2)."""
    pos_embed: str | None = None
    """Learned position embedding, if any (GPT-2)."""
    parallel_flag: str | None = None
    """Config attribute that, when true, makes attention and MLP read the same input."""
    extra_norms: tuple[str, ...] = field(default_factory=tuple)
    """Norms inside attention (q/k norms): they only touch queries and keys."""

    # -- structure ---------------------------------------------------------------
    def is_parallel(self, model: nn.Module) -> bool:
        """True when attention and MLP both read the layer's input (GPT-NeoX style)."""
        return bool(self.parallel_flag and getattr(model.config, self.parallel_flag, False))

    def layer_modules(self, model: nn.Module) -> nn.ModuleList:
        return get_module(model, self.layers)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.layer_modules(model))

    def layer(self, model: nn.Module, layer: int) -> nn.Module:
        check_layers([layer], self.n_layers(model))
        return self.layer_modules(model)[layer]

    def module(self, model: nn.Module, layer: int, relpath: str) -> nn.Module:
        return get_module(self.layer(model, layer), relpath)

    def hook_site(self, model: nn.Module, layer: int, hook: str) -> tuple[nn.Module, Side]:
        """The module whose input or output *is* hook point `hook` at `layer`."""
        if hook not in HOOKS:
            raise WiremapError(f"unknown hook point {hook!r}; choose one of {', '.join(HOOKS)}")
        block = self.layer(model, layer)
        if hook == "resid_pre":
            return block, "input"
        if hook == "resid_post":
            return block, "output"
        if hook == "mlp_in":
            return get_module(block, self.mlp), "input"
        if hook == "mlp_out":
            return get_module(block, self.post_mlp_norm or self.mlp), "output"
        # resid_mid: the input of the MLP's norm, or of the MLP when it has none.
        if self.is_parallel(model):
            return block, "input"
        return get_module(block, self.mlp_norm or self.mlp), "input"

    def d_model(self, model: nn.Module) -> int:
        return int(model.config.hidden_size)


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted path (`model.layers`) from `root`, with a clear error if absent."""
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise WiremapError(
                f"module {type(root).__name__} has no {path!r}; the adapter does not match "
                "this model. Check the model's architecture against `wiremap.models.adapters`."
            )
        module = getattr(module, part)
    return module


def check_layers(layers, n_layers: int) -> list[int]:
    """Validate layer indices (negative counts from the end) and return them as ints."""
    out = []
    for layer in layers:
        idx = int(layer)
        if not -n_layers <= idx < n_layers:
            raise WiremapError(
                f"layer {idx} is out of range: this model has {n_layers} layers "
                f"(0..{n_layers - 1}); pick layers inside that range"
            )
        out.append(idx % n_layers)
    return out


# The Llama layout; every other adapter states only how it differs.
_LLAMA = dict(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    attn="self_attn",
    mlp="mlp",
    norm_kind="rmsnorm",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
)


def _like_llama(name: str, *model_types: str, **overrides) -> Adapter:
    return Adapter(**{**_LLAMA, "name": name, "model_types": model_types or (name,), **overrides})


def _under(root: str, **paths: str) -> dict[str, str]:
    """Model-level paths below one root module (`transformer.h`, `gpt_neox.layers`)."""
    return {key: f"{root}.{path}" for key, path in paths.items()}


_QK = ("self_attn.q_norm", "self_attn.k_norm")
_GEMMA = dict(
    norm_kind="rmsnorm_plus_one",
    mlp_norm="pre_feedforward_layernorm",
    post_attn_norm="post_attention_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
)
_GPT2 = _under("transformer", layers="h", embed="wte", pos_embed="wpe", final_norm="ln_f")
_NEOX = _under("gpt_neox", layers="layers", embed="embed_in", final_norm="final_layer_norm")

ADAPTERS: Registry[Adapter] = Registry("language-model adapter")
_BY_MODEL_TYPE: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter, *, replace: bool = False) -> Adapter:
    """Add an architecture; a taken name or `model_type` raises unless `replace=True`."""
    taken = [mt for mt in adapter.model_types if mt in _BY_MODEL_TYPE]
    if taken and not replace:
        raise WiremapError(
            f"model types {taken} already have an adapter "
            f"({', '.join(sorted({_BY_MODEL_TYPE[mt].name for mt in taken}))}); pass "
            "replace=True to override it on purpose"
        )
    replaced = ADAPTERS.get(adapter.name)
    ADAPTERS.add(adapter.name, adapter, replace=replace)
    for mt in replaced.model_types if replaced else ():
        del _BY_MODEL_TYPE[mt]
    _BY_MODEL_TYPE.update(dict.fromkeys(adapter.model_types, adapter))
    return adapter


_BUILT_IN = [
    _like_llama(
        "gpt2", **_GPT2, attn="attn", norm_kind="layernorm", attn_norm="ln_1", mlp_norm="ln_2"
    ),
    _like_llama("llama"),
    _like_llama("mistral"),
    _like_llama("qwen2"),
    _like_llama("qwen3", extra_norms=_QK),
    _like_llama("gemma2", **_GEMMA),
    _like_llama("gemma3", "gemma3_text", extra_norms=_QK, **_GEMMA),
    _like_llama(
        "gpt_neox",
        **_NEOX,
        attn="attention",
        norm_kind="layernorm",
        parallel_flag="use_parallel_residual",
    ),
    _like_llama("phi3"),
    _like_llama(
        "olmo2",
        attn_norm=None,
        mlp_norm=None,
        post_attn_norm="post_attention_layernorm",
        post_mlp_norm="post_feedforward_layernorm",
        extra_norms=_QK,
    ),
]
for _adapter in _BUILT_IN:
    register_adapter(_adapter)


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def get_adapter(model_or_type: nn.Module | str) -> Adapter:
    """The adapter for a loaded model (or a `config.model_type` string)."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        model_type = getattr(getattr(model_or_type, "config", None), "model_type", None)
    adapter = _BY_MODEL_TYPE.get(model_type)
    if adapter is None:
        raise WiremapError(
            f"unsupported architecture {model_type!r}; wiremap supports "
            f"{', '.join(supported_model_types())}. Describe a new one with an `Adapter` "
            "and `register_adapter` (wiremap.models.adapters)"
        )
    if not isinstance(model_or_type, str):
        # Fail early and clearly when a checkpoint's module names differ from the table.
        for path in (adapter.layers, adapter.embed, adapter.final_norm, adapter.unembed):
            get_module(model_or_type, path)
    return adapter
