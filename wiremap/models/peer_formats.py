"""Deprecated: the sae-lens and sparsify formats moved to `wiremap.models.formats.sae_lens`
and `wiremap.models.formats.sparsify`; their names still import from here for this version,
with a DeprecationWarning.
"""

from __future__ import annotations

from wiremap.models.io import moved

_MOVED = {
    "export_sae_lens": "wiremap.models.formats.sae_lens",
    "import_sae_lens": "wiremap.models.formats.sae_lens",
    "TL_HOOKS": "wiremap.models.formats.sae_lens",
    "SAE_LENS_VERSION": "wiremap.models.formats.sae_lens",
    "export_sparsify": "wiremap.models.formats.sparsify",
}


def __getattr__(name: str):
    if name in _MOVED:
        return moved(__name__, name, _MOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_MOVED])
