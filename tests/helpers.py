"""Helpers several test modules share (imported as `helpers`: pytest puts tests/ on the path)."""

from __future__ import annotations

import lightning as L
import torch

from wiremap.train.module import TranscoderModule


def reference_outputs(module: TranscoderModule, x, y):
    """The unfused, dense reference step: loss terms, ŷ, a and per-feature firing counts."""
    y_hat, a, pre = module(x)
    return module.loss_terms(y_hat, y, a, pre), y_hat, a, (a != 0).sum(0, dtype=torch.float32)


def run(module, outputs_fn, x, y):
    """One step through `outputs_fn`: its outputs (a made dense) and every parameter's grad."""
    terms, y_hat, a, active = outputs_fn(module, x, y)
    module.zero_grad()
    torch.stack(list(terms.values())).sum().backward()
    grads = {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
    a = a.to_dense() if a.is_sparse else a
    return terms, y_hat, a, active, grads


class Crash(L.Callback):
    """Stops training with an error when the step `at_step` starts (a simulated crash)."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def tiny_cache(model_dir, root, n_docs: int, seed: int, **settings):
    """An activation cache of `model_dir` over `n_docs` sample documents in `root`, built the
    way training builds a missing one (`ActivationDataModule(..., build_missing=True)`).

    `settings` are CacheConfig fields (n_tokens, shard_tokens, ...); the defaults are the
    tests' usual 32-token contexts on the CPU.
    """
    from wiremap.cache import CacheConfig
    from wiremap.models.tiny import sample_corpus
    from wiremap.train.data import ActivationDataModule

    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(sample_corpus(n_docs, seed=seed)))
    settings = {"context_length": 32, "device": "cpu", **settings}
    cfg = CacheConfig(
        model=str(model_dir), dataset=str(corpus), out=str(root / "cache"), **settings
    )
    ActivationDataModule(cfg, build_missing=True).cache  # noqa: B018 (builds it)
    return cfg


def random_transcoder(arch, n_layers, d_model, d_transcoder, activation="relu", k=None, seed=0,
                      **build):  # fmt: skip
    """A transcoder with every parameter random (skip and biases included, JumpReLU
    thresholds in [0, 0.3)), so that a test compares every tensor that matters."""
    from wiremap.models.transcoders import build_transcoder

    torch.manual_seed(seed)
    tc = build_transcoder(arch, n_layers, d_model, d_transcoder, activation, k, **build)
    with torch.no_grad():
        for p in tc.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if activation == "jumprelu":
            tc.activation.set_threshold(torch.rand(n_layers, d_transcoder) * 0.3)
    return tc


TRAIN_BASE = {
    "run.logger": "none",
    "run.checkpoint_every": 2,
    "run.replacement_every": 0,
    "trainer.max_steps": 4,
    "trainer.enable_progress_bar": "false",
    "trainer.val_check_interval": 2,
    "data.cache.context_length": 32,
}


def train_argv(cfg, root, settings: dict, *extra: str) -> list[str]:
    """`wiremap train` arguments for a few steps on the cache of `cfg` (a CacheConfig) under
    `root`: TRAIN_BASE, then `settings` ({"model.d_transcoder": 16, ...}), then `extra`."""
    cache = {f"data.cache.{k}": getattr(cfg, k) for k in ("model", "dataset", "n_tokens", "out")}
    merged = {"run.root": root, **TRAIN_BASE, **cache, **settings}
    return [*(a for key, value in merged.items() for a in (f"--{key}", str(value))), *extra]
