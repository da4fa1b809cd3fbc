"""`wiremap cache`: cache a language model's MLP inputs and outputs to disk.

    wiremap cache                        # built-in default: a tiny local llama on toy text
    wiremap cache --model gpt2 --dataset Salesforce/wikitext \\
        --dataset-config wikitext-103-raw-v1 --n-tokens 1M --out wiremap_out/gpt2
    wiremap cache --model ./my-model --dataset 'data/*.jsonl' --text-column body
    wiremap cache --config configs/preset.yaml --n-tokens 50k   # flags override the preset

Rerunning an interrupted command resumes it; see `wiremap.train.cache` for the format.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import textwrap
from dataclasses import MISSING, fields
from pathlib import Path

from wiremap.cache import CacheConfig, build_cache, read_manifest
from wiremap.cache.text import warn
from wiremap.errors import WiremapError
from wiremap.fileio import atomic_write

DEFAULT_OUT = "wiremap_out/cache"
BUILTIN_TOKENS = 16_384
FIELDS = {f.name for f in fields(CacheConfig)}
_SUFFIX = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (shown as the option's help)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source available (frozen install): no help texts
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = after.value.value
    return docs


def count(text: str) -> int:
    """An integer such as `20000`, `20_000`, `20k`, `1M` or `1e6`."""
    value = text.strip().lower()
    try:
        if value and value[-1] in _SUFFIX:
            return int(float(value[:-1]) * _SUFFIX[value[-1]])
        return int(float(value)) if "e" in value else int(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 20000, 20k, 1M)") from err


def layer_list(items: list[str]) -> list[int]:
    """Layers from `0 1 2`, `0,1,2` or `0-3` (negative numbers count from the end)."""
    layers: list[int] = []
    for item in ",".join(items).split(","):
        item = item.strip()
        if match := re.fullmatch(r"(\d+)-(\d+)", item):
            layers += range(int(match[1]), int(match[2]) + 1)
        elif item:
            try:
                layers.append(int(item))
            except ValueError as err:
                raise WiremapError(f"--layers: {item!r} is not a layer number or range") from err
    return layers


# flag -> (CacheConfig field, extra argparse options)
OPTIONS: dict[str, tuple[str, dict]] = {
    "--model": ("model", {}),
    "--revision": ("revision", {}),
    "--dataset": ("dataset", {}),
    "--dataset-config": ("dataset_config", {}),
    "--split": ("split", {}),
    "--text-column": ("text_column", {}),
    "--streaming": ("streaming", {"action": "store_true"}),
    "--n-tokens": ("n_tokens", {"type": count, "metavar": "N"}),
    "--context-length": ("context_length", {"type": int, "metavar": "N"}),
    "--batch-size": ("batch_size", {"type": int, "metavar": "N"}),
    "--layers": ("layers", {"nargs": "+", "metavar": "L"}),
    "--input-hook": ("input_hook", {"choices": ["mlp_in", "resid_mid"]}),
    "--output-hook": ("output_hook", {"choices": ["mlp_out"]}),
    "--dtype": ("dtype", {"choices": ["bfloat16", "float16", "float32"]}),
    "--model-dtype": ("model_dtype", {"choices": ["float32", "bfloat16", "float16"]}),
    "--device": ("device", {}),
    "--out": ("out", {}),
    "--shard-tokens": ("shard_tokens", {"type": count, "metavar": "N"}),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wiremap cache",
        description=(
            "Run a language model over text and store its MLP inputs and outputs as "
            "safetensors shards with a manifest. With no --model/--dataset/--config it runs a "
            "built-in default (a tiny local llama on toy text). Rerun a command to resume it."
        ),
    )
    parser.add_argument(
        "--config", metavar="PRESET.yaml", help="read settings from `data.cache` in a YAML preset"
    )
    docs = field_docs(CacheConfig)
    defaults = {f.name: f.default for f in fields(CacheConfig)}
    for flag, (name, extra) in OPTIONS.items():
        text = docs.get(name, "")
        if defaults.get(name) not in (None, False, MISSING):
            text += f" (default: {defaults[name]})"
        parser.add_argument(flag, dest=name, default=None, help=text, **extra)
    parser.add_argument(
        "--include-bos",
        dest="exclude_bos",
        action="store_false",
        default=None,
        help="also store the BOS position of each context (left out by default)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


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
        raise WiremapError(
            f"preset {path}: unknown cache settings {', '.join(unknown)}; valid ones are "
            f"{', '.join(sorted(FIELDS))}"
        )
    for key in ("n_tokens", "shard_tokens"):
        if isinstance(cache.get(key), str):
            try:
                cache[key] = count(cache[key])
            except argparse.ArgumentTypeError as err:
                raise WiremapError(f"preset {path}: {key}: {err}") from err
    return dict(cache)


def builtin_default(values: dict) -> dict:
    """Settings for the built-in default: a tiny llama and a toy corpus under the output folder."""
    from wiremap.models.tiny import build_tiny_model, sample_corpus

    out = Path(values.get("out") or DEFAULT_OUT)
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
    defaults = {"n_tokens": BUILTIN_TOKENS, "out": str(out)}
    return {**defaults, **values, "model": str(model_dir), "dataset": str(corpus)}


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
    args = build_parser().parse_args(argv)
    values = read_preset(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}
    if "layers" in given:
        given["layers"] = layer_list(given["layers"])
    values.update(given)
    if not args.config and "model" not in values and "dataset" not in values:
        values = builtin_default(values)
    elif "model" not in values or "dataset" not in values:
        raise WiremapError(
            "give both --model and --dataset (or a --config preset naming them), or neither "
            "to run the built-in default"
        )
    values.setdefault("out", DEFAULT_OUT)
    path = build_cache(CacheConfig(**values), progress=not args.quiet)
    print(summary(path))
    return 0
