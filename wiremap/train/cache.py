"""Activation cache: run a language model over text, store its MLP inputs and outputs on disk.

    from wiremap.train.cache import ActivationCache, CacheConfig, build_cache

    cfg = CacheConfig(model="gpt2", dataset="wikitext", dataset_config="wikitext-103-raw-v1",
                      n_tokens=100_000, out="wiremap_out/gpt2")
    path = build_cache(cfg)                  # resumable: rerun the same call after a crash
    cache = ActivationCache(path)
    x, y = cache.get(torch.arange(1024))     # [1024, n_layers, d_model] each, stored dtype

Layout (DESIGN.md §4): `shard_00000.safetensors`, … holding `<input_hook>` and
`<output_hook>` as `[n, L, d]`, `tokens [n]` and `positions [n]`, plus `manifest.json`.

Crash safety. A shard is written under a temporary name, flushed to disk and renamed; only
then is it listed in manifest.json (itself replaced by rename). A shard exists for the cache
only once the manifest lists it, so a kill at any moment leaves at worst an unlisted file
that the next run overwrites. Batches are fixed groups of contexts counted from the start of
the text, and a shard boundary may fall inside a batch: a resumed run recomputes the whole
batch that holds its first missing row and drops the rows before it. The forward pass thus
sees exactly the batches of an uninterrupted run, and the cache comes out byte-identical.

Silent damage. Each shard's sha256 is in the manifest; a reader checks it the first time the
process opens the shard (one read at disk speed), so flipped bytes stop training with the
shard's name instead of feeding it garbage.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch
from torch import Tensor

from wiremap.checksums import sha256_file, sha256_once
from wiremap.errors import WiremapError, oom_to_error
from wiremap.fileio import atomic_write, remove_leftovers
from wiremap.models.adapters import check_layers, get_adapter
from wiremap.models.hooks import capture, stop_after, stoppable
from wiremap.models.loading import load_config, load_model, model_max_length
from wiremap.train.text import TextSpec, boundary_tokens, iter_texts, pack_contexts, tokenize, warn

MANIFEST = "manifest.json"
FORMAT = "wiremap-activation-cache/1"
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
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
    "batch_size",
    "tokens_per_shard",
    "exclude_bos",
    "n_tokens_requested",
)
PROGRESS = ("shards", "n_tokens", "norm_stats", "complete")  # manifest fields that grow


@dataclass
class CacheConfig:
    """What to cache, from which text, and where to put it."""

    model: str
    """Hugging Face model name, or a local folder written by `save_pretrained`."""
    dataset: str
    """Hub dataset name, or a local .txt/.jsonl/.parquet file, folder or glob."""
    revision: str | None = None
    """Model revision (branch, tag or commit) on the hub."""
    dataset_config: str | None = None
    """Hub dataset configuration (subset), e.g. `wikitext-103-raw-v1`."""
    split: str = "train"
    """Hub dataset split."""
    text_column: str = "text"
    """Column holding the text (.txt files: one document per line, column `text`)."""
    streaming: bool = False
    """Stream the hub dataset instead of downloading it first."""
    n_tokens: int = 100_000
    """Number of token positions to cache (BOS positions not counted when excluded)."""
    context_length: int = 128
    """Tokens per context, BOS included."""
    batch_size: int = 32
    """Contexts per forward pass."""
    layers: list[int] | None = None
    """Model layers to cache (default: all)."""
    input_hook: Literal["mlp_in", "resid_mid"] = "mlp_in"
    """Transcoder input: what the MLP reads (`mlp_in`) or the residual before its norm."""
    output_hook: Literal["mlp_out"] = "mlp_out"
    """Transcoder target: what the MLP block adds to the residual stream."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Storage dtype of the activations on disk."""
    model_dtype: str = "float32"
    """Dtype the language model runs in."""
    device: str = "auto"
    """Where the model runs: `cpu`, `cuda`, `cuda:1` or `auto` (GPU when there is one)."""
    out: str = "wiremap_out/cache"
    """Output folder."""
    shard_tokens: int = 8192
    """Token positions per shard file."""
    exclude_bos: bool = True
    """Leave out the BOS position of each context (its activations are outliers)."""

    def __post_init__(self) -> None:
        _choice("input_hook", self.input_hook, ("mlp_in", "resid_mid"))
        _choice("output_hook", self.output_hook, ("mlp_out",))
        _choice("dtype", self.dtype, tuple(STORAGE_DTYPES))
        for name in ("n_tokens", "batch_size", "shard_tokens"):
            if int(getattr(self, name)) < 1:
                raise WiremapError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.context_length < 2:
            raise WiremapError(f"context_length must be at least 2, got {self.context_length}")
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if self.layers is not None and len(self.layers) == 0:
            raise WiremapError("layers is empty; name at least one layer, or leave it out for all")

    def text_spec(self) -> TextSpec:
        return TextSpec(
            self.dataset, self.dataset_config, self.split, self.text_column, self.streaming
        )


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise WiremapError(f"{name} {value!r} is not supported; choose one of {', '.join(allowed)}")


