"""Text sources and packing for the activation cache (wiremap/cache/text.py)."""

import json
from types import SimpleNamespace

import pytest

from wiremap.cache.text import (
    TextSpec,
    boundary_tokens,
    iter_texts,
    local_files,
    pack_contexts,
    tokenize,
)
from wiremap.errors import WiremapError
from wiremap.models.loading import load_model


def test_pack_contexts_start_with_bos_and_join_documents_with_eos():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34], [40]]
    contexts = list(pack_contexts(docs, context_length=4, bos=1, eos=2))
    assert all(len(c) == 4 and c[0] == 1 for c in contexts)
    stream = [t for d in docs for t in (*d, 2)]  # 15 tokens -> 5 bodies of 3
    bodies = [t for c in contexts for t in c[1:]]
    assert bodies == stream[: len(bodies)]
    assert len(contexts) == len(stream) // 3


def test_pack_contexts_drops_the_tail_and_rejects_tiny_contexts():
    assert list(pack_contexts([[5, 6]], context_length=8, bos=1, eos=2)) == []
    with pytest.raises(WiremapError, match="too short"):
        list(pack_contexts([[5]], context_length=1, bos=1, eos=2))


def test_boundary_tokens_fall_back_to_eos_and_say_so():
    said = []
    bos, eos = boundary_tokens(SimpleNamespace(bos_token_id=None, eos_token_id=7), say=said.append)
    assert (bos, eos) == (7, 7)
    assert "no BOS" in said[0]
    assert boundary_tokens(SimpleNamespace(bos_token_id=1, eos_token_id=2)) == (1, 2)
    with pytest.raises(WiremapError, match="neither a BOS nor an EOS"):
        boundary_tokens(SimpleNamespace(bos_token_id=None, eos_token_id=None))


def _write_sources(folder):
    folder.mkdir()
    (folder / "a.txt").write_text("first doc\n\n  \nsecond doc\n")
    rows = [{"body": "json one", "n": 1}, {"body": "json two", "n": 2}]
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["pq one", None, "pq two"]}), folder / "c.parquet")
    return folder


def test_local_txt_jsonl_parquet_sources(tmp_path):
    src = _write_sources(tmp_path / "src")
    assert list(iter_texts(TextSpec(str(src / "a.txt")))) == ["first doc", "second doc"]
    assert list(iter_texts(TextSpec(str(src / "b.jsonl"), text_column="body"))) == [
        "json one",
        "json two",
    ]
    assert list(iter_texts(TextSpec(str(src / "*.parquet"), text_column="content"))) == [
        "pq one",
        "pq two",
    ]


def test_local_file_resolution(tmp_path):
    src = _write_sources(tmp_path / "src")
    assert local_files("gpt2") is None and local_files("Salesforce/wikitext") is None
    assert local_files(str(src / "*.txt")) == [src / "a.txt"]
    (tmp_path / "docs").mkdir()
    for name in ("z.txt", "a.txt"):
        (tmp_path / "docs" / name).write_text("x\n")
    assert local_files(str(tmp_path / "docs")) == [
        tmp_path / "docs" / n for n in ("a.txt", "z.txt")
    ]
    with pytest.raises(WiremapError, match="mixes file kinds"):
        local_files(str(src))
    with pytest.raises(WiremapError, match="does not exist"):
        local_files(str(tmp_path / "missing.jsonl"))
    with pytest.raises(WiremapError, match="no files match"):
        local_files(str(tmp_path / "*.parquet"))
    spec = TextSpec(str(src / "a.txt")).describe()
    assert spec["files"] == [str(src / "a.txt")] and spec["text_column"] == "text"


def test_unknown_column_lists_the_columns(tmp_path):
    src = _write_sources(tmp_path / "src")
    with pytest.raises(WiremapError, match="no column 'text'.*'body', 'n'"):
        list(iter_texts(TextSpec(str(src / "b.jsonl"))))
    with pytest.raises(WiremapError, match="holds int"):
        list(iter_texts(TextSpec(str(src / "b.jsonl"), text_column="n")))


def test_tokenize_matches_the_tokenizer_document_by_document(tiny_model_dir):
    _, tokenizer = load_model(str(tiny_model_dir("llama")))
    texts = [f"The cat sees the moon {i} times." for i in range(5)]
    ids = list(tokenize(texts, tokenizer, batch_size=2))
    assert ids == [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    assert all(tokenizer.bos_token_id not in d for d in ids)
