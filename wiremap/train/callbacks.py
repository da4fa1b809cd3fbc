"""Lightning callbacks for transcoder training: NaN guard, throughput, replacement quality, export.

    trainer = L.Trainer(callbacks=[NanGuard(), Throughput(every_n_steps=50),
                                   ReplacementQuality(every_n_steps=1000, n_contexts=16),
                                   ExportTranscoders("runs/gpt2-clt/transcoders")])

- `NanGuard`: a NaN or inf loss stops training *before* its backward pass (so the weights
  and the last checkpoint stay finite) with a WiremapError naming the step and the likely
  cause (bad data in the batch, bf16 overflow, learning rate too high).
- `ReuseHostMemory`: on CPU, keeps freed host memory for reuse (`host_memory.py`), so
  steps stop faulting in fresh pages (`bench/train.py` prints the speed-up).
- `Throughput`: logs training tokens/s (all processes together) every N steps.
- `ProgressLog`: when stdout is not a terminal, prints one line every N steps (step/total,
  tokens/s, ETA, loss, FVU, L0 per layer and in total, dead share, lr), flushed.
- `ReplacementQuality`: every N steps, on the data module's held-out contexts
  (`heldout_contexts`: rebuilt from a cache's validation rows, whose token ids and positions
  are stored beside the activations, or the first contexts of a streamed run), splices the
  transcoders into the language model — every covered layer's `mlp_out` replaced by the
  transcoder's reconstruction, computed from the inputs of the spliced run itself (closed
  loop, one forward pass: `models.hooks.splice_mlp_out`) — and logs the original CE, the
  spliced CE, the CE with those MLPs zero-ablated, the fraction of CE recovered
  `(CE_zero − CE_spliced) / (CE_zero − CE_orig)`, the KL(original ‖ spliced) per token and
  the next-token (argmax) agreement.
- `ExportTranscoders`: at the end of training writes `<run>/transcoders/` with
  `io.save_transcoders` (normalisation folded in, BatchTopK made per-token), a training
  summary in its config.yaml and the resolved training config beside it.
"""

from __future__ import annotations

import datetime
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from wiremap.errors import WiremapError, deprecated
from wiremap.train.host_memory import reuse_freed_memory


class ReuseHostMemory(L.Callback):
    """On CPU runs, turn on `reuse_freed_memory` (process-wide) when fitting starts."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.strategy.root_device.type == "cpu":
            reuse_freed_memory()


class NanGuard(L.Callback):
    """Stop with a WiremapError at the first non-finite loss, before it reaches the weights."""

    def __init__(self) -> None:
        self._batch: Any = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = batch

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        # Every process must agree, or the healthy ones would wait forever in all-reduce.
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise WiremapError(self.message(trainer, pl_module, loss))

    def message(self, trainer, pl_module, loss: Tensor) -> str:
        value = "NaN" if bool(torch.isnan(loss.detach()).any()) else "inf"
        lr = _current_lr(trainer)
        precision = str(trainer.precision)
        if self._batch is not None and not all(bool(torch.isfinite(t).all()) for t in self._batch):
            cause = (
                "bad data: this batch of cached activations itself holds NaN/inf values; "
                "check the cache with ActivationCache(path, verify=True) or rebuild it"
            )
        elif "16" in precision:
            cause = (
                f"a bf16/fp16 overflow or a learning rate too high (lr={lr:.3g}); try "
                "--trainer.precision 32-true, or lower --model.optim.lr"
            )
        else:
            cause = (
                f"a learning rate too high (lr={lr:.3g}); lower --model.optim.lr, lengthen "
                "--model.optim.warmup_fraction or set --trainer.gradient_clip_val 1.0"
            )
        return (
            f"training stopped: the loss became {value} at step {trainer.global_step} "
            f"(precision {precision}). Likely cause: {cause}. {_checkpoint_note(trainer)}"
        )


def _checkpoint_note(trainer) -> str:
    """What the user can resume from: the checkpoints written before the NaN, if any."""
    cb = trainer.checkpoint_callback
    folder = Path(cb.dirpath) if cb is not None and cb.dirpath else None
    if folder is not None and any(folder.glob("*.ckpt")):
        return f"The checkpoints in {folder} are intact; resume with --ckpt_path last after the fix"
    return "No checkpoint had been written yet: after the fix, start the run again"


def _current_lr(trainer) -> float:
    if trainer.optimizers:
        return float(trainer.optimizers[0].param_groups[0]["lr"])
    return math.nan


class TokenRate:
    """Training tokens per second between two readings, timed from the end of the first step
    (the first step carries start-up costs: compilation, page faults, loader start)."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._tokens = 0

    def add(self, n_tokens: int) -> None:
        """Count one finished step of `n_tokens` tokens (all processes together)."""
        if self._start is None:
            self._start = time.perf_counter()
            return
        self._tokens += n_tokens

    def take(self) -> float | None:
        """Tokens/s since the last reading (None before two steps have ended); restarts."""
        now = time.perf_counter()
        if self._start is None or now <= self._start or self._tokens == 0:
            return None
        rate = self._tokens / (now - self._start)
        self._start, self._tokens = now, 0
        return rate


