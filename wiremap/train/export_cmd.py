"""`wiremap export`: transcoders from any training checkpoint, without resuming the run.

    wiremap export runs/gpt2-clt/checkpoints/step=4000.ckpt --out tc/
    wiremap export runs/gpt2-clt/checkpoints/last.ckpt              # -> runs/gpt2-clt/export-step=N

Writes what a finished run writes to `<run>/transcoders/` (`ExportTranscoders`): the
circuit-tracer layout with the normalisation folded into the weights and BatchTopK turned
into its per-token JumpReLU, a summary in `config.yaml`, and the run's resolved config as
`training_config.yaml` (read from `<run>/config.yaml`, next to `checkpoints/`, or `--config`).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

from wiremap.errors import WiremapError


def main(argv: list[str]) -> int:
    from wiremap.commands import parse

    return export(**parse(argv, "wiremap export", export, positional=True))


def export(checkpoint: str, out: str | None = None, config: str | None = None) -> int:
    """Write transcoders from any training checkpoint, without resuming the run.

    Args:
        checkpoint: a training checkpoint: step=N.ckpt or last.ckpt
        out: output folder (default: <run>/export-step=<N> beside the checkpoints folder)
        config: the run's resolved config to copy as training_config.yaml (default:
            <run>/config.yaml when it exists)
    """
    ckpt = Path(checkpoint)
    module, step = load_checkpoint(ckpt)
    folder = Path(out) if out else run_dir(ckpt) / f"export-step={step}"
    resolved = Path(config) if config else run_dir(ckpt) / "config.yaml"
    if config and not resolved.is_file():
        raise WiremapError(f"--config {config!r} does not exist; give the run's config.yaml")
    export_checkpoint(module, step, ckpt, folder, resolved)
    note = "" if resolved.is_file() else f" (no {resolved} found: training_config.yaml left out)"
    print(f"wiremap export: step {step} of {ckpt} -> {folder}{note}")
    return 0


def run_dir(ckpt: Path) -> Path:
    """The run folder of a checkpoint written by `wiremap train` (<run>/checkpoints/x.ckpt)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def load_checkpoint(ckpt: Path):
    """(TranscoderModule on CPU with the checkpoint's weights, its global step)."""
    import torch

    from wiremap.train.module import TranscoderModule

    if not ckpt.is_file():
        raise WiremapError(
            f"checkpoint {str(ckpt)!r} does not exist; give a .ckpt file from "
            "<run>/checkpoints/ (step=N.ckpt or last.ckpt)"
        )
    try:
        # weights_only: plain tensors and containers, never code from a file handed to us
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        module = TranscoderModule(**state["hyper_parameters"])
        module.load_state_dict(state["state_dict"])
    except (
        OSError, RuntimeError, EOFError, KeyError, TypeError, ValueError,
        pickle.UnpicklingError, zipfile.BadZipFile,
    ) as err:  # fmt: skip
        raise WiremapError(
            f"could not read training checkpoint {str(ckpt)!r} ({type(err).__name__}: "
            f"{str(err)[:200]}); it is truncated or not a `wiremap train` checkpoint. "
            "Pick another one from <run>/checkpoints/"
        ) from err
    return module.eval(), int(state.get("global_step", 0))


def export_checkpoint(module, step: int, ckpt: Path, out: Path, config: Path | None) -> Path:
    """Write the export of `module` (loaded from `ckpt` at `step`) to `out`."""
    from wiremap import __version__
    from wiremap.train.callbacks import export_module, module_summary

    summary: dict[str, Any] = {
        "steps": step,
        "checkpoint": str(ckpt),
        **module_summary(module),
        "wiremap_version": __version__,
    }
    return export_module(module, out, summary, config)
