"""Text for the activation cache: read documents with `datasets`, tokenize, pack into contexts.

    spec = TextSpec("wikitext", config="wikitext-103-raw-v1", split="train")
    spec = TextSpec("data/*.jsonl", text_column="body")        # local files: a file, folder or glob
    bos, eos = boundary_tokens(tokenizer)                      # BOS (EOS when there is none)
    for context in pack_contexts(tokenize(iter_texts(spec), tokenizer), 128, bos, eos):
        ...                                                    # list[int]; context[0] == bos

Documents come in a fixed order (no shuffling), so the same spec always yields the same
contexts: the cache writer relies on that to resume an interrupted run.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from wiremap.errors import WiremapError

# file extension -> `datasets` builder that reads it
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def warn(message: str) -> None:
    """Tell the user something worth knowing, on stderr (stdout stays for results)."""
    print(f"wiremap cache: {message}", file=sys.stderr)


@dataclass(frozen=True)
class TextSpec:
    """Where the text comes from."""

    dataset: str
    """Hub dataset name, or a local .txt/.jsonl/.parquet file, folder or glob."""
    config: str | None = None
    """Hub dataset configuration (subset) name."""
    split: str = "train"
    """Hub dataset split (local files are read whole)."""
    text_column: str = "text"
    """Column holding the text (`text` for .txt files, one document per line)."""
    streaming: bool = False
    """Stream a hub dataset instead of downloading it first (local files always stream)."""

    def describe(self) -> dict:
        """The spec as recorded in a cache manifest, with local files resolved."""
        files = local_files(self.dataset)
        spec = asdict(self)
        spec["files"] = None if files is None else [str(f) for f in files]
        return spec


def _is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix.lower() in BUILDERS


def local_files(dataset: str) -> list[Path] | None:
    """Sorted local files named by `dataset` (file, folder or glob), or None for a hub name."""
    expanded = os.path.expanduser(dataset)
    if _is_glob(expanded):
        files = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if Path(p).is_file()]
        if not files:
            raise WiremapError(f"no files match {dataset!r}; check the pattern")
        return _supported(files, dataset)
    path = Path(expanded)
    if path.is_file():
        return _supported([path], dataset)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in BUILDERS)
        if not files:
            raise WiremapError(
                f"folder {dataset!r} holds no .txt, .jsonl or .parquet files; "
                "point --dataset at a folder or glob of such files"
            )
        return _supported(files, dataset)
    if _looks_local(dataset):
        raise WiremapError(
            f"dataset path {dataset!r} does not exist; check the path, or give a hub dataset "
            "name such as 'wikitext'"
        )
    return None


def _supported(files: list[Path], dataset: str) -> list[Path]:
    kinds = {BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if f.suffix.lower() not in BUILDERS)
        raise WiremapError(
            f"{bad} is not a .txt, .jsonl or .parquet file; wiremap reads only those"
        )
    if len(kinds) > 1:
        raise WiremapError(
            f"{dataset!r} mixes file kinds ({', '.join(sorted(kinds))}); point --dataset at "
            "one kind, e.g. a glob such as 'folder/*.jsonl'"
        )
    return files


def _load(spec: TextSpec):
    import datasets

    files = local_files(spec.dataset)
    try:
        if files is not None:
            # Streaming reads local files in place instead of copying them into an Arrow cache.
            builder = BUILDERS[files[0].suffix.lower()]
            data_files = [str(f) for f in files]
            return datasets.load_dataset(
                builder, data_files=data_files, split="train", streaming=True
            )
        return datasets.load_dataset(
            spec.dataset, spec.config, split=spec.split, streaming=spec.streaming
        )
    except WiremapError:
        raise
    except Exception as err:  # the boundary to `datasets`: any failure here is about the input
        raise WiremapError(
            f"could not load dataset {spec.dataset!r} (config {spec.config!r}, split "
            f"{spec.split!r}): {err}. Check the name, config and split; offline, give local "
            ".txt/.jsonl/.parquet files"
        ) from err


def iter_texts(spec: TextSpec) -> Iterator[str]:
    """The dataset's documents in order, empty ones skipped."""
    try:
        yield from _texts(spec)
    except UnicodeDecodeError as err:
        raise WiremapError(_not_utf8(spec.dataset, err)) from err


def _not_utf8(dataset: str, err: UnicodeDecodeError) -> str:
    path, where = next(_decode_errors(dataset), (dataset, err.reason))
    return (
        f"{path} is not UTF-8 text ({where}); convert it, e.g. `iconv -f latin1 -t utf-8 "
        "in.txt > out.txt`, and point --dataset at the converted file"
    )


def _decode_errors(dataset: str) -> Iterator[tuple[str, str]]:
    """(file, where its first decoding error lies) for the local files that are not UTF-8."""
    import codecs

    for path in local_files(dataset) or []:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as e:
                    yield str(path), f"{e.reason} at byte {offset + e.start}"
                    break
                offset += len(block)


