"""Writers of other tools' on-disk formats for per-layer transcoders (PLTs).

    export_sae_lens(tc, "out/sae_lens")  # out/sae_lens/layer_5/{cfg.json,sae_weights.safetensors}
    sae = sae_lens.SAE.load_from_disk("out/sae_lens/layer_5")
    export_sparsify(tc, "out/sparsify")  # out/sparsify/layers.5.mlp/{cfg.json,sae.safetensors}
    coders = sparsify.SparseCoder.load_many("out/sparsify", local=True)

sae-lens (6.x) reads one folder per layer: `cfg.json` (architecture `transcoder`,
`skip_transcoder`, `jumprelu_transcoder` or `jumprelu_skip_transcoder`, `d_in`, `d_sae`,
`d_out`, TransformerLens hook names in `metadata`) and `sae_weights.safetensors` with
`W_enc [d_in, F]`, `W_dec [F, d_out]`, `b_enc`, `b_dec`, `threshold`, `W_skip [d_out, d_in]`.
It has no TopK transcoder and no CLT. sparsify reads `<hookpoint>/cfg.json` + `sae.safetensors`
(`encoder.weight [F, d]`, `encoder.bias`, `W_dec [F, d]`, `b_dec`, `W_skip [d, d]`) and only
TopK transcoders. What a format cannot represent raises a WiremapError.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from wiremap.errors import WiremapError
from wiremap.models.transcoders import Transcoder

# Our hook names -> TransformerLens names (what sae-lens records as `hook_name`).
TL_HOOKS = {
    "mlp_in": "ln2.hook_normalized",
    "resid_mid": "hook_resid_mid",
    "mlp_out": "hook_mlp_out",
}
SAE_LENS_VERSION = "6.54.12"  # the format version written (sae-lens >= 6 reads it as is)


def export_sae_lens(tc: Transcoder, folder: str | Path) -> list[Path]:
    """Write each layer of a PLT as a sae-lens transcoder folder `layer_{model layer}`."""
    _need_plt(tc, "sae-lens")
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
            "W_enc": tc.W_enc(i).T,
            "b_enc": tc.b_enc(i),
            "W_dec": tc.decoder(i)[:, 0],
            "b_dec": tc.b_dec(i),
        }
        if name == "jumprelu":
            tensors["threshold"] = tc.threshold(i)
        if tc.has_skip:
            tensors["W_skip"] = tc.W_skip(i)
        _save(tensors, d / "sae_weights.safetensors")
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


def export_sparsify(tc: Transcoder, folder: str | Path) -> list[Path]:
    """Write a TopK PLT as sparsify transcoders, one `layers.{model layer}.mlp` folder each."""
    _need_plt(tc, "sparsify")
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
            "encoder.weight": tc.W_enc(i),
            "encoder.bias": tc.b_enc(i),
            "W_dec": tc.decoder(i)[:, 0],
            "b_dec": tc.b_dec(i),
        }
        if tc.has_skip:
            tensors["W_skip"] = tc.W_skip(i)  # sparsify adds x @ W_skip.T, as we do
        _save(tensors, d / "sae.safetensors")
        (d / "cfg.json").write_text(json.dumps(cfg))
        out.append(d)
    return out


def _need_plt(tc: Transcoder, tool: str) -> None:
    if tc.cross_layer:
        raise WiremapError(
            f"{tool} has no cross-layer transcoders; export this CLT with save_transcoders "
            "(circuit-tracer layout)"
        )


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "writer": "wiremap"})
