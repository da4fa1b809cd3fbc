"""The attribution graph: node tables plus one adjacency matrix.

    graph = Graph(prompt=..., input_ids=..., token_strings=..., active_features=...,
                  activations=..., logit_tokens=..., logit_probs=..., logit_strings=...,
                  adjacency=A, n_layers=L, settings={"model": "gpt2"})
    graph.save("out/graph")            # out/graph.safetensors + out/graph.meta.json
    graph = Graph.load("out/graph")
    A = graph.adjacency[graph.logit_slice, graph.feature_slice]   # dense adjacency

Node order (rows and columns of `adjacency`): active features (sorted by layer, pos,
feature), error nodes (layer-major: `layer * n_pos + pos`), token embeddings (one per
position), logit targets. `adjacency[t, s]` is the signed direct effect of source `s` on
target `t` (rows are targets). The adjacency may be dense or a torch sparse tensor (COO or
CSR); sparse graphs are saved and loaded as COO.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from wiremap.errors import WiremapError
from wiremap.fileio import atomic_path, atomic_write

FORMAT_VERSION = 1
NodeKind = Literal["feature", "error", "token", "logit"]


@dataclass
class Graph:
    """An attribution graph for one prompt (see the module docstring for the node order)."""

    prompt: str
    input_ids: Tensor  # [n_pos] int64
    token_strings: list[str]  # decoded token per position
    active_features: Tensor  # [n_feat, 3] int64: (layer, pos, feature)
    activations: Tensor  # [n_feat]
    logit_tokens: Tensor  # [n_logits] int64 (custom directions may use -1)
    logit_probs: Tensor  # [n_logits]
    logit_strings: list[str]
    adjacency: Tensor  # [N, N] dense float or torch sparse (COO/CSR); rows = targets
    n_layers: int
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_ids = torch.as_tensor(self.input_ids, dtype=torch.long).reshape(-1)
        self.active_features = torch.as_tensor(self.active_features, dtype=torch.long)
        self.active_features = self.active_features.reshape(-1, 3)
        self.logit_tokens = torch.as_tensor(self.logit_tokens, dtype=torch.long).reshape(-1)
        self.activations = torch.as_tensor(self.activations).reshape(-1)
        self.logit_probs = torch.as_tensor(self.logit_probs).reshape(-1)
        problems = _shape_problems(self)
        if problems:
            raise WiremapError(
                "inconsistent Graph: " + "; ".join(problems) + ". Build the node tables and the "
                "adjacency with the node order features, errors, tokens, logits."
            )

    # ---- sizes -------------------------------------------------------------------------
    @property
    def n_pos(self) -> int:
        return int(self.input_ids.numel())

    @property
    def n_features(self) -> int:
        return int(self.active_features.shape[0])

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.numel())

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_pos + self.n_logits

    # ---- index helpers -----------------------------------------------------------------
    @property
    def feature_slice(self) -> slice:
        return slice(0, self.n_features)

    @property
    def error_slice(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_errors)

    @property
    def token_slice(self) -> slice:
        start = self.n_features + self.n_errors
        return slice(start, start + self.n_pos)

    @property
    def logit_slice(self) -> slice:
        start = self.n_features + self.n_errors + self.n_pos
        return slice(start, start + self.n_logits)

    def error_index(self, layer: int, pos: int) -> int:
        """Node index of the error node at (layer, pos)."""
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.token_slice.start + pos

    def logit_index(self, i: int) -> int:
        return self.logit_slice.start + i

    @property
    def top_logit(self) -> int:
        """Node index of the most probable logit target."""
        return self.logit_index(int(torch.argmax(self.logit_probs)))

    def feature_error_indices(self) -> Tensor:
        """[n_feat] node index of the error node at each feature's (layer, pos)."""
        layer, pos = self.active_features[:, 0], self.active_features[:, 1]
        return self.n_features + layer * self.n_pos + pos

    def node_kind(self, i: int) -> NodeKind:
        for kind, sl in self._kinds():
            if sl.start <= i < sl.stop:
                return kind
        raise IndexError(f"node {i} out of range for a graph of {self.n_nodes} nodes")

    def node_layer_pos(self, i: int) -> tuple[int | None, int]:
        """(layer, pos) of node i; layer is None for tokens and logits (logits sit last)."""
        kind = self.node_kind(i)
        if kind == "feature":
            layer, pos, _ = self.active_features[i].tolist()
            return layer, pos
        if kind == "error":
            layer, pos = divmod(i - self.n_features, self.n_pos)
            return layer, pos
        if kind == "token":
            return None, i - self.token_slice.start
        return None, self.n_pos - 1

    def _kinds(self) -> list[tuple[NodeKind, slice]]:
        return [
            ("feature", self.feature_slice),
            ("error", self.error_slice),
            ("token", self.token_slice),
            ("logit", self.logit_slice),
        ]

    # ---- adjacency views ---------------------------------------------------------------
    @property
    def is_sparse(self) -> bool:
        return self.adjacency.layout != torch.strided

    def dense_adjacency(self) -> Tensor:
        return self.adjacency.to_dense() if self.is_sparse else self.adjacency

    def adjacency_coo(self) -> tuple[Tensor, Tensor, Tensor]:
        """(rows, cols, values) of the stored non-zero entries, duplicates summed."""
        return coo_triplets(self.adjacency)

    # ---- persistence -------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write `<base>.safetensors` (tensors) and `<base>.meta.json` (the rest); returns base."""
        from safetensors.torch import save_file

        base = _base(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "input_ids": self.input_ids,
            "active_features": self.active_features,
            "activations": self.activations,
            "logit_tokens": self.logit_tokens,
            "logit_probs": self.logit_probs,
        }
        if self.is_sparse:
            rows, cols, vals = self.adjacency_coo()
            tensors["adjacency_indices"] = torch.stack([rows, cols])
            tensors["adjacency_values"] = vals
        else:
            tensors["adjacency"] = self.adjacency
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic_path(_with(base, ".safetensors")) as tmp:
            save_file(tensors, str(tmp))
        meta = {
            "format_version": FORMAT_VERSION,
            "wiremap_version": _version(),
            "prompt": self.prompt,
            "token_strings": self.token_strings,
            "logit_strings": self.logit_strings,
            "n_layers": self.n_layers,
            "n_nodes": self.n_nodes,
            "adjacency_layout": "sparse_coo" if self.is_sparse else "dense",
            "settings": self.settings,
        }
        # default=str: settings may hold dtypes or paths; they come back as strings.
        text = json.dumps(meta, indent=1, default=str, ensure_ascii=False)
        atomic_write(_with(base, ".meta.json"), text)
        return base

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Graph:
        """Load a graph written by `save` (pass the base, the .safetensors or the .meta.json)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        base = _base(path)
        tfile, mfile = _with(base, ".safetensors"), _with(base, ".meta.json")
        if not tfile.exists() or not mfile.exists():
            raise WiremapError(
                f"no saved graph at {base}: expected {tfile.name} and {mfile.name}; "
                "write one with Graph.save(path)"
            )
        meta = _read_meta(mfile)
        if meta.get("format_version") != FORMAT_VERSION:
            raise WiremapError(
                f"{mfile} has graph format {meta.get('format_version')!r}, this wiremap reads "
                f"{FORMAT_VERSION}; re-run the attribution with this version"
            )
        try:
            t = load_file(str(tfile), device=str(device))
        except SafetensorError as err:  # a truncated or damaged file
            raise WiremapError(f"{tfile} is damaged ({err}); {_REDO}") from err
        if meta["adjacency_layout"] == "dense":
            adjacency = t["adjacency"]
        else:
            n = meta["n_nodes"]
            adjacency = torch.sparse_coo_tensor(
                t["adjacency_indices"], t["adjacency_values"], (n, n), check_invariants=True
            ).coalesce()
        return cls(
            prompt=meta["prompt"],
            input_ids=t["input_ids"],
            token_strings=meta["token_strings"],
            active_features=t["active_features"],
            activations=t["activations"],
            logit_tokens=t["logit_tokens"],
            logit_probs=t["logit_probs"],
            logit_strings=meta["logit_strings"],
            adjacency=adjacency,
            n_layers=meta["n_layers"],
            settings=meta["settings"],
        )


def coo_triplets(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, cols, values) of a dense, COO or CSR matrix; dense zeros are left out."""
    if matrix.layout == torch.strided:
        rows, cols = matrix.nonzero(as_tuple=True)
        return rows, cols, matrix[rows, cols]
    if matrix.layout == torch.sparse_csr:
        crow, cols = matrix.crow_indices(), matrix.col_indices()
        rows = torch.repeat_interleave(
            torch.arange(matrix.shape[0], device=crow.device), crow.diff()
        )
        indices = torch.stack([rows, cols])
        matrix = torch.sparse_coo_tensor(
            indices, matrix.values(), matrix.shape, check_invariants=False
        )
    coo = matrix.coalesce()
    rows, cols = coo.indices()
    return rows, cols, coo.values()


