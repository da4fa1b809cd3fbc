"""Deprecated: the activation cache moved to `wiremap.cache` (this module goes away in the
next version). Import from there: `from wiremap.cache import ActivationCache, CacheConfig,
build_cache`; the pieces live in `wiremap.cache.{config,manifest,writer,build,reader}`.
"""

import warnings

from wiremap.cache.build import TokenCheck, build_cache, capturing
from wiremap.cache.config import (
    STORAGE_DTYPES,
    CacheConfig,
    Plan,
    check_model,
    make_plan,
    model_config,
)
from wiremap.cache.manifest import FORMAT, IDENTITY, MANIFEST, PROGRESS, norm_stats, read_manifest
from wiremap.cache.reader import ActivationCache
from wiremap.cache.writer import Batch, ShardWriter, activation_rows, shard_sums

warnings.warn(
    "wiremap.train.cache moved to wiremap.cache and goes away in the next version; "
    "import from wiremap.cache instead",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "FORMAT",
    "IDENTITY",
    "MANIFEST",
    "PROGRESS",
    "STORAGE_DTYPES",
    "ActivationCache",
    "Batch",
    "CacheConfig",
    "Plan",
    "ShardWriter",
    "TokenCheck",
    "activation_rows",
    "build_cache",
    "capturing",
    "check_model",
    "make_plan",
    "model_config",
    "norm_stats",
    "read_manifest",
    "shard_sums",
]
