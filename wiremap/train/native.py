"""The fused encoder's elementwise passes as compiled CPU loops (`fused_kernels.c`).

    if native.available():
        native.forward(a[layer], window[layer], b, theta, cn, bandwidth)  # -> sums [3, F]

On CPU, PyTorch runs each elementwise op as its own pass: the fused path's ~12 ops a chunk
took as long as the encoder matmul itself (bf16 PLT, L=8, F=4096, 4096 tokens on 2 cores).
One C loop does them all in a single pass per layer, over rows split across torch's thread
count: 2.6-8x faster on that layer in `bench/fused_kernels.py` (on a shared 2-core machine
the PyTorch loop's time varied 2x between runs, the C loop's did not); `bench/train.py`
prints what that gains a whole training step.

The source is compiled with the system C compiler (`$CC`, else `cc` or `gcc`) on first use,
for this CPU (`-march=native`), into `$XDG_CACHE_HOME/wiremap/kernels/` (default
`~/.cache/...`), keyed by the source, compiler, flags and CPU, so a home folder shared by
different machines is safe.

Without a compiler, or with WIREMAP_NATIVE=0, `available()` is False and the fused path
keeps its PyTorch loop: equal to float32 rounding (tests hold both to the unfused
reference), slower.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_kernels.c")
FLAGS = ["-O3", "-fno-math-errno", "-fPIC", "-shared", "-pthread"]
DTYPES = (torch.float32, torch.bfloat16)
_enabled = True


@contextlib.contextmanager
def disabled():
    """Within this block the fused path takes its PyTorch loop (to compare the two)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def available() -> bool:
    """True when the compiled kernels can be used (a C compiler was found, WIREMAP_NATIVE≠0)."""
    return _library() is not None


def supports(t: Tensor) -> bool:
    """Whether `t` (a layer's activations) can go through the native kernels."""
    return _enabled and t.device.type == "cpu" and t.dtype in DTYPES and available()


def forward(a: Tensor, window: Tensor | None, b: Tensor, theta: Tensor | None, cn: Tensor,
            bandwidth: float) -> Tensor:  # fmt: skip
    """One layer in place, as `fused._threshold_layer`: a [N, F] holds W_enc x -> activations.

    Writes the JumpReLU window mask (if given) and returns per-feature sums over tokens [3, F]:
    Σ min(pre − θ, 0), the number of tokens fired, and Σ tanh(cn·a).
    """
    _check(a, window)
    n, f = a.shape
    theta = torch.zeros(f) if theta is None else theta
    acc = torch.zeros(_threads(), 3, f)
    args = _vectors(f, b, theta, 2 * cn)
    _library().wiremap_forward(
        a.dtype == torch.bfloat16, _ptr(a), _ptr(window), n, f, *map(_ptr, args),
        bandwidth / 2, _ptr(acc), acc.shape[0],
    )  # fmt: skip
    return acc.sum(0)


def backward(a: Tensor, grad_a: Tensor | None, window: Tensor | None, pre: Tensor, cn: Tensor,
             k: Tensor, below: Tensor) -> Tensor:  # fmt: skip
    """One layer, as `fused._grad_layer`: the pre-activation gradient into `pre` [N, F].

    Returns per-feature sums [3, F]: Σ g·window, Σ a·σ(1−σ) and Σ pre (the bias gradient).
    """
    grad_a = None if grad_a is None else grad_a.to(a.dtype).contiguous()
    _check(a, window, pre, grad_a)
    n, f = a.shape
    acc = torch.zeros(_threads(), 3, f)
    args = _vectors(f, 2 * cn, k, below)
    _library().wiremap_backward(
        a.dtype == torch.bfloat16, _ptr(a), _ptr(grad_a), _ptr(window), _ptr(pre), n, f,
        *map(_ptr, args), _ptr(acc), acc.shape[0],
    )  # fmt: skip
    return acc.sum(0)


def run(forward_pass: bool, a: Tensor, *args) -> Tensor:
    """`fused._forward_pass` / `fused._backward_pass` (same arguments) through the kernels."""
    if forward_pass:
        window, b, theta, cn2, half_bw = args
        return forward(a, window, b, theta, cn2 / 2, 2 * half_bw)
    grad_a, window, pre, cn2, k, below = args
    return backward(a, grad_a, window, pre, cn2 / 2, k, below)


def _check(a: Tensor, window: Tensor | None, *same: Tensor | None) -> None:
    """The C code trusts raw pointers: every block must have a's shape, layout and dtype."""
    blocks = [(t, a.dtype) for t in same if t is not None]
    blocks += [] if window is None else [(window, torch.bfloat16)]
    for t, dtype in [(a, a.dtype), *blocks]:
        if t.shape != a.shape or t.dtype != dtype or not t.is_contiguous() or t.device != a.device:
            raise ValueError(f"native kernels need contiguous {dtype} [{tuple(a.shape)}] blocks")
    if a.dim() != 2 or a.dtype not in DTYPES or a.device.type != "cpu":
        raise ValueError(f"native kernels take CPU float32/bfloat16 [N, F] blocks, not {a.dtype}")


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _vectors(f: int, *vectors: Tensor) -> list[Tensor]:
    """Per-feature vectors as contiguous float32 [F] (the C code reads f floats from each)."""
    out = [v.detach().to(torch.float32).contiguous() for v in vectors]
    if any(v.shape != (f,) for v in out):
        raise ValueError(f"native kernels need per-feature vectors of shape [{f}]")
    return out


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("WIREMAP_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    error = "no C compiler on PATH"
    if compiler is not None:
        for flags in (FLAGS + ["-march=native"], FLAGS):  # not every compiler has -march=native
            path, error = _compiled(compiler, flags)
            if path is None:
                continue
            try:
                return _bind(ctypes.CDLL(str(path)))
            except OSError as err:  # e.g. a damaged file in the cache: delete it to rebuild
                error = f"cannot load {path}: {err}"
    log.warning(
        "the native kernels could not be built (%s), so the fused encoder runs its slower "
        "PyTorch loop; set CC to a working C compiler and XDG_CACHE_HOME to a writable folder, "
        "or WIREMAP_NATIVE=0 to silence this", error,
    )  # fmt: skip
    return None


def _compiled(compiler: str, flags: list[str]) -> tuple[Path | None, str]:
    """The cached shared library for these flags, compiled now if missing, or (None, why)."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                     _cpu_fingerprint()])).hexdigest()[:16]  # fmt: skip
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wiremap" / "kernels"
    path = folder / f"fused_kernels-{key}.so"
    if path.exists():
        return path, ""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=folder)
        os.close(fd)
    except OSError as err:
        return None, f"cannot write to {folder}: {err}"
    cmd = [*shlex.split(compiler), *flags, str(SOURCE), "-o", tmp]  # CC may carry flags
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return None, f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}"
        os.replace(tmp, path)  # atomic: concurrent processes (DDP ranks) see no partial file
        return path, ""
    except OSError as err:
        return None, f"cannot run {compiler}: {err}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cpu_fingerprint() -> bytes:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keys = ("model name", "flags", "Features")
        keep = [ln for ln in lines if ln.split(":")[0].strip() in keys]
        return "\n".join(sorted(set(keep))).encode()
    except OSError:
        return f"{platform.machine()} {platform.processor()}".encode()


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.wiremap_forward.argtypes = [i32, p, p, i64, i64, p, p, p, f32, p, i32]
    lib.wiremap_backward.argtypes = [i32, p, p, p, p, i64, i64, p, p, p, p, i32]
    lib.wiremap_forward.restype = lib.wiremap_backward.restype = i32
    return lib
