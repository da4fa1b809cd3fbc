"""How every `wiremap` command gets its options: from a typed signature, through jsonargparse.

    def export(checkpoint: str, out: str | None = None) -> int:
        '''Write transcoders from a training checkpoint.

        Args:
            checkpoint: a training checkpoint: step=N.ckpt or last.ckpt
            out: output folder
        '''

    def main(argv):
        return export(**parse(argv, "wiremap export", export, positional=True))

A command's options are the parameters of functions and the fields of config dataclasses
(help texts: the `Args:` section of a function's docstring, the docstring under a field), so
nothing is copied by hand; `wiremap train` is LightningCLI, built on the same jsonargparse.
On the command line options are spelled with dashes (`--node-threshold`; `--node_threshold`
works too), a yes/no option is given alone or negated (`--streaming`, `--no-plt`), and a
list option once per value (`--target A --target B`). A bad option or value is one
`UsageError`: the problem first, then where the options are listed.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jsonargparse
from jsonargparse import ArgumentParser, DefaultHelpFormatter

from wiremap.errors import WiremapError

# a dataclass field's docstring is its option's help (the setting's name before 4.35: below)
if hasattr(jsonargparse, "set_parsing_settings"):
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
else:  # pragma: no cover - older jsonargparse
    jsonargparse.set_docstring_parse_options(attribute_docstrings=True)

_BOOLEAN = ("true", "false", "yes", "no")
Source = Callable[..., Any] | type


class UsageError(WiremapError):
    """A bad option, value or preset key: the problem, then the pointer to `--help`."""

    def __init__(self, prog: str, problem: str) -> None:
        super().__init__(f"{problem.rstrip('.')}. Run `{prog} --help` for the options")


def dashed(text: str) -> str:
    """`--node_threshold` -> `--node-threshold` for every option name in `text`."""
    return re.sub(r"(?<![\w-])--[\w.]+", lambda m: m[0][:2] + m[0][2:].replace("_", "-"), text)


class _Help(DefaultHelpFormatter):
    """Help with the dashed spellings; a yes/no option shows as `--[no-]name`."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        text = super()._format_action_invocation(action)
        text = re.sub(r", --[\w.]+\+ \S+$", "", text)  # `--x+`: given once per value instead
        return _yes_no(dashed(text))

    def _expand_help(self, action: argparse.Action) -> str:
        text = super()._expand_help(action)
        return re.sub(r"<function (\w+) at 0x\w+>", r"\1", text)  # a `custom` type: its name

    def _format_usage(self, *args: Any) -> str:
        return _yes_no(dashed(super()._format_usage(*args)))


def _yes_no(text: str) -> str:
    return re.sub(r"--([\w.-]+) \{true,false\}", r"--[no-]\1", text)


def parser(
    prog: str,
    *sources: Source,
    description: str | None = None,
    positional: bool = False,
    skip: Iterable[str] = (),
    custom: Mapping[str, Mapping[str, Any]] | None = None,
    defaults: Mapping[str, Any] | None = None,
    aliases: Mapping[str, str] | None = None,
    deprecated: Mapping[str, str] | None = None,
    bare: Mapping[str, str] | None = None,
) -> ArgumentParser:
    """An ArgumentParser with the parameters of `sources` (functions, dataclasses) as options.

    `positional`: parameters without a default are positional arguments, not `--options`.
    `custom`: name -> `add_argument` settings for an option whose type a signature cannot
    say (`20k` tokens, `0-3` layers); its help text and default still come from the source.
    `defaults`: other defaults than the sources' (a required option then is not).
    `aliases`: another spelling -> what it stands for (`{"--quiet": "--no_progress"}`);
    `deprecated`: the same, with a DeprecationWarning; `bare`: the value an option takes
    when given without one (`{"heads": "1000"}`). The help's last line lists them.
    """
    custom = dict(custom or {})
    spellings = Spellings(dict(aliases or {}), dict(deprecated or {}), dict(bare or {}))
    p = ArgumentParser(
        prog=prog,
        description=description if description is not None else _summary(sources[-1]),
        epilog=spellings.epilog(),
        exit_on_error=False,
        allow_abbrev=False,  # an option added later must not change what `--node-t` means
        formatter_class=_Help,
    )
    for source in sources:
        left_out = set(skip) | set(custom)
        if isinstance(source, type):
            p.add_class_arguments(source, None, as_group=False, skip=left_out)
        else:
            p.add_function_arguments(
                source, None, as_group=False, as_positional=positional, skip=left_out
            )
        _add_custom(p, source, custom, positional)
    if defaults:
        p.set_defaults(dict(defaults))
        for action in p._actions:
            action.required = action.required and action.dest not in defaults
    p.spellings = spellings
    return p


