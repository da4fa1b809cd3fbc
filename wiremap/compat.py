"""Old names that keep working for one version, each with a DeprecationWarning.

    __getattr__, __dir__ = moved_names(__name__, {"load_transcoders": "wiremap.models.formats"})
    alias_module(__name__, "wiremap.attribution.budget")   # the old module *is* the new one

Light on purpose (no torch): `wiremap/__init__.py` uses it.
"""

from __future__ import annotations

import sys
import warnings
from importlib import import_module


def moved_names(module: str, moved: dict[str, str]):
    """`__getattr__` and `__dir__` for a shim `module` whose names now live in `moved[name]`:
    each name still resolves, with a DeprecationWarning that names its new module."""

    def getattr_(name: str):
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(
            f"{module}.{name} is deprecated and goes away in the next version; import it from "
            f"{moved[name]} (from {moved[name]} import {name})",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(import_module(moved[name]), name)

    return getattr_, lambda: sorted(moved)


def alias_module(old: str, new: str) -> None:
    """Make the module being imported as `old` the very module `new` (same object: isinstance
    checks, monkeypatches and pickles agree), with one DeprecationWarning."""
    warnings.warn(
        f"{old} moved to {new} and goes away in the next version; import from {new} instead",
        DeprecationWarning,
        stacklevel=3,
    )
    sys.modules[old] = import_module(new)