def _shape_problems(g: Graph) -> list[str]:
    problems = []
    n_feat = g.active_features.shape[0]
    if g.activations.numel() != n_feat:
        problems.append(f"{g.activations.numel()} activations for {n_feat} active features")
    if len(g.token_strings) != g.n_pos:
        problems.append(f"{len(g.token_strings)} token_strings for {g.n_pos} input_ids")
    n_logits = g.logit_tokens.numel()
    if g.logit_probs.numel() != n_logits or len(g.logit_strings) != n_logits:
        problems.append(
            f"logit_tokens/logit_probs/logit_strings lengths differ "
            f"({n_logits}, {g.logit_probs.numel()}, {len(g.logit_strings)})"
        )
    if n_feat and not problems:
        layer, pos = g.active_features[:, 0], g.active_features[:, 1]
        if layer.min() < 0 or layer.max() >= g.n_layers or pos.min() < 0 or pos.max() >= g.n_pos:
            problems.append("an active feature's (layer, pos) lies outside n_layers × n_pos")
    n = g.n_nodes
    if tuple(g.adjacency.shape) != (n, n):
        problems.append(f"adjacency is {tuple(g.adjacency.shape)}, expected ({n}, {n})")
    return problems


_REDO = "run the attribution again to rewrite it"


def _read_meta(mfile: Path) -> dict:
    try:
        meta = json.loads(mfile.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WiremapError(f"{mfile} is truncated or not JSON ({err}); {_REDO}") from err
    if not isinstance(meta, dict):
        raise WiremapError(f"{mfile} is not a graph's metadata object; {_REDO}")
    return meta


def _base(path: str | Path) -> Path:
    path = Path(path)
    name = path.name
    for suffix in (".meta.json", ".safetensors"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    return path


def _with(base: Path, suffix: str) -> Path:
    # not Path.with_suffix: a base such as "graph.v2" must keep its dot
    return base.with_name(base.name + suffix)


def _version() -> str:
    from wiremap import __version__

    return __version__
