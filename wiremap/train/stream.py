"""Activations streamed from the language model: text, contexts, LM, shuffle buffer, batches.

    dm = ActivationDataModule(CacheConfig(model="gpt2", dataset="..."), source="stream",
                              batch_tokens=4096, buffer_size=65536)
    trainer.fit(module, datamodule=dm)       # nothing is written to disk but checkpoints

The stream reads the text the cache would read (the `data.cache` section), packs it the
same way, runs the model without gradients in its own dtype, captures the hook points with
the cache's code (`cache.capturing`, `cache.activation_rows`: the same storage dtype), and
mixes rows through a bounded shuffle buffer. Nothing is written to disk. A background
thread builds the next window while the training loop draws batches from the current one
(`prefetched`), so at most two windows of `buffer_size` rows are in memory.

Stream order (shared with `ActivationDataModule(order="stream")` on a cache):

1. Held-out text. The first `val_contexts` contexts of the text (rounded up to whole forward
   batches of `cache.batch_contexts` contexts) are never trained on: they are the validation
   set, in order, and the contexts `ReplacementQuality` splices the transcoders into.
2. Training text. Packing continues right after them. Documents are dealt to processes by
   index: with `world_size` processes, process `rank` packs the documents `d` with
   `(d - k) % world_size == rank`, where `k` is the document the held-out part ends in (its
   rest counts as the first training document). No two processes see the same tokens; with
   one process the training contexts are the cache's contexts after the held-out ones.
3. Rows. Each context gives its positions (BOS left out unless `cache.include_bos`) as rows,
   contexts in order, the model run on forward batches of `cache.batch_contexts` contexts.
4. Shuffle buffer. Rows fill a window of `buffer_size` rows (rounded down to whole batches);
   the window is permuted with `window_permutation(seed, epoch, window)` and cut into
   batches (row ids sorted within a batch); then the next window fills. When the text ends,
   the partial window gives its whole batches and the text starts over (next epoch).

A cache built from the same model, text and settings holds exactly these rows, so reading
it in stream order gives the very same batches (`tests/train/test_stream.py`). Under DDP the
cache in stream order splits each global batch across processes instead (as in window order).

Resuming. At every window start the stream records a `Cursor`: the forward batch it starts
in (text position of that batch's first context, rows of it already used), the epoch and
window, and the batch count. The data module's state_dict holds each process's cursor of
the window being consumed; a resumed run recomputes only that window and skips the batches
already trained on, so it continues with exactly the batches of the uninterrupted run.

Norm statistics (per-layer mean norms, as a cache manifest holds them) are estimated at the
start from the first `norm_tokens` rows of the text, the same on every process.
"""

from __future__ import annotations

import atexit
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from itertools import islice
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from wiremap.cache.build import capturing
from wiremap.cache.config import CacheConfig, Plan, check_model, make_plan, model_config
from wiremap.cache.manifest import norm_stats
from wiremap.cache.text import (
    TextPosition,
    boundary_tokens,
    iter_texts,
    pack_positions,
    tokenize_indexed,
)
from wiremap.cache.writer import activation_rows, shard_sums
from wiremap.errors import WiremapError

Rows = tuple[Tensor, Tensor]  # x, y: [n, L, d] in the storage dtype, on CPU


def window_permutation(seed: int, epoch: int, window: int, n: int) -> np.ndarray:
    """The seeded order of the `n` rows of one shuffle window (both readers use this)."""
    return np.random.default_rng([seed, epoch, window, 1]).permutation(n)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Cursor:
    """Where one process's stream stands at the start of a shuffle window."""

    batch: int = 0  # batches this process drew before the window
    epoch: int = 0
    window: int = 0  # window index within the epoch
    doc: int = 0  # text position of the first context of the forward batch the window starts in
    offset: int = 0
    skip: int = 0  # rows of that forward batch used by earlier windows

    @property
    def position(self) -> TextPosition:
        return TextPosition(self.doc, self.offset)


