"""EleutherAI sparsify transcoders: `<hookpoint>/cfg.json` + `sae.safetensors`, TopK only.

    tc = import_sparsify("skip-transcoder-Llama-3.2-1B/")   # folder of <hookpoint>/ folders
    export_sparsify(tc, "out/sparsify")   # out/sparsify/layers.5.mlp/{cfg.json,sae.safetensors}
    coders = sparsify.SparseCoder.load_many("out/sparsify", local=True)

Tensors: `encoder.weight [F, d]`, `encoder.bias [F]`, `W_dec [F, d]`, `b_dec [d]`, optional
`W_skip [d, d]` (skip = x @ W_skip.T, as ours). Only MLP hookpoints (`layers.N.mlp`) of
transcoders (`transcode: true`) import; what sparsify cannot represent raises a WiremapError.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wiremap.errors import WiremapError
from wiremap.models.formats.common import (
    Format,
    SafeFile,
    assemble,
    imported_spec,
    need_plt,
    register_format,
    stack_layers,
    write_safetensors,
)
from wiremap.models.loading import resolve_dtype
from wiremap.models.transcoders import Transcoder


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
    state = stack_layers(tensors)
    hooks = dict(input_hook=input_hook, output_hook=output_hook, model_name=model_name)
    spec = imported_spec(d_model, d_tc, layers, hooks, activation="topk", k=k)
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
    """One hookpoint's tensors in our names."""
    fix = "re-download the sparsify checkpoint"
    f = SafeFile(d / "sae.safetensors", fix)
    t = {
        "W_enc": f.get("encoder.weight", [d_tc, d_model]),
        "b_enc": f.get("encoder.bias", [d_tc]),
        "W_dec": f.get("W_dec", [d_tc, d_model]),
        "b_dec": f.get("b_dec", [d_model]),
    }
    if "W_skip" in f.keys:
        t["W_skip"] = f.get("W_skip", [d_model, d_model])
    return t


def export_sparsify(tc: Transcoder, folder: str | Path) -> list[Path]:
    """Write a TopK PLT as sparsify transcoders, one `layers.{model layer}.mlp` folder each."""
    need_plt(tc, "sparsify")
    if tc.activation.name != "topk" or tc.input_hook != "mlp_in":
        raise WiremapError(
            "sparsify transcoders are TopK coders from the MLP input to its output; this one "
            f"is {tc.activation.name} from {tc.input_hook}. Export it with save_transcoders"
        )
    cfg = {"activation": "topk", "num_latents": tc.d_transcoder, "k": tc.activation.k,
           "multi_topk": False, "skip_connection": tc.has_skip, "transcode": True,
           "normalize_decoder": False, "expansion_factor": 1, "d_in": tc.d_model}  # fmt: skip
    out = []
    for i, layer in enumerate(tc.layers):
        d = Path(folder) / f"layers.{layer}.mlp"
        d.mkdir(parents=True, exist_ok=True)
        tensors = {
            "encoder.weight": tc.W_enc[i],
            "encoder.bias": tc.b_enc[i],
            "W_dec": tc.decoder(i)[:, 0],
            "b_dec": tc.b_dec[i],
        }
        if tc.has_skip:
            tensors["W_skip"] = tc.W_skip[i]  # sparsify adds x @ W_skip.T, as we do
        write_safetensors(tensors, d / "sae.safetensors")
        (d / "cfg.json").write_text(json.dumps(cfg))
        out.append(d)
    return out


register_format(
    Format(
        "sparsify",
        "EleutherAI sparsify TopK transcoders (<hookpoint>/cfg.json + sae.safetensors)",
        read=import_sparsify,
        write=export_sparsify,
    )
)
