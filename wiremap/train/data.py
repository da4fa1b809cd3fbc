"""Shuffled (x, y) batches from an activation cache, for Lightning (single process or DDP).

    dm = ActivationDataModule(CacheConfig(model="gpt2", dataset="...", out="cache/gpt2"),
                              batch_size=4096, buffer_size=262144, val_fraction=0.01)
    trainer.fit(module, datamodule=dm)       # batches: x, y [B / world_size, L, d]

Order of rows. The last `val_fraction` of the cache's rows (whole held-out contexts, since
rows are in corpus order) form the validation split. The training rows are cut into chunks
of `chunk_rows` consecutive rows; every epoch permutes the chunks (seeded), lays them end to
end and shuffles each window of `buffer_size` rows (seeded): a shuffle across shards through
a buffer, computed on row indices only, so no buffer of activations is ever materialised
and the whole order is a pure function of (seed, batch index).

`batch_size` is the GLOBAL batch: every process computes the same global batch of row ids
and reads only its slice (`batch_size / world_size` rows), so a DDP run sees exactly the
rows of the one-process run with the same `batch_size`. The stream is endless (epochs run
back to back); stop training with `trainer.max_steps`. Worker processes split the batches
round-robin and each opens the memory-mapped shards itself.

Resuming: the module counts the training batches it hands out (`state_dict`), Lightning
stores that in the checkpoint, and a resumed run starts the stream at that batch.

Missing cache: with `build_missing=False` (default) a missing or incomplete cache raises a
WiremapError telling you to run `wiremap cache --config <preset>`; with `build_missing=True`
a single-process run builds it first (resumable) and a multi-process run still raises,
because several processes must not write the same cache.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wiremap.errors import WiremapError
from wiremap.train.cache import ActivationCache, CacheConfig, build_cache


class BatchPlan:
    """Row ids of global batch `i` of the endless shuffled stream over rows `[0, n_rows)`."""

    def __init__(
        self, n_rows: int, batch_size: int, buffer_size: int, chunk_rows: int, seed: int
    ) -> None:
        if n_rows < batch_size:
            raise WiremapError(
                f"the training split has {n_rows} rows, fewer than one batch ({batch_size}); "
                "cache more tokens or lower data.batch_size"
            )
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        # A window holds whole batches, so no batch straddles two windows.
        self.buffer_size = max(batch_size, buffer_size // batch_size * batch_size)
        self.chunk_starts = np.arange(0, n_rows, max(1, chunk_rows), dtype=np.int64)
        self.chunk_lens = np.minimum(chunk_rows, n_rows - self.chunk_starts)
        self.batches_per_epoch = n_rows // batch_size
        self._window_key: tuple[int, int] | None = None
        self._window: np.ndarray | None = None

    def rows(self, i: int) -> np.ndarray:
        """Global batch `i` as an int64 array of `batch_size` row ids."""
        epoch, b = divmod(i, self.batches_per_epoch)
        window, offset = divmod(b * self.batch_size, self.buffer_size)
        ids = self._window_ids(epoch, window)
        return ids[offset : offset + self.batch_size]

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
        return np.random.default_rng([self.seed, epoch, window, 1]).permutation(ids)


def rank_slice(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This process's share of a global batch, sorted so reads walk the shards forwards."""
    return np.sort(np.array_split(rows, world_size)[rank])


class _TrainStream(IterableDataset):
    """Endless (x, y) batches for one process, from global batch `start` on."""

    def __init__(self, path: str, plan: BatchPlan, rank: int, world_size: int, start: int):
        self.path, self.plan, self.rank, self.world_size = path, plan, rank, world_size
        self.start = start

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        cache = ActivationCache(self.path)  # opened here: one memory map per worker
        for i in itertools.count(self.start + worker, n_workers):
            rows = rank_slice(self.plan.rows(i), self.rank, self.world_size)
            yield cache.get(torch.from_numpy(rows))


