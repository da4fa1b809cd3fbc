"""Reading the circuit-tracer layout: wiremap's exports and circuit-tracer's own folders.

    tc = load_transcoders("run/transcoders", device="cuda", dtype=torch.bfloat16, lazy=True)
    tc = load_transcoders("ct_folder/")   # circuit-tracer's to_safetensors, hub configs, cache

PLTs: one `layer_{i}.safetensors` per layer (or a Gemma Scope `params.npz` / Gemma Scope 2
file listed in a circuit-tracer config); CLTs: `W_enc_{i}` / `W_dec_{i}.safetensors`, the
decoders optionally left on disk (`lazy=True`, read per layer by `SafetensorsDecoders`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wiremap.checksums import verify_checksums
from wiremap.errors import WiremapError
from wiremap.models.formats.circuit_tracer import (
    hook_from_config,
    local_file,
    read_config,
    resolve_folder,
)
from wiremap.models.formats.common import REFIX, THRESHOLD_KEY, SafeFile, assemble, check_shape
from wiremap.models.formats.gemma_scope import npz_layer, read_gemma_scope_2, read_npz
from wiremap.models.loading import resolve_dtype
from wiremap.models.transcoders import Transcoder


def load_transcoders(
    folder: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    lazy: bool = False,
    *,
    input_hook: str | None = None,
    output_hook: str | None = None,
    model_name: str | None = None,
) -> Transcoder:
    """Load a circuit-tracer-layout folder; `lazy` keeps CLT decoders on disk (read per layer).

    `folder`: our export, a folder written by circuit-tracer's `to_safetensors` (no
    config.yaml: pass the hooks, default mlp_in -> mlp_out for PLTs, resid_mid -> mlp_out for
    CLTs), a circuit-tracer config folder whose `transcoders` list local paths or
    `hf://owner/repo/file` entries found on disk (next to config.yaml or in the Hugging Face
    cache), or a hub reference (`owner/repo[/subfolder][@revision]`) that circuit-tracer
    has cached (`CIRCUIT_TRACER_CACHE_DIR`, default ~/.cache/circuit_tracer).
    `input_hook` / `output_hook` / `model_name` override what the folder says.
    """
    folder = resolve_folder(folder)
    config = read_config(folder)
    overrides = dict(input_hook=input_hook, output_hook=output_hook, model_name=model_name)
    config.update({k: v for k, v in overrides.items() if v is not None})
    dtype = resolve_dtype(dtype)
    if config["model_kind"] == "cross_layer_transcoder":
        tc = _load_clt(folder, config, device, dtype, lazy)
    else:
        tc = _load_plt(folder, config, device, dtype)
    verify_checksums(folder)  # silent damage; after the checks that name a problem better
    return tc


def _base_spec(config: dict[str, Any], n_layers: int, d_model: int, d_tc: int) -> dict[str, Any]:
    return dict(
        n_layers=n_layers,
        d_model=d_model,
        d_transcoder=d_tc,
        input_hook=hook_from_config(config, "input_hook", "feature_input_hook", "resid_mid"),
        output_hook=hook_from_config(config, "output_hook", "feature_output_hook", "mlp_out"),
        model_name=config.get("model_name"),
        layers=config.get("layers"),
    )


def _load_plt(folder: Path, config: dict, device, dtype: torch.dtype) -> Transcoder:
    files, layers = _plt_files(folder, config)
    layer_tensors = [_read_plt_file(p) for p in files]
    d_tc, d_model = layer_tensors[0]["W_enc"].shape
    for path, t in zip(files, layer_tensors, strict=True):
        _check_plt_layer(path, t, layer_tensors[0], d_tc, d_model)
    has_skip = "W_skip" in layer_tensors[0]
    has_threshold = THRESHOLD_KEY in layer_tensors[0]
    state = {
        name: torch.stack([t[name] for t in layer_tensors])
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip")
        if name in layer_tensors[0]
    }
    thresholds = torch.stack([t[THRESHOLD_KEY] for t in layer_tensors]) if has_threshold else None
    if "k" in layer_tensors[0] and not config.get("activation"):  # circuit-tracer's TopK files
        config = {**config, "activation": "topk", "k": int(layer_tensors[0]["k"])}
    spec = _base_spec(config, len(files), d_model, d_tc)
    spec["layers"] = spec["layers"] or layers
    spec.update(_activation_spec(config, thresholds))
    arch = config.get("arch") or ("skip_plt" if has_skip else "plt")
    return assemble(arch, spec, state, thresholds, device, dtype)


def _plt_files(folder: Path, config: dict) -> tuple[list[Path], list[int] | None]:
    """The file of each layer, and the model layers when the config lists them."""
    entries = config.get("transcoders")
    if not entries:
        found = sorted(folder.glob("layer_*.safetensors"), key=lambda p: _number(p.stem))
        if not found:
            raise WiremapError(f"{folder} holds no layer_*.safetensors files; {REFIX}")
        n = config.get("n_layers") or len(found)
        return [folder / f"layer_{i}.safetensors" for i in range(n)], None
    layers = None
    if all(isinstance(e, dict) for e in entries):  # older configs: {id, layer, filepath}
        entries = sorted(entries, key=lambda e: e["layer"])
        layers = [int(e["layer"]) for e in entries]
        entries = [e["filepath"] for e in entries]
    files = [local_file(folder, str(e)) for e in entries]
    padded = config.get("padded_files")
    return ([files[m] for m in padded] if padded else files), layers


def _number(stem: str) -> int:
    digits = re.findall(r"\d+", stem)
    return int(digits[-1]) if digits else -1


def _read_plt_file(path: Path) -> dict[str, Tensor]:
    """One layer in circuit-tracer's names, from our / circuit-tracer / Gemma Scope files."""
    if path.suffix == ".npz":
        return npz_layer(read_npz(path))
    f = SafeFile(path, REFIX)
    if "w_enc" in f.keys:
        return read_gemma_scope_2(f)
    names = ["W_enc", "W_dec", "b_enc", "b_dec", "W_skip", THRESHOLD_KEY, "k"]
    return {key: f.get(key) for key in names if key in f.keys or key in names[:4]}


