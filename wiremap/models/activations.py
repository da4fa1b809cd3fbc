"""Sparsity-inducing activation functions for transcoders, registered by name.

    act = build_activation("jumprelu", n_layers=4, d_transcoder=512, bandwidth=1e-3)
    a = act(pre)              # pre [..., L, F] -> a [..., L, F] (all layers at once)
    a3 = act(pre3, layer=3)   # pre3 [..., F]  -> a3 [..., F]   (one layer)

Names: `relu`, `jumprelu`, `topk`, `batchtopk`. A new activation is one class with
`@register_activation("name")`. Every activation takes `(n_layers, d_transcoder, k=None,
**kwargs)`, so a transcoder can build any of them from its config, and `config()` returns
those kwargs back.

JumpReLU keeps `log_threshold [L, F]` in float32 and compares in float32 even under
autocast (a bf16 threshold has only ~3 significant digits). Its threshold gradient is the
straight-through estimator of Rajamanoharan et al. (2024) with a rectangle kernel of
bandwidth ε: ∂a/∂θ = −(θ/ε)·1[|x−θ| < ε/2]. That is the exact θ-derivative of a smoothed
JumpReLU that falls linearly-in-θ² from x to 0 over the window (see `smoothed_jumprelu`).

BatchTopK keeps the `k · n_tokens` largest pre-activations of the whole batch per layer.
For per-token inference it becomes a JumpReLU (`to_jumprelu`). Calibration statistic
(our choice, as in Bussmann et al. 2024): while training, each batch records per layer
the smallest activation it kept (the batch-level threshold it effectively used); the
activation keeps an exponential moving average of it (`batch_threshold [L]`,
`threshold_momentum`, default 0.01, the first batch initialises it). `to_jumprelu()` turns
that per-layer value into a per-feature threshold `[L, F]` (the same value for every
feature of a layer); pass an explicit `[L]` or `[L, F]` threshold to override it, e.g. one
the training side calibrated on held-out data. Callers may also feed thresholds they
computed themselves through `record_batch_threshold`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from wiremap.errors import WiremapError
from wiremap.models.registry import Registry

ACTIVATIONS: Registry[type[Activation]] = Registry("activation")


def register_activation(
    name: str, *, replace: bool = False
) -> Callable[[type[Activation]], type[Activation]]:
    """Class decorator: make an `Activation` subclass buildable by `name` (a taken name
    raises a WiremapError unless `replace=True`)."""
    return ACTIVATIONS.register_class(name, attr="name", replace=replace)


def build_activation(
    name: str, n_layers: int, d_transcoder: int, k: int | None = None, **kwargs: Any
) -> Activation:
    """Build a registered activation for `n_layers` layers of `d_transcoder` features."""
    return ACTIVATIONS.lookup(name)(n_layers, d_transcoder, k=k, **kwargs)


class Activation(nn.Module):
    """Base class: `forward(pre, layer=None)` maps pre-activations to feature activations.

    With `layer=None` the input is `[..., L, F]`; with an int layer it is `[..., F]`.
    """

    name: ClassVar[str] = ""

    def __init__(self, n_layers: int, d_transcoder: int, k: int | None = None) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.d_transcoder = d_transcoder
        self.k = k

    def forward(self, pre: Tensor, layer: int | None = None) -> Tensor:
        raise NotImplementedError

    def threshold(self, layer: int | None = None) -> Tensor | None:
        """Per-feature threshold (`[F]`, or `[L, F]` for all layers); None if not a JumpReLU."""
        return None

    def config(self) -> dict[str, Any]:
        """The kwargs that rebuild this activation with `build_activation`."""
        return {"activation": self.name, "k": self.k}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "activation")


@register_activation("relu")
class ReLU(Activation):
    """max(x, 0)."""

    def forward(self, pre: Tensor, layer: int | None = None) -> Tensor:
        return torch.relu(pre)


class _JumpReLUFn(torch.autograd.Function):
    """x·1[x > θ]; d/dx = 1[x > θ]; d/dθ = −(θ/ε)·1[|x − θ| < ε/2] (rectangle kernel)."""

    @staticmethod
    def forward(ctx, x: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        on = x > theta
        ctx.save_for_backward(x, theta, on)  # the mask is reused, not recomputed, in backward
        ctx.bandwidth = bandwidth
        return x * on

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, theta, on = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_x = grad * on if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            window = (x - theta).abs() < eps / 2
            # reduce over the batch first (in θ's float32, as before), then scale by -θ/ε on
            # the small [.., F] result
            masked = (window * grad).to(theta.dtype)
            grad_theta = masked.sum_to_size(theta.shape) * (-(theta / eps))
        return grad_x, grad_theta, None


class _StepFn(torch.autograd.Function):
    """1[x > θ]; d/dx = 0; d/dθ = −(1/ε)·1[|x − θ| < ε/2] (for L0-style losses)."""

    @staticmethod
    def forward(ctx, x: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, theta)
        ctx.bandwidth = bandwidth
        return (x > theta).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        window = (x - theta).abs() < eps / 2
        grad_theta = (-(1.0 / eps) * window * grad).sum_to_size(theta.shape)
        return None, grad_theta, None


def smoothed_jumprelu(x: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """The function whose exact θ-gradient is JumpReLU's straight-through estimate.

    Equal to x·1[x>θ] outside the window |x−θ| < ε/2; inside it falls from x to 0 as
    x − (θ² − (x−ε/2)²)/(2ε) (the drop integrates to x because ∫θ dθ/ε over the window = x).
    Used by tests to check the estimator against finite differences.
    """
    eps = bandwidth
    low = x - eps / 2
    inside = x - (theta**2 - low**2) / (2 * eps)
    return torch.where(theta <= low, x, torch.where(theta >= x + eps / 2, 0.0, inside))


def _select_layer(t: Tensor, layer: int | None) -> Tensor:
    return t if layer is None else t[layer]


@register_activation("jumprelu")
class JumpReLU(Activation):
    """x·1[x > θ] with a learned per-feature threshold θ = exp(log_threshold) in float32."""

    def __init__(
        self,
        n_layers: int,
        d_transcoder: int,
        k: int | None = None,
        bandwidth: float = 1e-3,
        init_threshold: float = 1e-3,
    ) -> None:
        super().__init__(n_layers, d_transcoder, k)
        if bandwidth <= 0 or init_threshold <= 0:
            raise WiremapError("jumprelu needs bandwidth > 0 and init_threshold > 0")
        self.bandwidth = float(bandwidth)
        self.init_threshold = float(init_threshold)
        log_t = torch.full((n_layers, d_transcoder), float(init_threshold)).log()
        self.log_threshold = nn.Parameter(log_t)

    def _apply(self, fn, recurse: bool = True):
        # `.to(bfloat16)` / `.half()` would round θ; keep it float32 whatever the module dtype.
        super()._apply(fn, recurse)
        if self.log_threshold.dtype != torch.float32:
            self.log_threshold.data = self.log_threshold.data.float()
        return self

    def threshold(self, layer: int | None = None) -> Tensor:
        return _select_layer(self.log_threshold, layer).float().exp()

    def set_threshold(self, threshold: Tensor) -> None:
        """Set θ from a `[L, F]` tensor of non-negative values (0 gives a plain ReLU)."""
        threshold = torch.as_tensor(threshold, dtype=torch.float32)
        if threshold.shape != self.log_threshold.shape or bool((threshold < 0).any()):
            raise WiremapError(
                f"a JumpReLU threshold must be non-negative with shape "
                f"{tuple(self.log_threshold.shape)}; got shape {tuple(threshold.shape)}"
            )
        with torch.no_grad():
            self.log_threshold.copy_(threshold.to(self.log_threshold.device).log())

    def forward(self, pre: Tensor, layer: int | None = None) -> Tensor:
        theta = self.threshold(layer)
        out = _JumpReLUFn.apply(pre.float(), theta, self.bandwidth)
        return out.to(pre.dtype)

    def step(self, pre: Tensor, layer: int | None = None) -> Tensor:
        """1[pre > θ] with the rectangle-kernel gradient for θ (an L0 penalty's building block)."""
        return _StepFn.apply(pre.float(), self.threshold(layer), self.bandwidth)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "bandwidth": self.bandwidth}


