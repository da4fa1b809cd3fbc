"""Features that stand for a concept, and swapping one concept's features for another's.

    from wiremap.attribution.circuits import concept_features, contrast, swap

    # Features of the Dallas graph that carry "Texas": they push " Austin" up (total effect
    # in the graph) and fire on prompts about Texas cities, not on those about California's.
    tx = contrast(rm, [TWO_HOP.format(city=c) for c in texas], [... california cities ...])
    texas = concept_features(graph, tx, target=" Austin")
    ca = contrast(rm, [... california ...], [... texas ...])
    california = concept_features(graph_oakland, ca, target=" Sacramento")
    result = swap(rm, DALLAS, remove=texas, insert=california)
    result.before[0], result.after[0]       # (" Austin", 0.93), (" Sacramento", 0.71)

Selection, in two tests (both documented on `concept_features`):
1. *Influence*: a feature's total effect on the target logit in the graph: the sum over every
   path from the feature to the logit of the product of its edges, each feature-to-feature
   hop divided by the intermediate feature's activation. In the frozen model this is exactly
   how much the (demeaned) logit drops when the feature is switched off, to first order.
2. *Selectivity*: prompts that differ only in the concept (one city swapped for another, so
   positions line up) give each (layer, pos, feature) a mean activation on the concept's
   prompts and on the contrasting ones; a feature responds to the concept when it fires on
   most of the concept's prompts and its mean is several times the contrasting mean.

`swap` then runs the replacement model in free mode (later features recomputed, so the edit
propagates): the removed features are set to `remove_value` (0 by default) and the
inserted ones to their activation on their own prompt times `insert_scale`, at the
(layer, pos) where each was found.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import Tensor

from wiremap.attribution.graph import Graph
from wiremap.attribution.interventions import feature_intervention
from wiremap.attribution.targets import top_tokens
from wiremap.errors import WiremapError

Feature = tuple[int, int, int]  # (layer, pos, feature)


# -- selectivity ---------------------------------------------------------------------------
@dataclass
class Contrast:
    """Activation statistics of every (layer, pos, feature) on two aligned prompt sets."""

    mean: Tensor  # [L, pos, F] mean activation on the concept's prompts
    mean_other: Tensor  # [L, pos, F] mean on the contrasting prompts
    frac: Tensor  # [L, pos, F] share of the concept's prompts where the feature fires

    def selective(self, ratio: float = 3.0, min_frac: float = 0.5) -> Tensor:
        """[L, pos, F] bool: fires on ≥ `min_frac` of the prompts, mean ≥ `ratio` × other."""
        return (self.frac >= min_frac) & (self.mean > ratio * self.mean_other) & (self.mean > 0)


def prompt_activations(rm, prompts: list[str]) -> Tensor:
    """[n, L, pos, F] dense feature activations of prompts that all have the same length."""
    runs = [rm.run(rm.tokenize(p)).activations.to_dense() for p in prompts]
    lengths = {r.shape[1] for r in runs}
    if len(lengths) != 1:
        raise WiremapError(
            f"contrast prompts must have the same number of tokens, got lengths {sorted(lengths)};"
            " use prompts that differ by single-token words"
        )
    return torch.stack(runs).float()


def contrast(rm, concept_prompts: list[str], other_prompts: list[str]) -> Contrast:
    """Statistics of each feature on `concept_prompts` against `other_prompts`."""
    if not concept_prompts or not other_prompts:
        raise WiremapError("contrast needs at least one prompt on each side")
    a = prompt_activations(rm, concept_prompts)
    b = prompt_activations(rm, other_prompts)
    if a.shape[1:] != b.shape[1:]:
        raise WiremapError("both prompt sets must have the same number of tokens")
    return Contrast(mean=a.mean(0), mean_other=b.mean(0), frac=(a > 0).float().mean(0))


# -- influence -----------------------------------------------------------------------------
def logit_node(graph: Graph, token: str | int) -> int:
    """Node index of the logit target `token` (a string as in `graph.logit_strings`, or an id)."""
    for j, (tid, text) in enumerate(
        zip(graph.logit_tokens.tolist(), graph.logit_strings, strict=True)
    ):
        if token == tid or token == text:
            return graph.logit_index(j)
    raise WiremapError(
        f"{token!r} is not a logit target of this graph (targets: {graph.logit_strings}); "
        "attribute with target_tokens=[...] to include it"
    )


def total_effects(graph: Graph, target: int) -> Tensor:
    """[n_features] signed total effect of each feature on node `target` (module docstring).

    T = d + T·M with d the direct edges into `target` and M[t, s] = A[t, s] / a_t between
    features: computed by propagating back through the DAG until nothing is left.
    """
    adj = graph.dense_adjacency()
    feats = graph.feature_slice
    acts = graph.activations.float().clamp_min(1e-12)
    hop = adj[feats, feats].float() / acts[:, None]  # effect per unit of the target feature
    step = adj[target, feats].float()
    total = step.clone()
    for _ in range(graph.n_features):  # a DAG: the series ends after at most its depth
        step = step @ hop
        total += step
        if not bool(step.any()):
            break
    return total


def concept_features(
    graph: Graph,
    stats: Contrast,
    target: str | int,
    ratio: float = 3.0,
    min_frac: float = 0.5,
    share: float = 0.9,
    max_features: int = 32,
    positions: Collection[int] | None = None,
) -> list[Feature]:
    """Features of `graph` that stand for the concept `stats` contrasts, ranked by influence.

    Kept: features selective for the concept (`Contrast.selective(ratio, min_frac)`) whose
    total effect on the logit `target` is positive, at `positions` (default: all); of
    those, the strongest until they carry `share` of their summed effect (at most
    `max_features`). Empty when none qualifies.
    """
    effect = total_effects(graph, logit_node(graph, target))
    layer, pos, feat = graph.active_features.unbind(1)
    keep = stats.selective(ratio, min_frac)[layer, pos, feat] & (effect > 0)
    if positions is not None:
        keep &= torch.isin(pos, torch.tensor(sorted(positions), dtype=pos.dtype))
    idx = keep.nonzero().flatten()
    if idx.numel() == 0:
        return []
    idx = idx[effect[idx].argsort(descending=True)]
    cumulative = effect[idx].cumsum(0) / effect[idx].sum()
    n = min(int((cumulative < share).sum()) + 1, max_features)
    return [tuple(graph.active_features[i].tolist()) for i in idx[:n]]


def path_through(graph: Graph, result, source: int, via: set[int], target: int) -> bool:
    """Does the pruned graph `result` hold a path source -> (a node of `via`) -> target?"""
    targets, sources, _ = result.edges()
    forward: dict[int, list[int]] = {}
    for t, s in zip(targets.tolist(), sources.tolist(), strict=True):
        forward.setdefault(s, []).append(t)
    reach_from_source = reachable(forward, source)
    backward: dict[int, list[int]] = {}
    for s, ts in forward.items():
        for t in ts:
            backward.setdefault(t, []).append(s)
    reach_to_target = reachable(backward, target)
    return any(v in reach_from_source and v in reach_to_target for v in via)


def strongest_path_through(
    graph: Graph, result, source: int, via: set[int], target: int, k: int = 1000
) -> tuple[float, int, list[int]] | None:
    """The strongest token-to-`target` path (`export.strongest_paths`) that starts at
    `source` and passes through a node of `via`, among the `k` strongest; None if none."""
    from wiremap.attribution.export import strongest_paths

    for share, sign, path in strongest_paths(graph, result, k=k, target=target):
        if path[0] == source and via & set(path):
            return share, sign, path
    return None


def reachable(edges: dict, start) -> set:
    """Every node reachable from `start` along `edges` ({node: [next nodes]}), itself included."""
    seen, todo = {start}, [start]
    while todo:
        for nxt in edges.get(todo.pop(), []):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def feature_nodes(graph: Graph, features: list[Feature]) -> set[int]:
    """Node indices of `features` in `graph` (those that are nodes of it)."""
    index = {tuple(f): i for i, f in enumerate(graph.active_features.tolist())}
    return {index[tuple(f)] for f in features if tuple(f) in index}


# -- the swap -------------------------------------------------------------------------------
@dataclass
class SwapResult:
    """Top next tokens before and after the swap (and with the removal alone)."""

    prompt: str
    removed: list[Feature]
    inserted: list[tuple[int, int, int, float]]  # (layer, pos, feature, value)
    before: list[tuple[str, float]]
    ablated: list[tuple[str, float]]
    after: list[tuple[str, float]]
    expected: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def worked(self) -> bool:
        """The swapped model's top token is the expected one."""
        return self.expected is not None and bool(self.after) and self.after[0][0] == self.expected

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt,
            "removed": [list(f) for f in self.removed],
            "inserted": [list(f) for f in self.inserted],
            "before": self.before,
            "ablated": self.ablated,
            "after": self.after,
            "expected": self.expected,
            "worked": self.worked,
        }


def insertion_values(
    rm, prompt: str, features: list[Feature], scale: float = 1.0
) -> list[tuple[int, int, int, float]]:
    """(layer, pos, feature, scale × its activation on `prompt`) for each feature."""
    acts = rm.run(rm.tokenize(prompt)).activations.to_dense()
    return [(l, p, f, scale * float(acts[l, p, f])) for l, p, f in features]


def swap(
    rm,
    prompt: str,
    remove: list[Feature],
    insert: list[tuple[int, int, int, float]],
    remove_value: float = 0.0,
    expected: str | None = None,
    k: int = 5,
) -> SwapResult:
    """Set `remove` to `remove_value` and `insert` to their values; top tokens before/after."""

    def tops(values: list) -> list[tuple[str, float]]:
        logits = feature_intervention(rm, prompt, values, frozen=False, mode="set").logits
        return [(t.token, round(t.prob, 4)) for t in top_tokens(rm, logits, k)]

    removal = [(l, p, f, remove_value) for l, p, f in remove]
    return SwapResult(
        prompt=prompt,
        removed=list(remove),
        inserted=list(insert),
        before=tops([]),
        ablated=tops(removal),
        after=tops(removal + list(insert)),  # insertions come last: they win on overlaps
        expected=expected,
    )
