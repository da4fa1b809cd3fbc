"""Transcoder files: export/load in the circuit-tracer layout, import Gemma Scope and sparsify.

    save_transcoders(tc, "run/transcoders", extra_config={"training": {...}})
    tc = load_transcoders("run/transcoders", device="cuda", dtype=torch.bfloat16, lazy=True)
    tc = import_gemma_scope("gemma-scope-2b-pt-transcoders/")   # folder of layer_*/.../params.npz
    tc = import_sparsify("skip-transcoder-Llama-3.2-1B/")        # folder of <hookpoint>/ folders
    tc = load_transcoders("ct_folder/")   # circuit-tracer's to_safetensors, hub configs, cache

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
import re
import warnings
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
# Gemma-2/3 put a norm after the MLP: circuit-tracer's `mlp.hook_out` is the MLP output before
# it, `hook_mlp_out` the normed output (our `mlp_out`). Its `ln2.hook_normalized` is the
# pre-feedforward norm *before* its weight, so not our `mlp_in`: that is `mlp.hook_in`, which
# its Gemma-3 mappings have and its Gemma-2 mapping lacks (circuit-tracer 0.5.0).
CT_HOOKS_GEMMA = {"mlp_in": "mlp.hook_in", "resid_mid": "hook_resid_mid", "mlp_out": "hook_mlp_out"}
GEMMA_MODEL_TYPES = ("gemma2", "gemma3", "gemma3_text")
TOPK_NOTE = (
    "circuit-tracer main reads TopK from `activation`/`k` here; 0.5.0 loads it as ReLU (set "
    "each transcoder's activation_function to circuit_tracer's TopK(k)). Its TopK keeps "
    "negative values when fewer than k pre-activations are positive; wiremap's zeroes them"
)
_FROM_CT = {
    "mlp.hook_in": "mlp_in",
    "hook_mlp_in": "resid_mid",  # TransformerLens: the MLP block's input, before its norm
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


def ct_hook_names(tc: Transcoder, model_type: str | None = None) -> tuple[str, str]:
    """circuit-tracer's (feature_input_hook, feature_output_hook) for this transcoder."""
    model_type = model_type or guess_model_type(tc.model_name)
    names = CT_HOOKS_GEMMA if model_type in GEMMA_MODEL_TYPES else CT_HOOKS
    return names[tc.input_hook], names[tc.output_hook]


def guess_model_type(model_name: str | None) -> str | None:
    """HF `model_type` of a model: its local config.json, else a Gemma name, else None."""
    if not model_name:
        return None
    config = Path(model_name) / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text()).get("model_type")
        except (OSError, json.JSONDecodeError):
            return None
    match = re.search(r"gemma-?([23])", model_name.lower())
    return f"gemma{match.group(1)}" if match else None


def circuit_tracer_limits(
    tc: Transcoder, act: Activation, pad_layers: bool, model_type: str | None = None
) -> list[str]:
    """What circuit-tracer (0.5.0 / main) would load differently from wiremap, in words."""
    limits = []
    if tc.input_hook == "mlp_in" and (model_type or guess_model_type(tc.model_name)) == "gemma2":
        limits.append(
            "circuit-tracer has no Gemma-2 hook for the pre-feedforward norm's output (mlp_in): "
            "its ln2.hook_normalized is before the norm's weight. The config names mlp.hook_in, "
            "which its Gemma-2 mapping lacks, so it refuses rather than misreads; train on "
            "resid_mid for a Gemma-2 transcoder circuit-tracer can run"
        )
    if tc.cross_layer and tc.has_skip:
        limits.append(
            "circuit-tracer's load_clt ignores W_skip_i: it loads this skip CLT without its "
            "skip path (outputs differ by x @ W_skip_i); only wiremap reads it exactly"
        )
    if tc.cross_layer and act.name == "topk":
        limits.append(
            "circuit-tracer's load_clt knows only ReLU and JumpReLU: it loads this TopK CLT "
            "as a ReLU CLT; only wiremap reads it exactly"
        )
    if not pad_layers and tc.layers != list(range(tc.n_layers)):
        limits.append(
            f"covers model layers {tc.layers}, but circuit-tracer numbers transcoders "
            f"0..{tc.n_layers - 1} and would load them at the wrong layers; export with "
            "pad_layers=True to write all-zero transcoders for the missing layers"
        )
    return limits