def _check_k(k: int | None, d_transcoder: int, name: str) -> int:
    if k is None or not 0 < int(k) <= d_transcoder:
        raise WiremapError(f"{name} needs an integer k with 0 < k <= d_transcoder ({d_transcoder})")
    return int(k)


@register_activation("topk")
class TopK(Activation):
    """Per token and layer: keep the k largest pre-activations (ReLU'd), zero the rest."""

    def __init__(self, n_layers: int, d_transcoder: int, k: int | None = None) -> None:
        super().__init__(n_layers, d_transcoder, _check_k(k, d_transcoder, "topk"))

    def forward(self, pre: Tensor, layer: int | None = None) -> Tensor:
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))


@register_activation("batchtopk")
class BatchTopK(Activation):
    """Per layer: keep the k·n_tokens largest pre-activations over the whole batch."""

    def __init__(
        self,
        n_layers: int,
        d_transcoder: int,
        k: int | None = None,
        threshold_momentum: float = 0.01,
    ) -> None:
        super().__init__(n_layers, d_transcoder, _check_k(k, d_transcoder, "batchtopk"))
        self.threshold_momentum = float(threshold_momentum)
        self.register_buffer("batch_threshold", torch.zeros(n_layers))
        self.register_buffer("n_recorded", torch.zeros(n_layers, dtype=torch.long))

    def forward(self, pre: Tensor, layer: int | None = None) -> Tensor:
        if layer is None:
            # [..., L, F] -> [L, n_tokens * F]
            flat = pre.reshape(-1, self.n_layers, pre.shape[-1]).transpose(0, 1)
            flat = flat.reshape(self.n_layers, -1)
            layers = list(range(self.n_layers))
        else:
            flat = pre.reshape(1, -1)
            layers = [layer]
        values, indices = self._keep(flat, layers)
        kept = torch.zeros_like(flat).scatter(-1, indices, values)
        if layer is not None:
            return kept.reshape(pre.shape)
        shape = (self.n_layers, -1, pre.shape[-1])
        return kept.reshape(shape).transpose(0, 1).reshape(pre.shape)

    def select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """pre [..., L, F] -> (values, indices) [L, k·n_tokens]: each layer's kept
        pre-activations (ReLU'd) and their indices into that layer's flattened [n_tokens·F]
        (the sparse training path); records the batch threshold while training."""
        flat = pre.reshape(-1, self.n_layers, pre.shape[-1]).transpose(0, 1)
        return self._keep(flat.reshape(self.n_layers, -1), list(range(self.n_layers)))

    def _keep(self, flat: Tensor, layers: list[int]) -> tuple[Tensor, Tensor]:
        n_tokens = flat.shape[1] // self.d_transcoder
        values, indices = flat.topk(self.k * n_tokens, dim=-1, sorted=False)
        values = torch.relu(values)
        if self.training:
            self._record_kept_minimum(values.detach(), layers)
        return values, indices

    @torch.no_grad()
    def _record_kept_minimum(self, kept: Tensor, layers: list[int]) -> None:
        # The smallest positive kept value is the threshold this batch effectively used.
        positive = torch.where(kept > 0, kept, torch.full_like(kept, float("inf")))
        minimum = positive.min(dim=-1).values.float()
        self.record_batch_threshold(minimum, layers)

    @torch.no_grad()
    def record_batch_threshold(self, threshold: Tensor, layers: list[int] | None = None) -> None:
        """Fold one batch's per-layer thresholds (`[len(layers)]`) into the moving average.

        An infinite value (nothing fired in that layer) carries no information and is
        skipped. Runs on the device without a host sync, so it is cheap every step.
        """
        layers = list(range(self.n_layers)) if layers is None else layers
        idx = torch.tensor(layers, device=self.batch_threshold.device)
        value = threshold.to(self.batch_threshold.device, torch.float32)
        valid = torch.isfinite(value)
        old = self.batch_threshold[idx]
        first = self.n_recorded[idx] == 0
        ema = old + self.threshold_momentum * (value - old)
        new = torch.where(first, value, ema)
        self.batch_threshold[idx] = torch.where(valid, new, old)
        self.n_recorded[idx] += valid.long()

    def calibrated_threshold(self) -> Tensor:
        """The recorded per-layer threshold as a per-feature tensor `[L, F]`."""
        if bool((self.n_recorded == 0).any()):
            missing = (self.n_recorded == 0).nonzero().flatten().tolist()
            raise WiremapError(
                f"batchtopk has no recorded threshold for layers {missing}: run training "
                "batches first (in train mode), or pass an explicit threshold to to_jumprelu()"
            )
        return self.batch_threshold.float()[:, None].expand(-1, self.d_transcoder).clone()

    def to_jumprelu(self, threshold: Tensor | float | None = None) -> JumpReLU:
        """A JumpReLU for per-token inference; threshold `[L]`, `[L, F]`, a float or recorded."""
        if threshold is None:
            theta = self.calibrated_threshold()
        else:
            theta = torch.as_tensor(threshold, dtype=torch.float32).cpu()
            if theta.dim() <= 1:
                theta = theta.reshape(-1, 1).expand(self.n_layers, self.d_transcoder)
        act = JumpReLU(self.n_layers, self.d_transcoder, k=self.k)
        act.set_threshold(theta.clone())
        return act.to(self.batch_threshold.device)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "threshold_momentum": self.threshold_momentum}
