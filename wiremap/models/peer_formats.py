"""Deprecated: the sae-lens and sparsify formats moved to `wiremap.models.formats.sae_lens`
and `wiremap.models.formats.sparsify`; their names still import from here for this version,
with a DeprecationWarning.
"""

from __future__ import annotations

from wiremap.compat import moved_names

__getattr__, __dir__ = moved_names(
    __name__,
    {
        "export_sae_lens": "wiremap.models.formats.sae_lens",
        "import_sae_lens": "wiremap.models.formats.sae_lens",
        "TL_HOOKS": "wiremap.models.formats.sae_lens",
        "SAE_LENS_VERSION": "wiremap.models.formats.sae_lens",
        "export_sparsify": "wiremap.models.formats.sparsify",
    },
)
