"""wiremap's own export: safetensors files in the circuit-tracer layout, plus our config keys.

    save_transcoders(tc, "run/transcoders", extra_config={"training": {...}})
    tc = load_transcoders("run/transcoders", device="cuda", dtype=torch.bfloat16, lazy=True)

(`load_transcoders` lives in `load.py`: it reads circuit-tracer's folders as well.)

Layout written by `save_transcoders` (DESIGN.md §9), all tensors un-normalised (fold first):
- `config.yaml`: circuit-tracer keys `model_name`, `model_kind` (`transcoder_set` |
  `cross_layer_transcoder`), `feature_input_hook`, `feature_output_hook` (their hook names),
  `scan` / `scan_name`, `transcoders` (PLT files, absolute paths), plus ours:
  `wiremap_format`, `arch`, `activation`, `k`, activation options, `input_hook`/`output_hook`
  (our names), `layers`, `n_layers`,
  `d_model`, `d_transcoder`, `dtype`, `w_skip_layout`, `padded_files`,
  `circuit_tracer_limits` (what circuit-tracer cannot represent; warned at export), and
  whatever `extra_config` adds.
- PLT: `layer_{i}.safetensors` = `W_enc [F, d]`, `W_dec [F, d]`, `b_enc [F]`, `b_dec [d]`,
  `activation_function.threshold [F]` (JumpReLU), `W_skip [d_out, d_in]` (skip = x @ W_skip.T).
- CLT: `W_enc_{i}.safetensors` = `W_enc_i [F, d]`, `b_enc_i [F]`, `b_dec_i [d]`,
  `threshold_i [F]` (JumpReLU), `W_skip_i [d_in, d_out]` (circuit-tracer's CLT computes
  x @ W_skip_i, the transpose of the PLT convention); `W_dec_{i}.safetensors` =
  `W_dec_i [F, L - i, d]`.
`i` is the position in `layers` (the model layer is `layers[i]`), or with `pad_layers` the
model layer itself (all-zero transcoders fill the layers not covered). A BatchTopK transcoder is
exported as a JumpReLU (its calibrated threshold) so that inference is per token.
Thresholds are stored in float32 whatever `dtype` the weights use.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from wiremap.checksums import write_checksums
from wiremap.errors import WiremapError
from wiremap.models.activations import Activation, BatchTopK
from wiremap.models.formats.circuit_tracer import TOPK_NOTE, circuit_tracer_limits, ct_hook_names
from wiremap.models.formats.common import THRESHOLD_KEY, write_safetensors
from wiremap.models.loading import resolve_dtype
from wiremap.models.transcoders import Transcoder

FORMAT_VERSION = 1


def save_transcoders(
    transcoder: Transcoder,
    folder: str | Path,
    extra_config: dict[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    batchtopk_threshold: Tensor | float | None = None,
    *,
    pad_layers: bool | int = False,
    model_type: str | None = None,
) -> Path:
    """Write `transcoder` (already folded to raw activations) in the circuit-tracer layout.

    `dtype` casts the weights (default: the transcoder's); `batchtopk_threshold` overrides
    the recorded threshold used to turn a BatchTopK into a JumpReLU. circuit-tracer numbers
    its transcoders 0..n-1 as model layers and wants one for every model layer: for other
    `layers` (e.g. [5, 6, 7]) `pad_layers` writes all-zero transcoders for the model layers
    not covered (files named by model layer; `pad_layers=N` for an N-layer model, True reads
    N from the model's config.json, else max(layers) + 1); otherwise the export warns that
    circuit-tracer would misplace it.
    `model_type` (HF `config.model_type`; default: read from the model's config.json, or
    guessed from its name) picks circuit-tracer's hook names (Gemma-2/3 differ).
    Whatever circuit-tracer cannot represent is warned about and listed under
    `circuit_tracer_limits` in config.yaml. `config.yaml` is written last, so a folder
    without it is an unfinished export.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").unlink(missing_ok=True)  # unfinished until written again, last
    dtype = transcoder.dtype if dtype is None else resolve_dtype(dtype)
    act = _export_activation(transcoder.activation, batchtopk_threshold)
    files, n_files = _file_layers(transcoder, pad_layers)
    write = _write_clt_layer if transcoder.cross_layer else _write_plt_layer
    with torch.no_grad():
        for i, file_id in enumerate(files):
            write(transcoder, i, file_id, n_files, folder, dtype, act)
        for file_id in sorted(set(range(n_files)) - set(files)):
            _write_zero_layer(transcoder, file_id, n_files, folder, dtype, act)
    config = _export_config(transcoder, act, dtype, folder, files, n_files, model_type)
    limits = circuit_tracer_limits(transcoder, act, pad_layers, model_type)
    for text in limits:
        warnings.warn(f"{folder}: {text}", stacklevel=2)
    if limits:
        config["circuit_tracer_limits"] = limits
    if act.name == "topk" and not transcoder.cross_layer:
        config["circuit_tracer_notes"] = TOPK_NOTE
    config = _merge_extra(config, extra_config or {})
    write_checksums(folder, [p.name for p in folder.glob("*.safetensors")])
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def _export_activation(act: Activation, threshold: Tensor | float | None) -> Activation:
    if isinstance(act, BatchTopK):
        return act.to_jumprelu(threshold)
    return act


def _file_layers(tc: Transcoder, pad_layers: bool | int) -> tuple[list[int], int]:
    """The file number of each layer (its model layer when padded, else i), and the count."""
    if pad_layers is False:
        return list(range(tc.n_layers)), tc.n_layers
    n_files = pad_layers if type(pad_layers) is int else _model_n_layers(tc.model_name)
    n_files = n_files or tc.layers[-1] + 1
    if n_files <= max(tc.layers):
        raise WiremapError(
            f"pad_layers={pad_layers} gives {n_files} model layers but the transcoder covers "
            f"layer {max(tc.layers)}; pass the model's number of layers"
        )
    if tc.cross_layer and tc.layers != list(range(tc.layers[0], tc.layers[-1] + 1)):
        raise WiremapError(
            f"pad_layers needs consecutive layers for a CLT, got {tc.layers}: circuit-tracer's "
            "CLT decoders write to every later layer. Export without pad_layers (wiremap reads "
            "it) or train the CLT on a consecutive range of layers"
        )
    return list(tc.layers), n_files


def _model_n_layers(model_name: str | None) -> int | None:
    config = Path(model_name or "") / "config.json"
    try:
        cfg = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    n = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    return int(n) if n else None


def _cpu(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().to(device="cpu", dtype=dtype)


def _write_plt_layer(
    tc: Transcoder, i: int, file_id: int, n_files: int, folder, dtype, act: Activation
) -> None:
    tensors = {
        "W_enc": _cpu(tc.W_enc[i], dtype),
        "W_dec": _cpu(tc.decoder(i)[:, 0], dtype),
        "b_enc": _cpu(tc.b_enc[i], dtype),
        "b_dec": _cpu(tc.b_dec[i], dtype),
    }
    if act.threshold() is not None:
        tensors[THRESHOLD_KEY] = _cpu(act.threshold(i), torch.float32)
    if tc.has_skip:
        tensors["W_skip"] = _cpu(tc.W_skip[i], dtype)
    write_safetensors(tensors, folder / f"layer_{file_id}.safetensors")


def _write_clt_layer(
    tc: Transcoder, i: int, file_id: int, n_files: int, folder, dtype, act: Activation
) -> None:
    n = file_id
    enc = {
        f"W_enc_{n}": _cpu(tc.W_enc[i], dtype),
        f"b_enc_{n}": _cpu(tc.b_enc[i], dtype),
        f"b_dec_{n}": _cpu(tc.b_dec[i], dtype),
    }
    if act.threshold() is not None:
        enc[f"threshold_{n}"] = _cpu(act.threshold(i), torch.float32)
    if tc.has_skip:
        enc[f"W_skip_{n}"] = _cpu(tc.W_skip[i].T, dtype)
    write_safetensors(enc, folder / f"W_enc_{n}.safetensors")
    dec = _cpu(tc.decoder(i), dtype)  # [F, L - i, d]; padded: zeros for the layers after ours
    dec = torch.cat([dec, dec.new_zeros(dec.shape[0], n_files - n - dec.shape[1], dec.shape[2])], 1)
    write_safetensors({f"W_dec_{n}": dec}, folder / f"W_dec_{n}.safetensors")


def _write_zero_layer(
    tc: Transcoder, n: int, n_files: int, folder: Path, dtype: torch.dtype, act: Activation
) -> None:
    """An all-zero transcoder for model layer `n` (padding): no feature ever fires."""
    f, d = tc.d_transcoder, tc.d_model
    t = {"W_enc": torch.zeros(f, d, dtype=dtype), "b_enc": torch.zeros(f, dtype=dtype),
         "b_dec": torch.zeros(d, dtype=dtype)}  # fmt: skip
    if act.threshold() is not None:
        t[THRESHOLD_KEY] = torch.zeros(f)
    if tc.has_skip:
        t["W_skip"] = torch.zeros(d, d, dtype=dtype)
    if not tc.cross_layer:
        t["W_dec"] = torch.zeros(f, d, dtype=dtype)
        write_safetensors(t, folder / f"layer_{n}.safetensors")
        return
    renamed = {f"{k.removeprefix('activation_function.')}_{n}": v for k, v in t.items()}
    write_safetensors(renamed, folder / f"W_enc_{n}.safetensors")
    zeros = torch.zeros(f, n_files - n, d, dtype=dtype)
    write_safetensors({f"W_dec_{n}": zeros}, folder / f"W_dec_{n}.safetensors")


def _export_config(
    tc: Transcoder, act, dtype, folder: Path, files: list[int], n_files: int, model_type
) -> dict[str, Any]:
    model_name = tc.model_name or "unknown"
    scan = f"wiremap/{model_name}/{tc.arch}"
    hook_in, hook_out = ct_hook_names(tc, model_type)
    config: dict[str, Any] = {
        "model_name": model_name,
        "model_kind": "cross_layer_transcoder" if tc.cross_layer else "transcoder_set",
        "feature_input_hook": hook_in,
        "feature_output_hook": hook_out,
        "scan": scan,  # circuit-tracer 0.5.0 reads `scan`, its main branch `scan_name`
        "scan_name": scan,
    }
    if not tc.cross_layer:
        # absolute: circuit-tracer opens these paths relative to its working directory
        root = folder.resolve()
        config["transcoders"] = [str(root / f"layer_{i}.safetensors") for i in range(n_files)]
    trained = {k: v for k, v in tc.config.items() if k not in tc.activation.config()}
    config.update(wiremap_format=FORMAT_VERSION, **trained, **act.config())
    config["dtype"] = str(dtype).removeprefix("torch.")
    if (files, n_files) != (list(range(tc.n_layers)), tc.n_layers):
        config.update(padded_files=files, padded_n_layers=n_files)  # file number of our layers
    if act is not tc.activation:
        config.update(trained_activation=tc.activation.name, k=tc.activation.k)
    if tc.has_skip:
        config["w_skip_layout"] = "d_in d_out" if tc.cross_layer else "d_out d_in"
    return config


def _merge_extra(config: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    clash = sorted(set(config) & set(extra))
    if clash:
        raise WiremapError(
            f"extra_config keys {clash} would overwrite the export's own config keys; "
            "rename them or nest them (e.g. extra_config={'training': {...}})"
        )
    return {**config, **extra}