class _ValSet(IterableDataset):
    """The held-out rows `[lo, hi)` in order, in global batches split across processes."""

    def __init__(self, path: str, lo: int, hi: int, batch_size: int, rank: int, world_size: int):
        self.path, self.lo, self.hi, self.batch_size = path, lo, hi, batch_size
        self.rank, self.world_size = rank, world_size

    def batches(self) -> list[np.ndarray]:
        n = self.hi - self.lo
        size = min(self.batch_size, n)
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
    """Training and validation batches from the activation cache described by `cache`."""

    def __init__(
        self,
        cache: CacheConfig,
        batch_size: int = 4096,
        buffer_size: int = 262144,
        chunk_rows: int = 128,
        val_fraction: float = 0.01,
        num_workers: int = 0,
        seed: int = 0,
        build_missing: bool = False,
        pin_memory: bool = True,
    ) -> None:
        """
        Args:
            cache: How the cache is (or was) built; `cache.out` is the folder read here.
                The same section drives `wiremap cache --config <preset>`.
            batch_size: Tokens per optimiser step summed over all processes (global batch).
            buffer_size: Rows shuffled together (rounded down to a multiple of batch_size).
            chunk_rows: Consecutive rows kept together before the window shuffle.
            val_fraction: Share of rows (the last ones) held out for validation.
            num_workers: DataLoader worker processes (each memory-maps the shards).
            seed: Seed of the shuffle (independent of the model seed).
            build_missing: Build a missing or incomplete cache first (single process only).
            pin_memory: Pin host memory of batches when training on a GPU.
        """
        super().__init__()
        if batch_size <= 0 or not 0.0 <= val_fraction < 1.0 or num_workers < 0:
            raise WiremapError(
                "data: need batch_size > 0, 0 <= val_fraction < 1 and num_workers >= 0"
            )
        self.cache_config = cache
        self.batch_size, self.buffer_size, self.chunk_rows = batch_size, buffer_size, chunk_rows
        self.val_fraction, self.num_workers, self.seed = val_fraction, num_workers, seed
        self.build_missing, self.pin_memory = build_missing, pin_memory
        self.batches_consumed = 0
        self.rank, self.world_size = 0, 1

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
        if not _is_complete(self.path):
            self._build_or_raise()
        cache = ActivationCache(self.path)
        check_cache_matches(cache, self.cache_config)
        return cache

    def _build_or_raise(self) -> None:
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if not self.build_missing or multi:
            raise WiremapError(
                f"no complete activation cache at {str(self.path)!r}; build it first with "
                "`wiremap cache --config <your preset>.yaml` (same preset as `wiremap train`)"
                + ("" if multi else ", or set data.build_missing: true")
            )
        build_cache(self.cache_config)

    @property
    def n_layers(self) -> int:
        return self.cache.n_layers

    @property
    def d_model(self) -> int:
        return self.cache.d_model

    @property
    def cache_info(self) -> dict[str, Any]:
        """What the training module needs to know about the cache (linked by the CLI)."""
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
        return int(round(self.val_fraction * self.cache.n_tokens))

    @property
    def n_train(self) -> int:
        return self.cache.n_tokens - self.n_val

    # -- Lightning hooks ------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.cache  # noqa: B018  (opens/builds and validates on rank 0 before setup)

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        if self.batch_size % self.world_size:
            raise WiremapError(
                f"data.batch_size={self.batch_size} is the global batch and must divide evenly "
                f"over {self.world_size} processes"
            )
        self.cache  # noqa: B018

    def plan(self) -> BatchPlan:
        return BatchPlan(
            self.n_train, self.batch_size, self.buffer_size, self.chunk_rows, self.seed
        )

    def train_dataloader(self) -> DataLoader:
        stream = _TrainStream(
            str(self.path), self.plan(), self.rank, self.world_size, self.batches_consumed
        )
        return self._loader(stream)

    def val_dataloader(self) -> DataLoader | list:
        if self.n_val == 0:
            return []
        val = _ValSet(
            str(self.path), self.n_train, self.cache.n_tokens, self.batch_size,
            self.rank, self.world_size,
        )  # fmt: skip
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
        return {
            "batches_consumed": self.batches_consumed,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["batch_size"], state["seed"]) != (self.batch_size, self.seed):
            raise WiremapError(
                f"this checkpoint was trained with data.batch_size={state['batch_size']} and "
                f"data.seed={state['seed']}; resume with the same values to continue the same "
                "data order (or start a new run without --ckpt_path)"
            )
        self.batches_consumed = int(state["batches_consumed"])


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
