"""The activation cache: a language model's MLP inputs and outputs on disk, and reading them.

    from wiremap.cache import ActivationCache, CacheConfig, build_cache

    path = build_cache(CacheConfig(model="gpt2", dataset="wikitext", out="wiremap_out/gpt2"))
    x, y = ActivationCache(path).get(slice(0, 512))       # [512, n_layers, d_model] each

Modules, by what they do: `config` (what to cache: `CacheConfig`, `Plan`), `text` (documents,
tokenizing, packing into contexts), `manifest` (the folder's manifest.json and its lock),
`writer` (batches to shards, in a thread), `build` (`build_cache`: the resumable run) and
`reader` (`ActivationCache`). The cache needs only `wiremap.models`; training
(`wiremap.train`) and attribution read it. Names are imported lazily, so that importing the
package (e.g. for `text`) does not load torch.
"""

from importlib import import_module

# public name -> module that defines it
_LAZY = {
    "CacheConfig": "wiremap.cache.config",
    "Plan": "wiremap.cache.config",
    "make_plan": "wiremap.cache.config",
    "STORAGE_DTYPES": "wiremap.cache.config",
    "build_cache": "wiremap.cache.build",
    "capturing": "wiremap.cache.build",
    "ActivationCache": "wiremap.cache.reader",
    "read_manifest": "wiremap.cache.manifest",
    "norm_stats": "wiremap.cache.manifest",
    "TextSpec": "wiremap.cache.text",
    "TextPosition": "wiremap.cache.text",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wiremap.cache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = list(_LAZY)
