"""Deprecated: renamed `wiremap.models.frozen` (`linearise` → `freeze`, `Linearised` →
`FrozenModel`, `rm.linearised(ids)` → `rm.frozen(ids)`); this alias goes in the next version."""

import warnings

from wiremap.models.frozen import FrozenModel, FrozenRun, freeze

warnings.warn(
    "wiremap.models.linearise is renamed wiremap.models.frozen (freeze, FrozenModel); "
    "this alias goes away in the next version",
    DeprecationWarning,
    stacklevel=2,
)

linearise = freeze
Linearised = FrozenModel

__all__ = ["FrozenModel", "FrozenRun", "Linearised", "freeze", "linearise"]
