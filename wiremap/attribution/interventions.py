"""Interventions on transcoder features: set, scale, ablate or add, frozen or free; steering.

    res = feature_intervention(rm, "The capital of France is", [(3, 5, 101, 0.0)])  # ablate
    res = feature_intervention(rm, prompt, [(3, 5, 101, 2.0)], mode="scale", frozen=True)
    res = scale_features(rm, prompt, [(3, 5, 101), (4, 5, 7)], factor=-1.0)      # supernode
    text = generate_with_interventions(rm, prompt, [(3, None, 101, 4.0)], max_new_tokens=20)

An intervention is `(layer, pos, feature, value)`; `pos=None` means every position. Modes:
`set` (a ← value), `scale` (a ← value·a), `add` (a ← a + value), `ablate` (a ← 0).

- `frozen=True` (direct effects only): the frozen model of DESIGN.md §5 — attention
  patterns, norm scales and every other feature held at their values on the prompt — gets
  the change of the decoder writes `(a' − a)·W_dec`. The change of each logit target is
  then exactly the graph's edge times the relative change `(a' − a)/a` summed over the
  features changed (before soft-capping).
- `frozen=False` (free): the replacement model runs normally; every transcoder's features
  are recomputed from the residual stream it sees (so a change propagates through later
  layers, attention and norms), the listed features are edited at their layer, and the
  MLP error terms are held at their values on the prompt.

Generation re-runs the free replacement model on the whole sequence for each new token,
holding the interventions (with `pos=None` they apply to the new positions as well); at
positions past the prompt the error is the live MLP's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from wiremap.attribution.targets import top_tokens  # noqa: F401 (public here since 0.1)
from wiremap.errors import WiremapError

MODES = ("set", "scale", "add", "ablate")
Intervention = tuple[int, int | None, int, float]


@dataclass
class InterventionResult:
    logits: Tensor  # [pos, vocab] as the model returns them (soft-capped where it soft-caps)
    activations: Tensor  # [L, pos, F] sparse COO, after the intervention
    input_ids: Tensor  # [pos]


def feature_intervention(
    model,
    prompt: str | Tensor,
    interventions: Sequence[Intervention],
    frozen: bool = False,
    mode: str = "set",
) -> InterventionResult:
    """Run `prompt` with features edited; see the module docstring."""
    ids = _ids(model, prompt)
    edits = check_interventions(model, interventions, len(ids), mode)
    if frozen:
        return _frozen(model, ids, edits, mode)
    store: dict[int, Tensor] = {}
    logits = model(ids, edit=_editor(edits, mode), activations_out=store)
    acts = torch.stack([store[i][0] for i in range(model.n_layers)]).to_sparse()
    return InterventionResult(logits=logits, activations=acts, input_ids=ids)


def scale_features(
    model,
    prompt: str | Tensor,
    features: Sequence[tuple[int, int | None, int]],
    factor: float,
    frozen: bool = False,
) -> InterventionResult:
    """Scale a group of features (a supernode) by `factor` together."""
    edits = [(layer, pos, feat, factor) for layer, pos, feat in features]
    return feature_intervention(model, prompt, edits, frozen=frozen, mode="scale")


@torch.no_grad()
def generate_with_interventions(
    model,
    prompt: str | Tensor,
    interventions: Sequence[Intervention],
    max_new_tokens: int = 20,
    mode: str = "scale",
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """The continuation of `prompt` sampled with the interventions held (steering)."""
    ids = _ids(model, prompt)
    limit = model.max_length or (len(ids) + max_new_tokens)
    edits = check_interventions(model, interventions, len(ids), mode)
    errors = model.run(ids).errors
    edit = _editor(edits, mode)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    new: list[int] = []
    for _ in range(min(max_new_tokens, limit - len(ids))):
        seq = torch.cat([ids, torch.tensor(new, dtype=torch.long, device=ids.device)])
        last = model(seq, errors=errors, edit=edit)[-1]
        new.append(_sample(last.float(), temperature, gen))  # the model's own (capped) logits
        if new[-1] == model.tokenizer.eos_token_id:
            break
    return model.tokenizer.decode(new)


# -- helpers ---------------------------------------------------------------------------
def check_interventions(model, interventions, n_pos: int, mode: str) -> list[Intervention]:
    """Validated `(layer, pos, feature, value)` tuples; WiremapError on bad input."""
    if mode not in MODES:
        raise WiremapError(f"unknown intervention mode {mode!r}; choose one of {MODES}")
    n_layers, n_feat = model.n_layers, model.transcoders.d_transcoder
    out = []
    for item in interventions:
        if len(item) != 4:
            raise WiremapError(f"intervention {item!r}: give (layer, pos, feature, value)")
        layer, pos, feat, value = item
        if not 0 <= int(layer) < n_layers:
            raise WiremapError(f"intervention layer {layer} outside 0..{n_layers - 1}")
        if pos is not None and not 0 <= int(pos) < n_pos:
            raise WiremapError(f"intervention position {pos} outside the prompt (0..{n_pos - 1})")
        if not 0 <= int(feat) < n_feat:
            raise WiremapError(f"intervention feature {feat} outside 0..{n_feat - 1}")
        out.append((int(layer), None if pos is None else int(pos), int(feat), float(value)))
    return out


def _ids(model, prompt: str | Tensor) -> Tensor:
    if isinstance(prompt, Tensor):
        return prompt.reshape(-1).to(model.device)
    return model.tokenize(prompt)


def _apply(a: Tensor, value: float, mode: str) -> Tensor:
    if mode == "set":
        return torch.full_like(a, value)
    if mode == "scale":
        return a * value
    if mode == "add":
        return a + value
    return torch.zeros_like(a)


def _editor(edits: list[Intervention], mode: str):
    by_layer: dict[int, list[Intervention]] = {}
    for e in edits:
        by_layer.setdefault(e[0], []).append(e)

    def edit(layer: int, a: Tensor) -> Tensor:
        if layer not in by_layer:
            return a
        a = a.clone()
        for _, pos, feat, value in by_layer[layer]:
            where = slice(None) if pos is None else pos
            a[..., where, feat] = _apply(a[..., where, feat], value, mode)
        return a

    return edit


def _frozen(model, ids: Tensor, edits: list[Intervention], mode: str) -> InterventionResult:
    run = model.run(ids)
    acts = run.activations.to_dense()
    new = acts.clone()
    for layer, pos, feat, value in edits:
        where = slice(None) if pos is None else pos
        new[layer, where, feat] = _apply(acts[layer, where, feat], value, mode)
    writes = _write_changes(model, new - acts)
    with model.frozen(ids) as lin, torch.no_grad():
        final = lin.forward(writes=writes).final
        # the frozen model's logits are pre-cap: cap once, as the model's own forward does
        logits = model.softcap(lin.logits(final))[0]
    return InterventionResult(logits=logits, activations=new.to_sparse(), input_ids=ids)


def _write_changes(model, delta: Tensor) -> dict[int, Tensor]:
    """Residual writes {output layer: [1, pos, d]} of activation changes `delta [L, pos, F]`."""
    tc = model.transcoders
    writes: dict[int, Tensor] = {}
    for layer in range(model.n_layers):
        feats = delta[layer].abs().sum(0).nonzero().flatten()
        if feats.numel() == 0:
            continue
        dec = tc.decoder(layer, feats)  # [m, n_out, d]
        for offset in range(dec.shape[1]):
            w = delta[layer][:, feats] @ dec[:, offset, :].to(delta.dtype)  # [pos, d]
            out = layer + offset
            writes[out] = writes.get(out, 0) + w.unsqueeze(0)
    return writes


def _sample(logits: Tensor, temperature: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.cpu() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))
