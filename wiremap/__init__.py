"""wiremap: train transcoders on language models and trace circuits.

    from wiremap import load_model, ActivationCache, WiremapError

Public names are imported lazily so that `import wiremap` stays light
(no Lightning, wandb or transformers until they are needed).
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "WiremapError": "wiremap.errors",
    "load_model": "wiremap.models.loading",
    "get_adapter": "wiremap.models.adapters",
    "capture": "wiremap.models.hooks",
    "replace_mlp_out": "wiremap.models.hooks",
    "ActivationCache": "wiremap.train.cache",
    "build_cache": "wiremap.train.cache",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wiremap' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