def _step_tokens(trainer, batch) -> int:
    return batch[0].shape[0] * trainer.world_size


class Throughput(L.Callback):
    """Log `perf/tokens_per_s`: training tokens per second over all processes."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = max(1, every_n_steps)
        self._rate = TokenRate()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._rate.add(_step_tokens(trainer, batch))
        if trainer.global_step % self.every_n_steps == 0:
            rate = self._rate.take()
            if rate is None:
                return
            for logger in trainer.loggers:  # direct: self.log would repeat stale values
                logger.log_metrics({"perf/tokens_per_s": rate}, trainer.global_step)


class ProgressLog(L.Callback):
    """A plain progress line every N steps when stdout is not a terminal (nohup, SLURM, a
    pipe), where a progress bar shows nothing readable; on a terminal the bar is enough.

        step 250/300 (83%) | 229 tok/s | ETA 0:01:20 | loss 15.64 | fvu 0.072 |
        l0 43.9/layer, 88 total | dead 0.0% | lr 8.50e-04           (one line in the log)

    The metrics are those of that very step (the module computes them on these steps too).
    """

    def __init__(self, every_n_steps: int = 50, force: bool = False) -> None:
        self.every_n_steps, self.force = every_n_steps, force
        self.enabled = False
        self._rate = TokenRate()
        self._t0: float | None = None
        self._step0 = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        tty = sys.stdout.isatty()
        self.enabled = stage == "fit" and self.every_n_steps > 0 and (self.force or not tty)
        if self.enabled:
            pl_module.progress_every = self.every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled:
            return
        self._rate.add(_step_tokens(trainer, batch))
        step = trainer.global_step
        if self._t0 is None:  # first step of this process (a resumed run starts late)
            self._t0, self._step0 = time.perf_counter(), step
        if step % self.every_n_steps == 0 and trainer.is_global_zero:
            print(self.line(trainer, step), flush=True)

    def line(self, trainer, step: int) -> str:
        total = trainer.max_steps
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        rate = self._rate.take()
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)"]
        parts.append(f"{rate:,.0f} tok/s" if rate else "- tok/s")
        parts.append(f"ETA {self._eta(step, total)}")
        for key, fmt in (("loss", "loss {:.4g}"), ("fvu", "fvu {:.3f}")):
            if f"train/{key}" in m:
                parts.append(fmt.format(m[f"train/{key}"]))
        if "train/l0" in m:
            parts.append(f"l0 {m['train/l0']:.1f}/layer, {m['train/l0_total']:,.0f} total")
        if "train/dead_fraction" in m:
            parts.append(f"dead {100 * m['train/dead_fraction']:.1f}%")
        parts.append(f"lr {_current_lr(trainer):.2e}")
        return " | ".join(parts)

    def _eta(self, step: int, total: int) -> str:
        done = step - self._step0
        if self._t0 is None or done <= 0:
            return "-"
        seconds = (time.perf_counter() - self._t0) / done * max(0, total - step)
        return str(datetime.timedelta(seconds=round(seconds)))


class ReplacementQuality(L.Callback):
    """Every N steps: CE / KL / agreement of the LM with its MLPs replaced by the transcoders.

    `batch_contexts`: held-out contexts per forward pass (`batch_size` is its old name).
    """

    def __init__(
        self, every_n_steps: int = 1000, n_contexts: int = 16, batch_contexts: int = 8,
        batch_size: int | None = None,
    ) -> None:  # fmt: skip
        if batch_size is not None:
            deprecated("ReplacementQuality(batch_size=)", "batch_contexts")
            batch_contexts = batch_size
        self.every_n_steps, self.n_contexts = every_n_steps, n_contexts
        self.batch_contexts = batch_contexts
        self._lm = None
        self._ids: Tensor | None = None
        self.last: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and trainer.is_global_zero:
            self.log_metrics(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every_n_steps > 0 and trainer.is_global_zero:
            self.log_metrics(trainer, pl_module)

    def log_metrics(self, trainer, pl_module) -> None:
        metrics = {
            f"replacement/{k}": v for k, v in self.evaluate(trainer.datamodule, pl_module).items()
        }
        self.last = metrics
        # Straight to the loggers: Lightning forbids self.log in on_train_end.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, trainer.global_step)

    @torch.no_grad()
    def evaluate(self, datamodule, pl_module) -> dict[str, float]:
        """The replacement metrics on the held-out contexts (model loaded on first use)."""
        if self._lm is None:
            self._lm, self._ids = self._setup(datamodule, pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with pl_module.per_token() as tc:
                return replacement_metrics(
                    self._lm, tc, pl_module.in_scale, pl_module.out_scale, self._ids,
                    self.batch_contexts, include_bos=datamodule.include_bos,
                )  # fmt: skip
        finally:
            pl_module.train(was_training)

    def _setup(self, datamodule, device):
        from wiremap.models.loading import load_model

        lm = datamodule.lm_source  # the cache's manifest, or the streamed run's data.cache
        model, _ = load_model(
            lm["model"], lm["model_dtype"], device, lm["revision"], load_tokenizer=False
        )
        ids = datamodule.heldout_contexts(self.n_contexts)
        return model, ids.to(device)


class ExportTranscoders(L.Callback):
    """At the end of training write `folder` (circuit-tracer layout) and the run's config."""

    def __init__(
        self, folder: str | Path, config_path: str | Path | None = None, upload: bool = False
    ) -> None:
        self.folder, self.config_path, self.upload = Path(folder), config_path, upload

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        summary = training_summary(trainer, pl_module)
        export_module(pl_module, self.folder, summary, self.config_path)
        if self.upload:
            upload_artifact(trainer, self.folder)

    def on_fit_end(self, trainer, pl_module) -> None:
        # A run resumed at its last step (killed while exporting) skips on_train_end.
        if not (self.folder / "config.yaml").is_file():
            self.on_train_end(trainer, pl_module)


