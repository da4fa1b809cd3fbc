"""Deprecated alias of `wiremap.attribution` (the subpackage's name until 0.1).

`import wiremap.attribute.prune` and `from wiremap.attribute.attribute import attribute` keep
working for this version, with one DeprecationWarning: each `wiremap.attribute.<name>` is the
very module `wiremap.attribution.<name>` (same object, so isinstance checks and pickles agree).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_OLD = __name__
_NEW = "wiremap.attribution"

warnings.warn(
    f"{_OLD} was renamed {_NEW} and goes away in the next version; import from {_NEW} instead",
    DeprecationWarning,
    stacklevel=2,
)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `wiremap.attribute.<x>` and hands back the module `wiremap.attribution.<x>`."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(_OLD + "."):
            return None
        new = _NEW + fullname[len(_OLD) :]
        if importlib.util.find_spec(new) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(_NEW + spec.name[len(_OLD) :])

    def exec_module(self, module):
        pass


if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
    sys.meta_path.insert(0, _Alias())
