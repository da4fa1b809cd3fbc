"""Building a cache: run a language model over text, store its MLP inputs and outputs on disk.

    from wiremap.cache import ActivationCache, CacheConfig, build_cache

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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import chain, islice
from pathlib import Path

import torch
from torch import Tensor

from wiremap.cache.config import CacheConfig, Plan, check_model, make_plan, model_config
from wiremap.cache.manifest import (
    PROGRESS,
    dump_manifest,
    existing,
    header,
    intact_shards,
    locked,
    whole,
    with_shards,
)
from wiremap.cache.text import boundary_tokens, iter_texts, pack_contexts, tokenize, warn
from wiremap.cache.writer import Batch, ShardWriter
from wiremap.errors import WiremapError, oom_to_error
from wiremap.fileio import remove_leftovers
from wiremap.models.adapters import get_adapter
from wiremap.models.hooks import capture, stop_after, stoppable
from wiremap.models.loading import load_model


def _forward(model, ids: Tensor) -> None:
    with stoppable():  # `stop_after` ends the pass after the last cached layer
        model(input_ids=ids, use_cache=False)


def _batches(contexts, batch_contexts: int) -> Iterator[Tensor]:
    while batch := list(islice(contexts, batch_contexts)):
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

    The cache and the training stream (`wiremap.train.stream`) both capture through this.
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


def _run(model, contexts, writer: ShardWriter, check: TokenCheck, plan: Plan, bar) -> None:
    start = check.end
    with capturing(model, plan) as run:
        for b, ids in enumerate(_batches(contexts, plan.batch_contexts)):
            first = b * plan.rows_per_batch
            n_rows = len(ids) * plan.rows_per_context
            check.feed(first, ids)
            if first + n_rows <= start:  # done in an earlier run
                continue
            acts = run(ids)
            lo, hi = max(start - first, 0), min(plan.n_rows - first, n_rows)
            writer.submit(Batch(acts, ids, lo, hi))
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
    head = header(cfg, config, layers)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out):
        manifest = existing(out, head)
        if manifest is not None and manifest["complete"] and whole(out, manifest):
            warn(f"{out} already holds this cache, complete ({manifest['n_tokens']} tokens)")
            return out
        plan = make_plan(cfg, layers)
        with _oom_guard(cfg, plan, head["d_model"]):
            if model is None or tokenizer is None:
                model, tokenizer = load_model(cfg.model, cfg.model_dtype, cfg.device, cfg.revision)
            bos, eos = boundary_tokens(tokenizer)
            contexts = _contexts(cfg, tokenizer, plan, bos, eos)
            if manifest is None:
                manifest = with_shards(dict(head, bos_token_id=bos, eos_token_id=eos), [], False)
                dump_manifest(out, manifest)  # claims the folder before any shard exists
            _write(out, manifest, model, contexts, plan, progress)
    return out


def _oom_guard(cfg: CacheConfig, plan: Plan, d_model: int):
    """Out of memory while loading or running the model: the batch's figures and the flags."""
    captured = plan.rows_per_batch * len(plan.layers) * d_model * 2 * 4  # two hooks, float32
    figures = (
        f"model {cfg.model} in {cfg.model_dtype} on {cfg.device}; a batch of "
        f"{plan.batch_contexts} contexts x {cfg.context_length} tokens captures "
        f"{captured / 1e6:,.0f} MB"
    )
    fix = (
        f"lower --batch-contexts (now {plan.batch_contexts}) or --context-length, "
        "pick fewer --layers, run the model in --model-dtype bfloat16, or free memory; rerun "
        "the same command (it resumes)"
    )
    return oom_to_error("caching", figures, fix)


def _write(out: Path, manifest: dict, model, contexts, plan: Plan, progress: bool) -> None:
    remove_leftovers(out)  # temporary files of a killed run, never listed anywhere
    base = {k: v for k, v in manifest.items() if k not in PROGRESS}
    entries = intact_shards(out, manifest["shards"])
    if entries:
        warn(f"resuming {out} after {sum(e['n_tokens'] for e in entries)} tokens")
    writer = ShardWriter(out, base, entries, plan)
    check = TokenCheck(out, entries, plan.first_pos)
    with _progress(plan, check.end, progress) as bar:
        try:
            _run(model, contexts, writer, check, plan, bar)
        except BaseException:
            writer.abort()
            raise
    final = writer.close()
    if final["n_tokens"] < plan.n_rows:
        warn(f"the dataset ran out after {final['n_tokens']} of {plan.n_rows} tokens")


class TokenCheck:
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
