"""Deprecated: text packing moved to `wiremap.cache.text` (this module goes away in the next
version); import from there.
"""

import warnings

from wiremap.cache.text import (
    BUILDERS,
    TextPosition,
    TextSpec,
    boundary_tokens,
    iter_texts,
    local_files,
    pack_contexts,
    pack_positions,
    tokenize,
    tokenize_indexed,
    warn,
)

warnings.warn(
    "wiremap.train.text moved to wiremap.cache.text and goes away in the next version; "
    "import from wiremap.cache.text instead",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "BUILDERS",
    "TextPosition",
    "TextSpec",
    "boundary_tokens",
    "iter_texts",
    "local_files",
    "pack_contexts",
    "pack_positions",
    "tokenize",
    "tokenize_indexed",
    "warn",
]