def export_module(
    pl_module, folder: str | Path, summary: dict[str, Any], config_path: str | Path | None
) -> Path:
    """Write a TranscoderModule's transcoders to `folder` with `io.save_transcoders`
    (normalisation folded in, BatchTopK made per-token; `summary` under `training` in its
    config.yaml) and copy the run's resolved config beside it as `training_config.yaml`."""
    from wiremap.models.formats import save_transcoders

    folder = Path(folder)
    save_transcoders(pl_module.export_transcoder(), folder, extra_config={"training": summary})
    if config_path is not None and Path(config_path).is_file():
        shutil.copyfile(config_path, folder / "training_config.yaml")
    return folder


def upload_artifact(trainer, folder: Path) -> None:
    """Log `folder` as a W&B artifact of type `transcoders` (synced later when offline)."""
    from lightning.pytorch.loggers import WandbLogger

    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers:
        raise WiremapError("run.upload_artifact needs run.logger: wandb")
    import wandb

    run = loggers[0].experiment
    artifact = wandb.Artifact(f"transcoders-{run.id}", type="transcoders")
    artifact.add_dir(str(folder))
    run.log_artifact(artifact)


def training_summary(trainer, pl_module) -> dict[str, Any]:
    """Plain-data facts about the run, stored in the export's config.yaml."""
    from wiremap import __version__

    metrics = {
        k: round(float(v), 6)
        for k, v in trainer.callback_metrics.items()
        if k.startswith(("train/", "val/", "replacement/")) and "/layer_" not in k
    }
    for callback in trainer.callbacks:
        metrics.update(
            getattr(callback, "last", {}) if isinstance(callback, ReplacementQuality) else {}
        )
    return {
        "steps": int(trainer.global_step),
        "tokens": int(trainer.global_step * _tokens_per_step(trainer)),
        "precision": str(trainer.precision),
        "world_size": int(trainer.world_size),
        **module_summary(pl_module),
        "final_metrics": metrics,
        "wiremap_version": __version__,
    }


