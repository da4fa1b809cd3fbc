"""Writing shards: batches of captured activations become safetensors files, in a thread.

    writer = ShardWriter(out, base, entries, plan)   # `entries`: the shards already there
    writer.submit(Batch(acts, ids, lo, hi))          # from the forward-pass loop
    manifest = writer.close()                        # the last shard and the final manifest

A shard is written under a temporary name, flushed and renamed (`fileio.atomic_write`), and
only then listed in the manifest: a kill at any moment leaves at worst an unlisted file.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from wiremap.cache.config import Plan
from wiremap.cache.manifest import dump_manifest, with_shards
from wiremap.fileio import atomic_write


@dataclass
class Batch:
    """One forward batch's captured activations and the rows of it that go to shards."""

    acts: dict[str, dict[int, Tensor]]  # hook -> layer -> [batch, seq, d]
    ids: Tensor  # [batch, seq] on CPU
    lo: int  # keep rows lo:hi of the batch (context-major, BOS dropped unless included)
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


class ShardWriter:
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
    def submit(self, batch: Batch | None) -> None:
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
        manifest = with_shards(self.base, self.entries, complete=True)
        dump_manifest(self.out, manifest)
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

    def _add(self, batch: Batch) -> None:
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
        dump_manifest(self.out, with_shards(self.base, self.entries, complete=False))
        self.pending, self.fill = {}, 0
