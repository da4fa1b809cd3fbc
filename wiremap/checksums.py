"""sha256 checksums of the files in a folder, kept in a sidecar and checked on loading.

    from wiremap.checksums import write_checksums, verify_checksums

    write_checksums(folder, ["layer_0.safetensors", "layer_1.safetensors"])  # after writing
    verify_checksums(folder)    # WiremapError naming the damaged file; no-op without a sidecar

The sidecar is `checksums.json`: `{"format": "wiremap-checksums/1", "sha256": {name: hex}}`.
Folders without one (older exports, other projects' layouts) load unchecked. A file is
hashed at most once per process for a given size and modification time, so loading the
same export again costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from wiremap.errors import WiremapError
from wiremap.fileio import atomic_write

SIDECAR = "checksums.json"
FORMAT = "wiremap-checksums/1"
_BLOCK = 1 << 24
_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def sha256_once(path: str | Path) -> str:
    """`sha256_file`, computed once per process while the file's size and mtime stay."""
    path = Path(path)
    st = os.stat(path)
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _verified:
        _verified[key] = sha256_file(path)
    return _verified[key]


def write_checksums(folder: str | Path, names: Iterable[str]) -> Path:
    """Hash `names` (files inside `folder`) and write the sidecar atomically."""
    folder = Path(folder)
    sums = {name: sha256_once(folder / name) for name in sorted(names)}
    text = json.dumps({"format": FORMAT, "sha256": sums}, indent=1) + "\n"
    return atomic_write(folder / SIDECAR, text)


def read_checksums(folder: str | Path) -> dict[str, str] | None:
    """`{name: sha256}` from the folder's sidecar, or None when it has none."""
    path = Path(folder) / SIDECAR
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        sums = obj["sha256"]
        if obj.get("format") != FORMAT or not isinstance(sums, dict):
            raise ValueError(f"not a {FORMAT} file")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WiremapError(
            f"{path} is damaged ({err}); export the transcoders again, or delete {SIDECAR} "
            "to load the folder unchecked"
        ) from err
    return {str(k): str(v) for k, v in sums.items()}


def verify_checksums(folder: str | Path, what: str = "the transcoders") -> None:
    """Check every file the sidecar lists; a missing or altered one raises WiremapError."""
    folder = Path(folder)
    sums = read_checksums(folder)
    for name, want in (sums or {}).items():
        path = folder / name
        if not path.is_file():
            raise WiremapError(f"{path} is missing (listed in {folder / SIDECAR}); {_fix(what)}")
        if sha256_once(path) != want:
            raise WiremapError(
                f"{path} is corrupt: its sha256 differs from the one recorded in "
                f"{folder / SIDECAR}; {_fix(what)}"
            )


def _fix(what: str) -> str:
    return f"copy or export {what} again (e.g. `wiremap export`)"