def module_summary(pl_module) -> dict[str, Any]:
    """The facts every export records about the module: its cache and its settings."""
    return {
        "cache": pl_module.cache_info.get("path"),
        "loss": pl_module.hparams.loss,
        "optim": pl_module.hparams.optim,
    }


def _tokens_per_step(trainer) -> int:
    dm = trainer.datamodule
    size = getattr(dm, "batch_tokens", 0) or 0
    return size * trainer.accumulate_grad_batches


# -- replacement model evaluation ----------------------------------------------------------


def heldout_contexts(cache, start_row: int, n_contexts: int) -> Tensor:
    """Up to `n_contexts` whole contexts `[n, context_length]` rebuilt from rows >= start_row.

    Falls back to the last contexts of the whole cache (seen in training) when the held-out
    rows hold no complete context, e.g. with val_fraction 0.
    """
    m = cache.manifest
    first = 0 if cache.include_bos else 1
    per_context = int(m["context_length"]) - first
    ids = _contexts_from(cache, start_row, per_context, first, n_contexts)
    if ids is None:
        ids = _contexts_from(cache, max(0, cache.n_tokens - n_contexts * per_context * 2),
                             per_context, first, n_contexts)  # fmt: skip
    if ids is None:
        raise WiremapError(
            f"the cache at {cache.path} holds no complete context for the replacement check; "
            "cache more tokens or set the ReplacementQuality every_n_steps to 0"
        )
    if first:
        bos = torch.full((len(ids), 1), int(m["bos_token_id"]), dtype=ids.dtype)
        ids = torch.cat([bos, ids], dim=1)
    return ids


def _contexts_from(cache, lo: int, per_context: int, first: int, n: int) -> Tensor | None:
    rows = torch.arange(lo, cache.n_tokens)
    if len(rows) < per_context:
        return None
    positions, tokens = cache.positions(rows), cache.tokens(rows)
    starts = (positions == first).nonzero().flatten()
    starts = starts[starts + per_context <= len(rows)]
    # a start is whole when its last row carries the last position of a context
    starts = starts[positions[starts + per_context - 1] == first + per_context - 1][:n]
    if len(starts) == 0:
        return None
    return torch.stack([tokens[s : s + per_context] for s in starts.tolist()])


def replacement_metrics(
    lm, tc, in_scale: Tensor, out_scale: Tensor, ids: Tensor, batch_contexts: int = 8,
    keep_bos: bool | None = None, *, include_bos: bool = False,
) -> dict[str, float]:  # fmt: skip
    """CE (original, spliced, zero-ablated), CE recovered, KL and agreement over `ids`, run
    `batch_contexts` contexts at a time.

    `include_bos`: splice the transcoders in at position 0 (BOS) too; by default BOS keeps its
    own MLP outputs, as transcoders trained on a cache without BOS rows never saw them.
    `keep_bos` is the old, negated spelling (deprecated).
    """
    include_bos = _include_bos(include_bos, keep_bos)
    sums: dict[str, float] = {}
    for batch in ids.split(batch_contexts):
        for key, value in _batch_sums(lm, tc, in_scale, out_scale, batch, include_bos).items():
            sums[key] = sums.get(key, 0.0) + value
    n = sums.pop("n")
    out = {k: v / n for k, v in sums.items()}
    gap = out["ce_zero_ablated"] - out["ce_original"]
    out["ce_recovered"] = (out["ce_zero_ablated"] - out["ce_spliced"]) / gap if gap else math.nan
    return out