# -- planning ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Numbers derived from a config and the model."""

    layers: list[int]
    first_pos: int  # first stored position of a context (1 skips BOS)
    rows_per_context: int
    n_rows: int  # rows requested
    batch_size: int
    tokens_per_shard: int
    hooks: tuple[str, str]
    dtype: torch.dtype = field(repr=False)

    @property
    def n_contexts(self) -> int:
        return -(-self.n_rows // self.rows_per_context)

    @property
    def rows_per_batch(self) -> int:
        return self.batch_size * self.rows_per_context


def make_plan(cfg: CacheConfig, layers: list[int]) -> Plan:
    first_pos = 1 if cfg.exclude_bos else 0
    return Plan(
        layers=layers,
        first_pos=first_pos,
        rows_per_context=cfg.context_length - first_pos,
        n_rows=int(cfg.n_tokens),
        batch_size=int(cfg.batch_size),
        tokens_per_shard=int(cfg.shard_tokens),
        hooks=(cfg.input_hook, cfg.output_hook),
        dtype=STORAGE_DTYPES[cfg.dtype],
    )


def model_config(cfg: CacheConfig, model=None):
    return model.config if model is not None else load_config(cfg.model, cfg.revision)


def check_model(cfg: CacheConfig, config) -> list[int]:
    """Validate the config against the model; return the sorted layers to cache."""
    get_adapter(config.model_type)  # unsupported architecture -> clear error, before loading
    n_layers = int(config.num_hidden_layers)
    layers = range(n_layers) if cfg.layers is None else cfg.layers
    layers = sorted(set(check_layers(layers, n_layers)))
    limit = model_max_length(SimpleNamespace(config=config))
    if limit is not None and cfg.context_length > limit:
        raise WiremapError(
            f"context length {cfg.context_length} is beyond model {cfg.model!r}'s maximum of "
            f"{limit} positions; pass --context-length {limit} or less"
        )
    return layers


def _header(cfg: CacheConfig, config, layers: list[int]) -> dict:
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
        "batch_size": int(cfg.batch_size),
        "tokens_per_shard": int(cfg.shard_tokens),
        "exclude_bos": bool(cfg.exclude_bos),
        "n_tokens_requested": int(cfg.n_tokens),
        "dataset": cfg.text_spec().describe(),
        "wiremap_version": __version__,
    }


# -- files ---------------------------------------------------------------------------------


def _dump_manifest(out: Path, manifest: dict) -> None:
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
    return manifest


@contextmanager
def _locked(out: Path) -> Iterator[None]:
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


# -- resuming ------------------------------------------------------------------------------


def _existing(out: Path, header: dict) -> dict | None:
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


def _whole(out: Path, manifest: dict) -> bool:
    return len(_intact_shards(out, manifest["shards"], quiet=True)) == len(manifest["shards"])


