"""GGUF checkpoints: a tiny Llama written as llama.cpp's convert script writes it, loaded back.

The file holds float32 tensors, so its dequantised weights are the source model's exactly and
the logits must agree; the tokenizer comes from the file's `tokenizer.ggml.*` metadata.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wiremap.errors import WiremapError
from wiremap.models import loading
from wiremap.models.loading import load_config, load_model
from wiremap.models.tiny import sample_corpus

gguf = pytest.importorskip("gguf", reason="pip install gguf (in the dev extra)")

PROMPT = "The cat sees the moon today. A dog likes some bread"
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for its rotary layout (transformers undoes it on load)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _gguf_names(n_layers: int) -> dict[str, str]:
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for i in range(n_layers):
        for hf, gg in LAYER_NAMES.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    return names


def _add_tokenizer(writer, folder: Path, cfg) -> None:
    """The byte-level BPE vocabulary as `tokenizer.ggml.*` (model "gpt2", like SmolLM2's)."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    special = {a["id"]: a["content"] for a in tok["added_tokens"]}
    by_id = {i: t for t, i in tok["model"]["vocab"].items()} | special
    tokens = [by_id[i] for i in range(len(by_id))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control
    writer.add_token_merges(
        [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    )
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)
    writer.add_unk_token_id(tokens.index("<unk>"))
    writer.add_add_bos_token(False)


def write_gguf(folder: Path, out: Path, architecture: str = "llama") -> Path:
    """Write the llama checkpoint in `folder` as an F32 GGUF file at `out`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    cfg = model.config
    w = gguf.GGUFWriter(str(out), architecture)
    w.add_name("tiny llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(w, folder, cfg)
    names = _gguf_names(cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if ".attn_q." in names[name]:
            array = _permute(array, cfg.num_attention_heads)
        elif ".attn_k." in names[name]:
            array = _permute(array, cfg.num_key_value_heads)
        w.add_tensor(names[name], np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    """Each test dequantises into its own cache (never the user's ~/.cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="module")
def source(tiny_model_dir) -> Path:
    return Path(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def gguf_path(source, tmp_path_factory) -> Path:
    return write_gguf(source, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


@torch.no_grad()
def test_logits_and_tokens_equal_the_source_model(source, gguf_path, tmp_path):
    model, tokenizer = load_model(str(gguf_path))
    ref, ref_tokenizer = load_model(str(source))
    ids = ref_tokenizer(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(tokenizer(PROMPT, return_tensors="pt").input_ids, ids)
    assert tokenizer.decode(ids[0]) == PROMPT and tokenizer.eos_token_id == 2
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)
    (copy,) = (tmp_path / "xdg/wiremap/gguf").iterdir()  # the dequantised copy
    assert copy.name.startswith("tiny-llama.F32-") and (copy / "config.json").exists()


def test_second_load_reuses_the_dequantised_copy(gguf_path, monkeypatch):
    load_model(str(gguf_path), load_tokenizer=False)

    def fail(path):
        raise AssertionError("dequantised again")

    monkeypatch.setattr(loading, "_read_gguf", fail)
    model, tokenizer = load_model(str(gguf_path))
    assert model.config.num_hidden_layers == 2 and tokenizer is not None
    assert load_config(str(gguf_path)).model_type == "llama"


def test_a_folder_holding_one_gguf_file(gguf_path, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / gguf_path.name).symlink_to(gguf_path)
    model, _ = load_model(str(folder), load_tokenizer=False)
    assert model.config.hidden_size == 32
    (folder / "other.gguf").symlink_to(gguf_path)
    with pytest.raises(WiremapError, match="several .gguf files"):
        load_model(str(folder))


@pytest.mark.parametrize("damage", ["bad magic", "truncated", "cut in the header"])
def test_a_malformed_file_is_one_clear_error(gguf_path, tmp_path, damage):
    data = gguf_path.read_bytes()
    data = {
        "bad magic": b"NOPE" + data[4:],
        "truncated": data[: len(data) // 2],
        "cut in the header": data[:300],
    }[damage]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(WiremapError, match="not a readable GGUF file.*truncated or corrupt"):
        load_model(str(bad))


def test_an_architecture_transformers_cannot_dequantise(source, tmp_path):
    bad = write_gguf(source, tmp_path / "ssm.gguf", architecture="mamba2")
    with pytest.raises(WiremapError, match="holds a 'mamba2' model.*architectures only: .*llama"):
        load_model(str(bad))


def test_missing_gguf_package(gguf_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(WiremapError, match="needs the packages `gguf` and `accelerate`"):
        load_model(str(gguf_path))


def test_wiremap_cache_on_a_gguf_file_equals_its_source(source, gguf_path, tmp_path):
    from wiremap.cache import ActivationCache
    from wiremap.cache.command import main as cache_main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sample_corpus(n_docs=40, seed=1)) + "\n")
    caches = {}
    for name, model in (("gguf", gguf_path), ("source", source)):
        out = tmp_path / name
        argv = ["--model", str(model), "--dataset", str(corpus), "--out", str(out)]
        assert cache_main([*argv, "--n-tokens", "300", "--context-length", "16", "--quiet"]) == 0
        caches[name] = ActivationCache(out, verify=True)
    cache = caches["gguf"]
    assert cache.manifest["model"] == str(gguf_path) and len(cache) == 300
    rows = torch.arange(300)
    assert torch.equal(cache.tokens(rows), caches["source"].tokens(rows))
    for mine, theirs in zip(cache.get(rows), caches["source"].get(rows), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
