"""Keywords renamed in this version (issue 15: one name per concept); the old spellings
still work for one version, each with a DeprecationWarning.

    target_batch, include_bos = renamed_keywords("attribute", target_batch, include_bos,
                                                 batch_size=batch_size, zero_bos=zero_bos)
"""

from __future__ import annotations

import warnings

from wiremap.errors import WiremapError


def renamed_keywords(
    func: str,
    target_batch: int | None,
    include_bos: bool,
    *,
    batch_size: int | None = None,
    zero_bos: bool | None = None,
) -> tuple[int | None, bool]:
    """(target_batch, include_bos), taking the old `batch_size` / `zero_bos` when given."""
    if batch_size is not None:
        if target_batch is not None and target_batch != batch_size:
            raise WiremapError(
                f"{func}() got target_batch={target_batch} and batch_size={batch_size}; "
                "batch_size is the old name of target_batch: give only target_batch"
            )
        _warn(f"{func}(batch_size=...) is renamed {func}(target_batch=...)")
        target_batch = batch_size
    if zero_bos is not None:
        _warn(f"{func}(zero_bos=...) is renamed {func}(include_bos=...), the opposite: "
              f"zero_bos={zero_bos} is include_bos={not zero_bos}")  # fmt: skip
        include_bos = not zero_bos
    return target_batch, include_bos


def include_bos_of(settings: dict | None) -> bool:
    """Whether a graph's settings say BOS features and errors are sources.

    Graphs saved before the rename store `zero_bos` (the opposite); neither key: False.
    """
    settings = settings or {}
    if "include_bos" in settings:
        return bool(settings["include_bos"])
    return not bool(settings.get("zero_bos", True))


def _warn(message: str) -> None:
    warnings.warn(message + " (the old name goes away in the next version)",
                  DeprecationWarning, stacklevel=4)  # fmt: skip