def _intact_shards(out: Path, entries: list[dict], quiet: bool = False) -> list[dict]:
    """The listed shards up to the first one missing or of the wrong size."""
    for i, entry in enumerate(entries):
        path = out / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            if not quiet:
                warn(f"{path} is missing or damaged; recomputing from shard {i}")
            return entries[:i]
    return entries


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


def _manifest(base: dict, entries: list[dict], complete: bool) -> dict:
    manifest = dict(base)
    manifest.update(
        shards=entries,
        n_tokens=sum(e["n_tokens"] for e in entries),
        norm_stats=norm_stats(entries, len(base["layers"])),
        complete=complete,
    )
    return manifest


class _TokenCheck:
    """On resume, check that the text still yields the tokens stored in the last shard."""

    def __init__(self, out: Path, entries: list[dict], first_pos: int):
        self.first_pos = first_pos
        self.end = sum(e["n_tokens"] for e in entries)
        self.start = self.end - (entries[-1]["n_tokens"] if entries else 0)
        self.stored = _load_tokens(out / entries[-1]["file"]) if entries else None
        self.checked = self.start

    def feed(self, first_row: int, ids: Tensor) -> None:
        if self.stored is None or self.checked >= self.end:
            return
        rows = ids[:, self.first_pos :].reshape(-1)
        lo, hi = max(self.start, first_row), min(self.end, first_row + len(rows))
        if lo >= hi:
            return
        ours = rows[lo - first_row : hi - first_row]
        if not torch.equal(ours, self.stored[lo - self.start : hi - self.start]):
            raise WiremapError(
                "the text no longer gives the tokens already cached (the dataset or tokenizer "
                "changed since this cache was started); choose another --out to start afresh"
            )
        self.checked = hi

    def finish(self) -> None:
        if self.stored is not None and self.checked < self.end:
            raise WiremapError(
                "the text is shorter than the part already cached (the dataset changed since "
                "this cache was started); choose another --out to start afresh"
            )


def _load_tokens(path: Path) -> Tensor:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor("tokens")


# -- writing -------------------------------------------------------------------------------


@dataclass
class _Batch:
    acts: dict[str, dict[int, Tensor]]  # hook -> layer -> [batch, seq, d]
    ids: Tensor  # [batch, seq] on CPU
    lo: int  # keep rows lo:hi of the batch (context-major, BOS dropped if excluded)
    hi: int


def activation_rows(per_layer: dict[int, Tensor], plan: Plan) -> Tensor:
    """`[batch * rows_per_context, L, d]` in the storage dtype, on CPU."""
    first = per_layer[plan.layers[0]]
    batch, seq, d = first.shape
    out = torch.empty(
        batch, seq - plan.first_pos, len(plan.layers), d, dtype=plan.dtype, device=first.device
    )
    for i, layer in enumerate(plan.layers):  # one strided copy per layer, converting dtype
        out[:, :, i].copy_(per_layer[layer][:, plan.first_pos :])
    return out.view(-1, len(plan.layers), d).cpu()


def shard_sums(tensors: dict[str, Tensor], plan: Plan) -> dict:
    """Per-layer sums of row norms and squared norms of `tensors` (for `norm_stats`)."""
    sums = {}
    for side, hook in zip(("input", "output"), plan.hooks, strict=True):
        norms = torch.linalg.vector_norm(tensors[hook], dim=-1, dtype=torch.float32).double()
        sums[side] = {"norm": norms.sum(0).tolist(), "sq_norm": norms.square().sum(0).tolist()}
    return sums


