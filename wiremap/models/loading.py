"""Load any Hugging Face causal LM by hub name or local path.

model, tokenizer = load_model("gpt2", dtype="float32", device="cpu")
model, tokenizer = load_model("/path/to/checkpoint")
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from wiremap.errors import WiremapError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise WiremapError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WiremapError("device 'cuda' was asked for but no CUDA GPU is visible; use cpu")
    return device


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and not _is_hub_id(name)


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def check_model_source(name_or_path: str) -> None:
    """A clear error for a local path that does not exist (before transformers' own)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise WiremapError(
                f"{name_or_path!r} is a folder without config.json; point --model at a "
                "folder written by `save_pretrained` or at a hub model name"
            )
        return
    if _looks_like_path(name_or_path):
        raise WiremapError(
            f"model path {name_or_path!r} does not exist; check the path or give a hub name "
            "such as 'gpt2'"
        )


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    revision: str | None = None,
    load_tokenizer: bool = True,
):
    """Load `(model, tokenizer)` in eval mode; the tokenizer is None if not asked for."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_source(str(name_or_path))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=resolve_dtype(dtype), revision=revision
        )
        tokenizer = (
            AutoTokenizer.from_pretrained(name_or_path, revision=revision)
            if load_tokenizer
            else None
        )
    except (OSError, ValueError) as err:
        raise WiremapError(
            f"could not load model {name_or_path!r}: {err}. Check the name or path; "
            "offline, give a local folder written by `save_pretrained`"
        ) from err
    model.to(resolve_device(device)).eval()
    return model, tokenizer


def model_max_length(model) -> int | None:
    """Longest context the model was built for, when its config says so."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
