"""Transcoder files, one module per format, each registered by name in `FORMATS`.

    from wiremap.models.formats import load_transcoders, save_transcoders
    save_transcoders(tc, "run/transcoders")               # wiremap's export (circuit-tracer layout)
    tc = load_transcoders("run/transcoders", lazy=True)   # ours, or circuit-tracer's folders
    tc = import_transcoders("gemma-scope-2b-pt-transcoders/", format="gemma_scope")
    export_transcoders(tc, "out/sae_lens", format="sae_lens")

Modules: `wiremap` (our export), `load` (reading the circuit-tracer layout: ours and
circuit-tracer's), `circuit_tracer` (its hook names, limits, hub references and cache),
`gemma_scope`, `sparsify` (EleutherAI), `sae_lens`, and `common` (safe reads, one
safetensors writer, `assemble`, the registry). A new format is one module that calls
`register_format(Format(name, description, read=..., write=...))`, imported below; a name
registered twice raises a WiremapError unless `replace=True`.
"""

from wiremap.models.formats.circuit_tracer import ct_hook_names, guess_model_type
from wiremap.models.formats.common import (
    FORMATS,
    Format,
    export_transcoders,
    import_transcoders,
    register_format,
)
from wiremap.models.formats.gemma_scope import import_gemma_scope
from wiremap.models.formats.load import load_transcoders
from wiremap.models.formats.sae_lens import export_sae_lens, import_sae_lens
from wiremap.models.formats.sparsify import export_sparsify, import_sparsify
from wiremap.models.formats.wiremap import save_transcoders

register_format(
    Format(
        "wiremap",
        "wiremap's export: circuit-tracer's safetensors layout plus wiremap's config keys",
        read=load_transcoders,
        write=save_transcoders,
    )
)
register_format(
    Format(
        "circuit_tracer",
        "circuit-tracer transcoders (to_safetensors folders, hub configs, its cache)",
        read=load_transcoders,
        write=save_transcoders,
    )
)

__all__ = [
    "FORMATS",
    "Format",
    "ct_hook_names",
    "export_sae_lens",
    "export_sparsify",
    "export_transcoders",
    "guess_model_type",
    "import_gemma_scope",
    "import_sae_lens",
    "import_sparsify",
    "import_transcoders",
    "load_transcoders",
    "register_format",
    "save_transcoders",
]
