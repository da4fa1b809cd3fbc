"""Steering from the viewer: scale or ablate graph features, see the new next tokens.

    steerer = Steerer()                       # builds ReplacementModels lazily, keeps them
    steerer.steer(graph_obj, {"nodes": ["3_41_5"], "scale": 0.0, "max_new_tokens": 10})

The model is rebuilt from the graph's `metadata.info.model` and `metadata.info.transcoders`
with `ReplacementModel.from_pretrained`, once per (model, transcoders) pair. Only a graph
file inside the served folder names them (a request carries no path), and a model folder
that would need its own code (`auto_map` in config.json) is refused: trust_remote_code
stays False. The maths is
the attribution workstream's intervention API (`feature_intervention`,
`generate_with_interventions`); this module only turns viewer requests into its arguments.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from wiremap.attribution.subgraph import node_kind
from wiremap.attribution.viewer.graphfile import ViewerError

MAX_NEW_TOKENS = 64
MAX_STEERED = 256
REQUEST_KEYS = ("name", "nodes", "scale", "ablate", "all_positions", "max_new_tokens", "top_k")

Loader = Callable[[str, str], Any]  # (model name/path, transcoders folder) -> ReplacementModel


def load_replacement_model(model: str, transcoders: str) -> Any:
    from wiremap.models.replacement import ReplacementModel

    return ReplacementModel.from_pretrained(model, transcoders)


class Steerer:
    """Caches one ReplacementModel per (model, transcoders) and answers steer requests."""

    def __init__(self, loader: Loader = load_replacement_model):
        self.loader = loader
        self._models: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()  # one model build / forward at a time on a laptop CPU

    def model_for(self, obj: dict) -> Any:
        key = model_source(obj["metadata"])
        if key is None:
            raise ViewerError(
                422,
                "this graph's metadata names no model and transcoders (info.model, "
                "info.transcoders); re-run `wiremap attribute` with this wiremap to steer it",
            )
        if key not in self._models:
            refuse_remote_code(key[0])
            try:
                self._models[key] = self.loader(*key)
            except ImportError as err:
                raise ViewerError(
                    501, f"steering needs wiremap's intervention code: {err}"
                ) from err
        return self._models[key]

    def steer(self, obj: dict, request: dict) -> dict[str, Any]:
        """Top next tokens and a continuation, before and after the intervention."""
        features, factor, all_pos, n_new, top_k = parse_request(obj, request)
        with self._lock:
            model = self.model_for(obj)
            return run_steering(
                model, obj["metadata"]["prompt"], features, factor, all_pos, n_new, top_k
            )


def refuse_remote_code(model: str) -> None:
    """A local model folder whose config maps to custom code is never loaded."""
    try:
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # a hub name, or a folder the loader will report on
    if isinstance(config, dict) and "auto_map" in config:
        raise ViewerError(
            422,
            "this graph's model folder needs its own Python code (auto_map in config.json); "
            "the viewer never runs code from a model folder, so it cannot steer this graph",
        )


def model_source(meta: dict) -> tuple[str, str] | None:
    """(model, transcoders) from metadata.info, else from metadata.generation_settings."""
    for where in ("info", "generation_settings"):
        section = meta.get(where) if isinstance(meta.get(where), dict) else {}
        model = section.get("model") or section.get("model_name")
        transcoders = section.get("transcoders") or section.get("transcoders_path")
        if isinstance(model, str) and isinstance(transcoders, str) and model and transcoders:
            return model, transcoders
    return None


def parse_request(
    obj: dict, request: dict
) -> tuple[list[tuple[int, int, int]], float, bool, int, int]:
    """Checked (features, factor, all_positions, max_new_tokens, top_k) from a request body."""
    unknown = sorted(set(request) - set(REQUEST_KEYS))
    if unknown:
        raise ViewerError(
            400,
            f"unknown steer keys {unknown[:5]}; allowed: {REQUEST_KEYS} (the model and "
            "transcoders always come from the graph file's metadata)",
        )
    node_ids = request.get("nodes")
    if not isinstance(node_ids, list) or not node_ids or len(node_ids) > MAX_STEERED:
        raise ViewerError(400, f"'nodes' must list 1 to {MAX_STEERED} feature node ids")
    by_id = {n["node_id"]: n for n in obj["nodes"]}
    features = [feature_triple(by_id.get(i), i) for i in node_ids]
    ablate = bool(request.get("ablate", False))
    factor = request.get("scale", 1.0)
    if not isinstance(factor, (int, float)) or not -1e4 <= factor <= 1e4:
        raise ViewerError(400, "'scale' must be a number between -10000 and 10000")
    n_new = request.get("max_new_tokens", 20)
    if not isinstance(n_new, int) or not 0 <= n_new <= MAX_NEW_TOKENS:
        raise ViewerError(400, f"'max_new_tokens' must be an integer from 0 to {MAX_NEW_TOKENS}")
    top_k = request.get("top_k", 10)
    if not isinstance(top_k, int) or not 1 <= top_k <= 50:
        raise ViewerError(400, "'top_k' must be an integer from 1 to 50")
    all_pos = bool(request.get("all_positions", False))
    return features, 0.0 if ablate else float(factor), all_pos, n_new, top_k


def feature_triple(node: dict | None, node_id: str) -> tuple[int, int, int]:
    """(layer, pos, feature) of a feature node; its id is '{layer}_{feature}_{pos}'."""
    if node is None or node_kind(node) != "feature":
        raise ViewerError(400, f"{node_id!r} is not a feature node of this graph")
    parts = node_id.split("_")
    try:
        layer, feat, pos = (int(p) for p in parts)
    except ValueError as err:
        raise ViewerError(
            422, f"feature id {node_id!r} is not '{{layer}}_{{feature}}_{{pos}}'"
        ) from err
    return layer, pos, feat


def run_steering(
    model,
    prompt: str,
    features,
    factor: float,
    all_positions: bool,
    max_new_tokens: int,
    top_k: int,
) -> dict[str, Any]:
    from wiremap.attribution.interventions import feature_intervention, generate_with_interventions

    n_pos = int(model.tokenize(prompt).numel())
    if all_positions:
        unique = sorted({(layer, feat) for layer, _, feat in features})
        held = [(layer, p, feat, factor) for layer, feat in unique for p in range(n_pos)]
        gen = [(layer, None, feat, factor) for layer, feat in unique]
    else:
        held = gen = [(layer, pos, feat, factor) for layer, pos, feat in features]
    base = feature_intervention(model, prompt, [], mode="scale")
    steered = feature_intervention(model, prompt, held, mode="scale")
    kw = dict(max_new_tokens=max_new_tokens, mode="scale", temperature=0.0)
    return {
        "interventions": [list(i) for i in gen],
        "baseline": top_tokens(model, base.logits[-1], top_k),
        "steered": top_tokens(model, steered.logits[-1], top_k),
        "baseline_text": generate_with_interventions(model, prompt, [], **kw),
        "steered_text": generate_with_interventions(model, prompt, gen, **kw),
    }


def top_tokens(model, logits: torch.Tensor, k: int) -> list[dict[str, Any]]:
    """The k most probable next tokens as JSON (`wiremap.attribution.targets.top_tokens`)."""
    from wiremap.attribution.targets import top_tokens as ranked

    return [t._asdict() for t in ranked(model, logits, k)]