def _check_plt_layer(path: Path, t: dict, first: dict, d_tc: int, d_model: int) -> None:
    expected = {
        "W_enc": [d_tc, d_model],
        "W_dec": [d_tc, d_model],
        "b_enc": [d_tc],
        "b_dec": [d_model],
        "W_skip": [d_model, d_model],
        THRESHOLD_KEY: [d_tc],
    }
    for key, shape in expected.items():
        if key in t:
            check_shape(t[key].shape, shape, f"{path}: {key}", REFIX)
    if ("W_skip" in t) != ("W_skip" in first) or (THRESHOLD_KEY in t) != (THRESHOLD_KEY in first):
        raise WiremapError(
            f"{path} differs from the first layer file in having W_skip or a threshold; every "
            "layer file must have the same tensors. Re-export the transcoders"
        )


def _load_clt(folder: Path, config: dict, device, dtype: torch.dtype, lazy: bool) -> Transcoder:
    n_layers = config.get("n_layers") or len(list(folder.glob("W_enc_*.safetensors")))
    if not n_layers:
        raise WiremapError(f"{folder} holds no W_enc_*.safetensors files; {REFIX}")
    files = config.get("padded_files") or list(range(n_layers))
    first = files[0]
    d_tc, d_model = SafeFile(folder / f"W_enc_{first}.safetensors", REFIX).shape(f"W_enc_{first}")
    encoders = [_read_clt_encoder(folder, m, d_tc, d_model) for m in files]
    has_skip = f"W_skip_{first}" in encoders[0]
    has_threshold = f"threshold_{first}" in encoders[0]
    pairs = list(zip(files, encoders, strict=True))
    state = {
        name: torch.stack([e[f"{name}_{m}"] for m, e in pairs])
        for name in ("W_enc", "b_enc", "b_dec")
    }
    if has_skip:
        # circuit-tracer's CLT stores W_skip_i as [d_in, d_out]; we keep [d_out, d_in].
        state["W_skip"] = torch.stack([_need(e, f"W_skip_{m}", folder, m).T for m, e in pairs])
    thresholds = None
    if has_threshold:
        thresholds = torch.stack([_need(e, f"threshold_{m}", folder, m) for m, e in pairs])
    loader = SafetensorsDecoders(
        folder, n_layers, d_tc, d_model, files, config.get("padded_n_layers")
    )
    if not lazy:
        for i in range(n_layers):
            state[f"W_dec.{i}"] = loader(i)
    spec = _base_spec(config, n_layers, d_model, d_tc)
    spec.update(_activation_spec(config, thresholds))
    arch = config.get("arch") or ("skip_clt" if has_skip else "clt")
    return assemble(arch, spec, state, thresholds, device, dtype, loader if lazy else None)


