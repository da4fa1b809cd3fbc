"""wiremap's TopK PLT vs EleutherAI sparsify's TopK transcoder on the same activations.

    VENV=/path/to/sparsify-venv               # any venv that can import sparsify (see below)
    $VENV/bin/python bench/peer_train.py --cache wiremap_out/smollm2 --layer 12
    $VENV/bin/python bench/peer_train.py      # the organism's cache, built under --out if missing

One layer of an activation cache (mlp_in -> mlp_out), the same F (default 4608 = 8 x 576), k
(32), batches (same rows in the same order) and held-out rows for both. Each trains with its
own default optimiser settings, then both at the same small learning-rate sweep (`--lrs`;
wiremap with a warm-up of 5% of the steps, as its 1000-step default warm-up outlasts a short
run). Printed per run: validation FVU (Σ‖y−ŷ‖² / Σ‖y−ȳ‖² over the held-out rows), median
step time and tokens/s; then the tokens/s ratio wiremap / sparsify from the median step time
over each one's runs (all measured in this one run, same shapes).

wiremap trains as `wiremap train` does: TranscoderModule (sparse TopK path) under a Lightning
Trainer with gradient clipping 1.0 and bf16-mixed on a GPU. sparsify 1.3.3 trains a
`SparseCoder` (transcode=True) the way its `Trainer.fit` does, minus the language model
(read from its source): encoder bias = −mean(x)·W_encᵀ and b_dec = mean(y) on the first
batch, loss = FVU of the batch (auxk_alpha = 0 and no multi-TopK by default), its default
optimiser `signum` (ScheduleFreeWrapper(SignSGD, momentum 0.95), lr 5e-3/sqrt(F/2^14)),
and evaluation at the schedule-free averaged weights (`optimizer.eval()`), as its
checkpoints do.

sparsify is not a wiremap dependency: install it into a separate environment, e.g.
    python -m venv /path/venv --system-site-packages
    /path/venv/bin/pip install eai-sparsify==1.3.3 --no-deps
    /path/venv/bin/pip install einops natsort schedulefree simple-parsing
and run this file with that environment's python (from the repository root).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from wiremap.cache import ActivationCache
from wiremap.train.module import TranscoderModule

INSTALL = (
    "bench/peer_train.py needs EleutherAI's sparsify (PyPI: eai-sparsify) and it cannot be "
    "imported here ({error}). Install it into a separate environment, not wiremap's:\n"
    "    python -m venv /path/venv --system-site-packages\n"
    "    /path/venv/bin/pip install eai-sparsify==1.3.3 --no-deps\n"
    "    /path/venv/bin/pip install einops natsort schedulefree simple-parsing\n"
    "then run: /path/venv/bin/python bench/peer_train.py ..."
)


def import_sparsify():
    try:
        import sparsify  # noqa: F401
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, TranscoderConfig
        from sparsify.sign_sgd import SignSGD
    except ImportError as error:
        sys.exit(INSTALL.format(error=error))
    return SparseCoder, TranscoderConfig, SignSGD, ScheduleFreeWrapper


# -- data -------------------------------------------------------------------------------------
def organism_cache(out: Path, n_tokens: int) -> Path:
    """The built-in organism's mlp_in -> mlp_out cache (built once under `out`)."""
    from wiremap.demo import DemoConfig, cache_dir, cache_stage, write_corpus
    from wiremap.models.organism import load_organism, organism_path

    cfg = DemoConfig(out=str(out), n_tokens=n_tokens)
    path = cache_dir(cfg)
    if not (path / "manifest.json").exists():
        model, tokenizer = load_organism()
        cache_stage(cfg, str(organism_path()), model, tokenizer, write_corpus(cfg))
    return path


def load_layer(path: Path, layer: int | None, n_tokens: int) -> tuple[Tensor, Tensor, int]:
    """(x, y) [n, d] float32 of one model layer (default 12, else the middle one)."""
    cache = ActivationCache(path)
    layers = cache.layers
    if layer is None:
        layer = 12 if 12 in layers else layers[len(layers) // 2]
    if layer not in layers:
        sys.exit(f"layer {layer} is not in the cache {path} (it holds layers {layers})")
    col = layers.index(layer)
    n = min(n_tokens, cache.n_tokens)
    xs, ys = [], []
    for start in range(0, n, 4096):
        x, y = cache.get(torch.arange(start, min(n, start + 4096)))
        xs.append(x[:, col].float())
        ys.append(y[:, col].float())
    return torch.cat(xs), torch.cat(ys), layer


def split(x: Tensor, y: Tensor, n_val: int, seed: int = 0):
    """Shuffled rows: (train x, train y, val x, val y)."""
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]


def batches(x: Tensor, y: Tensor, batch: int, steps: int):
    """The same `steps` batches for both trainers (wrapping around the training rows)."""
    n = x.shape[0]
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % n
        yield x[idx], y[idx]


def fvu(y_hat: Tensor, y: Tensor) -> float:
    y_hat, y = y_hat.double(), y.double()
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