def _texts(spec: TextSpec) -> Iterator[str]:
    for i, row in enumerate(_load(spec)):
        if i == 0 and spec.text_column not in row:
            raise WiremapError(
                f"dataset {spec.dataset!r} has no column {spec.text_column!r}; its columns are "
                f"{', '.join(map(repr, row))}. Pass --text-column with one of them"
            )
        text = row[spec.text_column]
        if text is None:
            continue
        if not isinstance(text, str):
            raise WiremapError(
                f"column {spec.text_column!r} holds {type(text).__name__}, not text; "
                "pass --text-column naming a text column"
            )
        if text.strip():
            yield text


def boundary_tokens(tokenizer, say=warn) -> tuple[int, int]:
    """`(bos, eos)`: the token that starts every context and the one that ends a document."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None and eos is None:
        raise WiremapError(
            "the tokenizer has neither a BOS nor an EOS token; set tokenizer.bos_token "
            "(e.g. save the tokenizer with a bos_token) and run again"
        )
    if bos is None:
        say(f"note: the tokenizer has no BOS token; contexts start with EOS (id {eos}) instead")
        bos = eos
    if eos is None:
        say(f"note: the tokenizer has no EOS token; documents are separated by BOS (id {bos})")
        eos = bos
    return int(bos), int(eos)


def tokenize(texts: Iterable[str], tokenizer, batch_size: int = 256) -> Iterator[list[int]]:
    """Token ids of each document (no special tokens added), tokenized in batches for speed."""
    for _, ids in tokenize_indexed(enumerate(texts), tokenizer, batch_size):
        yield ids


def tokenize_indexed(
    documents: Iterable[tuple[int, str]], tokenizer, batch_size: int = 256
) -> Iterator[tuple[int, list[int]]]:
    """`(index, token ids)` of each `(index, text)`, tokenized in batches for speed."""
    batch: list[tuple[int, str]] = []
    for item in documents:
        batch.append(item)
        if len(batch) == batch_size:
            yield from _encode_indexed(tokenizer, batch)
            batch = []
    if batch:
        yield from _encode_indexed(tokenizer, batch)


def _encode_indexed(tokenizer, batch: list[tuple[int, str]]) -> Iterator[tuple[int, list[int]]]:
    ids = _encode(tokenizer, [text for _, text in batch])
    return zip((i for i, _ in batch), ids, strict=True)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # verbose=False: long documents are fine here, they get split across contexts.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def pack_contexts(
    documents: Iterable[list[int]], context_length: int, bos: int, eos: int
) -> Iterator[list[int]]:
    """Fixed-length contexts `[bos, t1, …]` from documents joined by `eos`.

    A document that does not fit continues in the next context; the tail that does not
    fill a whole context is dropped.
    """
    for context, _ in pack_positions(enumerate(documents), context_length, bos, eos):
        yield context


@dataclass(frozen=True)
class TextPosition:
    """A place in the packed token stream: `offset` tokens into document `doc`.

    `doc` counts the dataset's non-empty documents from 0 (the order `iter_texts` yields);
    a document's tokens are its token ids followed by one EOS.
    """

    doc: int = 0
    offset: int = 0


def pack_positions(
    documents: Iterable[tuple[int, list[int]]],
    context_length: int,
    bos: int,
    eos: int,
    offset: int = 0,
) -> Iterator[tuple[list[int], TextPosition]]:
    """`pack_contexts` over `(index, token ids)` documents, starting `offset` tokens into the
    first one; yields each context with the `TextPosition` of its first token after BOS, so a
    reader can later restart the packing exactly there."""
    if context_length < 2:
        raise WiremapError(f"context length {context_length} is too short; use at least 2")
    body = context_length - 1
    buffer: list[int] = []
    spans: list[tuple[int, int, int]] = []  # (buffer index, doc, offset of that token in doc)
    for index, doc in documents:
        tokens = [*doc, eos][offset:]
        if tokens:
            spans.append((len(buffer), index, offset))
            buffer.extend(tokens)
        offset = 0
        start = 0
        while len(buffer) - start >= body:
            yield [bos, *buffer[start : start + body]], _position_at(spans, start)
            start += body
        del buffer[:start]
        spans = _shift(spans, start) if buffer else []


def _position_at(spans: list[tuple[int, int, int]], at: int) -> TextPosition:
    begin, doc, offset = next(span for span in reversed(spans) if span[0] <= at)
    return TextPosition(doc, offset + at - begin)


def _shift(spans: list[tuple[int, int, int]], by: int) -> list[tuple[int, int, int]]:
    """The spans after dropping the first `by` buffered tokens."""
    first = _position_at(spans, by)
    later = [(b - by, d, o) for b, d, o in spans if b > by]
    return [(0, first.doc, first.offset), *later]
