"""Name -> object tables that refuse a second registration under the same name.

    ARCHS = Registry("transcoder architecture")

    @ARCHS.register_class("plt", attr="arch")    # sets PerLayerTranscoder.arch = "plt"
    class PerLayerTranscoder(Transcoder): ...

    cls = ARCHS.lookup("plt")                     # a WiremapError listing the names if unknown

Transcoder architectures, activations, language-model adapters and transcoder file formats
are registered this way. Registering a taken name raises a WiremapError, so a plug-in cannot
silently shadow a built-in (or another plug-in); `replace=True` says the override is meant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from wiremap.errors import WiremapError

T = TypeVar("T")
C = TypeVar("C", bound=type)


class Registry(dict[str, T], Generic[T]):
    """A dict of registered `kind`s by name; read it like a dict, add to it with `add`."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def add(self, name: str, value: T, *, replace: bool = False) -> T:
        """Register `value` as `name`; a taken name raises unless `replace=True`."""
        if name in self and not replace:
            raise WiremapError(
                f"{self.kind} {name!r} is already registered ({self[name]!r}); pick another "
                "name, or pass replace=True to override it on purpose"
            )
        self[name] = value
        return value

    def register_class(self, name: str, *, attr: str, replace: bool = False) -> Callable[[C], C]:
        """Class decorator: register the class as `name` and set `cls.<attr> = name`."""

        def add(cls: C) -> C:
            self.add(name, cls, replace=replace)
            setattr(cls, attr, name)
            return cls

        return add

    def lookup(self, name: str) -> T:
        """The entry `name`, or a WiremapError that lists the registered names."""
        if name not in self:
            raise WiremapError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self)}")
        return self[name]
