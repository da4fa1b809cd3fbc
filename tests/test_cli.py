"""The `wiremap` command: help, dispatch, and one-line errors."""

import re
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


# -- options: one mechanism (wiremap/commands.py), dashed spellings, one-line refusals ------
# the fewest arguments each command needs besides the one being tested
NEEDS = {
    "attribute": ["--model", "m", "--transcoders", "t", "--prompt", "p", "--out", "g.json"],
    "steer": ["--model", "m", "--transcoders", "t", "--prompt", "p", "--feature", "0:0:1"],
    "serve": ["graphs"],
    "export": ["step=1.ckpt"],
    "features": ["--cache", "c", "--transcoders", "t"],
    "organism": ["train"],
}


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_an_unknown_option_is_one_line_then_the_pointer(name, capsys):
    argv = [name, *NEEDS.get(name, []), "--bogus-flag", "1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"wiremap {name}: error: unrecognized arguments: --bogus-flag")
    prog = "wiremap organism train" if name == "organism" else f"wiremap {name}"
    assert err[0].endswith(f"Run `{prog} --help` for the options")


@pytest.mark.parametrize("name", sorted(set(cli.COMMANDS) - {"train"}))
def test_help_spells_options_with_dashes(name, capsys):
    argv = ["train", "--help"] if name == "organism" else ["--help"]
    with pytest.raises(SystemExit) as exit_:
        cli._resolve(name)(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--" in out and not re.findall(r"--\w+_[\w.]+", out), out


def test_yes_no_list_bare_and_underscored_options():
    from wiremap.attribution.cli import attribute_args

    argv = [*NEEDS["attribute"], "--no-full-graph", "--include-bos", "false", "--heads"]
    argv += ["--target", " Paris", "--target=7", "--node_threshold", "0.5", "--max-edges=9"]
    source, options = attribute_args(argv)
    assert (source.model, source.prompt, source.check_model_name) == ("m", "p", True)
    assert options["full_graph"] is False and options["include_bos"] is False
    assert options["target"] == [" Paris", "7"] and options["heads"] == 1000
    assert options["node_threshold"] == 0.5 and options["max_edges"] == 9
    _, options = attribute_args([*NEEDS["attribute"], "--include-bos", "--heads", "7"])
    assert options["include_bos"] is True and options["heads"] == 7


def test_old_attribute_flags_warn_and_still_work():
    from wiremap.attribution.cli import attribute_args

    with pytest.warns(DeprecationWarning, match="--keep-bos is deprecated.*--include-bos"):
        _, options = attribute_args([*NEEDS["attribute"], "--keep-bos"])
    assert options["include_bos"] is True
    with pytest.warns(DeprecationWarning, match="--batch-size is deprecated.*--target-batch"):
        _, options = attribute_args([*NEEDS["attribute"], "--batch-size", "8"])
    assert options["target_batch"] == 8


def test_cache_options_counts_layers_and_bos():
    from wiremap.cache.command import settings

    argv = ["--model", "m", "--dataset", "d", "--n-tokens", "20k", "--layers", "0-2", "5"]
    values, quiet = settings([*argv, "--include-bos", "--streaming", "--quiet"])
    assert values["n_tokens"] == 20_000 and values["layers"] == [0, 1, 2, 5]
    assert values["include_bos"] is True and values["streaming"] is True and quiet is True
    values, quiet = settings(argv)
    assert values["include_bos"] is False and values["streaming"] is False and quiet is False
    with pytest.raises(WiremapError, match=r"'20x' is not a count.*Run `wiremap cache --help`"):
        settings(["--n-tokens", "20x"])


def test_cache_preset_then_options(tmp_path):
    from wiremap.cache.command import settings

    preset = tmp_path / "p.yaml"
    preset.write_text("data:\n  cache: {model: m, dataset: d, n_tokens: 1k, layers: [1, 2]}\n")
    values, _ = settings(["--config", str(preset), "--n-tokens", "2k"])
    assert (values["model"], values["n_tokens"], values["layers"]) == ("m", 2000, [1, 2])
    preset.write_text("data:\n  cache: {model: m, dataset: d, n_token: 1k}\n")
    with pytest.raises(WiremapError) as err:
        settings(["--config", str(preset)])
    message = str(err.value)
    assert message.startswith(f"preset {preset}: unknown cache settings n_token; valid ones")
    assert message.endswith("Run `wiremap cache --help` for the options")
    assert "\n" not in message


def test_demo_options_are_demo_config_fields_with_their_old_names():
    from wiremap.demo_cmd import config

    cfg = config(["--features-per-layer", "8", "--quiet", "--no-plt", "--attention", "--steps=3"])
    assert (cfg.d_transcoder, cfg.progress, cfg.plt, cfg.attention, cfg.steps) == (
        8, False, False, True, 3,
    )  # fmt: skip
    assert config([]).progress is True
