"""The `wiremap` command: one entry point, subcommands mapped to plain functions.

    wiremap --help
    wiremap cache --help

Each subcommand lives in its own module as `main(argv: list[str]) -> int` and is
imported only when it runs, so `wiremap --help` is instant. Its options come from a config
dataclass or a function signature through `wiremap.commands` (jsonargparse; `train` is
LightningCLI); a refusal is one `WiremapError` line, printed here.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module

from wiremap.errors import WiremapError, disk_error

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "cache": ("wiremap.cache.command:main", "cache a language model's MLP activations to disk"),
    "train": ("wiremap.train.train_cmd:main", "train transcoders on a cached activation dataset"),
    "export": ("wiremap.train.export_cmd:main", "write transcoders from a training checkpoint"),
    "serve": ("wiremap.attribution.viewer_cmd:serve_main", "open graph JSON files in a viewer"),
    "features": ("wiremap.attribution.viewer_cmd:features_main", "compute feature cards"),
    "attribute": ("wiremap.attribution.cli:attribute_main", "build a prompt's attribution graph"),
    "steer": ("wiremap.attribution.cli:steer_main", "intervene on features; steer generation"),
    "organism": ("wiremap.train.organism_cmd:main", "build or evaluate the bundled model organism"),
    "real": ("wiremap.real:main", "locate the real-model tier's GGUF model; write its prose"),
    "demo": (
        "wiremap.demo_cmd:main",
        "run the whole pipeline offline on the built-in model organism",
    ),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: wiremap <command> [options]",
        "",
        "Train transcoders on language models and trace circuits.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `wiremap <command> --help` for a command's options."]
    return "\n".join(lines)


def _resolve(name: str):
    target, _ = COMMANDS[name]
    module, func = target.split(":")
    return getattr(import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from wiremap import __version__

        print(f"wiremap {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"wiremap: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return int(_resolve(name)(rest) or 0)
    except WiremapError as err:
        print(f"wiremap {name}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a full disk or an unwritable folder, however it is wrapped
        mapped = disk_error(err)
        if mapped is None:
            raise
        print(f"wiremap {name}: error: {mapped}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wiremap {name}: interrupted; finished work is kept on disk", file=sys.stderr)
        return 130


def run() -> None:  # pragma: no cover - console entry
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
