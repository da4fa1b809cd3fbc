"""Keep freed host memory for reuse, so CPU training steps do not fault in fresh pages.

    reuse_freed_memory()      # True where the C library is glibc

glibc serves every allocation above 32 MiB with its own `mmap` and gives it back to the OS
on free, so each [N, L, F] activation, gradient and optimiser temporary of a training step
arrives as fresh pages that the kernel must fault in and zero: on a busy 2-core machine,
compiled JumpReLU steps (d_model 576, F 16384, 1024 tokens) took 1.4–1.9x as long in fp32
and 2.0–2.8x in bf16 without this (`bench/fused_kernels.py --no-reuse-memory`). Turning
the `mmap` path and heap trimming off makes large blocks come from the heap and stay there
for the next step, as the CUDA caching allocator does on GPUs. The process keeps its peak
memory until it exits; the setting is process-wide and stays on. `wiremap train` applies it
on CPU runs (`run.reuse_host_memory`).
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = -1
"""mallopt's value for M_TRIM_THRESHOLD that turns trimming off (any finite threshold is an
int, under 2 GiB, which a large step's freed tensors exceed: then every step faults again)."""


def reuse_freed_memory() -> bool:
    """Serve large blocks from the heap and keep them when freed; False where not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the running process's C library
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