def _cpu(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().to(device="cpu", dtype=dtype).contiguous()


def _write(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt", "writer": "wiremap"})


def _write_plt_layer(
    tc: Transcoder, i: int, file_id: int, n_files: int, folder, dtype, act: Activation
) -> None:
    tensors = {
        "W_enc": _cpu(tc.W_enc(i), dtype),
        "W_dec": _cpu(tc.decoder(i)[:, 0], dtype),
        "b_enc": _cpu(tc.b_enc(i), dtype),
        "b_dec": _cpu(tc.b_dec(i), dtype),
    }
    if act.threshold() is not None:
        tensors[_THRESHOLD_KEY] = _cpu(act.threshold(i), torch.float32)
    if tc.W_skip(i) is not None:
        tensors["W_skip"] = _cpu(tc.W_skip(i), dtype)
    _write(tensors, folder / f"layer_{file_id}.safetensors")


def _write_clt_layer(
    tc: Transcoder, i: int, file_id: int, n_files: int, folder, dtype, act: Activation
) -> None:
    n = file_id
    enc = {
        f"W_enc_{n}": _cpu(tc.W_enc(i), dtype),
        f"b_enc_{n}": _cpu(tc.b_enc(i), dtype),
        f"b_dec_{n}": _cpu(tc.b_dec(i), dtype),
    }
    if act.threshold() is not None:
        enc[f"threshold_{n}"] = _cpu(act.threshold(i), torch.float32)
    if tc.W_skip(i) is not None:
        enc[f"W_skip_{n}"] = _cpu(tc.W_skip(i).T, dtype)
    _write(enc, folder / f"W_enc_{n}.safetensors")
    dec = _cpu(tc.decoder(i), dtype)  # [F, L - i, d]; padded: zeros for the layers after ours
    dec = torch.cat([dec, dec.new_zeros(dec.shape[0], n_files - n - dec.shape[1], dec.shape[2])], 1)
    _write({f"W_dec_{n}": dec}, folder / f"W_dec_{n}.safetensors")


def _write_zero_layer(
    tc: Transcoder, n: int, n_files: int, folder: Path, dtype: torch.dtype, act: Activation
) -> None:
    """An all-zero transcoder for model layer `n` (padding): no feature ever fires."""
    f, d = tc.d_transcoder, tc.d_model
    t = {"W_enc": torch.zeros(f, d, dtype=dtype), "b_enc": torch.zeros(f, dtype=dtype),
         "b_dec": torch.zeros(d, dtype=dtype)}  # fmt: skip
    if act.threshold() is not None:
        t[_THRESHOLD_KEY] = torch.zeros(f)
    if tc.has_skip:
        t["W_skip"] = torch.zeros(d, d, dtype=dtype)
    if not tc.cross_layer:
        _write({**t, "W_dec": torch.zeros(f, d, dtype=dtype)}, folder / f"layer_{n}.safetensors")
        return
    renamed = {f"{k.removeprefix('activation_function.')}_{n}": v for k, v in t.items()}
    _write(renamed, folder / f"W_enc_{n}.safetensors")
    zeros = torch.zeros(f, n_files - n, d, dtype=dtype)
    _write({f"W_dec_{n}": zeros}, folder / f"W_dec_{n}.safetensors")


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


# ---------------------------------------------------------------------------------------
# loading our layout (or any circuit-tracer export)
# ---------------------------------------------------------------------------------------
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


def resolve_folder(ref: str | Path) -> Path:
    """A folder on disk, or circuit-tracer's cache folder of a hub reference."""
    path = Path(ref)
    if path.exists() or not re.fullmatch(r"(hf://)?[\w.-]+/[\w.-]+(/[^@]+)?(@.+)?", str(ref)):
        return path
    cached = circuit_tracer_cache_path(str(ref))
    if (cached / "config.yaml").is_file():
        return cached
    raise WiremapError(
        f"{ref} is neither a folder nor in circuit-tracer's cache ({cached}); pass the folder "
        "holding the transcoders, or cache them with circuit-tracer's save_transcoders_to_cache"
    )


def circuit_tracer_cache_path(ref: str) -> Path:
    """Where circuit-tracer's `save_transcoders_to_cache` puts the transcoders of `ref`."""
    import os

    root = os.environ.get("CIRCUIT_TRACER_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "circuit_tracer"
    if ref.startswith("hf://"):
        repo, file, revision = parse_hf_uri(ref)
        ref = f"{repo}/{file}" if file else repo
        ref = f"{ref}@{revision}" if revision else ref
    return base / ref


def parse_hf_uri(uri: str) -> tuple[str, str, str | None]:
    """`hf://owner/repo/path/file?revision=r` -> (owner/repo, path/file, r)."""
    from urllib.parse import parse_qs, urlparse

    parsed = urlparse(uri)
    parts = parsed.path.lstrip("/").split("/", 1)
    if parsed.scheme != "hf" or not parsed.netloc or not parts[0]:
        raise WiremapError(f"{uri} is not an hf://owner/repo/file reference; fix config.yaml")
    revision = parse_qs(parsed.query).get("revision", [None])[0]
    return f"{parsed.netloc}/{parts[0]}", parts[1] if len(parts) > 1 else "", revision


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's `config.yaml` (or what its files say), validated enough to read it."""
    path = folder / "config.yaml"
    if not path.is_file():
        return _config_from_files(folder, path)
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise WiremapError(f"{path} is not valid YAML ({err}); re-export the transcoders") from err
    kinds = ("transcoder_set", "cross_layer_transcoder")
    if not isinstance(config, dict) or config.get("model_kind") not in kinds:
        raise WiremapError(f"{path} must set model_kind to one of {kinds}; fix or re-export it")
    return config


def _config_from_files(folder: Path, path: Path) -> dict[str, Any]:
    """A folder written by circuit-tracer's `to_safetensors`: it has no config.yaml."""
    for kind, first, input_hook in (
        ("transcoder_set", "layer_0.safetensors", "mlp_in"),
        ("cross_layer_transcoder", "W_enc_0.safetensors", "resid_mid"),
    ):
        if (folder / first).is_file():
            if _SafeFile(folder / first, _REFIX).metadata.get("writer") == "wiremap":
                break  # our own export, stopped before its config.yaml
            return {"model_kind": kind, "input_hook": input_hook, "output_hook": "mlp_out"}
    raise WiremapError(
        f"{path} not found: {folder} is not a transcoder export (or it is unfinished). "
        "Pass the folder written by `save_transcoders` or circuit-tracer, or import foreign "
        "files with import_gemma_scope / import_sparsify"
    )


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
            self.metadata = self._handle.metadata() or {}
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
    raw = config.get(theirs)
    if not raw:
        return default
    # circuit-tracer names may carry a TransformerLens block prefix: blocks.{layer}.hook_mlp_out
    name = re.sub(r"^blocks\.(\{layer\}|\d+)\.", "", str(raw))
    gemma = guess_model_type(config.get("model_name")) in GEMMA_MODEL_TYPES
    problem = _hook_problem(name, gemma)
    if problem is None and name in _FROM_CT:
        return _FROM_CT[name]
    known = ", ".join(sorted(_FROM_CT))
    raise WiremapError(
        f"{theirs} is {raw!r}: {problem or f'none of the hooks wiremap reads ({known})'}. "
        f"Pass {ours}= to load these transcoders at a wiremap hook point anyway"
    )


def _hook_problem(name: str, gemma: bool) -> str | None:
    """Why a circuit-tracer hook name is not the wiremap hook point it sounds like."""
    if name == "ln2.hook_normalized":
        return "the pre-MLP norm's output before its weight, wiremap's mlp_in is after it"
    if name == "mlp.hook_out" and gemma:
        return (
            "for Gemma-2/3 the MLP output before its post-feedforward norm, wiremap's "
            "mlp_out is after it"
        )
    return None


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
    files, layers = _plt_files(folder, config)
    layer_tensors = [_read_plt_file(p) for p in files]
    d_tc, d_model = layer_tensors[0]["W_enc"].shape
    for path, t in zip(files, layer_tensors, strict=True):
        _check_plt_layer(path, t, layer_tensors[0], d_tc, d_model)
    has_skip = "W_skip" in layer_tensors[0]
    has_threshold = _THRESHOLD_KEY in layer_tensors[0]
    state = {
        "encoder_weight": torch.stack([t["W_enc"] for t in layer_tensors]),
        "encoder_bias": torch.stack([t["b_enc"] for t in layer_tensors]),
        "decoder_weight": torch.stack([t["W_dec"] for t in layer_tensors]),
        "decoder_bias": torch.stack([t["b_dec"] for t in layer_tensors]),
    }
    if has_skip:
        state["skip_weight"] = torch.stack([t["W_skip"] for t in layer_tensors])
    thresholds = torch.stack([t[_THRESHOLD_KEY] for t in layer_tensors]) if has_threshold else None
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
            raise WiremapError(f"{folder} holds no layer_*.safetensors files; {_REFIX}")
        n = config.get("n_layers") or len(found)
        return [folder / f"layer_{i}.safetensors" for i in range(n)], None
    layers = None
    if all(isinstance(e, dict) for e in entries):  # older configs: {id, layer, filepath}
        entries = sorted(entries, key=lambda e: e["layer"])
        layers = [int(e["layer"]) for e in entries]
        entries = [e["filepath"] for e in entries]
    files = [_local_file(folder, str(e)) for e in entries]
    padded = config.get("padded_files")
    return ([files[m] for m in padded] if padded else files), layers


def _number(stem: str) -> int:
    digits = re.findall(r"\d+", stem)
    return int(digits[-1]) if digits else -1


def _local_file(folder: Path, entry: str) -> Path:
    """A `transcoders` entry on this disk: absolute, next to config.yaml, or an hf:// file."""
    if entry.startswith("hf://"):
        return _hf_file(folder, entry)
    path = Path(entry)
    candidates = [path] if path.is_absolute() else [folder / path, path]
    candidates.append(folder / path.name)  # an absolute path from before the folder moved
    return next((p for p in candidates if p.is_file()), candidates[0])


def _hf_file(folder: Path, uri: str) -> Path:
    repo, file, revision = parse_hf_uri(uri)
    for candidate in (folder / file, folder / Path(file).name):
        if file and candidate.is_file():
            return candidate
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, file, revision=revision)
    except Exception:  # no huggingface_hub, or a malformed name: treat as not cached
        cached = None
    if isinstance(cached, str) and Path(cached).is_file():
        return Path(cached)
    raise WiremapError(
        f"config.yaml in {folder} lists {uri}, which is neither next to it nor in the Hugging "
        f"Face cache; download it (`huggingface-cli download {repo} {file}`) or put the file "
        "next to config.yaml"
    )


def _read_plt_file(path: Path) -> dict[str, Tensor]:
    """One layer in circuit-tracer's names, from our / circuit-tracer / Gemma Scope files."""
    if path.suffix == ".npz":
        t = _read_npz(path)
        return {"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"], "b_enc": t["b_enc"],
                "b_dec": t["b_dec"], _THRESHOLD_KEY: t["threshold"]}  # fmt: skip
    f = _SafeFile(path, _REFIX)
    if "w_enc" in f.keys:  # Gemma Scope 2: w_enc [d, F], affine_skip_connection [d_in, d_out]
        t = {"W_enc": f.get("w_enc").T.contiguous(), "W_dec": f.get("w_dec"),
             "b_enc": f.get("b_enc"), "b_dec": f.get("b_dec"),
             _THRESHOLD_KEY: f.get("threshold")}  # fmt: skip
        if "affine_skip_connection" in f.keys:
            t["W_skip"] = f.get("affine_skip_connection").T.contiguous()
        return t
    names = ["W_enc", "W_dec", "b_enc", "b_dec", "W_skip", _THRESHOLD_KEY, "k"]
    return {key: f.get(key) for key in names if key in f.keys or key in names[:4]}


def _check_plt_layer(path: Path, t: dict, first: dict, d_tc: int, d_model: int) -> None:
    expected = {
        "W_enc": [d_tc, d_model],
        "W_dec": [d_tc, d_model],
        "b_enc": [d_tc],
        "b_dec": [d_model],
        "W_skip": [d_model, d_model],
        _THRESHOLD_KEY: [d_tc],
    }
    for key, shape in expected.items():
        if key in t:
            _check_shape(t[key].shape, shape, f"{path}: {key}", _REFIX)
    if ("W_skip" in t) != ("W_skip" in first) or (_THRESHOLD_KEY in t) != (_THRESHOLD_KEY in first):
        raise WiremapError(
            f"{path} differs from the first layer file in having W_skip or a threshold; every "
            "layer file must have the same tensors. Re-export the transcoders"
        )


def _load_clt(folder: Path, config: dict, device, dtype: torch.dtype, lazy: bool) -> Transcoder:
    n_layers = config.get("n_layers") or len(list(folder.glob("W_enc_*.safetensors")))
    if not n_layers:
        raise WiremapError(f"{folder} holds no W_enc_*.safetensors files; {_REFIX}")
    files = config.get("padded_files") or list(range(n_layers))
    first = files[0]
    d_tc, d_model = _SafeFile(folder / f"W_enc_{first}.safetensors", _REFIX).shape(f"W_enc_{first}")
    encoders = [_read_clt_encoder(folder, m, d_tc, d_model) for m in files]
    has_skip = f"W_skip_{first}" in encoders[0]
    has_threshold = f"threshold_{first}" in encoders[0]
    pairs = list(zip(files, encoders, strict=True))
    state = {
        "encoder_weight": torch.stack([e[f"W_enc_{m}"] for m, e in pairs]),
        "encoder_bias": torch.stack([e[f"b_enc_{m}"] for m, e in pairs]),
        "decoder_bias": torch.stack([e[f"b_dec_{m}"] for m, e in pairs]),
    }
    if has_skip:
        # circuit-tracer's CLT stores W_skip_i as [d_in, d_out]; we keep [d_out, d_in].
        state["skip_weight"] = torch.stack([_need(e, f"W_skip_{m}", folder, m).T for m, e in pairs])
    thresholds = None
    if has_threshold:
        thresholds = torch.stack([_need(e, f"threshold_{m}", folder, m) for m, e in pairs])
    loader = SafetensorsDecoders(
        folder, n_layers, d_tc, d_model, files, config.get("padded_n_layers")
    )
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
            _check_shape(shape, [d_transcoder, n_files - m, d_model], path, _REFIX)

    def _key(self, i: int) -> str:
        return f"W_dec_{self.files[i]}"

    def _file(self, i: int) -> _SafeFile:
        return _SafeFile(self.folder / f"{self._key(i)}.safetensors", _REFIX)

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

    Only MLP hookpoints import (`layers.3.mlp` -> layer 3; whole-layer `layers.3` coders are
    refused); `layers` overrides the layer numbers.
    Tensors: `encoder.weight [F, d]`, `encoder.bias [F]`, `W_dec [F, d]`,
    `b_dec [d]`, optional `W_skip [d, d]` (skip = x @ W_skip.T) -> `skip_plt`.
    """
    folder = Path(folder)
    dirs = _sparsify_dirs(folder, hookpoints)
    found = [_layer_from_hookpoint(d.name) for d in dirs]  # also checks each is an MLP
    layers = list(layers) if layers is not None else found
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
    """The layer of an MLP hookpoint (`layers.3.mlp`, `h.3.mlp`); other coders are refused."""
    match = re.fullmatch(r"(?:[\w.]*\.)?(?:layers|h|blocks)\.(\d+)\.mlp", name)
    if match:
        return int(match.group(1))
    if re.fullmatch(r"(?:[\w.]*\.)?(?:layers|h|blocks)\.\d+", name):
        raise WiremapError(
            f"hookpoint {name!r} is a whole-layer coder (it reads the layer's input and predicts "
            "its output, attention included); wiremap's transcoders replace the MLP only "
            "(mlp_in -> mlp_out). Import the `layers.N.mlp` hookpoints of a transcoder run"
        )
    raise WiremapError(
        f"hookpoint {name!r} is not an MLP (`layers.N.mlp`); wiremap imports sparsify "
        "transcoders of the MLP only (mlp_in -> mlp_out). Pass `hookpoints=` to pick those"
    )


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