class ActivationStream:
    """Text, model and stream order for one process (rank `rank` of `world_size`)."""

    def __init__(self, cfg: CacheConfig, val_contexts: int, seed: int, norm_tokens: int) -> None:
        self.cfg, self.seed, self.norm_tokens = cfg, seed, norm_tokens
        self.config = model_config(cfg)
        self.layers = check_model(cfg, self.config)
        self.plan: Plan = make_plan(cfg, self.layers)
        self.val_contexts = round_up(max(0, val_contexts), self.plan.batch_contexts)
        self.rank, self.world_size = 0, 1
        self.device: str | torch.device = lm_device(cfg.device)

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles the data module
        state = dict(self.__dict__)
        for key in ("lm", "_tokenizer", "lock"):
            state.pop(key, None)  # loaded again in the child process, on its own device
        return state

    # -- the model ------------------------------------------------------------------------
    @cached_property
    def lm(self):
        from wiremap.models.loading import load_model

        cfg = self.cfg
        model, tokenizer = load_model(cfg.model, cfg.model_dtype, self.device, cfg.revision)
        self._tokenizer = tokenizer
        return model

    @property
    def tokenizer(self):
        self.lm  # noqa: B018  (loaded with the model)
        return self._tokenizer

    @cached_property
    def boundaries(self) -> tuple[int, int]:
        return boundary_tokens(self.tokenizer)

    @cached_property
    def lock(self) -> threading.Lock:
        return threading.Lock()

    def move_to(self, device: torch.device) -> None:
        """Run the model on `device` (the process's training device, when `device: auto`)."""
        self.device = device
        if "lm" in self.__dict__:
            self.lm.to(device)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    # -- text ----------------------------------------------------------------------------
    def contexts(
        self, start: TextPosition, keep: Callable[[int], bool] = lambda d: True
    ) -> Iterator[tuple[list[int], TextPosition]]:
        """Packed contexts of the documents `d >= start.doc` that `keep(d)`, from `start` on."""
        texts = islice(enumerate(iter_texts(self.cfg.text_spec())), start.doc, None)
        docs = tokenize_indexed(((d, t) for d, t in texts if keep(d)), self.tokenizer)
        bos, eos = self.boundaries
        return pack_positions(docs, self.cfg.context_length, bos, eos, start.offset)

    @cached_property
    def train_start(self) -> TextPosition:
        """Where the training text begins: right after the held-out contexts."""
        if self.val_contexts == 0:
            return TextPosition()
        ahead = list(islice(self.contexts(TextPosition()), self.val_contexts + 1))
        if len(ahead) <= self.val_contexts:
            raise WiremapError(
                f"the text holds {len(ahead)} contexts, not more than the {self.val_contexts} "
                "held out for validation; give more text or lower data.val_contexts"
            )
        return ahead[-1][1]

    def mine(self, doc: int) -> bool:
        """Is training document `doc` this process's share of the text?"""
        return (doc - self.train_start.doc) % self.world_size == self.rank

    # -- rows ----------------------------------------------------------------------------
    def groups(
        self, contexts: Iterator[tuple[list[int], TextPosition]]
    ) -> Iterator[tuple[TextPosition, Tensor, Rows]]:
        """(position, ids [n, C], rows) per forward batch of `cache.batch_contexts` contexts."""
        while True:
            if _exiting.is_set():  # the interpreter is going: stop between forward passes
                raise SystemExit
            with self.lock:  # tokenizer and model: one thread at a time (see `prefetched`)
                batch = list(islice(contexts, self.plan.batch_contexts))
                if not batch:
                    return
                ids = torch.tensor([c for c, _ in batch], dtype=torch.long)
                rows = self.rows(ids)
            yield batch[0][1], ids, rows

    def rows(self, ids: Tensor) -> Rows:
        """Rows (x, y) of contexts `ids` [n, C], in text order and the storage dtype."""
        # Hooks and no_grad only around the forward pass: never held across a `yield`, or
        # the training step that runs in between would see them.
        with capturing(self.lm, self.plan) as run:
            acts = run(ids)
            x, y = (activation_rows(acts[h], self.plan) for h in self.plan.hooks)
        return x, y

    def heldout_rows(self) -> Iterator[Rows]:
        """Rows of the held-out contexts in order, one forward batch at a time."""
        contexts = islice(self.contexts(TextPosition()), self.val_contexts)
        for _, _, rows in self.groups(contexts):
            yield rows

    @property
    def n_val_rows(self) -> int:
        return self.val_contexts * self.plan.rows_per_context

    def heldout_contexts(self, n: int) -> Tensor:
        """Up to `n` held-out contexts [n, C] (BOS first); the first contexts of the text when
        nothing is held out."""
        limit = min(n, self.val_contexts) if self.val_contexts else n
        with self.lock:
            ids = [c for c, _ in islice(self.contexts(TextPosition()), limit)]
        if not ids:
            raise _no_context(self.cfg)
        return torch.tensor(ids, dtype=torch.long)

    @cached_property
    def stats(self) -> dict:
        """Per-layer norm statistics of the first `norm_tokens` rows of the text."""
        n_contexts = max(1, math.ceil(self.norm_tokens / self.plan.rows_per_context))
        x, y = [], []
        for _, _, (gx, gy) in self.groups(islice(self.contexts(TextPosition()), n_contexts)):
            x.append(gx)
            y.append(gy)
        if not x:
            raise _no_context(self.cfg)
        tensors = dict(zip(self.plan.hooks, (torch.cat(x), torch.cat(y)), strict=True))
        entry = {
            "n_tokens": len(tensors[self.plan.hooks[0]]),
            "sums": shard_sums(tensors, self.plan),
        }
        return norm_stats([entry], len(self.layers))

    # -- training order ------------------------------------------------------------------
    def first_cursor(self) -> Cursor:
        """Where this process's training text starts (every epoch starts there again)."""
        start = self.train_start
        if self.rank == 0:
            return Cursor(doc=start.doc, offset=start.offset)
        return Cursor(doc=start.doc + self.rank)  # the process's first document, whole

    def windows(
        self, cursor: Cursor, window_rows: int, batch: int
    ) -> Iterator[tuple[Cursor, Rows]]:
        """`(cursor, rows)` of each shuffle window with at least one batch, from `cursor` on."""
        while True:
            groups = self.groups(self.contexts(cursor.position, self.mine))
            pending: list[tuple[TextPosition, int, Rows]] = []  # forward batches in progress
            skip, epoch_batches = cursor.skip, 0
            while True:
                if not pending:  # the window starts with a new forward batch
                    group = next(groups, None)
                    if group is None:
                        break
                    pending, skip = [(group[0], skip, group[2])], 0
                pos, used, _ = pending[0]
                cursor = replace(cursor, doc=pos.doc, offset=pos.offset, skip=used)
                while _count(pending) < window_rows and (group := next(groups, None)):
                    pending.append((group[0], 0, group[2]))
                rows, pending = _take(pending, window_rows)
                n_batches = len(rows[0]) // batch
                if n_batches:
                    yield cursor, rows
                epoch_batches += n_batches
                cursor = replace(cursor, batch=cursor.batch + n_batches, window=cursor.window + 1)
                if len(rows[0]) < window_rows:  # the text ended inside this window
                    break
            if epoch_batches == 0:
                raise WiremapError(
                    f"process {self.rank} of {self.world_size} gets less than one batch of "
                    f"{batch} rows from the text; give more text, lower data.batch_tokens or use "
                    "fewer processes"
                )
            start = self.first_cursor()
            cursor = replace(start, batch=cursor.batch, epoch=cursor.epoch + 1)


