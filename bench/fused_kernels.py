"""The fused encoder's elementwise pass: compiled C kernels vs the PyTorch loop, one layer.

    python bench/fused_kernels.py                  # N=4096 tokens, F=4096 features
    python bench/fused_kernels.py --tokens 1024 --features 16384

Times `fused._threshold_layer` (forward: bias, JumpReLU with a learned threshold, tanh and
pre-activation penalties, firing counts) and `fused._grad_layer`'s pass (backward) on one
layer's [N, F] block, in float32 and bfloat16, both ways in the same run, and prints the
ratio. Best of `--repeats`; the matmuls around this pass are not included (bench/train.py
times whole training steps).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from wiremap.train import fused, native
from wiremap.train.host_memory import reuse_freed_memory


def best_time(repeats: int, fn, *args) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return min(times)


def forward(a, window, b, theta, cn, compiled: bool):
    stats = [torch.zeros(a.shape[1]) for _ in range(3)]
    with contextlib.nullcontext() if compiled else native.disabled():
        fused._threshold_layer(b, theta, cn, 1e-3, (a, window), stats)  # in place, as in training


def backward(a, grad_a, window, pre, cn, k, below, compiled: bool):
    if compiled:
        native.backward(a, grad_a, window, pre, cn, k, below)
    else:
        fused._grad_chunks(a, grad_a, cn, k, below, window, pre)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if not native.available():
        raise SystemExit("the native kernels are not available here (no C compiler?)")
    reuse_freed_memory()  # as in training: no page faults in either timing
    n, f = args.tokens, args.features
    print(f"one layer: N={n} tokens, F={f} features, {torch.get_num_threads()} threads")
    print(f"{'dtype':9} {'pass':9} {'compiled':>10} {'PyTorch':>10} {'speed-up':>9}")
    for dtype in (torch.float32, torch.bfloat16):
        compare(dtype, n, f, args.repeats)


def compare(dtype: torch.dtype, n: int, f: int, repeats: int) -> None:
    a, fired = torch.randn(n, f).to(dtype), torch.randn(n, f).relu().to(dtype)
    grad_a, pre = torch.randn(n, f).to(dtype), torch.empty(n, f, dtype=dtype)
    window = torch.empty(n, f, dtype=torch.bfloat16)
    b, theta, cn = 0.1 * torch.randn(f), torch.rand(f), torch.rand(f)
    k, below = torch.randn(f), torch.randn(f)
    passes = {
        "forward": (forward, a, window, b, theta, cn),
        "backward": (backward, fired, grad_a, window, pre, cn, k, below),
    }
    for name, (fn, *inputs) in passes.items():
        compiled = best_time(repeats, fn, *inputs, True)
        loop = best_time(repeats, fn, *inputs, False)
        print(f"{str(dtype)[6:]:9} {name:9} {compiled * 1e3:8.1f}ms {loop * 1e3:8.1f}ms "
              f"{loop / compiled:8.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
