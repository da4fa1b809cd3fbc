"""circuit-tracer's vocabulary: its hook names, what it cannot represent, where its files live.

    hook_in, hook_out = ct_hook_names(tc)       # ("mlp.hook_in", "mlp.hook_out") for a Llama
    for text in circuit_tracer_limits(tc, tc.activation, pad_layers=False): print(text)
    folder = resolve_folder("mntss/clt-gemma-2-2b-426k")   # circuit-tracer's cache of a hub repo
    config = read_config(folder)                # config.yaml, or what its files say

circuit-tracer (0.5.0 / main) reads the layout `save_transcoders` writes (`wiremap.py` in this
package); `load.py` reads it back, from our exports and from circuit-tracer's own
(`to_safetensors` folders, hub configs whose `transcoders` list `hf://` files, its cache).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from wiremap.errors import WiremapError
from wiremap.models.activations import Activation
from wiremap.models.formats.common import REFIX, SafeFile
from wiremap.models.transcoders import Transcoder

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


def local_file(folder: Path, entry: str) -> Path:
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
            if SafeFile(folder / first, REFIX).metadata.get("writer") == "wiremap":
                break  # our own export, stopped before its config.yaml
            return {"model_kind": kind, "input_hook": input_hook, "output_hook": "mlp_out"}
    raise WiremapError(
        f"{path} not found: {folder} is not a transcoder export (or it is unfinished). "
        "Pass the folder written by `save_transcoders` or circuit-tracer, or import foreign "
        "files with import_gemma_scope / import_sparsify"
    )


def hook_from_config(config: dict[str, Any], ours: str, theirs: str, default: str) -> str:
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
