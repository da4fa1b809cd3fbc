"""A cache folder's `manifest.json`: what it records, how it is read and replaced, and the
lock that keeps two runs from writing one folder.

    manifest = read_manifest("wiremap_out/gpt2")     # clear WiremapError when it is not a cache
    manifest["n_tokens"], manifest["norm_stats"]["input"]["mean_norm"]

The manifest lists the shards that belong to the cache (name, size, sha256, norm sums); it is
only ever replaced whole, by rename (`fileio.atomic_write`). Manifests of the previous
version (`exclude_bos`, `batch_size`) read as `include_bos` and `batch_contexts`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wiremap.cache.config import CacheConfig
from wiremap.cache.text import warn
from wiremap.errors import WiremapError
from wiremap.fileio import atomic_write

MANIFEST = "manifest.json"
FORMAT = "wiremap-activation-cache/1"
# Settings that change the bytes on disk: a folder is resumed only when all of them match.
IDENTITY = (
    "model",
    "revision",
    "dataset",
    "layers",
    "hooks",
    "dtype",
    "model_dtype",
    "context_length",
    "batch_contexts",
    "tokens_per_shard",
    "include_bos",
    "n_tokens_requested",
)
PROGRESS = ("shards", "n_tokens", "norm_stats", "complete")  # manifest fields that grow


def header(cfg: CacheConfig, config, layers: list[int]) -> dict:
    """The manifest's fixed part: the settings and the model's shape."""
    from wiremap import __version__

    return {
        "format": FORMAT,
        "model": cfg.model,
        "revision": cfg.revision,
        "architecture": config.model_type,
        "d_model": int(config.hidden_size),
        "n_model_layers": int(config.num_hidden_layers),
        "layers": layers,
        "hooks": {"input": cfg.input_hook, "output": cfg.output_hook},
        "dtype": cfg.dtype,
        "model_dtype": cfg.model_dtype,
        "context_length": int(cfg.context_length),
        "batch_contexts": int(cfg.batch_contexts),
        "tokens_per_shard": int(cfg.shard_tokens),
        "include_bos": bool(cfg.include_bos),
        "n_tokens_requested": int(cfg.n_tokens),
        "dataset": cfg.text_spec().describe(),
        "wiremap_version": __version__,
    }


def dump_manifest(out: Path, manifest: dict) -> None:
    atomic_write(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def read_manifest(folder: str | Path) -> dict:
    """The manifest of the cache in `folder`, with a clear error if there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise WiremapError(
            f"{folder} holds no {MANIFEST}: it is not an activation cache; build one with "
            f"`wiremap cache --out {folder}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WiremapError(
            f"{path} is unreadable ({err}); the cache is damaged: delete {folder} and build "
            "it again"
        ) from err
    if manifest.get("format") != FORMAT:
        raise WiremapError(f"{path} is not a {FORMAT} manifest; point at a wiremap cache folder")
    return upgraded(manifest)


def upgraded(manifest: dict) -> dict:
    """`manifest` with the previous version's field names replaced by today's."""
    manifest = dict(manifest)
    if "include_bos" not in manifest:  # before: `exclude_bos`, true when absent
        manifest["include_bos"] = not manifest.get("exclude_bos", True)
    manifest.pop("exclude_bos", None)
    if "batch_contexts" not in manifest and "batch_size" in manifest:
        manifest["batch_contexts"] = manifest["batch_size"]
    manifest.pop("batch_size", None)
    return manifest


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder so two runs never write the same cache."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, carry on
        yield
        return
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            raise WiremapError(
                f"another `wiremap cache` is writing to {out}; wait for it or choose another --out"
            ) from err
        yield  # the lock goes with the file handle, also when the process is killed


def with_shards(base: dict, entries: list[dict], complete: bool) -> dict:
    """The manifest `base` listing the shards `entries`, with totals and norm statistics."""
    manifest = dict(base)
    manifest.update(
        shards=entries,
        n_tokens=sum(e["n_tokens"] for e in entries),
        norm_stats=norm_stats(entries, len(base["layers"])),
        complete=complete,
    )
    return manifest


def norm_stats(entries: list[dict], n_layers: int) -> dict:
    """Per-layer mean (and mean squared) norms of inputs and outputs over `entries`' sums."""
    total = sum(e["n_tokens"] for e in entries)
    stats = {}
    for side in ("input", "output"):
        norm = [sum(e["sums"][side]["norm"][i] for e in entries) for i in range(n_layers)]
        sq = [sum(e["sums"][side]["sq_norm"][i] for e in entries) for i in range(n_layers)]
        stats[side] = {
            "mean_norm": [v / max(total, 1) for v in norm],
            "mean_sq_norm": [v / max(total, 1) for v in sq],
        }
    return stats


# -- resuming ------------------------------------------------------------------------------


def existing(out: Path, header: dict) -> dict | None:
    """The folder's manifest when it holds a cache with these settings; None when fresh."""
    if not (out / MANIFEST).exists():
        if any(out.glob("shard_*.safetensors")):
            raise WiremapError(
                f"{out} holds shard files but no {MANIFEST}; it is not a cache wiremap can "
                "resume. Choose another --out or delete those files"
            )
        return None
    manifest = read_manifest(out)
    diffs = _differences({k: manifest.get(k) for k in IDENTITY}, {k: header[k] for k in IDENTITY})
    if diffs:
        detail = "; ".join(f"{k}: {there!r} there, {now!r} now" for k, there, now in diffs)
        raise WiremapError(
            f"{out} already holds a cache with other settings ({detail}). wiremap never "
            "overwrites a cache: choose another --out, or delete that folder to rebuild it"
        )
    return manifest


def _differences(there: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """`(key, there, now)` for each differing setting, looking inside nested mappings."""
    diffs = []
    for key in now:
        a, b = there.get(key), now[key]
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append((prefix + key, a, b))
    return diffs


def whole(out: Path, manifest: dict) -> bool:
    """Are all the listed shards there, at their listed sizes?"""
    return len(intact_shards(out, manifest["shards"], quiet=True)) == len(manifest["shards"])


def intact_shards(out: Path, entries: list[dict], quiet: bool = False) -> list[dict]:
    """The listed shards up to the first one missing or of the wrong size."""
    for i, entry in enumerate(entries):
        path = out / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            if not quiet:
                warn(f"{path} is missing or damaged; recomputing from shard {i}")
            return entries[:i]
    return entries
