"""What every transcoder file format shares: safe reads, one safetensors writer, assembly.

    f = SafeFile(path, fix="re-download it")     # every failure is a WiremapError naming `fix`
    w = f.get("W_enc", [F, d])                   # checks the shape
    tc = assemble("plt", spec, stack_layers(per_layer), thresholds, "cpu", torch.float32)

Readers turn a foreign file's tensors into the transcoder's own parameter names (`W_enc
[F, d]`, `b_enc`, `W_dec`, `b_dec`, `W_skip [d_out, d_in]`) per layer, stack them and
`assemble` a transcoder without a random init. Formats register under a name in `FORMATS`
(`register_format`); a name registered twice is refused unless `replace=True`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wiremap.errors import WiremapError
from wiremap.models.registry import Registry
from wiremap.models.transcoders import TRANSCODERS, Transcoder, build_transcoder

THRESHOLD_KEY = "activation_function.threshold"
REFIX = "re-export with save_transcoders, or check that the folder is complete"


@dataclass(frozen=True)
class Format:
    """One transcoder file format: how to read it, how to write it (None: not supported)."""

    name: str
    """Registry name (`sae_lens`)."""
    description: str
    """One line for users: which tool writes or reads these files."""
    read: Callable[..., Transcoder] | None = None
    """`read(path, **options) -> Transcoder`."""
    write: Callable[..., Any] | None = None
    """`write(transcoder, folder, **options)`."""


FORMATS: Registry[Format] = Registry("transcoder file format")


def register_format(fmt: Format, *, replace: bool = False) -> Format:
    """Add a file format under `fmt.name`; a taken name raises unless `replace=True`."""
    return FORMATS.add(fmt.name, fmt, replace=replace)


class SafeFile:
    """Reads tensors from one safetensors file, turning every failure into a WiremapError."""

    def __init__(self, path: Path, fix: str) -> None:
        from safetensors import safe_open

        self.path, self.fix = path, fix
        if not path.is_file():
            raise WiremapError(f"{path} is missing; {fix}")
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
            self.keys = set(self._handle.keys())
            self.metadata = self._handle.metadata() or {}
        except Exception as err:  # safetensors raises its own error types
            raise WiremapError(f"{path} is not a readable safetensors file ({err}); {fix}") from err

    def get(self, key: str, shape: Sequence[int] | None = None) -> Tensor:
        if key not in self.keys:
            raise WiremapError(f"{self.path} has no tensor {key!r}; {self.fix}")
        tensor = self._handle.get_tensor(key)
        check_shape(tensor.shape, shape, f"{self.path}: {key}", self.fix)
        return tensor

    def rows(self, key: str, index: Tensor) -> Tensor:
        """Only the rows `index` of `key` (safetensors slices the file; no full read)."""
        if key not in self.keys:
            raise WiremapError(f"{self.path} has no tensor {key!r}; {self.fix}")
        return self._handle.get_slice(key)[torch.as_tensor(index).cpu()]

    def shape(self, key: str) -> list[int]:
        if key not in self.keys:
            raise WiremapError(f"{self.path} has no tensor {key!r}; {self.fix}")
        return list(self._handle.get_slice(key).get_shape())


def check_shape(actual, expected: Sequence[int] | None, what: str, fix: str) -> None:
    if expected is not None and list(actual) != list(expected):
        raise WiremapError(
            f"{what} has shape {list(actual)} but {list(expected)} was expected; {fix}"
        )


def stack_layers(per_layer: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-layer tensors under our parameter names -> the stacked [L, ...] state of a PLT."""
    per_layer = list(per_layer)
    return {name: torch.stack([t[name] for t in per_layer]) for name in per_layer[0]}


def imported_spec(d_model: int, d_tc: int, layers: list[int], hooks: dict, **activation):
    """`assemble`'s spec for an imported PLT over `layers` (hooks: input/output hook, model)."""
    return dict(n_layers=len(layers), d_model=d_model, d_transcoder=d_tc, layers=layers,
                **activation, **hooks)  # fmt: skip


def assemble(
    arch: str,
    spec: dict[str, Any],
    state: dict[str, Tensor],
    thresholds: Tensor | None,
    device: torch.device | str,
    dtype: torch.dtype,
    decoder_loader=None,
) -> Transcoder:
    """Build a transcoder from tensors in our parameter names without a random init."""
    if arch not in TRANSCODERS:
        raise WiremapError(f"unknown transcoder architecture {arch!r} in the config; re-export")
    with torch.device("meta"):
        tc = build_transcoder(arch, **spec)
        if decoder_loader is not None:
            tc.W_dec = None
            tc.decoder_loader = decoder_loader
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    if thresholds is not None:
        if bool((thresholds < 0).any()):
            raise WiremapError("JumpReLU thresholds must be non-negative; the files are corrupt")
        log_t = thresholds.to(device=device, dtype=torch.float32).log()
        state["activation.log_threshold"] = log_t
    try:
        tc.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise WiremapError(
            f"the tensors do not fit a {arch} transcoder ({err}); re-export"
        ) from err
    return tc.to(device)


def write_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    """Write `tensors` (detached, on the CPU, contiguous) to `path`, marked as wiremap's."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "writer": "wiremap"})


def need_plt(tc: Transcoder, tool: str) -> None:
    """Refuse a CLT for a format (`tool`) that has per-layer transcoders only."""
    if tc.cross_layer:
        raise WiremapError(
            f"{tool} has no cross-layer transcoders; export this CLT with save_transcoders "
            "(circuit-tracer layout)"
        )


def import_transcoders(path: str | Path, format: str, **options: Any) -> Transcoder:
    """Read transcoder files of a registered `format` (`FORMATS`) as one transcoder."""
    fmt = FORMATS.lookup(format)
    if fmt.read is None:
        raise WiremapError(f"wiremap writes {format} files but cannot read them; pick another")
    return fmt.read(path, **options)


def export_transcoders(transcoder: Transcoder, folder: str | Path, format: str, **options: Any):
    """Write `transcoder` in a registered `format` (`FORMATS`); returns what the writer does."""
    fmt = FORMATS.lookup(format)
    if fmt.write is None:
        raise WiremapError(f"wiremap reads {format} files but cannot write them; pick another")
    return fmt.write(transcoder, folder, **options)
