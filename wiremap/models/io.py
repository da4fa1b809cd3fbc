"""Deprecated: transcoder files moved to `wiremap.models.formats`, one module per format.

    from wiremap.models.formats import load_transcoders, save_transcoders   # the stable path

Every name `wiremap.models.io` had still imports from here for this version, with a
DeprecationWarning naming its new module.
"""

from __future__ import annotations

from wiremap.compat import moved_names

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


__getattr__, __dir__ = moved_names(__name__, _MOVED)
