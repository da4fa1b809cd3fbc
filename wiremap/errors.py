"""The one exception type for errors a user can cause, and the mapping of the system's errors
(out of memory, a full disk, a read-only folder) onto it."""

from __future__ import annotations

import errno
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


class WiremapError(Exception):
    """A problem the user can fix; the message names the problem and the fix.

    The `wiremap` command prints it as one line and exits with status 2.
    """


# -- out of memory -------------------------------------------------------------------------
# CUDA: torch.OutOfMemoryError; CPU: RuntimeError "DefaultCPUAllocator: can't allocate memory:
# you tried to allocate N bytes" or "not enough memory: you tried to allocate N bytes".
OOM_MARKERS = ("out of memory", "not enough memory", "allocate")


def is_oom(err: BaseException) -> bool:
    """True for an allocator's out-of-memory error (CPU or accelerator)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, torch.OutOfMemoryError):
        return True
    if isinstance(err, MemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in OOM_MARKERS)


@contextmanager
def oom_to_error(what: str, figures: str, fix: str) -> Iterator[None]:
    """Turn an allocator error raised inside into one WiremapError: what ran out, the
    figures it was working with, the allocator's own words and the setting to change."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        if not is_oom(err):
            raise
        raise WiremapError(
            f"{what} ran out of memory ({figures}; the allocator said: {str(err)[:160]}); {fix}"
        ) from err


# -- full disk, read-only folder -----------------------------------------------------------
DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_DISK_WORDS = {"no space left on device": errno.ENOSPC, "read-only file system": errno.EROFS}


def chain(err: BaseException | None) -> Iterator[BaseException]:
    """`err`, then what caused it (`raise ... from`) or was being handled, and so on."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def wiremap_cause(err: BaseException) -> WiremapError | None:
    """The first WiremapError in `err`'s chain (libraries may wrap ours in their own)."""
    return next((e for e in chain(err) if isinstance(e, WiremapError)), None)


def disk_error(err: BaseException) -> WiremapError | None:
    """A WiremapError for a full disk or an unwritable folder found in `err` or its causes
    (safetensors and torch wrap the OSError in their own types); None for anything else."""
    for e in chain(err):
        code = e.errno if isinstance(e, OSError) else _words_errno(str(e))
        if code in DISK_ERRNOS:
            where = getattr(e, "filename", None)
            return WiremapError(
                f"{DISK_ERRNOS[code]} at {where or 'the output folder'}: free space or choose "
                "a writable output folder (or fix the permissions), then run the same command "
                "again; finished work is kept and nothing half-written is left looking whole"
            )
    return None


def _words_errno(text: str) -> int | None:
    low = text.lower()
    return next((code for words, code in _DISK_WORDS.items() if words in low), None)


# -- settings -------------------------------------------------------------------------------
def deprecated(old: str, new: str, depth: int = 1) -> None:
    """One DeprecationWarning for a setting still accepted under its old name, blamed on the
    code `depth` frames above the caller."""
    warnings.warn(
        f"{old} is deprecated and goes away in the next version; use {new}",
        DeprecationWarning,
        stacklevel=2 + depth,
    )


def require_positive(cfg, *names: str) -> None:
    """WiremapError unless each named setting of `cfg` is a positive integer."""
    for name in names:
        if int(getattr(cfg, name)) < 1:
            raise WiremapError(f"{name} must be a positive integer, got {getattr(cfg, name)}")
