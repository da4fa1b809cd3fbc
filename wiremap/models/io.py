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


def moved_names(module: str, moved: dict[str, str]):
    """`__getattr__` and `__dir__` for a shim `module` whose names now live in `moved[name]`:
    each name still resolves, with a DeprecationWarning that names its new module."""

    def getattr_(name: str):
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(
            f"{module}.{name} is deprecated and goes away in the next version; import it from "
            f"{moved[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(import_module(moved[name]), name)

    return getattr_, lambda: sorted(moved)


__getattr__, __dir__ = moved_names(__name__, _MOVED)
