"""SAELens transcoders: one folder per layer, `cfg.json` + `sae_weights.safetensors`.

    export_sae_lens(tc, "out/sae_lens")  # out/sae_lens/layer_5/{cfg.json,sae_weights.safetensors}
    sae = sae_lens.SAE.load_from_disk("out/sae_lens/layer_5")
    tc = import_sae_lens("out/sae_lens")  # or a list of sae-lens transcoder folders

sae-lens (6.x) reads `cfg.json` (architecture `transcoder`, `skip_transcoder`,
`jumprelu_transcoder` or `jumprelu_skip_transcoder`, `d_in`, `d_sae`, `d_out`,
TransformerLens hook names in `metadata`) and `sae_weights.safetensors` with
`W_enc [d_in, F]`, `W_dec [F, d_out]`, `b_enc`, `b_dec`, `threshold`, `W_skip [d_out, d_in]`.
It has no TopK transcoder and no CLT: those raise a WiremapError.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from wiremap.errors import WiremapError
from wiremap.models.formats.common import (
    Format,
    SafeFile,
    assemble,
    need_plt,
    register_format,
    stack_layers,
    write_safetensors,
)
from wiremap.models.loading import resolve_dtype
from wiremap.models.transcoders import Transcoder

# Our hook names -> the TransformerLens-style names sae-lens records as `hook_name`. The MLP's
# input after its norm weight is circuit-tracer's `mlp.hook_in`; `ln2.hook_normalized` is the
# norm's output *before* its weight, which wiremap has no hook point for.
TL_HOOKS = {"mlp_in": "mlp.hook_in", "resid_mid": "hook_resid_mid", "mlp_out": "hook_mlp_out"}
SAE_LENS_VERSION = "6.54.12"  # the format version written (sae-lens >= 6 reads it as is)


def export_sae_lens(tc: Transcoder, folder: str | Path) -> list[Path]:
    """Write each layer of a PLT as a sae-lens transcoder folder `layer_{model layer}`."""
    need_plt(tc, "sae-lens")
    name = tc.activation.name
    if name not in ("relu", "jumprelu"):
        raise WiremapError(
            f"sae-lens has transcoders with ReLU or JumpReLU only, not {name}; export "
            "with save_transcoders (circuit-tracer layout) or export_sparsify (TopK)"
        )
    arch = ("jumprelu_" if name == "jumprelu" else "") + ("skip_" if tc.has_skip else "")
    arch += "transcoder"
    out = []
    for i, layer in enumerate(tc.layers):
        d = Path(folder) / f"layer_{layer}"
        d.mkdir(parents=True, exist_ok=True)
        tensors = {
            "W_enc": tc.W_enc[i].T,
            "b_enc": tc.b_enc[i],
            "W_dec": tc.decoder(i)[:, 0],
            "b_dec": tc.b_dec[i],
        }
        if name == "jumprelu":
            tensors["threshold"] = tc.threshold(i)
        if tc.has_skip:
            tensors["W_skip"] = tc.W_skip[i]
        write_safetensors(tensors, d / "sae_weights.safetensors")
        (d / "cfg.json").write_text(json.dumps(_sae_lens_cfg(tc, arch, layer), indent=2))
        out.append(d)
    return out


def _sae_lens_cfg(tc: Transcoder, arch: str, layer: int) -> dict:
    return {
        "architecture": arch,
        "d_in": tc.d_model,
        "d_sae": tc.d_transcoder,
        "d_out": tc.d_model,
        "dtype": str(tc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {
            "sae_lens_version": SAE_LENS_VERSION,
            "model_name": tc.model_name,
            "hook_name": f"blocks.{layer}.{TL_HOOKS[tc.input_hook]}",
            "hook_name_out": f"blocks.{layer}.{TL_HOOKS[tc.output_hook]}",
            "written_by": "wiremap",
        },
    }


_SAE_LENS_ARCHS = (
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
)
_FROM_TL = {v: k for k, v in TL_HOOKS.items()} | {"mlp.hook_out": "mlp_out"}


def import_sae_lens(
    paths: str | Path | Sequence[str | Path],
    *,
    input_hook: str | None = None,
    output_hook: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> Transcoder:
    """sae-lens transcoder folders (`cfg.json` + `sae_weights.safetensors`) as one PLT.

    `paths`: a list of folders, or a folder of them (`layer_*/`). The layer of each is read
    from its `metadata.hook_name` (`blocks.5.hook_resid_mid` -> 5), the hooks too
    (`mlp.hook_in`, `hook_resid_mid`, `hook_mlp_out`); others, such as `ln2.hook_normalized`
    (the norm before its weight), are refused unless `input_hook` / `output_hook` say which
    wiremap hook point to use.
    """
    folders = _sae_lens_folders(paths)
    cfgs = [_read_sae_lens_cfg(d) for d in folders]
    layers = [c["layer"] for c in cfgs]
    order = sorted(range(len(folders)), key=lambda j: layers[j])
    folders, cfgs = [folders[j] for j in order], [cfgs[j] for j in order]
    first = cfgs[0]
    for d, c in zip(folders, cfgs, strict=True):
        if (c["architecture"], c["d_in"], c["d_sae"]) != (
            first["architecture"],
            first["d_in"],
            first["d_sae"],
        ):
            raise WiremapError(
                f"{d / 'cfg.json'} differs from {folders[0].name} in architecture or size; "
                "import the transcoders of one release"
            )
    tensors = [_read_sae_lens_weights(d, c) for d, c in zip(folders, cfgs, strict=True)]
    jump = first["architecture"].startswith("jumprelu")
    thresholds = torch.stack([t.pop("threshold") for t in tensors]) if jump else None
    arch = "skip_plt" if "skip" in first["architecture"] else "plt"
    spec = dict(n_layers=len(folders), d_model=first["d_in"], d_transcoder=first["d_sae"],
                layers=sorted(layers), activation="jumprelu" if jump else "relu",
                input_hook=input_hook or _our_hook(first["hook_in"], "input_hook"),
                output_hook=output_hook or _our_hook(first["hook_out"], "output_hook"),
                model_name=first["model_name"])  # fmt: skip
    return assemble(arch, spec, stack_layers(tensors), thresholds, device, resolve_dtype(dtype))


def _sae_lens_folders(paths) -> list[Path]:
    if isinstance(paths, (str, Path)):
        root = Path(paths)
        if (root / "cfg.json").is_file():
            return [root]
        found = (
            sorted(d for d in root.iterdir() if (d / "cfg.json").is_file()) if root.is_dir() else []
        )
        if not found:
            raise WiremapError(f"{root} holds no sae-lens folders (cfg.json); pass their paths")
        return found
    return [Path(p) for p in paths]


def _read_sae_lens_cfg(d: Path) -> dict:
    path = d / "cfg.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise WiremapError(f"{path} is missing or not JSON ({err}); pass sae-lens folders") from err
    arch = cfg.get("architecture", "standard")
    if arch not in _SAE_LENS_ARCHS:
        raise WiremapError(
            f"{path} is a sae-lens {arch!r} SAE (it reconstructs its input), not a transcoder; "
            f"wiremap imports the architectures {', '.join(_SAE_LENS_ARCHS)}"
        )
    meta = cfg.get("metadata") or {}
    hook = str(meta.get("hook_name") or cfg.get("hook_name") or "")
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    numbers = re.findall(r"\d+", d.name)
    if not match and not numbers:
        raise WiremapError(
            f"cannot tell the layer of {d} (no blocks.N hook_name); rename it layer_N"
        )
    if int(cfg.get("d_out", cfg["d_in"])) != int(cfg["d_in"]):
        raise WiremapError(
            f"{path} maps d_in={cfg['d_in']} to d_out={cfg['d_out']}; wiremap's transcoders "
            "read and write the residual width (d_in = d_out)"
        )
    out_hook = re.sub(r"^blocks\.\d+\.", "", str(meta.get("hook_name_out") or "hook_mlp_out"))
    return {"architecture": arch, "d_in": int(cfg["d_in"]), "d_sae": int(cfg["d_sae"]),
            "layer": int(match.group(1)) if match else int(numbers[-1]),
            "hook_in": match.group(2) if match else hook, "hook_out": out_hook,
            "model_name": meta.get("model_name")}  # fmt: skip


def _our_hook(name: str, option: str) -> str:
    if name in _FROM_TL:
        return _FROM_TL[name]
    raise WiremapError(
        f"these sae-lens transcoders read/write hook {name!r}, which is none of wiremap's hook "
        f"points ({', '.join(f'{v} = {k}' for k, v in TL_HOOKS.items())}); pass {option}= "
        "to load them at one anyway"
    )


def _read_sae_lens_weights(d: Path, cfg: dict) -> dict[str, torch.Tensor]:
    f = SafeFile(d / "sae_weights.safetensors", "re-download or re-save the sae-lens transcoder")
    n, f_ = cfg["d_in"], cfg["d_sae"]
    t = {
        "W_enc": f.get("W_enc", [n, f_]).T.contiguous(),
        "b_enc": f.get("b_enc", [f_]),
        "W_dec": f.get("W_dec", [f_, n]),
        "b_dec": f.get("b_dec", [n]),
    }
    if "skip" in cfg["architecture"]:
        t["W_skip"] = f.get("W_skip", [n, n])
    if cfg["architecture"].startswith("jumprelu"):
        t["threshold"] = f.get("threshold", [f_]).float()
    return t


register_format(
    Format(
        "sae_lens",
        "SAELens ReLU / JumpReLU transcoders (one cfg.json + sae_weights.safetensors per layer)",
        read=import_sae_lens,
        write=export_sae_lens,
    )
)
