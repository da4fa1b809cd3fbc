"""The activation cache: a language model's MLP inputs and outputs on disk, and reading them.

    from wiremap.cache import ActivationCache, CacheConfig, build_cache

    path = build_cache(CacheConfig(model="gpt2", dataset="wikitext", out="wiremap_out/gpt2"))
    x, y = ActivationCache(path).get(slice(0, 512))       # [512, n_layers, d_model] each

Modules, by what they do: `config` (what to cache: `CacheConfig`, `Plan`), `text` (documents,
tokenizing, packing into contexts), `manifest` (the folder's manifest.json and its lock),
`writer` (batches to shards, in a thread), `build` (`build_cache`: the resumable run) and
`reader` (`ActivationCache`). The cache needs only `wiremap.models`; training
(`wiremap.train`) and attribution read it. (`import wiremap` stays light: it imports this
package only when one of these names is used.)
"""

from wiremap.cache.build import build_cache, capturing
from wiremap.cache.config import STORAGE_DTYPES, CacheConfig, Plan, make_plan
from wiremap.cache.manifest import norm_stats, read_manifest
from wiremap.cache.reader import ActivationCache
from wiremap.cache.text import TextPosition, TextSpec

__all__ = [
    "STORAGE_DTYPES",
    "ActivationCache",
    "CacheConfig",
    "Plan",
    "TextPosition",
    "TextSpec",
    "build_cache",
    "capturing",
    "make_plan",
    "norm_stats",
    "read_manifest",
]
