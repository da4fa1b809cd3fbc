"""Benchmark: streamed activations vs the disk cache — tokens/s and disk bytes per token.

    python bench/stream.py                                   # the organism, ~1 min on a CPU
    GGUF=$(python -c 'from wiremap.real import smollm2_gguf; print(smollm2_gguf())')
    python bench/stream.py --model $GGUF --dataset /work/real/prose.txt --layers 0 1 2 3 \\
        --n-tokens 16k --context-length 128                  # the real model, 4 layers

On the same model, text and settings, in one run (best of `--repeats`, interleaved):

    cache build   `build_cache`: text -> model -> shards on disk (once per cache)
    cache read    batches from that cache in stream order (every run that reuses it)
    stream        batches straight from the model (`data.source: stream`), nothing on disk

and prints tokens/s of each, their ratios, and disk bytes per token: the cache folder's size
over its tokens (`2·L·d·2` bytes of bf16 activations plus tokens and positions) against the
bytes a streamed pass writes (none: it holds `--buffer-size` rows in memory). Both readers
hand out the identical batches (tests/train/test_stream.py), so the times compare like for like.
A training run costs its transcoder steps on top of either; the stream wins when each token
is trained on once, the cache when sweeps reuse it.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from wiremap.cache import CacheConfig, build_cache
from wiremap.cache.command import count
from wiremap.models.loading import load_model
from wiremap.train.data import ActivationDataModule


def organism_corpus(folder: Path, n_tokens: int) -> tuple[str, str]:
    """(model path, corpus path) of the shipped organism and its synthetic corpus."""
    from wiremap.models.organism import organism_path
    from wiremap.train.organism import build_corpus

    corpus = folder / "organism.txt"
    docs = build_corpus(n_docs=n_tokens // 8 + 100, seed=0).documents  # ~16 tokens a document
    corpus.write_text("\n".join(docs) + "\n")
    return str(organism_path()), str(corpus)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def drain(dm: ActivationDataModule, n_batches: int) -> float:
    """Seconds to draw `n_batches` training batches (the first window included)."""
    dm.setup("fit")
    start = time.perf_counter()
    for _ in islice(dm.train_dataloader(), n_batches):
        pass
    return time.perf_counter() - start


def measure(cfg: CacheConfig, args, n_batches: int) -> dict[str, float]:
    out = Path(cfg.out)
    shutil.rmtree(out, ignore_errors=True)
    model, tokenizer = load_model(cfg.model, cfg.model_dtype, cfg.device, cfg.revision)
    start = time.perf_counter()  # as for the stream below: loading the model is not timed
    build_cache(cfg, model, tokenizer, progress=False)
    times = {"cache build": time.perf_counter() - start}
    data = {"batch_tokens": args.batch_size, "buffer_size": args.buffer_size, "val_contexts": 0}
    cached = ActivationDataModule(cfg, order="stream", **data)
    times["cache read"] = drain(cached, n_batches)
    streamed = ActivationDataModule(cfg, source="stream", **data)
    streamed.stream.lm  # noqa: B018  (loading the model is a start-up cost, not per token)
    before = folder_bytes(out.parent)
    times["stream"] = drain(streamed, n_batches)
    times["stream bytes"] = folder_bytes(out.parent) - before  # what the stream wrote
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model path (default: the organism)")
    parser.add_argument("--dataset", default=None, help="text (default: the organism corpus)")
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="default: all")
    parser.add_argument("--n-tokens", type=count, default=count("64k"))
    parser.add_argument("--context-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1024, help="tokens per training batch")
    parser.add_argument("--buffer-size", type=int, default=16384, help="rows shuffled together")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, dataset = args.model, args.dataset
        if model is None:
            model, dataset = organism_corpus(Path(tmp), args.n_tokens)
        cfg = CacheConfig(
            model=model, dataset=dataset, n_tokens=args.n_tokens, layers=args.layers,
            context_length=args.context_length, device=args.device,
            model_dtype=args.model_dtype, out=str(Path(tmp) / "cache"),
        )  # fmt: skip
        n_batches = args.n_tokens // args.batch_size
        runs = [measure(cfg, args, n_batches) for _ in range(args.repeats)]
        best = {key: min(r[key] for r in runs) for key in runs[0]}
        best["stream bytes"] = max(r["stream bytes"] for r in runs)
        report(cfg, best, n_batches * args.batch_size, Path(cfg.out), args)


def report(cfg: CacheConfig, best: dict[str, float], tokens: int, out: Path, args) -> None:
    from wiremap.cache import ActivationCache

    cache = ActivationCache(out)
    written = best.pop("stream bytes")
    rate = {
        key: (cache.n_tokens if key == "cache build" else tokens) / t for key, t in best.items()
    }
    print(f"model {cfg.model} layers {cache.layers} d_model {cache.d_model}, "
          f"{cache.n_tokens} tokens, context {cfg.context_length}, device {args.device}, "
          f"{args.threads} thread(s), batch {args.batch_size}, "
          f"buffer {args.buffer_size}")  # fmt: skip
    for key, value in rate.items():
        print(f"  {key:<12} {value:>12,.0f} tokens/s")
    both = 1 / (1 / rate["cache build"] + 1 / rate["cache read"])
    print(f"  stream / cache read            {rate['stream'] / rate['cache read']:.3f}x")
    ratio = rate["stream"] / both
    print(f"  stream / (cache build + read)  {ratio:.3f}x  (one pass over a new cache)")
    per_token = folder_bytes(out) / cache.n_tokens
    formula = 2 * cache.n_layers * cache.d_model * 2
    print(f"  disk: cache {per_token:,.0f} bytes/token (2·L·d·2 = {formula:,}), "
          f"stream {written / tokens:,.0f} bytes/token (buffer: {args.buffer_size} rows in memory, "
          f"{args.buffer_size * formula / 2**20:,.0f} MiB)")  # fmt: skip


if __name__ == "__main__":
    main()
