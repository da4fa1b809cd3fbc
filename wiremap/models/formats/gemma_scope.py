"""Gemma Scope transcoders: `params.npz` per layer (JumpReLU), and Gemma Scope 2 safetensors.

    tc = import_gemma_scope("gemma-scope-2b-pt-transcoders/")   # folder of layer_*/.../params.npz
    tc = import_gemma_scope(["l0.npz", "l1.npz"], layers=[0, 1])

npz keys: `W_enc [d, F]` (transposed here), `W_dec [F, d]`, `b_enc`, `b_dec`, `threshold`.
Gemma Scope 2 files (`w_enc [d, F]`, `w_dec`, `b_enc`, `b_dec`, `threshold`,
`affine_skip_connection [d_in, d_out]`) come through circuit-tracer configs and
`load_transcoders`, which reads each layer with `read_gemma_scope_2`.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from wiremap.errors import WiremapError
from wiremap.models.formats.common import (
    THRESHOLD_KEY,
    Format,
    SafeFile,
    assemble,
    check_shape,
    imported_spec,
    register_format,
    stack_layers,
)
from wiremap.models.loading import resolve_dtype
from wiremap.models.transcoders import Transcoder


def import_gemma_scope(
    paths: str | Path | Sequence[str | Path],
    *,
    layers: Sequence[int] | None = None,
    model_name: str | None = None,
    input_hook: str = "mlp_in",
    output_hook: str = "mlp_out",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> Transcoder:
    """Gemma Scope transcoders (`params.npz` per layer, JumpReLU) as one PLT.

    `paths`: a list of npz files (layer i = i-th file unless `layers` says otherwise), a
    folder searched for `**/params.npz` with the layer read from a `layer_<n>` component,
    or a glob pattern. npz keys: `W_enc [d, F]` (transposed here), `W_dec [F, d]`, `b_enc`,
    `b_dec`, `threshold`.
    """
    files, found_layers = _gemma_scope_files(paths)
    layers = list(layers) if layers is not None else found_layers
    if len(layers) != len(files):
        raise WiremapError(
            f"got {len(files)} npz files but {len(layers)} layers; pass one per file"
        )
    raw = [read_npz(p) for p in files]
    d_model, d_tc = raw[0]["W_enc"].shape
    for p, t in zip(files, raw, strict=True):
        _check_gemma_scope(p, t, d_model, d_tc)
    tensors = [npz_layer(t) for t in raw]
    thresholds = torch.stack([t.pop(THRESHOLD_KEY) for t in tensors])
    state = stack_layers(tensors)
    hooks = dict(input_hook=input_hook, output_hook=output_hook, model_name=model_name)
    spec = imported_spec(d_model, d_tc, layers, hooks, activation="jumprelu")
    return assemble("plt", spec, state, thresholds, device, resolve_dtype(dtype))


def _gemma_scope_files(paths) -> tuple[list[Path], list[int]]:
    if isinstance(paths, (str, Path)):
        text = str(paths)
        if any(c in text for c in "*?["):
            files = sorted(Path(p) for p in glob.glob(text, recursive=True))
        elif Path(text).is_dir():
            files = sorted(Path(text).rglob("params.npz"))
        else:
            files = [Path(text)]
        if not files:
            raise WiremapError(f"no params.npz files found at {text}; pass the npz paths")
        layers = [_layer_from_path(p) for p in files]
        if len(set(layers)) != len(layers):
            raise WiremapError(
                f"{text} holds several params.npz for the same layer (e.g. different widths or "
                "L0s); pass an explicit list of files, one per layer"
            )
        order = sorted(range(len(files)), key=lambda j: layers[j])
        return [files[j] for j in order], [layers[j] for j in order]
    files = [Path(p) for p in paths]
    if not files:
        raise WiremapError("import_gemma_scope got an empty list of files")
    return files, list(range(len(files)))


def _layer_from_path(path: Path) -> int:
    for part in reversed(path.parts):
        match = re.fullmatch(r"layer_(\d+)", part)
        if match:
            return int(match.group(1))
    raise WiremapError(
        f"cannot tell the layer of {path} (no `layer_<n>` folder in its path); pass a list "
        "of files with `layers=`"
    )


def read_npz(path: Path) -> dict[str, Tensor]:
    """The float32 tensors of a Gemma Scope `params.npz`, as stored (`W_enc [d, F]`)."""
    import numpy as np

    if not path.is_file():
        raise WiremapError(f"{path} does not exist; pass the Gemma Scope params.npz files")
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as err:  # numpy raises several types for a bad archive
        raise WiremapError(
            f"{path} is not a readable .npz archive ({err}); re-download it"
        ) from err
    missing = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"} - set(arrays)
    if missing:
        raise WiremapError(
            f"{path} lacks {sorted(missing)}; a Gemma Scope transcoder params.npz holds "
            "W_enc, W_dec, b_enc, b_dec and threshold"
        )
    return {k: torch.from_numpy(v.astype("float32")) for k, v in arrays.items()}


def npz_layer(t: dict[str, Tensor]) -> dict[str, Tensor]:
    """A `read_npz` layer in our names: `W_enc [F, d]`, `W_dec`, `b_enc`, `b_dec`, threshold."""
    return {"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"], "b_enc": t["b_enc"],
            "b_dec": t["b_dec"], THRESHOLD_KEY: t["threshold"]}  # fmt: skip


def _check_gemma_scope(path: Path, t: dict[str, Tensor], d_model: int, d_tc: int) -> None:
    fix = "all layers must come from one Gemma Scope release of the same width"
    expected = {
        "W_enc": [d_model, d_tc],
        "W_dec": [d_tc, d_model],
        "b_enc": [d_tc],
        "b_dec": [d_model],
        "threshold": [d_tc],
    }
    for key, shape in expected.items():
        check_shape(t[key].shape, shape, f"{path}: {key}", fix)


def read_gemma_scope_2(f: SafeFile) -> dict[str, Tensor]:
    """One Gemma Scope 2 layer file in our names (W_enc [F, d], W_skip [d_out, d_in])."""
    t = {"W_enc": f.get("w_enc").T.contiguous(), "W_dec": f.get("w_dec"),
         "b_enc": f.get("b_enc"), "b_dec": f.get("b_dec"),
         THRESHOLD_KEY: f.get("threshold")}  # fmt: skip
    if "affine_skip_connection" in f.keys:
        t["W_skip"] = f.get("affine_skip_connection").T.contiguous()
    return t


register_format(
    Format("gemma_scope", "Gemma Scope params.npz transcoders (JumpReLU)", read=import_gemma_scope)
)
