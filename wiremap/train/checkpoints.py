"""Training checkpoints that are whole or absent, and `--ckpt_path last` that says what it finds.

    trainer = L.Trainer(plugins=[AtomicCheckpointIO()], ...)   # last.ckpt never half-written
    ckpt = resolve_ckpt_path("last", run_dir / "checkpoints")  # a readable .ckpt, or WiremapError

Lightning writes a checkpoint through its CheckpointIO; this one serialises to memory first,
writes a temporary file beside the target and renames it over the target
(`wiremap.fileio`), so a full disk or a kill never leaves a truncated `last.ckpt` behind.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from wiremap.errors import WiremapError
from wiremap.fileio import atomic_write

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves replace the file atomically (temp file + rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buffer.getbuffer())


def readable(path: Path) -> bool:
    """True when `path` is a whole torch checkpoint (a zip whose directory can be read)."""
    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _step(path: Path) -> int:
    found = re.search(r"step=(\d+)", path.name)
    return int(found.group(1)) if found else -1


def step_checkpoints(folder: Path) -> list[Path]:
    """The folder's `step=N.ckpt` files, latest step first."""
    return sorted((p for p in folder.glob("*.ckpt") if _step(p) >= 0), key=_step, reverse=True)


def resolve_ckpt_path(ckpt: str | None, folder: Path) -> str | None:
    """The checkpoint to resume from: `last` becomes `<folder>/last.ckpt` when it is whole;
    no checkpoint, or an unreadable one, is a WiremapError naming what can be used."""
    if ckpt is None:
        return None
    path = folder / LAST if ckpt == "last" else Path(ckpt)
    if ckpt == "last" and not path.is_file():
        raise WiremapError(
            f"--ckpt_path last: {folder} holds no {LAST}, so there is nothing to resume; "
            "start the run without --ckpt_path (or check --run.root/--run.name)"
        )
    if not path.is_file():
        raise WiremapError(f"--ckpt_path {ckpt!r} does not exist; give a .ckpt file or `last`")
    if not readable(path):
        intact = next((p for p in step_checkpoints(path.parent) if readable(p)), None)
        fix = f"resume with --ckpt_path {intact}" if intact else "start the run again"
        raise WiremapError(f"checkpoint {path} is truncated or damaged; {fix}")
    return str(path)
