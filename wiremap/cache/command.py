"""`wiremap cache`: cache a language model's MLP inputs and outputs to disk.

    wiremap cache                        # built-in default: a tiny local llama on toy text
    wiremap cache --model gpt2 --dataset Salesforce/wikitext \\
        --dataset-config wikitext-103-raw-v1 --n-tokens 1M --out wiremap_out/gpt2
    wiremap cache --model ./my-model --dataset 'data/*.jsonl' --text-column body
    wiremap cache --config configs/preset.yaml --n-tokens 50k   # flags override the preset

Rerunning an interrupted command resumes it; see `wiremap.cache` for the format.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

from wiremap.cache import CacheConfig, build_cache, read_manifest
from wiremap.cache.text import warn
from wiremap.commands import UsageError, parse, parser, renamed
from wiremap.errors import WiremapError
from wiremap.fileio import atomic_write

PROG = "wiremap cache"
BUILTIN_TOKENS = 16_384
FIELDS = {f.name for f in fields(CacheConfig)}
_SUFFIX = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}
# options whose spelling a type hint cannot say: 20k tokens, layers 0-3
CUSTOM = {
    "n_tokens": {"type": "count", "metavar": "N"},
    "shard_tokens": {"type": "count", "metavar": "N"},
    "layers": {"nargs": "+", "metavar": "L"},
}


def options(config: str | None = None, quiet: bool = False) -> None:
    """Run a language model over text and store its MLP inputs and outputs as safetensors
    shards with a manifest. With no --model/--dataset/--config it runs a built-in default (a
    tiny local llama on toy text). Rerun a command to resume it.

    Args:
        config: read settings from `data.cache` in a YAML preset (PRESET.yaml); options
            given as well override it
        quiet: no progress bar
    """


def count(text: str | int) -> int:
    """An integer such as `20000`, `20_000`, `20k`, `1M` or `1e6`."""
    value = str(text).strip().lower()
    try:
        if value and value[-1] in _SUFFIX:
            return int(float(value[:-1]) * _SUFFIX[value[-1]])
        return int(float(value)) if "e" in value else int(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 20000, 20k, 1M)") from err


def layer_list(items: list[str | int] | str | int) -> list[int]:
    """Layers from `0 1 2`, `0,1,2` or `0-3` (negative numbers count from the end)."""
    items = items if isinstance(items, list) else [items]
    layers: list[int] = []
    for item in ",".join(map(str, items)).split(","):
        item = item.strip()
        if match := re.fullmatch(r"(\d+)-(\d+)", item):
            layers += range(int(match[1]), int(match[2]) + 1)
        elif item:
            try:
                layers.append(int(item))
            except ValueError as err:
                raise UsageError(
                    PROG, f"--layers: {item!r} is not a layer number or range"
                ) from err
    return layers


def build_parser():
    custom = {k: {**v, "type": count} if v.get("type") == "count" else v for k, v in CUSTOM.items()}
    # neither --model nor --dataset: the built-in default
    defaults = {"model": "", "dataset": ""}
    return parser(
        PROG, CacheConfig, options, custom=custom, defaults=defaults,
        deprecated=renamed(CacheConfig, {"batch_size": "batch_contexts"}),
    )  # fmt: skip


def read_preset(path: str) -> dict:
    """The `data.cache` (or `data.init_args.cache`) mapping of a YAML preset."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise WiremapError(f"preset {path!r} does not exist; check the path given to --config")
    try:
        doc = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise WiremapError(f"preset {path} is not valid YAML ({err}); fix the file") from err
    data = doc.get("data") if isinstance(doc, dict) else None
    data = data if isinstance(data, dict) else {}
    cache = data.get("cache") or (data.get("init_args") or {}).get("cache")
    if not isinstance(cache, dict):
        raise WiremapError(
            f"preset {path} has no `data: {{cache: {{...}}}}` mapping (or data.init_args.cache); "
            "add one with at least `model`, `dataset` and `out`"
        )
    unknown = sorted(set(cache) - FIELDS)
    if unknown:
        raise UsageError(
            PROG,
            f"preset {path}: unknown cache settings {', '.join(unknown)}; valid ones are "
            f"{', '.join(sorted(FIELDS))}",
        )
    for key in ("n_tokens", "shard_tokens"):
        if isinstance(cache.get(key), str):
            try:
                cache[key] = count(cache[key])
            except argparse.ArgumentTypeError as err:
                raise UsageError(PROG, f"preset {path}: {key}: {err}") from err
    return dict(cache)


def builtin_default(values: dict) -> dict:
    """Settings for the built-in default: a tiny llama and a toy corpus under the output folder."""
    from wiremap.models.tiny import build_tiny_model, sample_corpus

    out = Path(values["out"])
    model_dir, corpus = out / "tiny-model", out / "corpus.txt"
    warn(
        "no --model/--dataset/--config given: using the built-in default, a tiny random llama "
        f"({model_dir}) on a toy corpus ({corpus}). Pass --model and --dataset for real work."
    )
    if not (model_dir / "model.safetensors").exists():
        building = out / "tiny-model.building"
        build_tiny_model("llama", building, n_layers=2, d_model=64)
        building.replace(model_dir)  # whole or absent, even if the run is killed
    if not corpus.exists():
        atomic_write(corpus, "\n".join(sample_corpus(n_docs=2_000, seed=1)) + "\n")
    return {**values, "model": str(model_dir), "dataset": str(corpus)}


def summary(path: Path) -> str:
    m = read_manifest(path)
    n = max(m["n_tokens"], 1)
    size = sum(e["bytes"] for e in m["shards"])
    return (
        f"cached {m['n_tokens']:,} tokens of {m['model']} ({len(m['layers'])} layers x "
        f"{m['d_model']} dims, {m['hooks']['input']} -> {m['hooks']['output']}, {m['dtype']}) "
        f"in {len(m['shards'])} shards: {size / n:,.0f} bytes/token, {size / 1e6:,.1f} MB in {path}"
    )


def main(argv: list[str]) -> int:
    values, quiet = settings(argv)
    path = build_cache(CacheConfig(**values), progress=not quiet)
    print(summary(path))
    return 0


def settings(argv: list[str]) -> tuple[dict, bool]:
    """(CacheConfig settings, --quiet): the options, over a preset's, over the defaults."""
    p = build_parser()
    values = parse(argv, p)
    if values["config"]:  # the preset's settings, then the options given as well
        p.set_defaults(read_preset(values["config"]))
    elif not values["model"] and not values["dataset"]:
        p.set_defaults(n_tokens=BUILTIN_TOKENS)  # the built-in default is small
    values = parse(argv, p)
    quiet, config = values.pop("quiet"), values.pop("config")
    if values["layers"] is not None:
        values["layers"] = layer_list(values["layers"])
    if not config and not values["model"] and not values["dataset"]:
        return builtin_default(values), quiet
    if not values["model"] or not values["dataset"]:
        raise UsageError(
            PROG,
            "give both --model and --dataset (or a --config preset naming them), or neither "
            "to run the built-in default",
        )
    return values, quiet
