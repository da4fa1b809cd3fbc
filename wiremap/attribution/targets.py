"""Logit targets of an attribution graph: which logits, and the direction each one reads.

    targets = select_targets(rm, logits[-1], max_n_logits=10, desired_logit_prob=0.95)
    targets = select_targets(rm, logits[-1], target_tokens=[" Paris", 1234])
    label, vec = logit_difference(rm, " Paris", " London")
    targets = select_targets(rm, logits[-1], target_directions={label: vec})

Probabilities are always the softmax of the logits the model itself returns (`token_probs`):
a Hugging Face Gemma-2/3 model soft-caps its logits inside its forward, so they are never
capped again here. `top_tokens` is the one ranking of next tokens (targets, interventions,
`wiremap steer` and the viewer all use it).

A token's direction is its demeaned unembedding row `W_U[v] − mean_v' W_U[v']`, read at the
final norm's output at the last position: its dot product with that output is the token's
logit minus the mean logit (before any soft-capping). Custom directions are read the same
way; they have no probability, so each gets weight 1/n in the influence computation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from wiremap.errors import WiremapError


@dataclass
class LogitTargets:
    """The logit nodes of a graph."""

    tokens: Tensor  # [n] token ids (-1 for a custom direction)
    probs: Tensor  # [n] probability of the token at the last position (1/n for custom)
    strings: list[str]  # label of each target
    directions: Tensor  # [n, d_model] read at the final norm output, last position

    def __len__(self) -> int:
        return int(self.tokens.numel())


class TopToken(NamedTuple):
    """One of the most probable next tokens."""

    id: int
    token: str  # decoded
    prob: float


def token_probs(logits: Tensor) -> Tensor:
    """[vocab] next-token probabilities from the model's own logits ([vocab] or [pos, vocab]).

    `logits` are what the model returns (already soft-capped where it soft-caps, as Hugging
    Face's Gemma-2/3 do): probabilities are their softmax, with no second cap.
    """
    last = logits if logits.dim() == 1 else logits[-1]
    return torch.softmax(last.float(), dim=-1)


def top_tokens(model, logits: Tensor, k: int = 5, desired_prob: float = 1.0) -> list[TopToken]:
    """The most probable next tokens: at most `k`, stopping once their cumulative
    probability reaches `desired_prob` (1.0: exactly `k`). `logits` as in `token_probs`."""
    if k < 1 or not 0 < desired_prob <= 1:
        raise WiremapError(
            f"top tokens: k={k}, desired_prob={desired_prob}; use k >= 1 (max_n_logits, --top) "
            "and 0 < desired_prob <= 1 (desired_logit_prob)"
        )
    top_p, top_i = token_probs(logits).topk(min(k, logits.shape[-1]))
    # smallest prefix whose cumulative probability reaches `desired_prob`
    n = min(int((top_p.cumsum(0) < desired_prob).sum()) + 1, top_p.numel())
    decode = model.tokenizer.decode
    return [
        TopToken(i, decode([i]), p)
        for i, p in zip(top_i[:n].tolist(), top_p[:n].tolist(), strict=True)
    ]


def demeaned_unembedding(rm, token_ids: Tensor) -> Tensor:
    """[n, d]: W_U[v] − mean over the vocabulary, for each id in `token_ids`."""
    w = rm.unembed_weight().float()
    return w[token_ids] - w.mean(0, keepdim=True)


def resolve_token(rm, token: str | int) -> int:
    """A token id from an id or a string that is exactly one token; WiremapError otherwise."""
    vocab = rm.unembed_weight().shape[0]
    if isinstance(token, int) or (isinstance(token, str) and token.lstrip("-").isdigit()):
        tid = int(token)
        if not 0 <= tid < vocab:
            raise WiremapError(f"target token id {tid} is outside the vocabulary (0..{vocab - 1})")
        return tid
    ids = rm.tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = [rm.tokenizer.decode([i]) for i in ids]
        raise WiremapError(
            f"target token {token!r} is not a single token (it splits into {pieces}); give one "
            "token, e.g. with its leading space (' Paris'), or a token id"
        )
    return int(ids[0])


def logit_difference(rm, token_a: str | int, token_b: str | int) -> tuple[str, Tensor]:
    """(label, direction) for logit(a) − logit(b)."""
    a, b = resolve_token(rm, token_a), resolve_token(rm, token_b)
    w = rm.unembed_weight().float()
    label = f"{rm.tokenizer.decode([a])!r} - {rm.tokenizer.decode([b])!r}"
    return label, w[a] - w[b]


def select_targets(
    rm,
    last_logits: Tensor,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    target_tokens: Sequence[str | int] | None = None,
    target_directions: Mapping[str, Tensor] | Sequence[Tensor] | Tensor | None = None,
) -> LogitTargets:
    """Targets from explicit directions, explicit tokens, or the top of the distribution.

    `last_logits [vocab]` are the model's own logits at the last position (`token_probs`).
    """
    probs = token_probs(last_logits)
    if target_directions is not None:
        return _custom(rm, target_directions)
    if target_tokens is not None:
        if len(target_tokens) == 0:
            raise WiremapError("target_tokens is empty; give at least one token or leave it out")
        chosen = [resolve_token(rm, t) for t in target_tokens]
    else:
        chosen = [t.id for t in top_tokens(rm, last_logits, max_n_logits, desired_logit_prob)]
    ids = torch.tensor(chosen, dtype=torch.long, device=probs.device)
    return LogitTargets(
        tokens=ids,
        probs=probs[ids],
        strings=[rm.tokenizer.decode([int(i)]) for i in ids],
        directions=demeaned_unembedding(rm, ids),
    )


def _custom(rm, directions) -> LogitTargets:
    if isinstance(directions, Tensor):
        items = [(f"direction {i}", v) for i, v in enumerate(directions.reshape(-1, rm.d_model))]
    elif isinstance(directions, Mapping):
        items = list(directions.items())
    else:
        items = [(f"direction {i}", v) for i, v in enumerate(directions)]
    if not items:
        raise WiremapError("target_directions is empty; give at least one direction")
    vecs = []
    for label, v in items:
        v = torch.as_tensor(v, dtype=torch.float32, device=rm.device).reshape(-1)
        if v.numel() != rm.d_model:
            raise WiremapError(
                f"target direction {label!r} has {v.numel()} entries; it must have d_model="
                f"{rm.d_model} (a vector read at the final norm's output)"
            )
        vecs.append(v)
    n = len(items)
    return LogitTargets(
        tokens=torch.full((n,), -1, dtype=torch.long),
        probs=torch.full((n,), 1.0 / n),
        strings=[str(label) for label, _ in items],
        directions=torch.stack(vecs),
    )
