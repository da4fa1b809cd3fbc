"""Source nodes of an attribution graph and the contraction that turns gradients into edges.

    table = SourceTable.build(rm, run)                   # include_bos=False
    edges = table.contract(g_embed, g_writes, n_pos)     # [batch, table.n_cols]

Columns: active features (sorted by layer, pos, feature), then error nodes (layer-major,
`layer * n_pos + pos`), then token nodes (one per position) — the graph's node order.
A source's edge to a target is `⟨∂target/∂(residual write), write⟩`: a feature writes
`a · W_dec^{l→l'}` into the MLP output of every layer l' it decodes to (one for a PLT,
all later layers for a CLT), an error node writes its error vector at its layer, a token
node writes the first layer's input at its position.

All writes into one layer (features of every source layer that decodes to it, and the
error) are stored padded per position (`[pos, d, slots]`), so the contraction reads each
layer's gradient once, in one batched matmul over positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from wiremap.attribution.renamed import renamed_keywords


@dataclass
class _Block:
    """Everything the sources write into the MLP output of layer `out`, padded per position."""

    out: int
    writes: Tensor  # [pos, d, slots] a · decoder vectors and the error vector (zero padding)
    cols: Tensor  # [pos, slots] column of each slot (padding: the token column of its pos)


@dataclass
class SourceTable:
    features: Tensor  # [n_feat, 3] (layer, pos, feature)
    activations: Tensor  # [n_feat]
    errors: Tensor  # [L, pos, d] (zero at BOS unless include_bos)
    tokens: Tensor  # [pos, d]
    blocks: list[_Block]
    n_layers: int
    n_pos: int

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def n_cols(self) -> int:
        return self.token_start + self.n_pos

    @classmethod
    def build(
        cls, rm, run, include_bos: bool = False, *, zero_bos: bool | None = None
    ) -> SourceTable:
        """The sources of `run` (`rm.run(ids)`); BOS features and errors only if `include_bos`
        (`zero_bos`, the old name and the opposite, works for this version with a warning)."""
        _, include_bos = renamed_keywords("SourceTable.build", None, include_bos, zero_bos=zero_bos)
        acts = run.activations.coalesce()
        idx, vals = acts.indices(), acts.values()
        keep = vals != 0
        if not include_bos:
            keep &= idx[1] != 0
        # coalesced indices are sorted lexicographically: (layer, pos, feature)
        features, activations = idx[:, keep].T.contiguous(), vals[keep]
        errors = run.errors.clone()
        if not include_bos:
            errors[:, 0] = 0
        n_layers, n_pos = run.reads.shape[:2]
        blocks = _blocks(rm.transcoders, features, activations, errors, n_layers, n_pos)
        return cls(features, activations, errors, run.resid0, blocks, n_layers, n_pos)

    def contract(
        self, g_embed: Tensor, g_writes: list[Tensor | None], n_pos: int, out: Tensor | None = None
    ) -> Tensor:
        """Edges [B, n_cols] from residual gradients over the first `n_pos` positions.

        `g_embed [B, n_pos, d]` is the gradient at the first layer's input, `g_writes[l]`
        the gradient at layer l's MLP output (None where the targets do not depend on it).
        Written into `out` [B, n_cols] when given (it saves a copy of the rows).
        """
        batch = g_embed.shape[0]
        edges = g_embed.new_zeros(batch, self.n_cols) if out is None else out.zero_()
        tok = self.token_start
        edges[:, tok : tok + n_pos] = torch.einsum("bpd,pd->bp", g_embed, self.tokens[:n_pos])
        for block in self.blocks:
            g = g_writes[block.out] if block.out < len(g_writes) else None
            if g is None:
                continue
            # one read of the gradient per layer: [pos, B, d] @ [pos, d, slots]
            part = torch.bmm(g.transpose(0, 1), block.writes[:n_pos])
            cols = block.cols[:n_pos].reshape(-1)
            # a padding slot adds an exact 0 (its write is zero) to a token column
            edges.index_add_(1, cols, part.permute(1, 0, 2).reshape(batch, -1))
        return edges


def _blocks(tc, features, acts, errors, n_layers: int, n_pos: int) -> list[_Block]:
    """One block per output layer: the writes of every feature decoding to it, and its error."""
    tokens = int(features.shape[0]) + n_layers * n_pos  # first token column
    parts: dict[int, list[tuple[Tensor, Tensor]]] = {layer: [] for layer in range(n_layers)}
    for src in range(n_layers):
        rows = (features[:, 0] == src).nonzero().flatten()
        if rows.numel() == 0:
            continue
        pos, feat = features[rows, 1], features[rows, 2]
        slot = _slots(pos)
        n_slots = int(slot.max()) + 1
        uniq, inverse = torch.unique(feat, return_inverse=True)
        dec = tc.decoder(src, uniq)[inverse].to(acts.dtype)  # [m, n_out, d]
        cols = tokens + torch.arange(n_pos, device=acts.device)[:, None].repeat(1, n_slots)
        cols[pos, slot] = rows
        for offset in range(dec.shape[1]):
            writes = acts.new_zeros(n_pos, dec.shape[-1], n_slots)
            writes[pos, :, slot] = acts[rows, None] * dec[:, offset, :]
            parts[src + offset].append((writes, cols))
    n_feat = int(features.shape[0])
    blocks = []
    for out in range(n_layers):
        err_cols = n_feat + out * n_pos + torch.arange(n_pos, device=errors.device)
        parts[out].append((errors[out].to(acts.dtype).unsqueeze(-1), err_cols.unsqueeze(-1)))
        writes, cols = zip(*parts[out], strict=True)
        blocks.append(_Block(out, torch.cat(writes, dim=2), torch.cat(cols, dim=1)))
    return blocks


def _slots(pos: Tensor) -> Tensor:
    """Rank of each entry among the entries with the same position (pos is sorted per layer)."""
    order = torch.argsort(pos, stable=True)
    sorted_pos = pos[order]
    first = torch.searchsorted(sorted_pos, sorted_pos, right=False)
    slot = torch.empty_like(pos)
    slot[order] = torch.arange(pos.numel(), device=pos.device) - first
    return slot
