"""Deprecated: moved to `wiremap.attribution.subgraph` (graph-JSON logic the viewer, the PNG and the
export share); this alias is that module and goes away in the next version."""

import importlib
import sys
import warnings

warnings.warn(
    "wiremap.attribution.viewer.subgraph moved to wiremap.attribution.subgraph",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("wiremap.attribution.subgraph")