def _include_bos(include_bos: bool, keep_bos: bool | None) -> bool:
    if keep_bos is None:
        return include_bos
    deprecated("keep_bos=", "include_bos= (its negation)", depth=2)
    return not keep_bos


def _batch_sums(lm, tc, in_scale, out_scale, ids: Tensor, include_bos: bool) -> dict[str, float]:
    from wiremap.models.hooks import replace_mlp_out

    original = lm(ids).logits.float()
    zeros = {layer: torch.zeros(*ids.shape, tc.d_model, device=ids.device) for layer in tc.layers}
    with replace_mlp_out(lm, zeros):
        ablated = lm(ids).logits.float()
    with spliced_transcoders(lm, tc, in_scale, out_scale, include_bos=include_bos):
        spliced = lm(ids).logits.float()
    target = ids[:, 1:].reshape(-1)

    def ce(logits: Tensor) -> float:
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        return float(F.cross_entropy(flat, target, reduction="sum"))

    log_p, log_q = original.log_softmax(-1), spliced.log_softmax(-1)
    return {
        "ce_original": ce(original),
        "ce_spliced": ce(spliced),
        "ce_zero_ablated": ce(ablated),
        "kl": float((log_p.exp() * (log_p - log_q)).sum(-1)[:, :-1].sum()),
        "agreement": float((original.argmax(-1) == spliced.argmax(-1))[:, :-1].sum()),
        "n": float(target.numel()),
    }


def spliced_mlp_outputs(
    lm, tc, in_scale, out_scale, ids: Tensor, keep_bos: bool | None = None, *,
    include_bos: bool = False,
) -> dict[int, Tensor]:  # fmt: skip
    """Closed-loop reconstructions {model layer: mlp_out} of the fully spliced model on `ids`."""
    recon: dict[int, Tensor] = {}
    include_bos = _include_bos(include_bos, keep_bos)
    with spliced_transcoders(lm, tc, in_scale, out_scale, include_bos=include_bos, recon=recon):
        lm(ids)
    return recon


def spliced_transcoders(
    lm, tc, in_scale, out_scale, keep_bos: bool | None = None, recon: dict | None = None, *,
    include_bos: bool = False,
):  # fmt: skip
    """Context: every covered layer's `mlp_out` replaced by the (normalised) transcoder's
    reconstruction of its live input, in one pass (`models.hooks.splice_mlp_out`).

    Decoder writes of each layer's features are added to all later outputs at once (no
    [.., L, F] tensor). Unless `include_bos`, position 0 keeps the model's own MLP outputs
    (BOS sees only itself, so its stream is the clean one). Reconstructions go into `recon`.
    `keep_bos` is the old, negated spelling of `include_bos` (deprecated).
    """
    from wiremap.models.hooks import splice_mlp_out

    include_bos = _include_bos(include_bos, keep_bos)

    recon = {} if recon is None else recon
    index = {layer: i for i, layer in enumerate(tc.layers)}
    partial: dict[int, Tensor] = {}  # decoder writes so far, by transcoder index

    def splice(layer: int, x: Tensor, out: Tensor) -> Tensor:
        i = index[layer]
        x = x.float() * in_scale[i]
        a = tc.encode(x, i)
        dec = tc.decoder(i)  # [F, n_out, d]: writes to layers i .. i + n_out - 1
        for j in range(dec.shape[1]):
            partial[i + j] = partial.get(i + j, tc.b_dec[i + j].float()) + a @ dec[:, j, :]
        y = (partial.pop(i) + tc.skip(x, i)) / out_scale[i]
        if not include_bos:
            y[:, 0] = out[:, 0]
        recon[layer] = y
        return y

    return splice_mlp_out(lm, splice, tc.input_hook, layers=tc.layers)