class _ShardWriter:
    """Turns batches into shards and commits them, in a background thread.

    The thread converts activations to the storage dtype, serialises, hashes and writes,
    while the main thread runs the next forward pass.
    """

    def __init__(self, out: Path, base: dict, entries: list[dict], plan: Plan):
        self.out, self.base, self.entries, self.plan = out, base, list(entries), plan
        self.pending: dict[str, list[Tensor]] = {}
        self.fill = 0
        self.error: BaseException | None = None
        self.stopping = False
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.thread = threading.Thread(target=self._loop, name="wiremap-cache-writer", daemon=True)
        self.thread.start()

    # main-thread side
    def submit(self, batch: _Batch) -> None:
        while True:
            self._raise_if_failed()
            try:
                self.queue.put(batch, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> dict:
        """Write the last partial shard and the final manifest; return the manifest."""
        self.submit(None)
        self.thread.join()
        self._raise_if_failed()
        manifest = _manifest(self.base, self.entries, complete=True)
        _dump_manifest(self.out, manifest)
        return manifest

    def abort(self) -> None:
        self.stopping = True
        self.thread.join(timeout=60)

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    # writer-thread side
    def _loop(self) -> None:
        try:
            while not self.stopping:
                try:
                    batch = self.queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                if batch is None:
                    if self.fill:
                        self._commit()
                    return
                self._add(batch)
        except BaseException as err:  # handed to the main thread by submit/close
            self.error = err

    def _add(self, batch: _Batch) -> None:
        chunk = {
            h: activation_rows(batch.acts[h], self.plan)[batch.lo : batch.hi]
            for h in self.plan.hooks
        }
        ids = batch.ids[:, self.plan.first_pos :]
        positions = torch.arange(self.plan.first_pos, batch.ids.shape[1]).expand_as(ids)
        chunk["tokens"] = ids.reshape(-1)[batch.lo : batch.hi]
        chunk["positions"] = positions.reshape(-1)[batch.lo : batch.hi]
        while len(chunk["tokens"]):
            take = min(len(chunk["tokens"]), self.plan.tokens_per_shard - self.fill)
            for key, value in chunk.items():
                self.pending.setdefault(key, []).append(value[:take])
            chunk = {key: value[take:] for key, value in chunk.items()}
            self.fill += take
            if self.fill == self.plan.tokens_per_shard:
                self._commit()

    def _commit(self) -> None:
        from safetensors.torch import save

        tensors = {key: torch.cat(parts).contiguous() for key, parts in self.pending.items()}
        data = save(tensors)
        name = f"shard_{len(self.entries):05d}.safetensors"
        atomic_write(self.out / name, data)
        self.entries.append(
            {
                "file": name,
                "n_tokens": self.fill,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "sums": shard_sums(tensors, self.plan),
            }
        )
        # The shard is part of the cache from this write on, not before.
        _dump_manifest(self.out, _manifest(self.base, self.entries, complete=False))
        self.pending, self.fill = {}, 0


# -- running -------------------------------------------------------------------------------


def _forward(model, ids: Tensor) -> None:
    with stoppable():  # `stop_after` ends the pass after the last cached layer
        model(input_ids=ids, use_cache=False)


def _batches(contexts, batch_size: int) -> Iterator[Tensor]:
    while batch := list(islice(contexts, batch_size)):
        yield torch.tensor(batch, dtype=torch.long)


def _contexts(cfg: CacheConfig, tokenizer, plan: Plan, bos: int, eos: int):
    """The packed contexts, after checking there is at least one."""
    docs = tokenize(iter_texts(cfg.text_spec()), tokenizer)
    contexts = islice(pack_contexts(docs, cfg.context_length, bos, eos), plan.n_contexts)
    first = next(contexts, None)
    if first is None:
        raise WiremapError(
            f"dataset {cfg.dataset!r} holds no text, or fewer than {cfg.context_length} tokens "
            "(one context); give a dataset with text, or lower --context-length"
        )
    return chain([first], contexts)


def _progress(plan: Plan, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=plan.n_rows,
        initial=start,
        unit="tok",
        unit_scale=True,
        desc="caching",
        disable=not enabled,
        dynamic_ncols=True,
    )


@contextmanager
def capturing(model, plan: Plan) -> Iterator[Callable[[Tensor], dict[str, dict[int, Tensor]]]]:
    """`run(ids)` does one no-grad forward pass over contexts `ids` [n, C], stopped after the
    last layer of `plan`, and returns `{hook: {layer: [n, C, d]}}` (model dtype and device).

    The cache and the activation stream (`stream.py`) both capture through this.
    """
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    with (
        torch.no_grad(),
        capture(model, plan.hooks, plan.layers, adapter) as store,
        stop_after(adapter.layer(model, plan.layers[-1])),
    ):

        def run(ids: Tensor) -> dict[str, dict[int, Tensor]]:
            _forward(model, ids.to(device))
            return {h: dict(store[h]) for h in plan.hooks}

        yield run


def _run(model, contexts, writer: _ShardWriter, check: _TokenCheck, plan: Plan, bar) -> None:
    start = check.end
    with capturing(model, plan) as run:
        for b, ids in enumerate(_batches(contexts, plan.batch_size)):
            first = b * plan.rows_per_batch
            n_rows = len(ids) * plan.rows_per_context
            check.feed(first, ids)
            if first + n_rows <= start:  # done in an earlier run
                continue
            acts = run(ids)
            lo, hi = max(start - first, 0), min(plan.n_rows - first, n_rows)
            writer.submit(_Batch(acts, ids, lo, hi))
            bar.update(hi - lo)
    check.finish()


def build_cache(cfg: CacheConfig, model=None, tokenizer=None, progress: bool = True) -> Path:
    """Cache `cfg`'s activations in `cfg.out`, resuming an interrupted run; return the folder.

    `model` and `tokenizer` may be passed in already loaded (they must be `cfg.model`).
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise WiremapError(f"--out {out} is a file; give a folder for the cache")
    config = model_config(cfg, model)
    layers = check_model(cfg, config)
    header = _header(cfg, config, layers)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        manifest = _existing(out, header)
        if manifest is not None and manifest["complete"] and _whole(out, manifest):
            warn(f"{out} already holds this cache, complete ({manifest['n_tokens']} tokens)")
            return out
        plan = make_plan(cfg, layers)
        with _oom_guard(cfg, plan, header["d_model"]):
            if model is None or tokenizer is None:
                model, tokenizer = load_model(cfg.model, cfg.model_dtype, cfg.device, cfg.revision)
            bos, eos = boundary_tokens(tokenizer)
            contexts = _contexts(cfg, tokenizer, plan, bos, eos)
            if manifest is None:
                manifest = _manifest(dict(header, bos_token_id=bos, eos_token_id=eos), [], False)
                _dump_manifest(out, manifest)  # claims the folder before any shard exists
            _write(out, manifest, model, contexts, plan, progress)
    return out


def _oom_guard(cfg: CacheConfig, plan: Plan, d_model: int):
    """Out of memory while loading or running the model: the batch's figures and the flags."""
    captured = plan.rows_per_batch * len(plan.layers) * d_model * 2 * 4  # two hooks, float32
    figures = (
        f"model {cfg.model} in {cfg.model_dtype} on {cfg.device}; a batch of {plan.batch_size} "
        f"contexts x {cfg.context_length} tokens captures {captured / 1e6:,.0f} MB"
    )
    fix = (
        f"lower --batch-size (now {plan.batch_size}) or --context-length, pick fewer --layers, "
        "run the model in --model-dtype bfloat16, or free memory; rerun the same command "
        "(it resumes)"
    )
    return oom_to_error("caching", figures, fix)


def _write(out: Path, manifest: dict, model, contexts, plan: Plan, progress: bool) -> None:
    remove_leftovers(out)  # temporary files of a killed run, never listed anywhere
    base = {k: v for k, v in manifest.items() if k not in PROGRESS}
    entries = _intact_shards(out, manifest["shards"])
    if entries:
        warn(f"resuming {out} after {sum(e['n_tokens'] for e in entries)} tokens")
    writer = _ShardWriter(out, base, entries, plan)
    check = _TokenCheck(out, entries, plan.first_pos)
    with _progress(plan, check.end, progress) as bar:
        try:
            _run(model, contexts, writer, check, plan, bar)
        except BaseException:
            writer.abort()
            raise
    final = writer.close()
    if final["n_tokens"] < plan.n_rows:
        warn(f"the dataset ran out after {final['n_tokens']} of {plan.n_rows} tokens")


# -- reading -------------------------------------------------------------------------------


class ActivationCache:
    """Read a cache written by `build_cache`: memory-mapped shards, random access by row.

    cache = ActivationCache("wiremap_out/cache", verify=True)
    x, y = cache.get(slice(0, 512))         # [512, L, d] input and output activations
    cache.tokens([3, 7]), cache.norm_stats["input"]["mean_norm"]
    """

    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete"):
            raise WiremapError(
                f"the cache in {self.path} is incomplete ({self.manifest['n_tokens']} of "
                f"{self.manifest['n_tokens_requested']} tokens); rerun the same `wiremap cache` "
                "command to finish it"
            )
        sizes = torch.tensor([e["n_tokens"] for e in self.manifest["shards"]], dtype=torch.long)
        self._ends = sizes.cumsum(0)
        self._open: dict[int, dict[str, Tensor]] = {}
        self._ahead: threading.Thread | None = None  # hashes the next shard while this one is used
        self._check_sizes()
        if verify:
            self.verify()

    # -- description
    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def n_layers(self) -> int:
        return len(self.manifest["layers"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def input_hook(self) -> str:
        return self.manifest["hooks"]["input"]

    @property
    def output_hook(self) -> str:
        return self.manifest["hooks"]["output"]

    @property
    def dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.manifest["dtype"]]

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def norm_stats(self) -> dict:
        return self.manifest["norm_stats"]

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"ActivationCache({str(self.path)!r}, model={m['model']!r}, n_tokens={self.n_tokens}, "
            f"layers={self.layers}, d_model={self.d_model}, dtype={m['dtype']})"
        )

    def __getstate__(self) -> dict:  # data-loader workers reopen the memory maps themselves
        return {**self.__dict__, "_open": {}, "_ahead": None}

    # -- checks
    def _check_sizes(self) -> None:
        for entry in self.manifest["shards"]:
            path = self.path / entry["file"]
            if not path.is_file():
                raise WiremapError(
                    f"shard {path} is missing; rebuild the cache with `wiremap cache`"
                )
            if path.stat().st_size != entry["bytes"]:
                raise WiremapError(
                    f"shard {path} has {path.stat().st_size} bytes, the manifest says "
                    f"{entry['bytes']}: it is truncated or damaged; delete the folder and "
                    "rebuild the cache"
                )

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest; WiremapError names the bad ones."""
        bad = [
            e["file"]
            for e in self.manifest["shards"]
            if sha256_file(self.path / e["file"]) != e["sha256"]
        ]
        if bad:
            raise WiremapError(
                f"checksum mismatch in {', '.join(bad)} of {self.path}: the files are corrupt; "
                "delete the folder and rebuild the cache"
            )

    def check_matches(self, **expected) -> None:
        """Raise WiremapError unless the manifest has these values (e.g. `model=`, `layers=`)."""
        wrong = {k: v for k, v in expected.items() if _manifest_value(self.manifest, k) != v}
        if wrong:
            detail = "; ".join(
                f"{k}: {_manifest_value(self.manifest, k)!r} in the cache, {v!r} asked"
                for k, v in wrong.items()
            )
            raise WiremapError(
                f"the cache in {self.path} does not match what is asked ({detail}); point at the "
                "right cache or build one with these settings"
            )

    # -- data
    def shard(self, i: int) -> dict[str, Tensor]:
        """Shard `i`'s tensors, memory-mapped (nothing is read until used)."""
        if i not in self._open:
            self._open[i] = self._load_shard(i)
            self._hash_ahead(i + 1)
        return self._open[i]

    def _hash_ahead(self, i: int) -> None:
        """Hash shard `i` in the background (hashlib releases the GIL), so that reads walking
        forwards find its checksum ready; a failure here is left for the real open to report."""
        if i >= self.n_shards or (self._ahead is not None and self._ahead.is_alive()):
            return
        path = self.path / self.manifest["shards"][i]["file"]
        self._ahead = threading.Thread(target=_quietly, args=(sha256_once, path), daemon=True)
        self._ahead.start()

    def _load_shard(self, i: int) -> dict[str, Tensor]:
        from safetensors import safe_open

        entry = self.manifest["shards"][i]
        path = self.path / entry["file"]
        self._check_sha256(path, entry["sha256"])
        try:
            with safe_open(str(path), "pt") as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        except Exception as err:  # safetensors' own errors: header or size is damaged
            raise WiremapError(
                f"shard {path} cannot be read ({err}); it is corrupt: delete the folder and "
                "rebuild the cache"
            ) from err
        self._check_shard(path, tensors, entry["n_tokens"])
        return tensors

    def _check_sha256(self, path: Path, want: str) -> None:
        """Once per shard and process, when it is first opened (a full read at disk speed)."""
        if sha256_once(path) != want:
            raise WiremapError(
                f"shard {path} is corrupt: its sha256 differs from the one in {MANIFEST}. "
                f"Delete {path.name} and rerun the same `wiremap cache` command: it resumes "
                "and recomputes that shard and the ones after it"
            )

    def _check_shard(self, path: Path, tensors: dict[str, Tensor], n: int) -> None:
        shape = (n, self.n_layers, self.d_model)
        expect = {
            self.input_hook: (shape, self.dtype),
            self.output_hook: (shape, self.dtype),
            "tokens": ((n,), torch.long),
            "positions": ((n,), torch.long),
        }
        for key, (want_shape, want_dtype) in expect.items():
            got = tensors.get(key)
            if got is None or tuple(got.shape) != want_shape or got.dtype != want_dtype:
                found = None if got is None else (tuple(got.shape), got.dtype)
                raise WiremapError(
                    f"shard {path} does not match the manifest ({key}: expected "
                    f"{want_shape} {want_dtype}, found {found}); rebuild the cache"
                )

    def _index(self, indices) -> tuple[Tensor, bool]:
        if isinstance(indices, int):
            idx = torch.tensor([indices + self.n_tokens if indices < 0 else indices])
            single = True
        elif isinstance(indices, slice):
            idx, single = torch.arange(*indices.indices(self.n_tokens)), False
        else:
            idx, single = torch.as_tensor(indices, dtype=torch.long).reshape(-1), False
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.n_tokens):
            raise IndexError(f"row index out of range for a cache of {self.n_tokens} tokens")
        return idx, single

    def _gather(self, key: str, indices) -> Tensor:
        idx, single = self._index(indices)
        shard_of = torch.searchsorted(self._ends, idx, right=True)
        sample = self.shard(0)[key]
        out = torch.empty((len(idx), *sample.shape[1:]), dtype=sample.dtype)
        for s in shard_of.unique().tolist():
            mask = shard_of == s
            start = int(self._ends[s - 1]) if s else 0
            out[mask] = self.shard(s)[key][idx[mask] - start]
        return out[0] if single else out

    def get(self, indices) -> tuple[Tensor, Tensor]:
        """`(x, y)`: input and output activations `[n, L, d]` (or `[L, d]` for an int)."""
        return self._gather(self.input_hook, indices), self._gather(self.output_hook, indices)

    def tokens(self, indices) -> Tensor:
        return self._gather("tokens", indices)

    def positions(self, indices) -> Tensor:
        return self._gather("positions", indices)


def _quietly(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass


def _manifest_value(manifest: dict, key: str):
    if key in ("input_hook", "output_hook"):
        return manifest["hooks"][key.split("_")[0]]
    return manifest.get(key)
