"""The fused training step on each backend of its elementwise passes, in one interleaved run.

    python bench/fused_kernels.py        # SmolLM2 sizes: d_model 576, F 4096 and 16384, 1024 tokens
    python bench/fused_kernels.py --features 4096 --l0 32 --repeats 9

A whole JumpReLU PLT training step, forward + backward (`TranscoderModule.step_outputs`,
the loss terms, `.backward()`), on random activations, in float32 and under bf16 autocast,
with the fused encoder's elementwise passes (`wiremap/train/fused.py`) run by each backend:

- unfused: the reference path (`forward` + `loss_terms`, one op at a time, dense decode);
- eager: the fused path's passes op by op over cache-sized row chunks;
- compiled: `torch.compile` of the same passes (Inductor's C++/OpenMP kernels on CPU).

Until commit 0d2e43e it also timed a hand-written C kernel for the passes, which that run
showed no faster on whole steps; README "Speed" gives the numbers and why it went.

The thresholds are set so that `--l0` features fire per token, as in a trained transcoder
(the decode is then sparse). The backends take turns within each repeat (the machine may be
shared: interleaving exposes them to the same load), medians are reported and ratios to the
compiled backend. `compile s` is the first compiled step minus the median step: the cold
compile (a fresh Inductor cache folder) a short run pays once per process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-bench-"))

import torch  # noqa: E402 (after the cache folder is set)

from wiremap.train import fused  # noqa: E402
from wiremap.train.host_memory import reuse_freed_memory  # noqa: E402
from wiremap.train.module import TranscoderModule  # noqa: E402


class UnfusedModule(TranscoderModule):
    fused = False
    decode_sparse = False


def make(cls, args, f: int, l0: int, x: torch.Tensor) -> TranscoderModule:
    torch.manual_seed(0)
    module = cls(args.layers, args.d_model, arch="plt", d_transcoder=f, activation="jumprelu",
                 loss={"sparsity_coef": 1.0, "preact_coef": 3e-6})  # fmt: skip
    with torch.no_grad():  # θ per feature at the quantile that leaves l0 of f firing
        pre = module.transcoder.pre_activations(x).transpose(0, 1)  # [L, N, F]
        q = torch.quantile(pre[:, : min(len(x), 4096)].float(), 1 - l0 / f, dim=1)
        module.transcoder.activation.log_threshold.copy_(q.clamp_min(1e-4).log())
    return module


def step(module: TranscoderModule, x, y, bf16: bool) -> float:
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        terms = module.step_outputs(x, y).terms
    torch.stack(list(terms.values())).sum().backward()
    module.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def compare(args, f: int, l0: int, bf16: bool, backends: list[str]) -> dict[str, list[float]]:
    x = torch.randn(args.tokens, args.layers, args.d_model)
    y = torch.randn(args.tokens, args.layers, args.d_model)
    modules = {b: make(UnfusedModule if b == "unfused" else TranscoderModule, args, f, l0, x)
               for b in backends}  # fmt: skip
    times = {b: [] for b in backends}
    first = {}
    for r in range(args.repeats + 1):
        for b in backends:
            with fused.use(None if b == "unfused" else b):
                t = step(modules[b], x, y, bf16)
            (times[b].append(t) if r else first.__setitem__(b, t))
    med = {b: statistics.median(ts) for b, ts in times.items()}
    ref = med["compiled"]
    cells = [f"{b} {med[b] * 1e3:7.1f}ms ({med[b] / ref:4.2f}x)" for b in backends]
    compile_s = first["compiled"] - ref
    print(f"{'bf16' if bf16 else 'fp32'} F={f:<5} l0={l0:<3} " + " | ".join(cells)
          + f" | compile {compile_s:5.1f}s", flush=True)  # fmt: skip
    return med


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--features", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--l0", type=int, nargs="+", default=[32, 64])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--backends", nargs="+", default=["unfused", "eager", "compiled"],
                   choices=["unfused", "eager", "compiled"])  # fmt: skip
    p.add_argument("--no-reuse-memory", action="store_true",
                   help="leave malloc as it is (to time run.reuse_host_memory)")  # fmt: skip
    args = p.parse_args()
    backends = list(dict.fromkeys(args.backends + ["compiled"]))  # the ratios' reference
    if not args.no_reuse_memory:
        reuse_freed_memory()  # as `wiremap train` on CPU: no page faults in any timing
    print(f"PLT jumprelu, L={args.layers}, d_model={args.d_model}, {args.tokens} tokens, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}, "
          "ratio to compiled")  # fmt: skip
    for dtype in args.dtypes:
        for f in args.features:
            for l0 in args.l0:
                compare(args, f, l0, dtype == "bf16", backends)


if __name__ == "__main__":
    main()
