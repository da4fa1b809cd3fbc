"""Hooks on a language model, always through context managers that clean up in `finally`.

with capture(model, ["mlp_in", "mlp_out"], layers=[0, 1]) as acts:
    model(input_ids)
acts["mlp_out"][1]          # [batch, seq, d_model]

with replace_mlp_out(model, {1: new_out}):
    logits = model(input_ids).logits

with splice_mlp_out(model, lambda layer, x, out: f(layer, x), "mlp_in"):
    logits = model(input_ids).logits   # every MLP output replaced by f(its live input)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, suppress
from functools import partial

import torch
from torch import Tensor, nn

from wiremap.models.adapters import Adapter, check_layers, get_adapter


def _first_tensor(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    for key in ("hidden_states", "input", "x"):
        if key in kwargs:
            return kwargs[key]
    return next(v for v in kwargs.values() if isinstance(v, Tensor))


def _output_tensor(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def hooks_removed(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(
    model: nn.Module,
    hooks: Iterable[str],
    layers: Iterable[int] | None = None,
    adapter: Adapter | None = None,
    detach: bool = True,
) -> Iterator[dict[str, dict[int, Tensor]]]:
    """Record hook points `hooks` at `layers` (all by default) during forward passes.

    Yields `{hook: {layer: tensor}}`, filled in as the model runs; a later forward pass
    overwrites earlier values.
    """
    adapter = adapter or get_adapter(model)
    n_layers = adapter.n_layers(model)
    layers = check_layers(range(n_layers) if layers is None else layers, n_layers)
    store: dict[str, dict[int, Tensor]] = {h: {} for h in hooks}
    handles = []
    for hook in store:
        for layer in layers:
            module, side = adapter.hook_site(model, layer, hook)
            handles.append(tensor_hook(module, side, _keeper(store[hook], layer, detach)))
    with hooks_removed(handles):
        yield store


def tensor_hook(module: nn.Module, side: str, fn: Callable[[Tensor], None]):
    """Call `fn` with the module's input (`side="input"`) or output tensor on every forward.

    Returns the hook handle; remove it (e.g. with `hooks_removed`) when done.
    """
    if side == "input":
        return module.register_forward_pre_hook(
            lambda _m, args, kwargs: fn(_first_tensor(args, kwargs)), with_kwargs=True
        )
    return module.register_forward_hook(lambda _m, _a, out: fn(_output_tensor(out)))


def _keeper(slot: dict, layer: int, detach: bool) -> Callable[[Tensor], None]:
    def keep(t: Tensor) -> None:
        slot[layer] = t.detach() if detach else t

    return keep


@contextmanager
def replace_mlp_out(
    model: nn.Module,
    values: Mapping[int, Tensor],
    adapter: Adapter | None = None,
) -> Iterator[None]:
    """Make layer `l`'s MLP block add `values[l]` to the residual instead of its output."""
    adapter = adapter or get_adapter(model)
    layers = check_layers(values.keys(), adapter.n_layers(model))
    handles = []
    for layer, value in zip(layers, values.values(), strict=True):
        module, _ = adapter.hook_site(model, layer, "mlp_out")
        handles.append(module.register_forward_hook(_replacer(value)))
    with hooks_removed(handles):
        yield


def _replacer(value: Tensor):
    def hook(_module, _args, output):
        out = _output_tensor(output)
        if value.shape != out.shape:
            raise ValueError(f"replacement shape {tuple(value.shape)} != {tuple(out.shape)}")
        return _with_output(output, value.to(dtype=out.dtype, device=out.device))

    return hook


# (layer, live input at the transcoder's input hook, the MLP block's own output) -> new output
Splice = Callable[[int, Tensor, Tensor], Tensor]


@contextmanager
def splice_mlp_out(
    model: nn.Module,
    splice: Splice,
    input_hook: str,
    layers: Iterable[int] | None = None,
    adapter: Adapter | None = None,
) -> Iterator[None]:
    """Make layer `l`'s MLP block add `splice(l, x, out)` instead of its output `out`.

    `x` is layer `l`'s input at `input_hook` (`mlp_in` or `resid_mid`) in the same forward
    pass, so it already sees the spliced outputs of the layers below: one pass gives the
    closed-loop replacement model. The one splicing mechanism of wiremap: the replacement
    model and training's replacement metrics both run through it.
    """
    adapter = adapter or get_adapter(model)
    n_layers = adapter.n_layers(model)
    layers = check_layers(range(n_layers) if layers is None else layers, n_layers)
    reads: dict[int, Tensor] = {}
    handles = []
    for layer in layers:
        module, side = adapter.hook_site(model, layer, input_hook)
        handles.append(tensor_hook(module, side, partial(reads.__setitem__, layer)))
        out_module, _ = adapter.hook_site(model, layer, "mlp_out")
        handles.append(out_module.register_forward_hook(_splicer(splice, layer, reads)))
    with hooks_removed(handles):
        yield


def _splicer(splice: Splice, layer: int, reads: dict[int, Tensor]):
    def hook(_module, _args, output):
        out = _output_tensor(output)
        return _with_output(output, splice(layer, reads[layer], out).to(out.dtype))

    return hook


def _with_output(output, new: Tensor):
    """A module's `output` (a tensor or a tuple led by one) with its tensor replaced."""
    return (new, *output[1:]) if isinstance(output, tuple) else new


class StopForward(Exception):
    """Raised by a hook to end a forward pass early: nothing after that point is needed."""


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Forward passes inside end with `StopForward` once `module` has run (see `stoppable`)."""

    def stop(_module, _args, _output):
        raise StopForward

    with hooks_removed([module.register_forward_hook(stop)]):
        yield


def stoppable() -> AbstractContextManager:
    """`with stoppable(): model(ids)`: a pass ended early by `StopForward` just returns."""
    return suppress(StopForward)


def remaining_hooks(model: nn.Module) -> int:
    """How many forward (pre-)hooks are registered anywhere in `model` (for tests)."""
    total = 0
    for module in model.modules():
        total += len(module._forward_hooks) + len(module._forward_pre_hooks)
    return total


@torch.no_grad()
def run_and_capture(model, input_ids: Tensor, hooks, layers=None, attention_mask=None):
    """One no-grad forward pass; returns `(logits, {hook: {layer: tensor}})`."""
    with capture(model, hooks, layers) as store:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits, store
