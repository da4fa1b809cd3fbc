"""Transcoder files: export/load in the circuit-tracer layout, import Gemma Scope and sparsify.

    save_transcoders(tc, "run/transcoders", extra_config={"training": {...}})
    tc = load_transcoders("run/transcoders", device="cuda", dtype=torch.bfloat16, lazy=True)
    tc = import_gemma_scope("gemma-scope-2b-pt-transcoders/")   # folder of layer_*/.../params.npz
    tc = import_sparsify("skip-transcoder-Llama-3.2-1B/")        # folder of <hookpoint>/ folders

Layout written by `save_transcoders` (DESIGN.md §9), all tensors un-normalised (fold first):
- `config.yaml`: circuit-tracer keys `model_name`, `model_kind` (`transcoder_set` |
  `cross_layer_transcoder`), `feature_input_hook`, `feature_output_hook` (their hook names),
  `scan`, `transcoders` (PLT file list), plus ours: `wiremap_format`, `arch`, `activation`,
  `k`, activation options, `input_hook`/`output_hook` (our names), `layers`, `n_layers`,
  `d_model`, `d_transcoder`, `dtype`, `w_skip_layout`, and whatever `extra_config` adds.
- PLT: `layer_{i}.safetensors` = `W_enc [F, d]`, `W_dec [F, d]`, `b_enc [F]`, `b_dec [d]`,
  `activation_function.threshold [F]` (JumpReLU), `W_skip [d_out, d_in]` (skip = x @ W_skip.T).
- CLT: `W_enc_{i}.safetensors` = `W_enc_i [F, d]`, `b_enc_i [F]`, `b_dec_i [d]`,
  `threshold_i [F]` (JumpReLU), `W_skip_i [d_in, d_out]` (circuit-tracer's CLT computes
  x @ W_skip_i, the transpose of the PLT convention); `W_dec_{i}.safetensors` =
  `W_dec_i [F, L - i, d]`.
`i` is the position in `layers` (the model layer is `layers[i]`). A BatchTopK transcoder is
exported as a JumpReLU (its calibrated threshold) so that inference is per token.
Thresholds are stored in float32 whatever `dtype` the weights use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from wiremap.checksums import verify_checksums, write_checksums
from wiremap.errors import WiremapError
from wiremap.models.activations import Activation, BatchTopK
from wiremap.models.loading import resolve_dtype
from wiremap.models.transcoders import TRANSCODERS, Transcoder, build_transcoder

FORMAT_VERSION = 1
# Our hook names -> the TransformerLens-style names circuit-tracer configs use.
CT_HOOKS = {"mlp_in": "mlp.hook_in", "resid_mid": "hook_resid_mid", "mlp_out": "mlp.hook_out"}
_FROM_CT = {
    "mlp.hook_in": "mlp_in",
    "ln2.hook_normalized": "mlp_in",
    "hook_mlp_in": "mlp_in",
    "hook_resid_mid": "resid_mid",
    "mlp.hook_out": "mlp_out",
    "hook_mlp_out": "mlp_out",
}
_THRESHOLD_KEY = "activation_function.threshold"


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------
def save_transcoders(
    transcoder: Transcoder,
    folder: str | Path,
    extra_config: dict[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    batchtopk_threshold: Tensor | float | None = None,
) -> Path:
    """Write `transcoder` (already folded to raw activations) in the circuit-tracer layout.

    `dtype` casts the weights (default: the transcoder's); `batchtopk_threshold` overrides
    the recorded threshold used to turn a BatchTopK into a JumpReLU. `config.yaml` is
    written last, so a folder without it is an unfinished export.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").unlink(missing_ok=True)  # unfinished until written again, last
    dtype = transcoder.dtype if dtype is None else resolve_dtype(dtype)
    act = _export_activation(transcoder.activation, batchtopk_threshold)
    thresholds = act.threshold()
    write = _write_clt_layer if transcoder.cross_layer else _write_plt_layer
    with torch.no_grad():
        for i in range(transcoder.n_layers):
            th = None if thresholds is None else thresholds[i]
            write(transcoder, i, folder, dtype, th)
    config = _export_config(transcoder, act, dtype, extra_config or {})
    write_checksums(folder, [p.name for p in folder.glob("*.safetensors")])
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def _export_activation(act: Activation, threshold: Tensor | float | None) -> Activation:
    if isinstance(act, BatchTopK):
        return act.to_jumprelu(threshold)
    return act


def _cpu(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().to(device="cpu", dtype=dtype).contiguous()


def _write(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt", "writer": "wiremap"})


def _write_plt_layer(
    tc: Transcoder, i: int, folder: Path, dtype: torch.dtype, threshold: Tensor | None
) -> None:
    tensors = {
        "W_enc": _cpu(tc.W_enc(i), dtype),
        "W_dec": _cpu(tc.decoder(i)[:, 0], dtype),
        "b_enc": _cpu(tc.b_enc(i), dtype),
        "b_dec": _cpu(tc.b_dec(i), dtype),
    }
    if threshold is not None:
        tensors[_THRESHOLD_KEY] = _cpu(threshold, torch.float32)
    if tc.W_skip(i) is not None:
        tensors["W_skip"] = _cpu(tc.W_skip(i), dtype)
    _write(tensors, folder / f"layer_{i}.safetensors")


def _write_clt_layer(
    tc: Transcoder, i: int, folder: Path, dtype: torch.dtype, threshold: Tensor | None
) -> None:
    enc = {
        f"W_enc_{i}": _cpu(tc.W_enc(i), dtype),
        f"b_enc_{i}": _cpu(tc.b_enc(i), dtype),
        f"b_dec_{i}": _cpu(tc.b_dec(i), dtype),
    }
    if threshold is not None:
        enc[f"threshold_{i}"] = _cpu(threshold, torch.float32)
    if tc.W_skip(i) is not None:
        enc[f"W_skip_{i}"] = _cpu(tc.W_skip(i).T, dtype)
    _write(enc, folder / f"W_enc_{i}.safetensors")
    _write({f"W_dec_{i}": _cpu(tc.decoder(i), dtype)}, folder / f"W_dec_{i}.safetensors")


def _export_config(
    tc: Transcoder, act: Activation, dtype: torch.dtype, extra: dict[str, Any]
) -> dict[str, Any]:
    model_name = tc.model_name or "unknown"
    config: dict[str, Any] = {
        "model_name": model_name,
        "model_kind": "cross_layer_transcoder" if tc.cross_layer else "transcoder_set",
        "feature_input_hook": CT_HOOKS[tc.input_hook],
        "feature_output_hook": CT_HOOKS[tc.output_hook],
        "scan": f"wiremap/{model_name}/{tc.arch}",
    }
    if not tc.cross_layer:
        config["transcoders"] = [f"layer_{i}.safetensors" for i in range(tc.n_layers)]
    trained = {k: v for k, v in tc.config.items() if k not in tc.activation.config()}
    config.update(wiremap_format=FORMAT_VERSION, **trained, **act.config())
    config["dtype"] = str(dtype).removeprefix("torch.")
    if act is not tc.activation:
        config.update(trained_activation=tc.activation.name, k=tc.activation.k)
    if tc.has_skip:
        config["w_skip_layout"] = "d_in d_out" if tc.cross_layer else "d_out d_in"
    clash = sorted(set(config) & set(extra))
    if clash:
        raise WiremapError(
            f"extra_config keys {clash} would overwrite the export's own config keys; "
            "rename them or nest them (e.g. extra_config={'training': {...}})"
        )
    return {**config, **extra}


# ---------------------------------------------------------------------------------------
# loading our layout (or any circuit-tracer export)
# ---------------------------------------------------------------------------------------
def load_transcoders(
    folder: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    lazy: bool = False,
) -> Transcoder:
    """Load a circuit-tracer-layout export; `lazy` keeps CLT decoders on disk (read per layer)."""
    folder = Path(folder)
    config = read_config(folder)
    dtype = resolve_dtype(dtype)
    if config["model_kind"] == "cross_layer_transcoder":
        tc = _load_clt(folder, config, device, dtype, lazy)
    else:
        tc = _load_plt(folder, config, device, dtype)
    verify_checksums(folder)  # silent damage; after the checks that name a problem better
    return tc


def read_config(folder: Path) -> dict[str, Any]:
    """The export's `config.yaml`, validated enough to know how to read the weights."""
    path = folder / "config.yaml"
    if not path.is_file():
        raise WiremapError(
            f"{path} not found: {folder} is not a transcoder export (or it is unfinished). "
            "Pass the folder written by `save_transcoders`, or import foreign files with "
            "import_gemma_scope / import_sparsify"
        )
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise WiremapError(f"{path} is not valid YAML ({err}); re-export the transcoders") from err
    kinds = ("transcoder_set", "cross_layer_transcoder")
    if not isinstance(config, dict) or config.get("model_kind") not in kinds:
        raise WiremapError(f"{path} must set model_kind to one of {kinds}; fix or re-export it")
    return config


class _SafeFile:
    """Reads tensors from one safetensors file, turning every failure into a WiremapError."""

    def __init__(self, path: Path, fix: str) -> None:
        from safetensors import safe_open

        self.path, self.fix = path, fix
        if not path.is_file():
            raise WiremapError(f"{path} is missing; {fix}")
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
            self.keys = set(self._handle.keys())
        except Exception as err:  # safetensors raises its own error types
            raise WiremapError(f"{path} is not a readable safetensors file ({err}); {fix}") from err

    def get(self, key: str, shape: Sequence[int] | None = None) -> Tensor:
        if key not in self.keys:
            raise WiremapError(f"{self.path} has no tensor {key!r}; {self.fix}")
        tensor = self._handle.get_tensor(key)
        _check_shape(tensor.shape, shape, f"{self.path}: {key}", self.fix)
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


def _check_shape(actual, expected: Sequence[int] | None, what: str, fix: str) -> None:
    if expected is not None and list(actual) != list(expected):
        raise WiremapError(
            f"{what} has shape {list(actual)} but {list(expected)} was expected; {fix}"
        )


def _hook(config: dict[str, Any], ours: str, theirs: str, default: str) -> str:
    if config.get(ours):
        return config[ours]
    # circuit-tracer names may carry a TransformerLens block prefix: blocks.{layer}.hook_mlp_out
    name = re.sub(r"^blocks\.(\{layer\}|\d+)\.", "", str(config.get(theirs, "")))
    return _FROM_CT.get(name, default)


def _base_spec(config: dict[str, Any], n_layers: int, d_model: int, d_tc: int) -> dict[str, Any]:
    return dict(
        n_layers=n_layers,
        d_model=d_model,
        d_transcoder=d_tc,
        input_hook=_hook(config, "input_hook", "feature_input_hook", "resid_mid"),
        output_hook=_hook(config, "output_hook", "feature_output_hook", "mlp_out"),
        model_name=config.get("model_name"),
        layers=config.get("layers"),
    )


_REFIX = "re-export with save_transcoders, or check that the folder is complete"


def _load_plt(folder: Path, config: dict, device, dtype: torch.dtype) -> Transcoder:
    files = [_plt_file(folder, name) for name in _plt_names(folder, config)]
    first = _SafeFile(files[0], _REFIX)
    d_tc, d_model = first.shape("W_enc")
    layer_tensors = [_read_plt_layer(_SafeFile(p, _REFIX), d_tc, d_model) for p in files]
    has_skip = "W_skip" in layer_tensors[0]
    has_threshold = _THRESHOLD_KEY in layer_tensors[0]
    for path, t in zip(files, layer_tensors, strict=True):
        if ("W_skip" in t) != has_skip or (_THRESHOLD_KEY in t) != has_threshold:
            raise WiremapError(
                f"{path} differs from {files[0]} in having W_skip or a threshold; every layer "
                "file must have the same tensors. Re-export the transcoders"
            )
    state = {
        "encoder_weight": torch.stack([t["W_enc"] for t in layer_tensors]),
        "encoder_bias": torch.stack([t["b_enc"] for t in layer_tensors]),
        "decoder_weight": torch.stack([t["W_dec"] for t in layer_tensors]),
        "decoder_bias": torch.stack([t["b_dec"] for t in layer_tensors]),
    }
    if has_skip:
        state["skip_weight"] = torch.stack([t["W_skip"] for t in layer_tensors])
    thresholds = torch.stack([t[_THRESHOLD_KEY] for t in layer_tensors]) if has_threshold else None
    spec = _base_spec(config, len(files), d_model, d_tc)
    spec.update(_activation_spec(config, thresholds))
    arch = config.get("arch") or ("skip_plt" if has_skip else "plt")
    return assemble(arch, spec, state, thresholds, device, dtype)


def _plt_names(folder: Path, config: dict) -> list[str]:
    names = config.get("transcoders")
    if names:
        return [str(n) for n in names]
    n = config.get("n_layers") or len(list(folder.glob("layer_*.safetensors")))
    if not n:
        raise WiremapError(f"{folder} holds no layer_*.safetensors files; {_REFIX}")
    return [f"layer_{i}.safetensors" for i in range(n)]


def _plt_file(folder: Path, name: str) -> Path:
    if "://" in name:
        raise WiremapError(
            f"config.yaml in {folder} points at {name}, a remote file; download it and list "
            "local paths (relative to the folder) under `transcoders`"
        )
    path = Path(name)
    return path if path.is_absolute() else folder / path


def _read_plt_layer(f: _SafeFile, d_tc: int, d_model: int) -> dict[str, Tensor]:
    t = {
        "W_enc": f.get("W_enc", [d_tc, d_model]),
        "W_dec": f.get("W_dec", [d_tc, d_model]),
        "b_enc": f.get("b_enc", [d_tc]),
        "b_dec": f.get("b_dec", [d_model]),
    }
    if "W_skip" in f.keys:
        t["W_skip"] = f.get("W_skip", [d_model, d_model])
    if _THRESHOLD_KEY in f.keys:
        t[_THRESHOLD_KEY] = f.get(_THRESHOLD_KEY, [d_tc])
    return t


def _load_clt(folder: Path, config: dict, device, dtype: torch.dtype, lazy: bool) -> Transcoder:
    n_layers = config.get("n_layers") or len(list(folder.glob("W_enc_*.safetensors")))
    if not n_layers:
        raise WiremapError(f"{folder} holds no W_enc_*.safetensors files; {_REFIX}")
    d_tc, d_model = _SafeFile(folder / "W_enc_0.safetensors", _REFIX).shape("W_enc_0")
    encoders = [_read_clt_encoder(folder, i, d_tc, d_model) for i in range(n_layers)]
    has_skip = f"W_skip_{0}" in encoders[0]
    has_threshold = "threshold_0" in encoders[0]
    state = {
        "encoder_weight": torch.stack([e[f"W_enc_{i}"] for i, e in enumerate(encoders)]),
        "encoder_bias": torch.stack([e[f"b_enc_{i}"] for i, e in enumerate(encoders)]),
        "decoder_bias": torch.stack([e[f"b_dec_{i}"] for i, e in enumerate(encoders)]),
    }
    if has_skip:
        # circuit-tracer's CLT stores W_skip_i as [d_in, d_out]; we keep [d_out, d_in].
        state["skip_weight"] = torch.stack(
            [_need(e, f"W_skip_{i}", folder, i).T for i, e in enumerate(encoders)]
        )
    thresholds = None
    if has_threshold:
        thresholds = torch.stack(
            [_need(e, f"threshold_{i}", folder, i) for i, e in enumerate(encoders)]
        )
    loader = SafetensorsDecoders(folder, n_layers, d_tc, d_model)
    if not lazy:
        for i in range(n_layers):
            state[f"decoder_weight.{i}"] = loader(i)
    spec = _base_spec(config, n_layers, d_model, d_tc)
    spec.update(_activation_spec(config, thresholds))
    arch = config.get("arch") or ("skip_clt" if has_skip else "clt")
    return assemble(arch, spec, state, thresholds, device, dtype, loader if lazy else None)


def _read_clt_encoder(folder: Path, i: int, d_tc: int, d_model: int) -> dict[str, Tensor]:
    f = _SafeFile(folder / f"W_enc_{i}.safetensors", _REFIX)
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
    """Reads CLT decoders `W_dec_{i}` [F, L-i, d] from disk on demand (lazy loading)."""

    def __init__(self, folder: Path, n_layers: int, d_transcoder: int, d_model: int) -> None:
        self.folder = Path(folder)
        self.shapes = [[d_transcoder, n_layers - i, d_model] for i in range(n_layers)]
        for i in range(n_layers):  # check every header now so a bad file fails at load time
            shape = self._file(i).shape(f"W_dec_{i}")
            _check_shape(shape, self.shapes[i], str(self.folder / f"W_dec_{i}.safetensors"), _REFIX)

    def _file(self, i: int) -> _SafeFile:
        return _SafeFile(self.folder / f"W_dec_{i}.safetensors", _REFIX)

    def __call__(self, i: int, features: Tensor | None = None) -> Tensor:
        f = self._file(i)
        if features is None:
            return f.get(f"W_dec_{i}", self.shapes[i])
        return f.rows(f"W_dec_{i}", features)


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
            tc.decoder_weight = None
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


# ---------------------------------------------------------------------------------------
# importers
# ---------------------------------------------------------------------------------------
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
    tensors = [_read_npz(p) for p in files]
    d_model, d_tc = tensors[0]["W_enc"].shape
    for p, t in zip(files, tensors, strict=True):
        _check_gemma_scope(p, t, d_model, d_tc)
    state = _stack_layers(
        {"encoder_weight": t["W_enc"].T, "encoder_bias": t["b_enc"],
         "decoder_weight": t["W_dec"], "decoder_bias": t["b_dec"]}
        for t in tensors
    )  # fmt: skip
    thresholds = torch.stack([t["threshold"] for t in tensors]).float()
    hooks = dict(input_hook=input_hook, output_hook=output_hook, model_name=model_name)
    spec = _imported_spec(d_model, d_tc, layers, hooks, activation="jumprelu")
    return assemble("plt", spec, state, thresholds, device, resolve_dtype(dtype))


def _stack_layers(per_layer: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-layer tensors under our parameter names -> the stacked [L, ...] state of a PLT."""
    per_layer = list(per_layer)
    return {name: torch.stack([t[name] for t in per_layer]) for name in per_layer[0]}


def _imported_spec(d_model: int, d_tc: int, layers: list[int], hooks: dict, **activation):
    """`assemble`'s spec for an imported PLT over `layers` (hooks: input/output hook, model)."""
    return dict(n_layers=len(layers), d_model=d_model, d_transcoder=d_tc, layers=layers,
                **activation, **hooks)  # fmt: skip


def _gemma_scope_files(paths) -> tuple[list[Path], list[int]]:
    if isinstance(paths, (str, Path)):
        text = str(paths)
        if any(c in text for c in "*?["):
            files = sorted(Path(p) for p in _glob(text))
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


def _glob(pattern: str) -> Iterable[str]:
    import glob

    return glob.glob(pattern, recursive=True)


def _layer_from_path(path: Path) -> int:
    for part in reversed(path.parts):
        match = re.fullmatch(r"layer_(\d+)", part)
        if match:
            return int(match.group(1))
    raise WiremapError(
        f"cannot tell the layer of {path} (no `layer_<n>` folder in its path); pass a list "
        "of files with `layers=`"
    )


def _read_npz(path: Path) -> dict[str, Tensor]:
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
        _check_shape(t[key].shape, shape, f"{path}: {key}", fix)


def import_sparsify(
    folder: str | Path,
    *,
    hookpoints: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    model_name: str | None = None,
    input_hook: str = "mlp_in",
    output_hook: str = "mlp_out",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> Transcoder:
    """sparsify transcoders (`<hookpoint>/cfg.json` + `sae.safetensors`, TopK) as one PLT.

    The layer of each hookpoint is the integer in its name (`layers.3.mlp` -> 3) unless
    `layers` is given. Tensors: `encoder.weight [F, d]`, `encoder.bias [F]`, `W_dec [F, d]`,
    `b_dec [d]`, optional `W_skip [d, d]` (skip = x @ W_skip.T) -> `skip_plt`.
    """
    folder = Path(folder)
    dirs = _sparsify_dirs(folder, hookpoints)
    layers = list(layers) if layers is not None else [_layer_from_hookpoint(d.name) for d in dirs]
    if len(layers) != len(dirs):
        raise WiremapError(f"got {len(dirs)} hookpoints but {len(layers)} layers; pass one each")
    order = sorted(range(len(dirs)), key=lambda j: layers[j])
    dirs, layers = [dirs[j] for j in order], [layers[j] for j in order]
    cfgs = [_read_sparsify_cfg(d) for d in dirs]
    d_model, d_tc, k = cfgs[0]["d_in"], cfgs[0]["num_latents"], cfgs[0]["k"]
    for d, cfg in zip(dirs, cfgs, strict=True):
        if (cfg["d_in"], cfg["num_latents"], cfg["k"]) != (d_model, d_tc, k):
            raise WiremapError(
                f"{d / 'cfg.json'} has d_in/num_latents/k {cfg['d_in']}/{cfg['num_latents']}/"
                f"{cfg['k']} but {dirs[0].name} has {d_model}/{d_tc}/{k}; import hookpoints "
                "of one training run (pass `hookpoints=`)"
            )
    tensors = [_read_sparsify_weights(d, d_model, d_tc) for d in dirs]
    has_skip = "W_skip" in tensors[0]
    if any(("W_skip" in t) != has_skip for t in tensors):
        raise WiremapError(
            f"some hookpoints in {folder} have W_skip and some do not; pick one kind"
        )
    state = _stack_layers(
        {"encoder_weight": t["encoder.weight"], "encoder_bias": t["encoder.bias"],
         "decoder_weight": t["W_dec"], "decoder_bias": t["b_dec"],
         **({"skip_weight": t["W_skip"]} if has_skip else {})}
        for t in tensors
    )  # fmt: skip
    hooks = dict(input_hook=input_hook, output_hook=output_hook, model_name=model_name)
    spec = _imported_spec(d_model, d_tc, layers, hooks, activation="topk", k=k)
    arch = "skip_plt" if has_skip else "plt"
    return assemble(arch, spec, state, None, device, resolve_dtype(dtype))


def _sparsify_dirs(folder: Path, hookpoints: Sequence[str] | None) -> list[Path]:
    if not folder.is_dir():
        raise WiremapError(f"{folder} is not a folder; pass the folder holding <hookpoint>/ dirs")
    if hookpoints is not None:
        return [folder / h for h in hookpoints]
    if (folder / "cfg.json").is_file():
        return [folder]
    dirs = sorted(d for d in folder.iterdir() if (d / "cfg.json").is_file())
    if not dirs:
        raise WiremapError(
            f"{folder} holds no <hookpoint>/cfg.json; pass a sparsify checkpoint folder"
        )
    return dirs


def _layer_from_hookpoint(name: str) -> int:
    numbers = re.findall(r"\d+", name)
    if len(numbers) != 1:
        raise WiremapError(
            f"cannot tell the layer of hookpoint {name!r}; pass `layers=` (one per hookpoint)"
        )
    return int(numbers[0])


def _read_sparsify_cfg(d: Path) -> dict[str, Any]:
    path = d / "cfg.json"
    if not path.is_file():
        raise WiremapError(f"{path} is missing; each hookpoint folder needs cfg.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WiremapError(f"{path} is not valid JSON ({err}); re-download it") from err
    if "d_in" not in cfg:
        raise WiremapError(f"{path} has no d_in; it is not a sparsify cfg.json")
    if cfg.get("activation", "topk") != "topk":
        raise WiremapError(
            f"{path} uses activation {cfg['activation']!r}; only sparsify's topk is supported"
        )
    if not cfg.get("transcode", False):
        raise WiremapError(
            f"{path} describes a sparse autoencoder (transcode: false), not a transcoder; "
            "import a sparsify transcoder (trained with --transcode)"
        )
    d_in = int(cfg["d_in"])
    latents = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    return {"d_in": d_in, "num_latents": latents, "k": int(cfg.get("k", 32))}


def _read_sparsify_weights(d: Path, d_model: int, d_tc: int) -> dict[str, Tensor]:
    fix = "re-download the sparsify checkpoint"
    f = _SafeFile(d / "sae.safetensors", fix)
    t = {
        "encoder.weight": f.get("encoder.weight", [d_tc, d_model]),
        "encoder.bias": f.get("encoder.bias", [d_tc]),
        "W_dec": f.get("W_dec", [d_tc, d_model]),
        "b_dec": f.get("b_dec", [d_model]),
    }
    if "W_skip" in f.keys:
        t["W_skip"] = f.get("W_skip", [d_model, d_model])
    return t
