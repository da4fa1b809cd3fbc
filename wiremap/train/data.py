"""Shuffled (x, y) batches from an activation cache or streamed from the model, for Lightning.

    dm = ActivationDataModule(CacheConfig(model="gpt2", dataset="...", out="cache/gpt2"),
                              batch_tokens=4096, buffer_size=262144, val_fraction=0.01)
    trainer.fit(module, datamodule=dm)       # batches: x, y [B / world_size, L, d]
    dm = ActivationDataModule(cfg, source="stream", buffer_size=65536)   # no cache on disk

Two sources, one interface (`n_layers`, `d_model`, `cache_info`, `heldout_contexts`,
`lm_source`, `include_bos`, `state_dict`): `source="cache"` reads `wiremap cache`'s shards;
`source="stream"` runs the model on the text while training (`stream.py`, which also
documents the stream order: a cache read with `order="stream"` gives the same batches).

Window order (the cache's default). The last `val_fraction` of the cache's rows (whole
held-out contexts, since rows are in corpus order) form the validation split. The training
rows are cut into chunks of `chunk_rows` consecutive rows; every epoch permutes the chunks
(seeded), lays them end to end and shuffles each window of `buffer_size` rows (seeded): a
shuffle across shards through a buffer, computed on row indices only, so no buffer of
activations is ever materialised and the whole order is a pure function of (seed, batch
index).

`batch_tokens` is the GLOBAL batch: every process computes the same global batch of row ids
and reads only its slice (`batch_tokens / world_size` rows), so a DDP run sees exactly the
rows of the one-process run with the same `batch_tokens` (a streamed run instead gives each
process its own documents, in batches of `batch_tokens / world_size` rows). The stream is
endless (epochs run back to back); stop training with `trainer.max_steps`. Worker
processes split the batches round-robin and each opens the memory-mapped shards itself.

Resuming: the module counts the training batches it hands out (`state_dict`), Lightning
stores that in the checkpoint, and a resumed run starts the stream at that batch (a
streamed run also stores each process's `stream.Cursor`).

Missing cache: with `build_missing=False` (default) a missing or incomplete cache raises a
WiremapError telling you to run `wiremap cache --config <preset>`; with `build_missing=True`
a single-process run builds it first (resumable) and a multi-process run still raises,
because several processes must not write the same cache.

Old names, accepted for this version with a DeprecationWarning: `batch_size` (now
`batch_tokens`) and the `exclude_bos` property (now `include_bos`).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wiremap.cache import ActivationCache, CacheConfig, build_cache
from wiremap.errors import WiremapError, deprecated
from wiremap.train.stream import (
    ActivationStream,
    Cursor,
    StreamTrain,
    StreamVal,
    round_up,
    window_permutation,
)


class BatchPlan:
    """Row ids of global batch `i` of the endless shuffled stream over rows `[0, n_rows)`."""

    def __init__(
        self, n_rows: int, batch_tokens: int, buffer_size: int, chunk_rows: int, seed: int
    ) -> None:
        if n_rows < batch_tokens:
            raise WiremapError(
                f"the training split has {n_rows} rows, fewer than one batch ({batch_tokens}); "
                "cache more tokens or lower data.batch_tokens"
            )
        self.n_rows, self.batch_tokens, self.seed = n_rows, batch_tokens, seed
        # A window holds whole batches, so no batch straddles two windows.
        self.buffer_size = max(batch_tokens, buffer_size // batch_tokens * batch_tokens)
        self.chunk_starts = np.arange(0, n_rows, max(1, chunk_rows), dtype=np.int64)
        self.chunk_lens = np.minimum(chunk_rows, n_rows - self.chunk_starts)
        self.batches_per_epoch = n_rows // batch_tokens
        self._window_key: tuple[int, int] | None = None
        self._window: np.ndarray | None = None

    def rows(self, i: int) -> np.ndarray:
        """Global batch `i` as an int64 array of `batch_tokens` row ids."""
        epoch, b = divmod(i, self.batches_per_epoch)
        window, offset = divmod(b * self.batch_tokens, self.buffer_size)
        ids = self._window_ids(epoch, window)
        return ids[offset : offset + self.batch_tokens]

    def _window_ids(self, epoch: int, window: int) -> np.ndarray:
        if self._window_key != (epoch, window):
            self._window = self._build_window(epoch, window)
            self._window_key = (epoch, window)
        return self._window

    def _build_window(self, epoch: int, window: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunk_starts))
        starts, lens = self.chunk_starts[order], self.chunk_lens[order]
        ends = np.cumsum(lens)  # end of each chunk in the epoch's virtual row sequence
        lo = window * self.buffer_size
        hi = min(lo + self.buffer_size, self.n_rows)
        first, last = np.searchsorted(ends, [lo, hi - 1], side="right")
        pieces = []
        for c in range(first, last + 1):
            begin = ends[c] - lens[c]  # virtual position of the chunk's first row
            a, b = max(lo, begin), min(hi, ends[c])
            pieces.append(np.arange(starts[c] + a - begin, starts[c] + b - begin))
        ids = np.concatenate(pieces)
        return ids[window_permutation(self.seed, epoch, window, len(ids))]


def rank_slice(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This process's share of a global batch, sorted so reads walk the shards forwards."""
    return np.sort(np.array_split(rows, world_size)[rank])


