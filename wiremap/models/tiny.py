"""Tiny random language models and local tokenizers, built without any download.

Tests, benchmarks and the README's first command use these: a model is built from a
config, saved with `save_pretrained` and loaded back by path, exactly like a user's
checkpoint.

    path = build_tiny_model("llama", "/tmp/tiny-llama")
    model, tokenizer = load_model(path)
"""

from __future__ import annotations

import random
from pathlib import Path

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ARCHITECTURES = (
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "gpt_neox",
    "phi3",
    "olmo2",
)

_SUBJECTS = ["the cat", "a dog", "my friend", "the river", "our teacher", "the old man", "a bird"]
_VERBS = ["sees", "likes", "follows", "finds", "paints", "remembers", "carries"]
_OBJECTS = ["the moon", "a red ball", "the green door", "some bread", "the small boat", "a song"]
_ENDINGS = ["today", "at night", "in the park", "near the sea", "every morning", "again"]


def sample_corpus(n_docs: int = 200, seed: int = 0) -> list[str]:
    """A deterministic toy corpus of short documents (a few simple sentences each)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_ENDINGS)}."
            for _ in range(rng.randint(2, 6))
        ]
        docs.append(" ".join(s[0].upper() + s[1:] for s in sentences))
    return docs


def build_tokenizer(texts: list[str], path: str | Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `texts`, save it in HF format at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(str(path))
    return fast


def tiny_config(arch: str, vocab_size: int, n_layers: int = 2, d_model: int = 32, **kw):
    """A small random config of architecture `arch` (one of `ARCHITECTURES`)."""
    import transformers as T

    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    heads = max(2, d_model // 16)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=4 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=kw.pop("max_position_embeddings", 128),
        **ids,
    )
    head_dim = dict(head_dim=d_model // heads)
    builders = {
        "gpt2": lambda: T.GPT2Config(
            vocab_size=vocab_size,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=heads,
            n_positions=common["max_position_embeddings"],
            **ids,
        ),
        "llama": lambda: T.LlamaConfig(**common),
        "mistral": lambda: T.MistralConfig(**common),
        "qwen2": lambda: T.Qwen2Config(**common),
        "qwen3": lambda: T.Qwen3Config(**common, **head_dim),
        "gemma2": lambda: T.Gemma2Config(**common, **head_dim),
        "gemma3_text": lambda: T.Gemma3TextConfig(**common, **head_dim),
        "gpt_neox": lambda: T.GPTNeoXConfig(
            **{k: v for k, v in common.items() if k != "num_key_value_heads"}
        ),
        "phi3": lambda: T.Phi3Config(**common),
        "olmo2": lambda: T.Olmo2Config(**common),
    }
    if arch not in builders:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")
    config = builders[arch]()
    for key, value in kw.items():
        setattr(config, key, value)
    return config


def build_tiny_model(
    arch: str,
    path: str | Path,
    n_layers: int = 2,
    d_model: int = 32,
    seed: int = 0,
    texts: list[str] | None = None,
    vocab_size: int = 512,
    **config_overrides,
) -> Path:
    """Build a random `arch` model and its tokenizer, save both to `path`, return it."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(texts or sample_corpus(), path, vocab_size=vocab_size)
    config = tiny_config(arch, len(tokenizer), n_layers, d_model, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _perturb_norms(model, seed)
    model.save_pretrained(str(path))
    return path


def _perturb_norms(model, seed: int) -> None:
    """Give norm weights random values so tests notice a norm applied the wrong way."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln" in name or name.startswith("ln"):
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
