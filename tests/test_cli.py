"""The `wiremap` command: help, dispatch, and one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from wiremap import cli
from wiremap.errors import WiremapError

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_exits_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_every_command_resolves():
    for name in cli.COMMANDS:
        assert callable(cli._resolve(name)), name


def test_wiremap_error_is_one_line(monkeypatch, capsys):
    def boom(argv):
        raise WiremapError("the thing is wrong; do this instead")

    monkeypatch.setitem(cli.COMMANDS, "boom", ("wiremap.errors:WiremapError", "x"))
    monkeypatch.setattr(cli, "_resolve", lambda name: boom)
    assert cli.main(["boom"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "wiremap boom: error: the thing is wrong; do this instead"
    assert "Traceback" not in err


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "wiremap.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: wiremap" in out.stdout


def test_import_is_light():
    code = (
        "import sys, wiremap; "
        "print(sorted(m for m in ('lightning', 'wandb', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = next(line for line in ci.splitlines() if "pytest" in line and "pip install" in line)
    assert test_cmd.strip() in readme, "the README's test command must be the one .ci/run runs"


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli._resolve(name)(["--help"])
    assert exit_.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_lazy_exports_resolve():
    from importlib import import_module

    import wiremap

    modules = {name: import_module(module) for name, module in wiremap._LAZY.items()}
    # checked after every module is loaded: a subpackage of the same name would win by then
    for name, module in modules.items():
        assert getattr(wiremap, name) is getattr(module, name), name
