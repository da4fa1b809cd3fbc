"""Deprecated: transcoder files moved to `wiremap.models.formats`, one module per format.

    from wiremap.models.formats import load_transcoders, save_transcoders   # the stable path

Every name `wiremap.models.io` had still imports from here for this version, with a
DeprecationWarning naming its new module.
"""

from __future__ import annotations

import warnings
from importlib import import_module

_MOVED = {
    "save_transcoders": "wiremap.models.formats.wiremap",
    "FORMAT_VERSION": "wiremap.models.formats.wiremap",
    "load_transcoders": "wiremap.models.formats.load",
    "SafetensorsDecoders": "wiremap.models.formats.load",
    "assemble": "wiremap.models.formats.common",
    "import_gemma_scope": "wiremap.models.formats.gemma_scope",
    "import_sparsify": "wiremap.models.formats.sparsify",
    **dict.fromkeys(
        [
            "CT_HOOKS",
            "CT_HOOKS_GEMMA",
            "GEMMA_MODEL_TYPES",
            "TOPK_NOTE",
            "ct_hook_names",
            "guess_model_type",
            "circuit_tracer_limits",
            "resolve_folder",
            "circuit_tracer_cache_path",
            "parse_hf_uri",
            "read_config",
        ],
        "wiremap.models.formats.circuit_tracer",
    ),
}


def moved(old_module: str, name: str, new_module: str):
    """`name` from `new_module`, warning that `old_module` (a shim) goes away."""
    warnings.warn(
        f"{old_module}.{name} is deprecated and goes away in the next version; import it from "
        f"{new_module} (from wiremap.models.formats import ... has the public names)",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(import_module(new_module), name)


def __getattr__(name: str):
    if name in _MOVED:
        return moved(__name__, name, _MOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_MOVED])
