"""Benchmark: what writing the activation cache costs over a bare forward pass.

    python bench/cache.py                        # about a minute on a laptop CPU
    python bench/cache.py --n-tokens 16k --threads 2 --device cpu

Builds a tiny-config llama (d_model 256, 8 layers by default) with a local tokenizer,
packs toy text into contexts of 128, and times on the very same batches, interleaved and
best of `--repeats`:

    forward   model(ids) with no hooks                         (the bare forward pass)
    cut       the same, stopped after the last cached layer    (the forward caching runs)
    cache     build_cache end to end: read + tokenize text, forward with hooks,
              convert to bf16, hash, write shards, fsync, manifest

and prints tokens/s for each, the overhead of caching over both forwards, and bytes per
token on disk. Target: caching costs at most 15% over the bare forward pass.

Threads default to 1: on a busy shared CPU, multi-threaded torch ops stall in OpenMP
waits, and how much they stall changes when another Python thread (the cache's writer)
exists, which would skew the comparison. One thread measures the work itself.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from wiremap.cache import CacheConfig, build_cache, read_manifest
from wiremap.cache.build import _forward
from wiremap.cache.command import count
from wiremap.cache.text import TextSpec, iter_texts, pack_contexts, tokenize
from wiremap.models.adapters import get_adapter
from wiremap.models.hooks import stop_after
from wiremap.models.loading import load_model
from wiremap.models.tiny import build_tiny_model, sample_corpus


def _batches(tokenizer, corpus: Path, cfg: CacheConfig) -> list[torch.Tensor]:
    """The batches build_cache will run: same packing, same grouping."""
    docs = tokenize(iter_texts(TextSpec(str(corpus))), tokenizer)
    contexts = pack_contexts(docs, cfg.context_length, tokenizer.bos_token_id, 2)
    n_contexts = -(-cfg.n_tokens // (cfg.context_length - 1))
    contexts = list(islice(contexts, n_contexts))
    if len(contexts) < n_contexts:
        raise SystemExit(f"corpus too small: {len(contexts)} of {n_contexts} contexts")
    size = cfg.batch_contexts
    return [torch.tensor(contexts[i : i + size]) for i in range(0, len(contexts), size)]


@torch.no_grad()
def _time_forward(model, batches, device, cut: bool) -> float:
    start = time.perf_counter()
    if cut:
        adapter = get_adapter(model)
        with stop_after(adapter.layer(model, adapter.n_layers(model) - 1)):
            for ids in batches:
                _forward(model, ids.to(device))
    else:
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _time_cache(cfg: CacheConfig, model, tokenizer) -> float:
    shutil.rmtree(cfg.out, ignore_errors=True)
    start = time.perf_counter()
    build_cache(cfg, model=model, tokenizer=tokenizer, progress=False)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n-tokens", type=count, default=8192)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-tokens", type=count, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="wiremap-bench-cache-"))
    try:
        _bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench(args, work: Path) -> None:
    model_dir = build_tiny_model(
        "llama",
        work / "model",
        n_layers=args.n_layers,
        d_model=args.d_model,
        max_position_embeddings=max(128, args.context_length),
    )
    corpus = work / "corpus.txt"
    n_docs = max(200, args.n_tokens // 25)
    corpus.write_text("\n".join(sample_corpus(n_docs, seed=1)) + "\n")
    cfg = CacheConfig(
        model=str(model_dir),
        dataset=str(corpus),
        n_tokens=args.n_tokens,
        context_length=args.context_length,
        batch_contexts=args.batch_size,
        shard_tokens=args.shard_tokens,
        device=args.device,
        out=str(work / "cache"),
    )
    model, tokenizer = load_model(cfg.model, device=args.device)
    device = next(model.parameters()).device
    batches = _batches(tokenizer, corpus, cfg)
    _time_forward(model, batches[:1], device, cut=False)  # warm-up
    times: dict[str, list[float]] = {"forward": [], "cut": [], "cache": []}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits all three
        times["forward"].append(_time_forward(model, batches, device, cut=False))
        times["cut"].append(_time_forward(model, batches, device, cut=True))
        times["cache"].append(_time_cache(cfg, model, tokenizer))
    _report(args, times, read_manifest(cfg.out), device)


def _report(args, times: dict[str, list[float]], manifest: dict, device) -> None:
    n = manifest["n_tokens"]
    best = {k: min(v) for k, v in times.items()}
    size = sum(s["bytes"] for s in manifest["shards"])
    layers, d = len(manifest["layers"]), manifest["d_model"]
    print(
        f"llama d_model={args.d_model} layers={args.n_layers} context={args.context_length} "
        f"batch={args.batch_size} tokens={n} device={device} threads={torch.get_num_threads()} "
        f"(best of {args.repeats})"
    )
    for name, seconds in best.items():
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:<8} {n / seconds:>10,.0f} tokens/s   ({runs} s)")
    print(f"  caching / bare forward       = {best['cache'] / best['forward']:.3f}")
    print(f"  caching / forward to layer L = {best['cache'] / best['cut']:.3f}")
    raw = 2 * layers * d * 2
    print(f"  bytes per token on disk      = {size / n:,.1f} (activations alone: {raw})")


if __name__ == "__main__":
    main()