# -- wiremap ----------------------------------------------------------------------------------
class _Batches(torch.utils.data.IterableDataset):
    def __init__(self, x, y, batch, steps):
        self.args = (x, y, batch, steps)

    def __iter__(self):
        for xb, yb in batches(*self.args):
            yield xb[:, None], yb[:, None]  # [B, L=1, d]


class _StepTimer(L.Callback):
    def __init__(self):
        self.times, self.last = [], None

    def on_train_batch_end(self, trainer, *args):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def run_wiremap(data, args, lr: float | None, device: str) -> tuple[float, float]:
    """(validation FVU, median step seconds) of wiremap's TopK PLT."""
    x, y, xv, yv = data
    L.seed_everything(0, verbose=False)
    optim = {} if lr is None else {"lr": lr, "warmup_steps": max(1, args.steps // 20)}
    module = TranscoderModule(1, x.shape[1], arch="plt", d_transcoder=args.features,
                              activation="topk", k=args.k, optim=optim)  # fmt: skip
    timer = _StepTimer()
    trainer = L.Trainer(
        max_steps=args.steps, accelerator=device, devices=1, logger=False,
        precision="bf16-mixed" if device == "cuda" else "32-true", gradient_clip_val=1.0,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        limit_val_batches=0, callbacks=[timer],
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(_Batches(x, y, args.batch_size, args.steps), None)
    trainer.fit(module, train_dataloaders=loader)
    module.eval()
    with torch.no_grad():
        xn, yn = module.normalised(xv[:, None].to(module.device), yv[:, None].to(module.device))
        y_hat = module.step_outputs(xn, yn).y_hat
    return fvu(y_hat[:, 0].cpu(), yn[:, 0].cpu()), statistics.median(timer.times)


# -- sparsify ---------------------------------------------------------------------------------
def run_sparsify(data, args, lr: float | None, device: str) -> tuple[float, float]:
    """(validation FVU, median step seconds) of sparsify's TopK transcoder."""
    SparseCoder, TranscoderConfig, SignSGD, ScheduleFreeWrapper = import_sparsify()
    x, y, xv, yv = data
    torch.manual_seed(0)
    cfg = TranscoderConfig(k=args.k, num_latents=args.features)
    sc = SparseCoder(x.shape[1], cfg, device=device, dtype=torch.float32)
    lr = lr or 5e-3 / (args.features / 2**14) ** 0.5  # sparsify's signum default
    opt = ScheduleFreeWrapper(SignSGD([{"params": sc.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
    times = []
    for step, (xb, yb) in enumerate(batches(x, y, args.batch_size, args.steps)):
        xb, yb = xb.to(device), yb.to(device)
        start = time.perf_counter()
        if step == 0:  # Trainer.fit's initialisation on the first batch (transcode)
            sc.encoder.bias.data = -xb.mean(0) @ sc.encoder.weight.data.T
            sc.b_dec.data = yb.mean(0)
        out = sc(xb, yb)
        out.fvu.backward()
        opt.step()
        opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    opt.eval()  # schedule-free: evaluate at the averaged weights
    with torch.no_grad():
        y_hat = sc(xv.to(device), yv.to(device)).sae_out
    return fvu(y_hat.float().cpu(), yv), statistics.median(times[1:])


# -- main -------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, help="activation cache (default: the organism's)")
    p.add_argument("--layer", type=int, help="model layer (default 12, else the middle one)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("wiremap_out/peer_train"),
        help="where the organism's cache is built when --cache is not given",
    )
    p.add_argument("--features", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1024, help="tokens per step")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tokens", type=int, default=60_000, help="cache rows to read")
    p.add_argument("--val", type=int, default=4096, help="held-out rows")
    p.add_argument("--lrs", type=float, nargs="*", default=[1e-3, 3e-3, 1e-2])
    args = p.parse_args()  # fmt: skip
    import_sparsify()  # fail early, with the install instructions
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = args.cache or organism_cache(args.out, args.tokens)
    x, y, layer = load_layer(path, args.layer, args.tokens)
    data = split(x, y, args.val)
    print(f"{path} layer {layer}: {data[0].shape[0]} training rows, {args.val} held out; "
          f"d={x.shape[1]} F={args.features} k={args.k} batch={args.batch_size} "
          f"steps={args.steps} on {device}")  # fmt: skip
    print(f"{'trainer':9} {'lr':>9} {'val FVU':>8} {'ms/step':>8} {'tokens/s':>9}")
    rates = {"wiremap": [], "sparsify": []}  # step seconds of every run
    for name, run in (("wiremap", run_wiremap), ("sparsify", run_sparsify)):
        for lr in [None, *args.lrs]:
            val_fvu, step_s = run(data, args, lr, device)
            rates[name].append(step_s)
            label = "default" if lr is None else f"{lr:.1e}"
            print(f"{name:9} {label:>9} {val_fvu:8.4f} {step_s * 1e3:8.1f} "
                  f"{args.batch_size / step_s:9.0f}", flush=True)  # fmt: skip
    ratio = statistics.median(rates["sparsify"]) / statistics.median(rates["wiremap"])
    print(f"tokens/s wiremap / sparsify (median step time over each one's runs): {ratio:.2f}")


if __name__ == "__main__":
    main()
