"""What to cache (`CacheConfig`) and the numbers derived from it and the model (`Plan`).

cfg = CacheConfig(model="gpt2", dataset="wikitext", n_tokens=100_000, out="cache/gpt2")
layers = check_model(cfg, model_config(cfg))     # validated before any weight is loaded
plan = make_plan(cfg, layers)                    # rows per context, per batch, per shard
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal

import torch

from wiremap.cache.text import TextSpec
from wiremap.errors import WiremapError, deprecated, require_positive
from wiremap.models.adapters import check_layers, get_adapter
from wiremap.models.loading import load_config, model_max_length

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class CacheConfig:
    """What to cache, from which text, and where to put it."""

    model: str
    """Hugging Face model name, or a local folder written by `save_pretrained`."""
    dataset: str
    """Hub dataset name, or a local .txt/.jsonl/.parquet file, folder or glob."""
    revision: str | None = None
    """Model revision (branch, tag or commit) on the hub."""
    dataset_config: str | None = None
    """Hub dataset configuration (subset), e.g. `wikitext-103-raw-v1`."""
    split: str = "train"
    """Hub dataset split."""
    text_column: str = "text"
    """Column holding the text (.txt files: one document per line, column `text`)."""
    streaming: bool = False
    """Stream the hub dataset instead of downloading it first."""
    n_tokens: int = 100_000
    """Number of token positions to cache (BOS positions not counted unless included)."""
    context_length: int = 128
    """Tokens per context, BOS included."""
    batch_contexts: int = 32
    """Contexts per language-model forward pass."""
    layers: list[int] | None = None
    """Model layers to cache (default: all)."""
    input_hook: Literal["mlp_in", "resid_mid"] = "mlp_in"
    """Transcoder input: what the MLP reads (`mlp_in`) or the residual before its norm."""
    output_hook: Literal["mlp_out"] = "mlp_out"
    """Transcoder target: what the MLP block adds to the residual stream."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Storage dtype of the activations on disk."""
    model_dtype: str = "float32"
    """Dtype the language model runs in."""
    device: str = "auto"
    """Where the model runs: `cpu`, `cuda`, `cuda:1` or `auto` (GPU when there is one)."""
    out: str = "wiremap_out/cache"
    """Output folder."""
    shard_tokens: int = 8192
    """Token positions per shard file."""
    include_bos: bool = False
    """Also cache (and train on) the BOS position of each context; left out by default, as
    its activations are outliers."""
    batch_size: int | None = None
    """Deprecated: the old name of `batch_contexts`."""
    exclude_bos: bool | None = None
    """Deprecated: the old, negated spelling of `include_bos`."""

    def __post_init__(self) -> None:
        self._take_old_names()
        _choice("input_hook", self.input_hook, ("mlp_in", "resid_mid"))
        _choice("output_hook", self.output_hook, ("mlp_out",))
        _choice("dtype", self.dtype, tuple(STORAGE_DTYPES))
        require_positive(self, "n_tokens", "batch_contexts", "shard_tokens")
        if self.context_length < 2:
            raise WiremapError(f"context_length must be at least 2, got {self.context_length}")
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if self.layers is not None and len(self.layers) == 0:
            raise WiremapError("layers is empty; name at least one layer, or leave it out for all")

    def _take_old_names(self) -> None:
        """Settings given by their old names (one version only): moved to the new ones."""
        if self.batch_size is not None:
            deprecated("cache setting batch_size", "batch_contexts", depth=3)
            self.batch_contexts, self.batch_size = self.batch_size, None
        if self.exclude_bos is not None:
            deprecated("cache setting exclude_bos", "include_bos (its negation)", depth=3)
            self.include_bos, self.exclude_bos = not self.exclude_bos, None

    def text_spec(self) -> TextSpec:
        return TextSpec(
            self.dataset, self.dataset_config, self.split, self.text_column, self.streaming
        )


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise WiremapError(f"{name} {value!r} is not supported; choose one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Plan:
    """Numbers derived from a config and the model."""

    layers: list[int]
    first_pos: int  # first stored position of a context (1 skips BOS)
    rows_per_context: int
    n_rows: int  # rows requested
    batch_contexts: int
    tokens_per_shard: int
    hooks: tuple[str, str]
    dtype: torch.dtype = field(repr=False)

    @property
    def n_contexts(self) -> int:
        return -(-self.n_rows // self.rows_per_context)

    @property
    def rows_per_batch(self) -> int:
        return self.batch_contexts * self.rows_per_context


def make_plan(cfg: CacheConfig, layers: list[int]) -> Plan:
    first_pos = 0 if cfg.include_bos else 1
    return Plan(
        layers=layers,
        first_pos=first_pos,
        rows_per_context=cfg.context_length - first_pos,
        n_rows=int(cfg.n_tokens),
        batch_contexts=int(cfg.batch_contexts),
        tokens_per_shard=int(cfg.shard_tokens),
        hooks=(cfg.input_hook, cfg.output_hook),
        dtype=STORAGE_DTYPES[cfg.dtype],
    )


def model_config(cfg: CacheConfig, model=None):
    return model.config if model is not None else load_config(cfg.model, cfg.revision)


def check_model(cfg: CacheConfig, config) -> list[int]:
    """Validate the config against the model; return the sorted layers to cache."""
    get_adapter(config.model_type)  # unsupported architecture -> clear error, before loading
    n_layers = int(config.num_hidden_layers)
    layers = range(n_layers) if cfg.layers is None else cfg.layers
    layers = sorted(set(check_layers(layers, n_layers)))
    limit = model_max_length(SimpleNamespace(config=config))
    if limit is not None and cfg.context_length > limit:
        raise WiremapError(
            f"context length {cfg.context_length} is beyond model {cfg.model!r}'s maximum of "
            f"{limit} positions; pass --context-length {limit} or less"
        )
    return layers
