"""The README's Python examples run: every ```python block that starts with `import wiremap`.

Each block runs on its own, in a temporary folder holding what the README's commands would
have left there: `wiremap cache`'s built-in default (a tiny llama, its corpus and cache under
`wiremap_out/cache`), organism transcoders at `wiremap_out/demo/clt` (random weights of the
demo's shape: the examples only need them to run) and `wiremap/data` (the shipped organism).
Tiny settings replace long ones (`TINY`). A block whose first comment line is
`# not run in tests: <why>` is skipped with that reason (it needs a hub model or a GPU).
And every `wiremap ...` command line of its bash blocks parses: each option it gives is one
that command takes.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = "# not run in tests:"
# (pattern, replacement): long runs made tiny, the viewer on a free port
TINY = [
    (r"max_steps=\d+", "max_steps=4"),
    (r'"max_steps": \d+', '"max_steps": 4'),
    (r"block=False\)", "block=False, port=0)"),
]


def readme_blocks() -> list[tuple[int, str]]:
    """(line number, code) of each ```python block starting with `import wiremap`."""
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, start = [], None
    for i, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start = i
        elif start is not None and line.strip() == "```":
            code = "\n".join(lines[start : i - 1])
            if code.startswith("import wiremap\n"):
                blocks.append((start + 1, code))
            start = None
    return blocks


def skip_reason(code: str) -> str:
    """The reason of a `# not run in tests: <why>` line right after the import, or ''."""
    rest = [line for line in code.splitlines()[1:] if line.strip()]
    first = rest[0] if rest else ""
    return first.removeprefix(SKIP).strip() if first.startswith(SKIP) else ""


def tiny(code: str) -> str:
    for pattern, replacement in TINY:
        code = re.sub(pattern, replacement, code)
    return code


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding what the README's blocks read (see the module docstring)."""
    from wiremap.cache import command as cache_cmd
    from wiremap.models.io import save_transcoders
    from wiremap.models.transcoders import build_transcoder

    work = tmp_path_factory.mktemp("readme")
    (work / "wiremap").mkdir()
    (work / "wiremap" / "data").symlink_to(ROOT / "wiremap" / "data")
    organism = work / "wiremap" / "data" / "organism"
    d_model = json.loads((organism / "config.json").read_text())["hidden_size"]
    clt = build_transcoder("clt", 4, d_model, 256, "jumprelu", model_name=str(organism))
    save_transcoders(clt, work / "wiremap_out" / "demo" / "clt")
    here = Path.cwd()
    os.chdir(work)  # relative paths, as `wiremap cache` run there writes them
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "using the built-in default"
            cache_cmd.main(["--quiet"])
    finally:
        os.chdir(here)
    return work


def test_the_readme_has_runnable_python_examples():
    blocks = readme_blocks()
    runnable = [line for line, code in blocks if not skip_reason(code)]
    assert len(blocks) >= 4 and len(runnable) > len(blocks) / 2, blocks


BLOCKS = readme_blocks()


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_example_runs(line, code, workdir, monkeypatch):
    reason = skip_reason(code)
    if reason:
        pytest.skip(f"README.md:{line}: {reason}")
    monkeypatch.chdir(workdir)
    scope: dict = {"__name__": "readme_example"}
    try:
        exec(compile(tiny(code), f"README.md:{line}", "exec"), scope)
    finally:
        server = scope.get("server")
        if hasattr(server, "shutdown"):
            server.shutdown()


def readme_commands() -> list[tuple[int, list[str]]]:
    """(line number, argv after `wiremap`) of each `wiremap ...` line in the README's bash
    blocks, continuation lines joined, `[optional ...]` brackets dropped; lines with a
    `<placeholder>` or `...` are left out."""
    import shlex

    lines = README.read_text(encoding="utf-8").splitlines()
    commands, in_bash = [], False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        text = line.strip().removeprefix("srun ")
        if not in_bash or not text.startswith("wiremap "):
            continue
        j = i
        while text.split(" #")[0].rstrip().endswith("\\"):
            j += 1
            text = text.split(" #")[0].rstrip()[:-1] + " " + lines[j].strip()
        text = text.split(" #")[0].replace("[", "").replace("]", "")
        if "<" not in text and " ... " not in text:
            commands.append((i + 1, shlex.split(text)[1:]))
    return commands


class _Parsed(Exception):
    pass


COMMANDS = readme_commands()


@pytest.mark.parametrize("line,argv", COMMANDS, ids=[f"README.md:{n}" for n, _ in COMMANDS])
def test_readme_command_parses(line, argv, monkeypatch, capsys):
    """Every option a README command line gives is one its command takes (nothing is run:
    the first complete parse stops it)."""
    from jsonargparse import ArgumentParser

    from wiremap.cli import main

    parse_args, depth = ArgumentParser.parse_args, []

    def parse_then_stop(self, *args, **kwargs):
        depth.append(1)
        try:
            parse_args(self, *args, **kwargs)
        finally:
            depth.pop()
        if not depth:
            raise _Parsed

    monkeypatch.setattr(ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.chdir(ROOT)  # the presets under configs/
    with pytest.raises(_Parsed):
        main(argv)
    assert "error" not in capsys.readouterr().err


def test_the_readme_has_commands_of_every_kind():
    names = {argv[0] for _, argv in COMMANDS}
    assert {"cache", "train", "attribute", "steer", "serve", "features", "demo"} <= names