def _add_custom(p: ArgumentParser, source: Source, custom: dict, positional: bool) -> None:
    from docstring_parser import parse_from_object

    helps = {d.arg_name: d.description for d in parse_from_object(source).params}
    for name, default in _defaults(source).items():
        if name in custom:
            settings = custom.pop(name)
            p.add_argument(f"--{name}", default=default, help=helps.get(name), **settings)


def _defaults(source: Source) -> dict[str, Any]:
    import inspect

    if dataclasses.is_dataclass(source):
        return {
            f.name: None if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(source)
        }
    params = inspect.signature(source).parameters.values()
    return {p.name: None if p.default is p.empty else p.default for p in params}


def _summary(source: Source) -> str:
    return (source.__doc__ or "").strip().split("\n\n")[0]


@dataclasses.dataclass
class Spellings:
    """What a command accepts besides its options' own names (see `parser`)."""

    aliases: dict[str, str]
    deprecated: dict[str, str]
    bare: dict[str, str]

    def epilog(self) -> str | None:
        pairs = [f"{dashed(a)} = {dashed(b)}" for a, b in self.aliases.items()]
        pairs += [f"{dashed(a)} = {dashed(b)} (deprecated)" for a, b in self.deprecated.items()]
        return f"Also accepted: {'; '.join(pairs)}." if pairs else None


def parse(
    argv: list[str], prog: str | ArgumentParser, *sources: Source, **settings: Any
) -> dict[str, Any]:
    """The options in `argv` of `parser(prog, *sources, **settings)` (or of the parser
    `prog`), as a flat mapping. Raises UsageError."""
    p = prog if isinstance(prog, ArgumentParser) else parser(prog, *sources, **settings)
    try:
        return p.parse_args(normalise(argv, p)).as_dict()
    except argparse.ArgumentError as err:
        raise UsageError(p.prog, one_line(str(err), p)) from None


def underscored(argv: list[str]) -> list[str]:
    """`argv` with option names underscored (`--ckpt-path x` -> `--ckpt_path x`)."""
    end = argv.index("--") if "--" in argv else len(argv)
    return [_underscored(t) for t in argv[:end]] + argv[end:]


def _underscored(token: str) -> str:
    if not token.startswith("--"):
        return token
    name, eq, value = token.partition("=")
    return "--" + name[2:].replace("-", "_") + eq + value


def normalise(argv: list[str], p: ArgumentParser) -> list[str]:
    """`argv` as jsonargparse reads it: underscored names, yes/no and list options spelled out."""
    kinds = _option_kinds(p)
    spellings = getattr(p, "spellings", Spellings({}, {}, {}))
    aliases, deprecated, bare = spellings.aliases, spellings.deprecated, spellings.bare
    out: list[str] = []
    rest = list(argv)
    while rest:
        token = rest.pop(0)
        if token == "--":
            return out + [token] + rest
        if not token.startswith("--"):
            out.append(token)
            continue
        name, eq, value = _underscored(token).partition("=")
        if name in deprecated:
            _warn_deprecated(name, deprecated[name])
            name, eq, value = (deprecated[name] + eq + value).partition("=")
        elif name in aliases:
            name, eq, value = (aliases[name] + eq + value).partition("=")
        key = name[2:]
        follows = rest[0] if rest else None
        if kinds.get(key) == "bool" and not eq and (follows or "").lower() not in _BOOLEAN:
            token = f"{name}=true"
        elif key.startswith("no_") and kinds.get(key[3:]) == "bool" and not eq:
            token = f"--{key[3:]}=false"
        elif key in bare and not eq and (follows is None or follows.startswith("--")):
            token = f"{name}={bare[key]}"
        elif kinds.get(key) == "list" and not (eq and value.startswith("[")):
            token = f"{name}+{eq}{value}"  # once per value, as argparse's append does
        else:
            token = name + eq + value
        out.append(token)
    return out