def _no_context(cfg: CacheConfig) -> WiremapError:
    return WiremapError(
        f"dataset {cfg.dataset!r} holds no text, or fewer than {cfg.context_length} tokens "
        "(one context); give a dataset with text, or lower cache.context_length"
    )


def _count(pending: list[tuple[TextPosition, int, Rows]]) -> int:
    return sum(len(rows[0]) - used for _, used, rows in pending)


def _take(pending: list[tuple[TextPosition, int, Rows]], n: int) -> tuple[Rows, list]:
    """The first `n` pending rows (fewer when there are not as many), and what is left."""
    xs, ys, left = [], [], []
    for pos, used, (gx, gy) in pending:
        take = min(n, len(gx) - used)
        xs.append(gx[used : used + take])
        ys.append(gy[used : used + take])
        n -= take
        if used + take < len(gx):
            left.append((pos, used + take, (gx, gy)))
    return (torch.cat(xs), torch.cat(ys)), left


class StreamTrain(IterableDataset):
    """Endless (x, y) batches of one process's stream, from its batch `start` on.

    `record(cursor)` is called as each window starts, before its batches are handed out.
    """

    def __init__(
        self, stream: ActivationStream, cursor: Cursor, start: int, batch: int,
        window_rows: int, record: Callable[[Cursor], None],
    ) -> None:  # fmt: skip
        self.stream, self.cursor, self.start, self.batch = stream, cursor, start, batch
        self.window_rows, self.record = window_rows, record

    def __iter__(self) -> Iterator[Rows]:
        seed = self.stream.seed
        windows = self.stream.windows(self.cursor, self.window_rows, self.batch)
        for cursor, (x, y) in prefetched(windows):
            self.record(cursor)
            order = window_permutation(seed, cursor.epoch, cursor.window, len(x))
            for j in range(len(x) // self.batch):
                if cursor.batch + j < self.start:
                    continue
                rows = torch.from_numpy(np.sort(order[j * self.batch : (j + 1) * self.batch]))
                yield x[rows], y[rows]


class StreamVal(IterableDataset):
    """The held-out rows in order, in global batches split across processes (as `_ValSet`)."""

    def __init__(self, stream: ActivationStream, batch_tokens: int, rank: int, world_size: int):
        self.stream, self.rank, self.world_size = stream, rank, world_size
        self.size = min(batch_tokens, stream.n_val_rows)

    def __len__(self) -> int:
        return self.stream.n_val_rows // self.size if self.size else 0

    def __iter__(self) -> Iterator[Rows]:
        from wiremap.train.data import rank_slice

        pending: list[tuple[TextPosition, int, Rows]] = []
        left = len(self)
        for rows in self.stream.heldout_rows():
            pending.append((TextPosition(), 0, rows))
            while left and _count(pending) >= self.size:
                (x, y), pending = _take(pending, self.size)
                mine = torch.from_numpy(
                    rank_slice(np.arange(self.size), self.rank, self.world_size)
                )
                yield x[mine], y[mine]
                left -= 1


_END = object()
_running: dict[threading.Thread, threading.Event] = {}  # prefetch threads still working
_exiting = threading.Event()


@atexit.register
def _stop_prefetching() -> None:
    """Let prefetch threads finish their forward pass before the interpreter goes: one killed
    inside a torch op at exit aborts the process ("terminate called without an active
    exception"). Runs before daemon threads are killed."""
    _exiting.set()
    for thread, stop in list(_running.items()):
        stop.set()
        thread.join()


class _Failed(NamedTuple):
    error: BaseException


def prefetched(items: Iterator[Any], ahead: int = 1) -> Iterator[Any]:
    """`items`, made in a background thread at most `ahead` items beyond the one in use.

    The stream builds the next shuffle window (text, tokenizer, model forward) while the
    training loop draws batches from the current one, so at most two windows are in memory.
    Grad mode is per thread, so the forward pass's no_grad never reaches the training step;
    the model and tokenizer are used under `ActivationStream.lock` (validation runs them from
    the training thread). An error in the thread is raised here.
    """
    out: queue.Queue = queue.Queue()
    slots, stop = threading.Semaphore(ahead + 1), threading.Event()

    def slot() -> bool:
        while not slots.acquire(timeout=0.2):
            if stop.is_set():
                return False
        return not stop.is_set()

    def run() -> None:
        try:
            while slot():
                item = next(items, _END)
                out.put(item)
                if item is _END:
                    return
        except BaseException as err:  # handed to the consumer
            out.put(_Failed(err))
        finally:
            _running.pop(threading.current_thread(), None)

    thread = threading.Thread(target=run, name="wiremap-stream", daemon=True)
    _running[thread] = stop
    thread.start()
    try:
        while (item := out.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
            slots.release()  # done with this item: the thread may make another
    finally:
        stop.set()


def lm_device(device: str) -> str:
    """`auto` -> this process's GPU (`cuda:LOCAL_RANK`) when there is one, else `cpu`."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"
