"""Deprecated alias of `wiremap.cache.command` (`wiremap cache`); goes away in the next version."""

from wiremap.compat import alias_module

alias_module(__name__, "wiremap.cache.command")