def _option_kinds(p: ArgumentParser) -> dict[str, str]:
    """Option name -> "bool" or "list" for the options that `normalise` spells out."""
    kinds = {}
    for action in p._actions:
        hint = str(getattr(action, "_typehint", ""))
        for option in action.option_strings:
            if hint in ("<class 'bool'>", "bool | None", "typing.Optional[bool]"):
                kinds[option[2:]] = "bool"
            elif option.endswith("+"):
                kinds[option[2:-1]] = "list"
    return kinds


def _warn_deprecated(old: str, new: str) -> None:
    with warnings.catch_warnings():  # a command's user should see it, not only a test
        warnings.simplefilter("always", DeprecationWarning)
        warnings.warn(
            f"{dashed(old)} is deprecated and will be removed in the next version; use "
            f"{dashed(new.partition('=')[0])}",
            DeprecationWarning,
            stacklevel=4,
        )


def one_line(text: str, p: ArgumentParser | None = None) -> str:
    """jsonargparse's (often multi-line) refusal as one line naming the option and value."""
    key = re.match(r'Parser key "([^"]+)":', text)
    if key:
        given = re.search(r"(?:Given|Got) value: (.*)", text)
        value = given[1].strip() if given else "?"
        expected = re.search(r"Expected an? (<class '\w+'>)", text)
        actions = p._actions if p is not None else []
        hints = [str(a._typehint) for a in actions if getattr(a, "dest", None) == key[1]]
        hint = hints[0] if hints else expected[1] if expected else ""
        return f"--{key[1].replace('_', '-')} {value}: expected {_kind(hint)}"
    required = re.match(r"the following arguments are required: (.*)", text)
    if required:
        names = ", ".join(_flag(p, n.strip()) for n in required[1].split(","))
        return f"missing {names}"
    return dashed(" ".join(text.split()))


def _kind(hint: str) -> str:
    """A type hint as a reader says it: `int`, `one of all, features`, `list of str`."""
    kind = re.sub(r"<class '(\w+)'>", r"\1", hint.replace("typing.", ""))
    kind = re.sub(r"^Optional\[(.*)\]$|^(.*) \| None$", r"\1\2", kind)
    if literal := re.fullmatch(r"Literal\[(.*)\]", kind):
        return "one of " + literal[1].replace("'", "")
    return re.sub(r"^list\[(.*)\]$", r"list of \1", kind) or "another value"


def _flag(p: ArgumentParser | None, dest: str) -> str:
    for action in p._actions if p is not None else []:
        if action.dest == dest and action.option_strings:
            return dashed(action.option_strings[0])
    return dest  # a positional argument


def at_least(prog: str, low: int, **values: int) -> None:
    """UsageError when a whole-number option is below `low` (`--top -1`)."""
    for name, value in values.items():
        if value < low:
            raise UsageError(
                prog, f"--{name.replace('_', '-')} {value}: give a whole number of at least {low}"
            )


def split(values: Mapping[str, Any], cls: type) -> tuple[Any, dict[str, Any]]:
    """(`cls` built from its fields in `values`, the other entries of `values`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    rest = {k: v for k, v in values.items() if k not in names}
    return cls(**{k: v for k, v in values.items() if k in names}), rest


def renamed(source: Source, names: Mapping[str, str]) -> dict[str, str]:
    """`deprecated` spellings of renamed options: `--old` -> `--new` for each old -> new in
    `names` once `source` has the new name and not the old one (issue 15's renames)."""
    params = set(_defaults(source))
    return {f"--{old}": f"--{new}" for old, new in names.items() if new in params - {old}}
