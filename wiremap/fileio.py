"""Atomic file writes: a path holds either its old content or the whole new one, never half.

    from wiremap.fileio import atomic_write, atomic_path

    atomic_write("graph.json", text)                 # str or bytes
    with atomic_path("model.safetensors") as tmp:    # for writers that want a path
        save_file(tensors, tmp)

The data goes to a temporary file in the same folder, is flushed to disk, then renamed over
the target (`os.replace`, atomic on POSIX and Windows), and the folder is synced so that the
rename itself survives a power cut. On any failure (a full disk, a kill, an exception) the
temporary file is removed where the process still can, and the target is untouched. A new
file gets the mode a plain `open()` would give it (umask applied); a replaced file keeps its
mode.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before threads exist
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_UMASK


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it replaces `path`."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _mode_for(path))
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is None:  # a failed write names no file: name the one being written
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write(path: str | Path, data: str | bytes | memoryview, fsync: bool = True) -> Path:
    """Replace `path` with `data` (str is written as UTF-8) atomically; returns the path."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as f:
        write_all(f, raw)
    return Path(path)


def write_all(f, data: bytes) -> None:
    """`f.write(data)`; one place where tests can slow writes down or make them fail."""
    f.write(data)


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder` (call it only where no
    other process writes at the same time, e.g. under a lock or before a run starts)."""
    found = list(Path(folder).glob(f".*{TMP_SUFFIX}")) if Path(folder).is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found
