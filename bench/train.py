"""Training throughput of CLT and PLT transcoders, fp32 and bf16-mixed, vs this machine's peak.

    python bench/train.py                   # L=8, d_model=256, F=4096, 4096 tokens a step
    python bench/train.py --batch-size 1024 --steps 5
    python bench/train.py --only sparse density     # the sparse-path parts alone

Synthetic random activations (no language model), the real TranscoderModule and a Lightning
Trainer with `wiremap train`'s ReuseHostMemory callback, so the figures include the loss
terms, AdamW, gradient clipping and Lightning's loop. Before that callback is on (it is
process-wide), the PLT in float32 is also timed unfused (the dense reference path) and
without host-memory reuse; the PLT in bf16 is timed again with the eager passes in place of
the compiled passes (wiremap/train/fused.py, torch.compile). The speed-ups are printed.

Sparse path (`--only sparse`): TopK PLT and CLT at k = 16, 32, 64, 128 active features per
token and layer, trained through wiremap/train/sparse.py (decode, decoder and encoder weight
gradients over the active features) vs the dense reference path; the ratio is printed.
Density crossover (`--only density`): a JumpReLU PLT's forward + backward with its decode
sparse vs dense at densities 0.5-10%: where the time ratio crosses 1 is the
`sparse.MAX_DENSITY` rule that picks the decode of ReLU / JumpReLU batches.

Tokens/s come from the median step time. Achieved FLOP/s counts only the transcoder
matmuls: encoder forward + weight gradient (the input needs no gradient), decoder forward +
input gradient + weight gradient. The peak
(TFLOP/s) is the best of five timings of a large torch.matmul in the same dtype, taken just
before each configuration in the same run, so ratios compare like with like on whatever
machine runs this.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from wiremap.train import fused as fused_passes
from wiremap.train import sparse
from wiremap.train.callbacks import ReuseHostMemory
from wiremap.train.module import TranscoderModule


class UnfusedModule(TranscoderModule):
    """The reference path: separate encoder, activation and loss ops, dense decode."""

    fused = False
    decode_sparse = False


class DenseModule(TranscoderModule):
    """TopK / BatchTopK through the dense reference path (decode of all F features)."""

    decode_sparse = False


class RandomBatches(IterableDataset):
    """Endless random (x, y) batches of shape [B, L, d], generated once and repeated."""

    def __init__(self, batch: int, n_layers: int, d_model: int):
        gen = torch.Generator().manual_seed(0)
        self.pool = [
            (torch.randn(batch, n_layers, d_model, generator=gen),
             torch.randn(batch, n_layers, d_model, generator=gen))
            for _ in range(2)
        ]  # fmt: skip

    def __iter__(self):
        i = 0
        while True:
            yield self.pool[i % 2]
            i += 1


class StepTimer(L.Callback):
    """Wall time of each step after `warmup` (synchronising the GPU at both ends)."""

    def __init__(self, warmup: int):
        self.warmup, self.last, self.times = warmup, None, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if trainer.global_step > self.warmup:
            self.times.append(now - self.last)
        self.last = now

    def median(self) -> float:
        """Median step time: robust to the odd step another tenant of the machine slows."""
        return statistics.median(self.times)


def matmul_flops_per_token(arch: str, n_layers: int, d_model: int, d_tc: int) -> float:
    enc = 2 * n_layers * d_model * d_tc
    writes = n_layers * (n_layers + 1) // 2 if arch == "clt" else n_layers
    dec = 2 * writes * d_tc * d_model
    return 2 * enc + 3 * dec


def measure_peak(dtype: torch.dtype, device: str, n: int, trials: int = 5) -> float:
    """The best of `trials` timings of a large matmul (the denominator of every ratio)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 10 if device == "cuda" else 3
    best = 0.0
    for _ in range(trials):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def tokens_per_s(
    arch: str, precision: str, args, device: str, unfused=False, reuse=True, compiled=True,
    cls=None, **kw,
) -> float:  # fmt: skip
    cls = cls or (UnfusedModule if unfused else TranscoderModule)
    with fused_passes.use(None if compiled else "eager"):
        return _tokens_per_s(arch, precision, args, device, cls, reuse, **kw)


def _tokens_per_s(
    arch: str, precision: str, args, device: str, cls, reuse, activation="jumprelu", k=None
) -> float:
    L.seed_everything(0)
    module = cls(
        args.layers, args.d_model, arch=arch, d_transcoder=args.features, activation=activation,
        k=k, optim={"lr": 1e-4, "warmup_steps": 10},
    )  # fmt: skip
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        max_steps=args.warmup + args.steps, accelerator=device, devices=1, precision=precision,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0, gradient_clip_val=1.0,
        log_every_n_steps=50, callbacks=[timer] + ([ReuseHostMemory()] if reuse else []),
    )  # fmt: skip
    data = DataLoader(RandomBatches(args.batch_size, args.layers, args.d_model), batch_size=None)
    trainer.fit(module, train_dataloaders=data)
    return args.batch_size / timer.median()