class _TrainStream(IterableDataset):
    """Endless (x, y) batches for one process, from global batch `start` on."""

    def __init__(
        self, path: str, plan: BatchPlan, rank: int, world_size: int, start: int, offset: int = 0
    ) -> None:
        self.path, self.plan, self.rank, self.world_size = path, plan, rank, world_size
        self.start, self.offset = start, offset  # plan row r is cache row offset + r

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        cache = ActivationCache(self.path)  # opened here: one memory map per worker
        for i in itertools.count(self.start + worker, n_workers):
            rows = rank_slice(self.plan.rows(i), self.rank, self.world_size)
            yield cache.get(torch.from_numpy(rows + self.offset))


class _ValSet(IterableDataset):
    """The held-out rows `[lo, hi)` in order, in global batches split across processes."""

    def __init__(self, path: str, lo: int, hi: int, batch_tokens: int, rank: int, world_size: int):
        self.path, self.lo, self.hi, self.batch_tokens = path, lo, hi, batch_tokens
        self.rank, self.world_size = rank, world_size

    def batches(self) -> list[np.ndarray]:
        n = self.hi - self.lo
        size = min(self.batch_tokens, n)
        starts = range(self.lo, self.lo + n // size * size, size)
        return [rank_slice(np.arange(s, s + size), self.rank, self.world_size) for s in starts]

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        cache = ActivationCache(self.path)
        for rows in self.batches()[worker::n_workers]:
            yield cache.get(torch.from_numpy(rows))


class ActivationDataModule(L.LightningDataModule):
    """Training and validation batches from an activation cache, or streamed from the model."""

    def __init__(
        self,
        cache: CacheConfig,
        batch_tokens: int = 4096,
        buffer_size: int = 262144,
        chunk_rows: int = 128,
        val_fraction: float = 0.01,
        num_workers: int = 0,
        seed: int = 0,
        build_missing: bool = False,
        pin_memory: bool = True,
        source: Literal["cache", "stream"] = "cache",
        order: Literal["window", "stream"] | None = None,
        val_contexts: int = 64,
        norm_tokens: int = 16384,
        batch_size: int | None = None,
    ) -> None:
        """
        Args:
            cache: How the cache is (or was) built; `cache.out` is the folder read here.
                The same section drives `wiremap cache --config <preset>`, and names the
                model and text a streamed run reads.
            batch_tokens: Activation rows (tokens) per optimiser step summed over all
                processes (global batch).
            buffer_size: Rows shuffled together (rounded down to a multiple of batch_tokens);
                a streamed run holds this many rows in memory (per process).
            chunk_rows: Window order: consecutive rows kept together before the window shuffle.
            val_fraction: Window order: share of rows (the last ones) held out for validation.
            num_workers: DataLoader worker processes (each memory-maps the shards); a
                streamed run runs the model in the main process and needs 0.
            seed: Seed of the shuffle (independent of the model seed).
            build_missing: Build a missing or incomplete cache first (single process only).
            pin_memory: Pin host memory of batches when training on a GPU.
            source: `cache`: read activations written by `wiremap cache`; `stream`: run the
                model on the text while training, nothing written to disk (`stream.py`).
            order: `window` (cache default): chunks of the whole cache shuffled each epoch;
                `stream` (the only order of a streamed run): rows in text order through a
                shuffle buffer, validation on the first contexts (see `stream.py`).
            val_contexts: Stream order: contexts at the start of the text held out for
                validation (rounded up to whole forward batches of `cache.batch_contexts`).
            norm_tokens: Streamed run: rows at the start of the text the per-layer norm
                statistics are estimated from.
            batch_size: Deprecated: the old name of `batch_tokens`.
        """
        super().__init__()
        if batch_size is not None:
            deprecated("data.batch_size", "data.batch_tokens")
            batch_tokens = batch_size
        if batch_tokens <= 0 or not 0.0 <= val_fraction < 1.0 or num_workers < 0:
            raise WiremapError(
                "data: need batch_tokens > 0, 0 <= val_fraction < 1 and num_workers >= 0"
            )
        order = order or ("stream" if source == "stream" else "window")
        if source == "stream" and (order != "stream" or num_workers):
            raise WiremapError(
                "data.source: stream reads in stream order with the model in the main process; "
                "leave data.order unset (or `stream`) and set data.num_workers: 0"
            )
        self.cache_config = cache
        self.batch_tokens, self.buffer_size, self.chunk_rows = batch_tokens, buffer_size, chunk_rows
        self.val_fraction, self.num_workers, self.seed = val_fraction, num_workers, seed
        self.build_missing, self.pin_memory = build_missing, pin_memory
        self.source, self.order = source, order
        self.val_contexts, self.norm_tokens = val_contexts, norm_tokens
        self.batches_consumed = 0
        self.rank, self.world_size = 0, 1
        self.cursors: dict[int, Cursor] = {}  # streamed run: window starts seen, by batch
        self.resume_cursors: list[Cursor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the datamodule: drop the open memory maps, reopen after.
        state = dict(self.__dict__)
        state.pop("cache", None)
        return state

    # -- the cache ----------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return Path(self.cache_config.out)

    @cached_property
    def cache(self) -> ActivationCache:
        """The opened cache, built first if allowed; checked against `cache_config`."""
        if self.source == "stream":
            raise WiremapError(
                "data.source is stream: this run reads no activation cache (use "
                "datamodule.heldout_contexts / lm_source for what the cache would tell)"
            )
        if not _is_complete(self.path):
            self._build_or_raise()
        cache = ActivationCache(self.path)
        check_cache_matches(cache, self.cache_config)
        return cache

    @cached_property
    def stream(self) -> ActivationStream:
        """The model, text and stream order of a streamed run (`source: stream`)."""
        if self.source != "stream":
            raise WiremapError("data.stream is only there for data.source: stream")
        cfg = self.cache_config
        return ActivationStream(cfg, self.val_contexts, self.seed, self.norm_tokens)

    def _build_or_raise(self) -> None:
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if not self.build_missing or multi:
            raise WiremapError(
                f"no complete activation cache at {str(self.path)!r}; build it first with "
                "`wiremap cache --config <your preset>.yaml` (same preset as `wiremap train`)"
                + ("" if multi else ", or set data.build_missing: true")
                + " — or stream the activations instead (data.source: stream)"
            )
        build_cache(self.cache_config)

    @property
    def streaming(self) -> bool:
        return self.source == "stream"

    @property
    def n_layers(self) -> int:
        return len(self.stream.layers) if self.streaming else self.cache.n_layers

    @property
    def d_model(self) -> int:
        return self.stream.d_model if self.streaming else self.cache.d_model

    @property
    def cache_info(self) -> dict[str, Any]:
        """What the training module needs to know about the data (linked by the CLI)."""
        if self.streaming:
            cfg, stream = self.cache_config, self.stream
            return {
                "model": cfg.model, "layers": list(stream.layers), "input_hook": cfg.input_hook,
                "output_hook": cfg.output_hook, "norm_stats": stream.stats, "path": None,
                "n_tokens": None, "context_length": cfg.context_length, "source": "stream",
            }  # fmt: skip
        m = self.cache.manifest
        return {
            "model": m["model"],
            "layers": list(m["layers"]),
            "input_hook": self.cache.input_hook,
            "output_hook": self.cache.output_hook,
            "norm_stats": m.get("norm_stats"),
            "path": str(self.path),
            "n_tokens": self.cache.n_tokens,
            "context_length": m.get("context_length"),
        }

    @property
    def n_val(self) -> int:
        """Held-out rows: the last ones (window order) or the first ones (stream order)."""
        if self.streaming:
            return self.stream.n_val_rows
        if self.order == "stream":
            bos = 0 if self.include_bos else 1
            per_context = int(self.cache.manifest["context_length"]) - bos
            return min(self._cached_val_contexts * per_context, self.cache.n_tokens)
        return int(round(self.val_fraction * self.cache.n_tokens))

    @property
    def _cached_val_contexts(self) -> int:
        """Stream order on a cache: held-out contexts, rounded up to whole forward batches."""
        return round_up(max(0, self.val_contexts), int(self.cache.manifest["batch_contexts"]))

    @property
    def n_train(self) -> int:
        """Training rows of the cache (rows n_val.. in stream order, ..n_train in window)."""
        return self.cache.n_tokens - self.n_val

    # -- what the replacement check needs (both sources) -----------------------------------
    def heldout_contexts(self, n_contexts: int) -> Tensor:
        """Up to `n_contexts` token contexts `[n, context_length]` (BOS first), held out
        from training when the run holds any out."""
        from wiremap.train.callbacks import heldout_contexts

        if self.streaming:
            return self.stream.heldout_contexts(n_contexts)
        if self.order == "stream":
            contexts = self._cached_val_contexts
            return heldout_contexts(self.cache, 0, min(n_contexts, contexts or n_contexts))
        return heldout_contexts(self.cache, self.n_train, n_contexts)

    @property
    def lm_source(self) -> dict[str, Any]:
        """`model`, `model_dtype` and `revision` of the language model the data comes from."""
        if self.streaming:
            cfg = self.cache_config
            return {"model": cfg.model, "model_dtype": cfg.model_dtype, "revision": cfg.revision}
        m = self.cache.manifest
        return {
            "model": m["model"],
            "model_dtype": m.get("model_dtype", "float32"),
            "revision": m.get("revision"),
        }

    @property
    def include_bos(self) -> bool:
        """Are the BOS positions among the training rows?"""
        if self.streaming:
            return bool(self.cache_config.include_bos)
        return self.cache.include_bos

    @property
    def exclude_bos(self) -> bool:
        """Deprecated: `not include_bos`."""
        deprecated("ActivationDataModule.exclude_bos", "include_bos (its negation)")
        return not self.include_bos

    @property
    def batch_size(self) -> int:
        """Deprecated: `batch_tokens`."""
        deprecated("ActivationDataModule.batch_size", "batch_tokens")
        return self.batch_tokens

    # -- Lightning hooks ------------------------------------------------------------------
    def prepare_data(self) -> None:
        if not self.streaming:
            self.cache  # noqa: B018  (opens/builds and validates on rank 0 before setup)

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        if self.batch_tokens % self.world_size:
            raise WiremapError(
                f"data.batch_tokens={self.batch_tokens} is the global batch and must divide "
                f"evenly over {self.world_size} processes"
            )
        if not self.streaming:
            self.cache  # noqa: B018
            return
        self.stream.rank, self.stream.world_size = self.rank, self.world_size
        if self.cache_config.device == "auto" and self.trainer is not None:
            self.stream.move_to(self.trainer.strategy.root_device)

    def plan(self) -> BatchPlan:
        """The cache's batch order: window order, or stream order (one chunk, no permutation)."""
        chunk_rows = self.n_train if self.order == "stream" else self.chunk_rows
        return BatchPlan(self.n_train, self.batch_tokens, self.buffer_size, chunk_rows, self.seed)

    def train_dataloader(self) -> DataLoader:
        if self.streaming:
            return self._loader(self._stream_train())
        offset = self.n_val if self.order == "stream" else 0
        stream = _TrainStream(
            str(self.path), self.plan(), self.rank, self.world_size, self.batches_consumed, offset
        )
        return self._loader(stream)

    def _stream_train(self) -> StreamTrain:
        local = self.batch_tokens // self.world_size
        window = max(local, self.buffer_size // local * local)
        return StreamTrain(
            self.stream, self._start_cursor(), self.batches_consumed, local, window, self._record
        )

    def _start_cursor(self) -> Cursor:
        if self.resume_cursors is None:
            return self.stream.first_cursor()
        return self.resume_cursors[self.rank]

    def _record(self, cursor: Cursor) -> None:
        self.cursors[cursor.batch] = cursor
        for old in sorted(self.cursors)[:-4]:  # the loop prefetches a batch or two at most
            del self.cursors[old]

    def _cursor_now(self) -> Cursor:
        """The cursor of the last window started at or before the next batch to train on."""
        seen = [b for b in self.cursors if b <= self.batches_consumed]
        if seen:
            return self.cursors[max(seen)]
        return self._start_cursor()

    def val_dataloader(self) -> DataLoader | list:
        if self.n_val == 0:
            return []
        if self.streaming:
            val = StreamVal(self.stream, self.batch_tokens, self.rank, self.world_size)
            return self._loader(val)
        lo, hi = (0, self.n_val) if self.order == "stream" else (self.n_train, self.cache.n_tokens)
        val = _ValSet(str(self.path), lo, hi, self.batch_tokens, self.rank, self.world_size)
        return self._loader(val, workers=min(self.num_workers, len(val)))

    def _loader(self, dataset: IterableDataset, workers: int | None = None) -> DataLoader:
        workers = self.num_workers if workers is None else workers
        pin = self.pin_memory and torch.cuda.is_available()
        return DataLoader(
            dataset,
            batch_size=None,  # the datasets yield whole batches
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[Tensor, Tensor]:
        # Count here (main process, once per batch the loop consumes) so that the count is
        # exact whatever the workers prefetch; checkpoints store it.
        if self.trainer is None or self.trainer.training:
            self.batches_consumed += 1
        x, y = batch
        return x.float(), y.float()

    def state_dict(self) -> dict[str, Any]:
        state = {
            "batches_consumed": self.batches_consumed,
            "batch_tokens": self.batch_tokens,
            "seed": self.seed,
            "source": self.source,
            "order": self.order,
        }
        if self.streaming:
            state["cursors"] = _gather(asdict(self._cursor_now()), self.world_size)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        batch_tokens = state.get("batch_tokens", state.get("batch_size"))  # older checkpoints
        if (batch_tokens, state["seed"]) != (self.batch_tokens, self.seed):
            raise WiremapError(
                f"this checkpoint was trained with data.batch_tokens={batch_tokens} and "
                f"data.seed={state['seed']}; resume with the same values to continue the same "
                "data order (or start a new run without --ckpt_path)"
            )
        source, order = state.get("source", "cache"), state.get("order", "window")
        if (source, order) != (self.source, self.order):
            raise WiremapError(
                f"this checkpoint read data.source={source} in {order} order; resume with the "
                "same data.source and data.order (or start a new run without --ckpt_path)"
            )
        self.batches_consumed = int(state["batches_consumed"])
        if self.streaming:
            self.resume_cursors = self._cursors_from(state["cursors"])

    def _cursors_from(self, saved: list[dict[str, int]]) -> list[Cursor]:
        if len(saved) != self.world_size:
            raise WiremapError(
                f"this streamed checkpoint was trained by {len(saved)} processes, this run has "
                f"{self.world_size}; each process reads its own slice of the text, so resume "
                "with the same number of processes"
            )
        return [Cursor(**c) for c in saved]


def _gather(item: dict[str, int], world_size: int) -> list[dict[str, int]]:
    """Every process's `item`, in rank order (checkpoints are saved on all processes at once)."""
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [item]
    items: list[Any] = [None] * world_size
    dist.all_gather_object(items, item)
    return items


def _is_complete(path: Path) -> bool:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return bool(json.loads(manifest.read_text()).get("complete", False))
    except json.JSONDecodeError:
        return False


def check_cache_matches(cache: ActivationCache, cfg: CacheConfig) -> None:
    """WiremapError when the cache on disk was built with other layers or hooks than `cfg`."""
    m = cache.manifest
    problems = []
    if cache.input_hook != cfg.input_hook or cache.output_hook != cfg.output_hook:
        problems.append(
            f"hooks {cache.input_hook}->{cache.output_hook} (config: "
            f"{cfg.input_hook}->{cfg.output_hook})"
        )
    wanted = list(range(m["n_model_layers"])) if cfg.layers is None else list(cfg.layers)
    if list(m["layers"]) != wanted:
        problems.append(f"layers {list(m['layers'])} (config: {wanted})")
    if str(m["model"]) != str(cfg.model):
        problems.append(f"model {m['model']!r} (config: {cfg.model!r})")
    if problems:
        raise WiremapError(
            f"the cache at {str(cache.path)!r} does not match data.cache: "
            + "; ".join(problems)
            + ". Point data.cache.out at a new folder and run `wiremap cache --config ...`, "
            "or fix the preset"
        )
