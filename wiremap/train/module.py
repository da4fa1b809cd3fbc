"""The LightningModule that trains a transcoder (PLT or CLT) on cached activations.

    module = TranscoderModule(n_layers=12, d_model=768, arch="clt", d_transcoder=4096,
                              activation="jumprelu", cache_info=datamodule.cache_info)
    trainer.fit(module, datamodule=datamodule)
    tc = module.export_transcoder()     # works on raw activations (normalisation folded in)

Loss (DESIGN.md §3), on activations normalised per layer by a scalar so that E‖x‖ = √d:
- `mse`: Σ_l ‖ŷ^l − y^l‖² (mean over tokens);
- `sparsity` (relu, jumprelu): λ_t · Σ tanh(c·‖W_dec,i‖·a_i), λ_t ramped linearly from 0
  over `loss.sparsity_ramp` of the run;
- `preact` (relu, jumprelu): λ_p · Σ ReLU(θ_i − h_i)·‖W_dec,i‖ against dead features;
- `auxk` (topk, batchtopk): auxiliary-k loss on features dead for `loss.dead_tokens` tokens.

ReLU and JumpReLU compute encoder, activation, `sparsity` and `preact` in one pass through
`fused.fused_encode` (same values and gradients, a fraction of the memory traffic), and
decode from the active features only when a batch is sparse enough (`sparse.worth_it`).
TopK and BatchTopK run one dense encoder matmul and everything else (decode, AuxK, the
decoder's and encoder's weight gradients) over the active features (`sparse.py`). The
unfused `forward` + `loss_terms` path stays the reference that tests hold both to.

The per-layer scales come from the cache manifest's `norm_stats` when present, else from
the first training batch (averaged over processes); they are buffers, so checkpoints keep
them. Weights, θ and the optimiser state are float32; `bf16-mixed` only autocasts matmuls.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from wiremap.errors import WiremapError
from wiremap.models.activations import BatchTopK, JumpReLU, ReLU
from wiremap.models.transcoders import Transcoder, build_transcoder, fold_normalisation
from wiremap.train import losses, sparse
from wiremap.train.fused import fused_encode

SPARSE_BY_K = ("topk", "batchtopk")


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms."""

    sparsity_coef: float = 1.0
    """Final λ of the tanh sparsity penalty (relu, jumprelu). It prices one active feature
    against reconstruction (≈ d_model · FVU per layer in normalised units): 1.0 gave 37–52
    active features per token and layer on SmolLM2 (d_model 576, F 2048; README); scale it
    with d_model, raise it for fewer features."""
    sparsity_c: float = 4.0
    """Stretch constant c inside tanh(c·‖W_dec‖·a)."""
    sparsity_ramp: float = 0.8
    """Fraction of the run over which λ rises linearly from 0 (default: until the learning
    rate starts to decay, so the features settle at the final λ)."""
    preact_coef: float = 3e-6
    """λ_p of the pre-activation loss against dead features (relu, jumprelu; 0 = off)."""
    auxk_coef: float = 1 / 32
    """Weight of the auxiliary-k loss (topk, batchtopk)."""
    k_aux: int | None = None
    """Dead features decoded by the auxiliary-k loss per token and layer (None: d_model/2)."""
    dead_tokens: int = 10_000_000
    """A feature silent for this many training tokens counts as dead."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW; linear warm-up, a plateau, then a decay over the end of the run.

    Warm-up and decay are fractions of `trainer.max_steps`, so one preset fits a run of any
    length. The peak learning rate shrinks with the dictionary width as in sparsify
    (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"; EleutherAI's sparsify:
    2e-4 / √(F / 2^14)): wider dictionaries spread the same signal over more, noisier
    gradient entries. `base_lr` is 5x sparsify's because short runs need the larger rate
    (issue 11: on a SmolLM2 layer at F 4608, 3e-3 reached FVU 0.35 where sparsify's 3.8e-4
    reached 0.39); the README's SmolLM2 recipe uses it.
    """

    lr: float | None = None
    """Peak learning rate; None = base_lr · √(lr_ref_width / d_transcoder)."""
    base_lr: float = 1e-3
    """Peak learning rate at `lr_ref_width` features per layer (used when `lr` is None)."""
    lr_ref_width: int = 16384
    """The dictionary width F_ref at which the peak learning rate is `base_lr`."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    warmup_fraction: float = 0.05
    """Linear warm-up over this fraction of the run."""
    warmup_steps: int | None = None
    """Linear warm-up steps; when set, overrides `warmup_fraction` (older presets)."""
    decay_fraction: float = 0.2
    """The last fraction of the run over which the rate decays to min_lr_ratio·lr
    (1.0: decay from the end of warm-up on)."""
    decay: Literal["cosine", "linear", "constant"] = "linear"
    """Shape of that decay (`constant`: no decay)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""

    def __post_init__(self) -> None:
        for name in ("warmup_fraction", "decay_fraction", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise WiremapError(f"optim.{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.warmup_fraction + self.decay_fraction > 1.0:
            raise WiremapError(
                f"optim.warmup_fraction ({self.warmup_fraction}) + optim.decay_fraction "
                f"({self.decay_fraction}) exceed the whole run; lower one of them"
            )
        if (self.lr if self.lr is not None else self.base_lr) <= 0:
            raise WiremapError("the learning rate (optim.lr or optim.base_lr) must be positive")

    def peak_lr(self, d_transcoder: int) -> float:
        """The peak learning rate for `d_transcoder` features per layer."""
        if self.lr is not None:
            return self.lr
        return self.base_lr * math.sqrt(self.lr_ref_width / d_transcoder)

    def phases(self, total_steps: int) -> tuple[int, int]:
        """(warm-up steps, decay steps) of a run of `total_steps` steps."""
        warmup = self.warmup_steps
        if warmup is None:
            warmup = round(self.warmup_fraction * total_steps)
        return warmup, round(self.decay_fraction * total_steps)


class StepOutputs(NamedTuple):
    terms: dict[str, Tensor]
    """The weighted loss terms; their sum is the training loss."""
    y_hat: Tensor
    """[N, L, d] reconstructions (normalised units)."""
    a: Tensor
    """[N, L, F] feature activations (a detached sparse COO tensor on the sparse path)."""
    active: Tensor
    """[L, F] tokens on which each feature fired."""


def _autocast_dtype(device: torch.device) -> torch.dtype:
    """The matmul dtype autocast would use here (float32 when autocast is off)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


def _as(cls, value):
    return cls(**value) if isinstance(value, dict) else (value or cls())


class TranscoderModule(L.LightningModule):
    """Loss, optimiser, normalisation, dead-feature tracking and metrics around a Transcoder."""

    decode_sparse: ClassVar[bool] = True
    """Decode from the active features only (`sparse.py`): always for TopK and BatchTopK, for
    ReLU and JumpReLU when a batch is sparse enough (`sparse.worth_it`). Benches set it False
    to time the dense path."""
    progress_every: int = 0
    """Also compute the train/* metrics every this many steps (set by callbacks.ProgressLog)."""

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        arch: Literal["plt", "skip_plt", "clt", "skip_clt"] = "clt",
        d_transcoder: int = 1024,
        activation: Literal["relu", "jumprelu", "topk", "batchtopk"] = "jumprelu",
        k: int | None = None,
        activation_kwargs: dict[str, Any] | None = None,
        loss: LossConfig | None = None,
        optim: OptimConfig | None = None,
        normalise: bool = True,
        cache_info: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            n_layers: Layers covered (read from the cache by `wiremap train`).
            d_model: Width of the activations (read from the cache by `wiremap train`).
            arch: Transcoder architecture.
            d_transcoder: Features per layer.
            activation: Activation function.
            k: Active features per token and layer for topk / batchtopk.
            activation_kwargs: Extra activation options, e.g. {bandwidth: 1e-3,
                init_threshold: 1e-3} for jumprelu.
            loss: Loss weights.
            optim: Optimiser and schedule.
            normalise: Scale inputs and targets per layer so that E‖x‖ = √d_model.
            cache_info: Facts about the cache (model, layers, hooks, norm_stats); linked
                from the data module by `wiremap train`.
        """
        super().__init__()
        self.loss_cfg, self.optim_cfg = _as(LossConfig, loss), _as(OptimConfig, optim)
        info = cache_info or {}
        self.cache_info = info
        self.save_hyperparameters(
            {
                "n_layers": n_layers, "d_model": d_model, "arch": arch,
                "d_transcoder": d_transcoder, "activation": activation, "k": k,
                "activation_kwargs": activation_kwargs, "loss": asdict(self.loss_cfg),
                "optim": asdict(self.optim_cfg), "normalise": normalise, "cache_info": info,
            }
        )  # fmt: skip
        self.transcoder: Transcoder = build_transcoder(
            arch, n_layers, d_model, d_transcoder, activation, k,
            input_hook=info.get("input_hook", "mlp_in"),
            output_hook=info.get("output_hook", "mlp_out"),
            model_name=info.get("model"), layers=info.get("layers"),
            **(activation_kwargs or {}),
        )  # fmt: skip
        self.normalise = normalise
        self.register_buffer("in_scale", torch.ones(n_layers))
        self.register_buffer("out_scale", torch.ones(n_layers))
        self.register_buffer("scales_ready", torch.tensor(not normalise))
        self.register_buffer("silent_tokens", torch.zeros(n_layers, d_transcoder, dtype=torch.long))
        if normalise and info.get("norm_stats"):
            self._scales_from_stats(info["norm_stats"])

    # -- normalisation ----------------------------------------------------------------
    def _scales_from_stats(self, stats: dict[str, Any]) -> None:
        root_d = math.sqrt(self.transcoder.d_model)
        for key, buf in (("input", self.in_scale), ("output", self.out_scale)):
            norms = torch.as_tensor(stats[key]["mean_norm"], dtype=torch.float32)
            buf.copy_(root_d / norms.clamp_min(1e-12))
        self.scales_ready.fill_(True)

    @torch.no_grad()
    def _estimate_scales(self, x: Tensor, y: Tensor) -> None:
        norms = torch.stack([x.norm(dim=-1).mean(0), y.norm(dim=-1).mean(0)])  # [2, L]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(norms)
            norms /= dist.get_world_size()
        root_d = math.sqrt(self.transcoder.d_model)
        self.in_scale.copy_(root_d / norms[0].clamp_min(1e-12))
        self.out_scale.copy_(root_d / norms[1].clamp_min(1e-12))
        self.scales_ready.fill_(True)

    def normalised(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Raw x, y [N, L, d] -> the normalised activations the transcoder sees."""
        if not bool(self.scales_ready):
            self._estimate_scales(x, y)
        return x * self.in_scale[:, None], y * self.out_scale[:, None]

    # -- forward and loss -----------------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised x [N, L, d] -> (y_hat [N, L, d], a [N, L, F], pre [N, L, F])."""
        tc = self.transcoder
        pre = tc.pre_activations(x)
        a = tc.activation(pre)
        y_hat = tc.decode(a)
        if tc.has_skip:
            y_hat = y_hat + tc.skip(x)
        return y_hat, a, pre

    @property
    def sparse_by_k(self) -> bool:
        return self.hparams.activation in SPARSE_BY_K

    @property
    def fused(self) -> bool:
        """ReLU and JumpReLU train through `fused_encode` (same math, a fraction of the passes)."""
        return type(self.transcoder.activation) in (ReLU, JumpReLU)

    def sparsity_lambda(self) -> float:
        total = self._total_steps()
        ramp_steps = int(self.loss_cfg.sparsity_ramp * total) if total else 0
        return losses.ramp(self.global_step, self.loss_cfg.sparsity_coef, ramp_steps)

    def step_outputs(self, x: Tensor, y: Tensor) -> StepOutputs:
        """Normalised x, y [N, L, d] -> the loss terms, ŷ, a and per-feature firing counts."""
        if self.fused:
            return self._fused_outputs(x, y)
        if self.sparse_by_k and self.decode_sparse:
            return self._sparse_outputs(x, y)
        y_hat, a, pre = self(x)
        active = (a != 0).sum(dim=0, dtype=torch.float32)
        return StepOutputs(self.loss_terms(y_hat, y, a, pre), y_hat, a, active)

    def _fused_outputs(self, x: Tensor, y: Tensor) -> StepOutputs:
        cfg, tc = self.loss_cfg, self.transcoder
        norms = tc.decoder_norms()
        theta = tc.activation.threshold()
        bandwidth = getattr(tc.activation, "bandwidth", 1.0)
        out = fused_encode(
            x, tc.W_enc, tc.b_enc, theta, cfg.sparsity_c * norms,
            bandwidth=bandwidth, mm_dtype=_autocast_dtype(x.device),
        )  # fmt: skip
        n = x.shape[0]
        if self.decode_sparse and sparse.worth_it(float(out.active.sum()), out.a.numel()):
            bags, values = sparse.dense_bags(out.a.transpose(0, 1), out.window)
            y_hat = sparse.decode(tc, bags, values, n)
        else:
            y_hat = tc.decode(out.a)
        if tc.has_skip:
            y_hat = y_hat + tc.skip(x)
        terms = {"mse": losses.reconstruction_loss(y_hat, y)}
        terms["sparsity"] = self.sparsity_lambda() * out.tanh_sum / n
        if cfg.preact_coef > 0:
            terms["preact"] = cfg.preact_coef * (out.gap_sum * norms).sum() / n
        return StepOutputs(terms, y_hat, out.a, out.active)

    def _sparse_outputs(self, x: Tensor, y: Tensor) -> StepOutputs:
        """TopK / BatchTopK: dense encoder matmul, everything else over the active set only
        (`sparse.py`; same values and gradients as `forward` + `loss_terms`)."""
        cfg, tc = self.loss_cfg, self.transcoder
        with torch.no_grad():
            pre = tc.pre_activations(x)
        bags, values = sparse.encode(tc, x, pre)
        y_hat = sparse.decode(tc, bags, values, x.shape[0])
        if tc.has_skip:
            y_hat = y_hat + tc.skip(x)
        terms = {"mse": losses.reconstruction_loss(y_hat, y)}
        if cfg.auxk_coef > 0:
            k_aux = cfg.k_aux or tc.d_model // 2
            aux = sparse.auxk_loss(tc, x, pre, self.dead_mask(), y - y_hat, k_aux)
            terms["auxk"] = cfg.auxk_coef * aux
        a = sparse.to_coo(bags, values, pre.shape)
        active = bags.active(values).view(tc.n_layers, tc.d_transcoder)
        return StepOutputs(terms, y_hat, a, active)

    def loss_terms(self, y_hat: Tensor, y: Tensor, a: Tensor, pre: Tensor) -> dict[str, Tensor]:
        """The weighted loss terms (their sum is the training loss), unfused."""
        cfg, tc = self.loss_cfg, self.transcoder
        terms = {"mse": losses.reconstruction_loss(y_hat, y)}
        if self.sparse_by_k:
            if cfg.auxk_coef > 0:
                k_aux = cfg.k_aux or tc.d_model // 2
                aux = losses.auxk_loss(tc, pre, self.dead_mask(), y - y_hat, k_aux)
                terms["auxk"] = cfg.auxk_coef * aux
            return terms
        norms = tc.decoder_norms()
        lam = self.sparsity_lambda()
        terms["sparsity"] = lam * losses.tanh_sparsity_loss(a, norms, cfg.sparsity_c)
        if cfg.preact_coef > 0:
            theta = tc.activation.threshold()
            terms["preact"] = cfg.preact_coef * losses.preact_loss(pre, theta, norms)
        return terms

    # -- dead features -----------------------------------------------------------------
    def dead_mask(self) -> Tensor:
        """[L, F] bool: features silent for at least `loss.dead_tokens` training tokens."""
        return self.silent_tokens >= self.loss_cfg.dead_tokens

    @torch.no_grad()
    def track_firing(self, active: Tensor, n_tokens: int) -> None:
        """Count silent tokens per feature from this batch's firing counts `active` [L, F]."""
        fired = (active > 0).to(torch.int32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(fired, op=dist.ReduceOp.MAX)
            n_tokens *= dist.get_world_size()
        self.silent_tokens.add_(n_tokens).masked_fill_(fired.bool(), 0)

    # -- Lightning steps -------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = self.normalised(*batch)
        out = self.step_outputs(x, y)
        loss = torch.stack(list(out.terms.values())).sum()
        self.track_firing(out.active, x.shape[0])
        if self._log_now():
            self._log_train(loss, out, y, x.shape[0])
        return loss

    def _log_now(self) -> bool:
        # Lightning writes on-step metrics when (step + 1) % log_every_n_steps == 0; the
        # progress line (callbacks.ProgressLog) asks for its own steps via `progress_every`.
        step = self.global_step + 1
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        extra = self.progress_every
        return (every > 0 and step % every == 0) or (extra > 0 and step % extra == 0)

    def _log_train(self, loss: Tensor, out: StepOutputs, y: Tensor, n_tokens: int) -> None:
        metrics = {
            "train/loss": loss.detach(),
            **{f"train/{k}": v.detach() for k, v in out.terms.items()},
        }
        metrics.update(_per_layer("train/fvu", losses.fvu_per_layer(out.y_hat, y)))
        metrics.update(l0_metrics("train", out.active.sum(-1) / n_tokens))
        metrics["train/dead_fraction"] = self.dead_mask().float().mean()
        metrics["train/lambda"] = self.sparsity_lambda()
        if self._trainer is not None and self.trainer.lr_scheduler_configs:
            metrics["train/lr"] = self.trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)
        bar = {"fvu": "train/fvu", "l0": "train/l0", "l0_total": "train/l0_total"}
        for short, key in bar.items():
            self.log(short, metrics[key], prog_bar=True, logger=False)

    def on_validation_epoch_start(self) -> None:
        self._val_sums: dict[str, Tensor] = {}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = self.normalised(*batch)
        out = self.step_outputs(x, y)
        sums = {
            "err": (y - out.y_hat).pow(2).sum(dim=(0, -1)),  # [L]
            "sq": y.pow(2).sum(dim=(0, -1)),
            "sum": y.sum(dim=0),  # [L, d]
            "active": out.active.sum(dim=-1),
            "n": torch.tensor(float(x.shape[0]), device=x.device),
        }
        for key, value in sums.items():
            self._val_sums[key] = self._val_sums.get(key, 0) + value.float()

    def on_validation_epoch_end(self) -> None:
        if not self._val_sums:
            return
        s = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in self._val_sums.items()}
        variance = s["sq"] - s["sum"].pow(2).sum(-1) / s["n"]
        metrics = _per_layer("val/fvu", s["err"] / variance.clamp_min(1e-12))
        metrics.update(l0_metrics("val", s["active"] / s["n"]))
        self.log_dict(metrics, on_epoch=True, rank_zero_only=True)

    # -- optimiser -----------------------------------------------------------------------
    def _total_steps(self) -> int:
        if self._trainer is None:
            return 0
        total = self.trainer.max_steps
        if total is None or total < 0:
            est = self.trainer.estimated_stepping_batches
            total = int(est) if math.isfinite(est) else 0
        return total

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        params = list(self.parameters())
        optimizer = torch.optim.AdamW(
            params, lr=cfg.peak_lr(self.transcoder.d_transcoder), betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay, fused=self._fused_adam_ok(params),
        )  # fmt: skip
        total = self._total_steps()
        warmup, decay_steps = cfg.phases(total)

        def factor(step: int) -> float:
            return losses.lr_factor(step, warmup, total, cfg.decay, cfg.min_lr_ratio, decay_steps)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _fused_adam_ok(self, params: list[Tensor]) -> bool:
        """One fused AdamW kernel per step (7x faster than the loop on CPU), unless a GradScaler
        (16-mixed) has to unscale the gradients before clipping."""
        plugin = self.trainer.precision_plugin if self._trainer is not None else None
        scaled = getattr(plugin, "scaler", None) is not None
        return not scaled and all(p.device.type in ("cpu", "cuda") for p in params)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        if not optimizer.defaults.get("fused") or not gradient_clip_val:
            return super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
        # Lightning's AMP plugin refuses to clip for any fused optimizer (fp16 scalers unscale
        # inside it); AdamW is fused only without a scaler, so these are the true gradients.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    # -- checkpoints and export -----------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {})
        keys = ("n_layers", "d_model", "arch", "d_transcoder", "activation")
        diff = [
            f"{k}: {saved[k]} vs {self.hparams[k]}"
            for k in keys
            if k in saved and saved[k] != self.hparams[k]
        ]  # noqa: E501
        if diff:
            raise WiremapError(
                "the checkpoint does not match this run (checkpoint vs config: "
                + "; ".join(diff)
                + "); resume with the preset and cache it was trained with"
            )

    @contextmanager
    def per_token(self) -> Iterator[Transcoder]:
        """The transcoder with BatchTopK temporarily swapped for its calibrated JumpReLU."""
        tc = self.transcoder
        act = tc.activation
        if not isinstance(act, BatchTopK):
            yield tc
            return
        tc.set_activation(act.to_jumprelu())
        try:
            yield tc
        finally:
            tc.set_activation(act)

    @torch.no_grad()
    def export_transcoder(self) -> Transcoder:
        """A float32 CPU copy for raw activations: scales folded, BatchTopK made per-token."""
        with self.per_token() as tc:
            folded = fold_normalisation(tc, self.in_scale.cpu(), self.out_scale.cpu())
        return folded.float().cpu()


def _per_layer(name: str, values: Tensor) -> dict[str, Tensor]:
    """`name/layer_i` for each layer and `name` = the mean over layers."""
    out = {f"{name}/layer_{i}": v for i, v in enumerate(values)}
    out[name] = values.mean()
    return out


def l0_metrics(prefix: str, per_layer: Tensor) -> dict[str, Tensor]:
    """L0 under its one set of names: `<prefix>/l0` = active features per token and layer
    (mean over layers), `<prefix>/l0/layer_i`, and `<prefix>/l0_total` = summed over layers
    (what a token activates in the whole replacement model)."""
    out = _per_layer(f"{prefix}/l0", per_layer)
    out[f"{prefix}/l0_total"] = per_layer.sum()
    return out
