"""Loss terms and metrics for transcoder training (DESIGN.md §3), as plain tensor functions.

    mse = reconstruction_loss(y_hat, y)                      # Σ_l ‖ŷ^l − y^l‖², mean over tokens
    sparsity = tanh_sparsity_loss(a, tc.decoder_norms(), c=4.0)
    preact = preact_loss(pre, threshold, tc.decoder_norms())
    aux = auxk_loss(tc, pre, dead, y - y_hat, k_aux=d_model // 2)
    lam = ramp(step, final=1e-3, ramp_steps=1000)

Shapes: tokens first, then layers: `y, y_hat [N, L, d]`, `a, pre [N, L, F]`,
`decoder_norms, threshold [L, F]`, `dead [L, F]` (bool). Every loss is a sum over layers
and features and a mean over tokens, so its size does not depend on the batch size.

FVU (fraction of variance unexplained) is computed per layer over a batch as
`Σ_n ‖y_n − ŷ_n‖² / Σ_n ‖y_n − ȳ‖²` with ȳ the batch mean of that layer's target.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def reconstruction_loss(y_hat: Tensor, y: Tensor) -> Tensor:
    """Σ_l ‖ŷ^l − y^l‖² per token, averaged over tokens."""
    return (y_hat - y).pow(2).sum(dim=(-1, -2)).mean()


def tanh_sparsity_loss(a: Tensor, decoder_norms: Tensor, c: float = 4.0) -> Tensor:
    """Σ_l Σ_i tanh(c · ‖W_dec,i‖ · a_i^l) per token, averaged over tokens."""
    # c folds into the [L, F] norms first: one full-size multiply instead of two
    return torch.tanh(a * (c * decoder_norms)).sum(dim=(-1, -2)).mean()


def preact_loss(pre: Tensor, threshold: Tensor | None, decoder_norms: Tensor) -> Tensor:
    """Σ ReLU(θ_i − h_i)·‖W_dec,i‖ per token: pushes silent features back towards firing.

    `threshold=None` means θ = 0 (a ReLU).
    """
    theta = 0.0 if threshold is None else threshold
    return (torch.relu(theta - pre) * decoder_norms).sum(dim=(-1, -2)).mean()


def auxk_loss(transcoder, pre: Tensor, dead: Tensor, residual: Tensor, k_aux: int) -> Tensor:
    """Auxiliary-k loss (Gao et al. 2024) on dead features, normalised by the residual variance.

    The `k_aux` largest pre-activations among dead features (per token and layer) decode,
    without bias, towards the detached residual `y − ŷ`; returns
    `Σ‖ê − e‖² / Σ‖e − ē‖²` scaled by `min(1, n_dead / k_aux)`, or 0 without dead features.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k = min(k_aux, pre.shape[-1])
    masked = torch.where(dead, pre, torch.full_like(pre, -math.inf))
    values, indices = masked.topk(k, dim=-1, sorted=False)
    a_aux = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    # decode() adds b_dec; subtracting the decode of zeros leaves only the decoder writes.
    e_hat = transcoder.decode(a_aux) - transcoder.decode(torch.zeros_like(a_aux[:1]))
    e = residual.detach()
    variance = (e - e.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    scale = min(1.0, n_dead / (k * transcoder.n_layers))
    return scale * (e_hat - e).pow(2).sum() / variance


def ramp(step: int, final: float, ramp_steps: int) -> float:
    """Linear warm-up from 0 to `final` over `ramp_steps` steps (λ schedule)."""
    if ramp_steps <= 0:
        return final
    return final * min(1.0, step / ramp_steps)


def lr_factor(
    step: int,
    warmup_steps: int,
    total_steps: int,
    decay: str,
    min_ratio: float,
    decay_steps: int | None = None,
) -> float:
    """Learning-rate multiplier: linear warm-up, a plateau at 1, then `cosine`, `linear` or
    `constant` decay over the last `decay_steps` steps (None: everything after warm-up)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay_steps is None:
        decay_steps = total_steps - warmup_steps
    decay_steps = min(decay_steps, total_steps - warmup_steps)
    start = total_steps - decay_steps
    if decay == "constant" or decay_steps <= 0 or step < start:
        return 1.0
    progress = min(1.0, (step - start) / decay_steps)
    if decay == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_ratio + (1 - min_ratio) * shape


@torch.no_grad()
def fvu_per_layer(y_hat: Tensor, y: Tensor) -> Tensor:
    """[L]: Σ_n ‖y_n − ŷ_n‖² / Σ_n ‖y_n − ȳ‖² per layer (ȳ = batch mean)."""
    y_hat, y = y_hat.float().flatten(0, -3), y.float().flatten(0, -3)
    err = (y - y_hat).pow(2).sum(dim=(0, -1))
    var = (y - y.mean(dim=0)).pow(2).sum(dim=(0, -1))
    return err / var.clamp_min(1e-12)


@torch.no_grad()
def l0_per_layer(a: Tensor) -> Tensor:
    """[L]: mean number of active features per token."""
    return (a != 0).float().flatten(0, -3).sum(dim=-1).mean(dim=0)