def _read_clt_encoder(folder: Path, i: int, d_tc: int, d_model: int) -> dict[str, Tensor]:
    f = SafeFile(folder / f"W_enc_{i}.safetensors", REFIX)
    t = {
        f"W_enc_{i}": f.get(f"W_enc_{i}", [d_tc, d_model]),
        f"b_enc_{i}": f.get(f"b_enc_{i}", [d_tc]),
        f"b_dec_{i}": f.get(f"b_dec_{i}", [d_model]),
    }
    if f"W_skip_{i}" in f.keys:
        t[f"W_skip_{i}"] = f.get(f"W_skip_{i}", [d_model, d_model])
    if f"threshold_{i}" in f.keys:
        t[f"threshold_{i}"] = f.get(f"threshold_{i}", [d_tc])
    return t


def _need(tensors: dict[str, Tensor], key: str, folder: Path, i: int) -> Tensor:
    if key not in tensors:
        raise WiremapError(
            f"{folder / f'W_enc_{i}.safetensors'} lacks {key!r} although layer 0 has it; "
            "every layer must have the same tensors. Re-export the transcoders"
        )
    return tensors[key]


class SafetensorsDecoders:
    """Reads CLT decoders `W_dec_{i}` [F, L-i, d] from disk on demand (lazy loading).

    `files[i]` is the file number of layer i (the model layer in a padded export, whose
    decoders also hold zeros for the `n_files` model layers after ours: they are cut off).
    """

    def __init__(
        self,
        folder: Path,
        n_layers: int,
        d_transcoder: int,
        d_model: int,
        files: Sequence[int] | None = None,
        n_files: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.files = list(files) if files is not None else list(range(n_layers))
        n_files = n_files or self.files[-1] + 1
        self.shapes = [[d_transcoder, n_layers - i, d_model] for i in range(n_layers)]
        for i, m in enumerate(self.files):  # check every header now: a bad file fails at load
            shape = self._file(i).shape(self._key(i))
            path = str(self.folder / f"{self._key(i)}.safetensors")
            check_shape(shape, [d_transcoder, n_files - m, d_model], path, REFIX)

    def _key(self, i: int) -> str:
        return f"W_dec_{self.files[i]}"

    def _file(self, i: int) -> SafeFile:
        return SafeFile(self.folder / f"{self._key(i)}.safetensors", REFIX)

    def __call__(self, i: int, features: Tensor | None = None) -> Tensor:
        f = self._file(i)
        n_out = self.shapes[i][1]
        if features is None:
            return f.get(self._key(i))[:, :n_out].contiguous()
        return f.rows(self._key(i), features)[:, :n_out].contiguous()


def _activation_spec(config: dict[str, Any], thresholds: Tensor | None) -> dict[str, Any]:
    """Activation name and options: from our keys, else inferred (threshold -> JumpReLU)."""
    name = config.get("activation") or ("jumprelu" if thresholds is not None else "relu")
    if (name == "jumprelu") != (thresholds is not None):
        raise WiremapError(
            f"config.yaml says activation {name!r} but the files "
            f"{'have' if thresholds is not None else 'lack'} JumpReLU thresholds; re-export"
        )
    spec: dict[str, Any] = {"activation": name, "k": config.get("k")}
    for key in ("bandwidth", "threshold_momentum"):
        if key in config:
            spec[key] = config[key]
    if name == "batchtopk":
        raise WiremapError(
            "this export uses a batchtopk activation, which needs a whole batch at inference; "
            "re-export it with save_transcoders (which turns it into a JumpReLU)"
        )
    return spec