def throughput(args, device: str) -> None:
    """JumpReLU PLT and CLT tokens/s and share of the matmul peak (fp32, bf16-mixed)."""
    cuda = device == "cuda"
    dtypes = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}
    if device == "cpu":
        unfused = tokens_per_s("plt", "32-true", args, device, unfused=True, reuse=False)
        fused = tokens_per_s("plt", "32-true", args, device, reuse=False)
        print(f"plt 32-true without host-memory reuse: unfused {unfused:.0f} tokens/s, "
              f"fused {fused:.0f} tokens/s: fused / unfused = {fused / unfused:.2f}")  # fmt: skip
    print(f"{'arch':5} {'precision':11} {'tokens/s':>10} {'TFLOP/s':>8} {'peak':>8} {'of peak':>8}")
    for arch in ("plt", "clt"):
        for precision, dtype in dtypes.items():
            # the peak is taken just before each run: these shared machines drift over minutes
            peak = measure_peak(dtype, device, 8192 if cuda else 2048)
            rate = tokens_per_s(arch, precision, args, device)
            flops = rate * matmul_flops_per_token(arch, args.layers, args.d_model, args.features)
            print(f"{arch:5} {precision:11} {rate:10.0f} {flops / 1e12:8.3f} "
                  f"{peak / 1e12:8.3f} {flops / peak:8.1%}")  # fmt: skip
            if device == "cpu" and (arch, precision) == ("plt", "32-true"):
                print(f"      host-memory reuse: x{rate / fused:.2f} tokens/s")
            if device == "cpu" and (arch, precision) == ("plt", "bf16-mixed"):
                loop = tokens_per_s(arch, precision, args, device, compiled=False)
                print(f"      compiled passes ({fused_passes.backend(device)}) / eager passes: "
                      f"x{rate / loop:.2f} tokens/s")  # fmt: skip


def sparse_vs_dense(args, device: str, precision: str) -> None:
    """TopK PLT and CLT, k active features per token and layer: sparse vs dense tokens/s."""
    print(f"TopK, {precision}: sparse path (train/sparse.py) vs dense reference")
    print(f"{'arch':5} {'k':>4} {'sparse tok/s':>13} {'dense tok/s':>12} {'sparse/dense':>13}")
    for arch in ("plt", "clt"):
        for k in args.k:
            kw = {"activation": "topk", "k": k}
            rate = tokens_per_s(arch, precision, args, device, cls=TranscoderModule, **kw)
            dense = tokens_per_s(arch, precision, args, device, cls=DenseModule, **kw)
            print(f"{arch:5} {k:4d} {rate:13.0f} {dense:12.0f} {rate / dense:13.2f}")


def density_crossover(args, device: str, densities=(0.005, 0.01, 0.02, 0.05, 0.1)) -> None:
    """JumpReLU PLT forward + backward with the decode sparse vs dense, at set densities
    (θ = that quantile of the pre-activations; no optimiser step, so density stays put).
    Where the ratio crosses 1 is `sparse.MAX_DENSITY`."""
    print("JumpReLU plt, forward + backward: sparse decode / dense decode time by density")
    x = torch.randn(args.batch_size, args.layers, args.d_model, device=device)
    for density in densities:
        times = []
        for forced in (True, False):
            L.seed_everything(0)
            cls = TranscoderModule if forced else DenseModule
            module = cls(args.layers, args.d_model, arch="plt", d_transcoder=args.features,
                         activation="jumprelu").to(device)  # fmt: skip
            with torch.no_grad():
                pre = module.transcoder.pre_activations(x[:256]).transpose(0, 1).flatten(1)
                theta = pre.float().quantile(1 - density, dim=-1).clamp_min(1e-6)
                module.transcoder.activation.set_threshold(
                    theta[:, None].expand_as(module.transcoder.activation.log_threshold)
                )
            with _max_density(1.0 if forced else 0.0):
                times.append(_fwd_bwd_time(module, x, args.steps))
        print(f"  density {density:6.3f}: sparse {times[0] * 1e3:8.1f} ms, dense "
              f"{times[1] * 1e3:8.1f} ms, sparse/dense time {times[0] / times[1]:.2f}")  # fmt: skip


@contextlib.contextmanager
def _max_density(value: float):
    old = sparse.MAX_DENSITY
    sparse.MAX_DENSITY = value
    try:
        yield
    finally:
        sparse.MAX_DENSITY = old


def _fwd_bwd_time(module, x, steps: int) -> float:
    times = []
    for _ in range(steps + 1):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        terms = module.step_outputs(x, x).terms
        torch.stack(list(terms.values())).sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    p.add_argument("--steps", type=int, default=20 if cuda else 5)
    p.add_argument("--warmup", type=int, default=5 if cuda else 1)
    p.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=[16, 32, 64, 128],
        help="active features per token and layer of the sparse-vs-dense TopK runs",
    )
    p.add_argument(
        "--only",
        choices=["throughput", "sparse", "density"],
        nargs="+",
        default=["throughput", "sparse", "density"],
        help="which parts to run",
    )
    args = p.parse_args()
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; L={args.layers} d_model={args.d_model} F={args.features} "
          f"batch={args.batch_size}; {args.steps} timed steps after {args.warmup}")  # fmt: skip
    if "throughput" in args.only:
        throughput(args, device)
    if "sparse" in args.only:
        sparse_vs_dense(args, device, "bf16-mixed" if cuda else "32-true")
    if "density" in args.only:
        density_crossover(args, device)


if __name__ == "__main__":
    main()
