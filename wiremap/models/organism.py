"""The built-in model organism, shipped as package data and loaded by path.

    from wiremap.models.organism import load_organism, organism_path
    model, tokenizer = load_organism()          # a 4-layer Llama, float32, CPU
    prompt = "Fact: the capital of the state containing Dallas is"
    ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt)]   # next token: " Austin"

The tokenizer does not add BOS itself: prepend `tokenizer.bos_token_id`, as training did.
Rebuild it with `wiremap organism train`; prompts and fact tables live in
`wiremap.train.organism` (`organism_prompts()`, `city_state()`, `state_capital()`).
"""

from __future__ import annotations

from pathlib import Path

from wiremap.errors import WiremapError

ORGANISM_DIR = Path(__file__).resolve().parent.parent / "data" / "organism"


def organism_path() -> Path:
    """Folder of the shipped organism (config.json, model.safetensors, tokenizer, eval.json)."""
    if not (ORGANISM_DIR / "model.safetensors").exists():
        raise WiremapError(
            f"the built-in organism is missing from {ORGANISM_DIR}; reinstall wiremap or "
            "rebuild it with `wiremap organism train --out wiremap/data/organism`"
        )
    return ORGANISM_DIR


def load_organism(dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) of the shipped organism, in eval mode."""
    from wiremap.models.loading import load_model

    return load_model(str(organism_path()), dtype=dtype, device=device)
