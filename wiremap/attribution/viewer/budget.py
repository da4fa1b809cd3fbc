"""Deprecated alias of `wiremap.attribution.budget` (moved out of the viewer: the export and
the PNG use it too); goes away in the next version."""

from wiremap.compat import alias_module

alias_module(__name__, "wiremap.attribution.budget")
