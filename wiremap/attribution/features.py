"""Feature cards: what makes each transcoder feature fire and what it writes.

    wiremap features --cache cache/ --transcoders tc/        # -> tc/features/
    cfg = FeatureCardConfig(cache="cache/", transcoders="tc/")
    build_feature_cards(cfg)
    FeatureStore("tc/features").card(layer=3, index=41)      # one Neuronpedia-style dict

One streaming pass over the activation cache keeps, per feature and as fixed-size tensors
(so memory does not grow with the cache): the top-K activations (row ids, merged per chunk
with `torch.topk` over [current top K ∪ chunk]), a uniform random sample of its active
tokens (the top-R of random keys, same merge), its activation count and a log-binned
histogram. Contexts are then rebuilt around the kept rows from the cache's tokens and
positions, and the decoder's logit lens (final norm + unembedding; for a CLT the sum of
its decoders) gives the top and bottom output tokens.

Store: `<out>/index.json` plus `<out>/layer_{l}.jsonl.gz`, one JSON card per line; the gzip
file is a concatenation of one gzip member per block of features, and the index records each
block's byte offset, so one card is read without decompressing the whole layer (the file
still reads with `zcat`). Card fields follow Neuronpedia's feature JSON (`maxActApprox`,
`frac_nonzero`, `freq_hist_data_bar_*`, `pos_str`/`pos_values`, `neg_str`/`neg_values`,
`activations[{tokens, values, maxValue, maxValueTokenIndex, dataIndex, binMin, ...}]`).

Per-feature JSON for other viewers: circuit-tracer's and Neuronpedia's graph viewers fetch
`{feature_json_base_url}/{node.feature}.json` (the Cantor-paired id of the node) in
Anthropic's feature format (`examples_quantiles`, `top_logits`, `bottom_logits`, `act_min`,
`act_max`, ...). `write_feature_jsons(graph_obj, store, folder)` writes those files for the
features of one graph JSON; `anthropic_feature(card, id)` converts one card.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wiremap.attribution.card_progress import CardProgress, fingerprint
from wiremap.errors import WiremapError, oom_to_error
from wiremap.fileio import atomic_path, atomic_write, remove_leftovers

BLOCK = 128  # features per gzip member: a card read decompresses at most this many
HIST_PER_OCTAVE = 2
HIST_LOW, HIST_HIGH = -10, 10  # log2 range of the histogram; outside values go to end bins
N_HIST = (HIST_HIGH - HIST_LOW) * HIST_PER_OCTAVE


@dataclass
class FeatureCardConfig:
    """What to compute feature cards from and how many examples to keep."""

    cache: str
    """Activation cache folder (written by `wiremap cache`)."""
    transcoders: str
    """Exported transcoder folder (circuit-tracer layout)."""
    out: str | None = None
    """Output folder; default `<transcoders>/features`."""
    model: str | None = None
    """LM for the logit lens; default the cache manifest's model."""
    top_k: int = 20
    """Top-activating contexts kept per feature."""
    n_samples: int = 24
    """Random active tokens kept per feature, to show examples from lower quantiles."""
    n_quantiles: int = 3
    """Quantile bins the random sample is split into (two examples shown per bin)."""
    context: int = 24
    """Tokens shown per example (the example token sits near the end)."""
    n_logits: int = 10
    """Top and bottom output tokens per feature."""
    device: str = "cpu"
    """Where the transcoder and LM run."""
    seed: int = 0
    """Seed of the random sample."""
    chunk_elements: int = 2**22
    """Rows × features encoded at once (the pass and the contexts): bounds peak memory."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        from wiremap.errors import require_positive

        require_positive(self, "top_k", "n_samples", "n_quantiles", "context", "n_logits")


# ---- the streaming pass ---------------------------------------------------------------------
class TopK:
    """Per-feature top-k (value, row, payload) kept as [F, k] tensors, merged per chunk."""

    def __init__(self, n_features: int, k: int):
        self.keys = torch.full((n_features, k), -math.inf)
        self.rows = torch.full((n_features, k), -1, dtype=torch.long)
        self.values = torch.zeros(n_features, k)

    def update(self, keys: Tensor, rows: Tensor, values: Tensor) -> None:
        """keys, values [n, F] for rows [n]: keep the k largest keys per feature."""
        k = min(self.keys.shape[1], keys.shape[0])
        ck, ci = keys.T.topk(k, dim=1)  # pre-select within the chunk: [F, k], not [F, n]
        merged_keys = torch.cat([self.keys, ck], dim=1)
        merged_rows = torch.cat([self.rows, rows[ci]], dim=1)
        merged_vals = torch.cat([self.values, values.T.gather(1, ci)], dim=1)
        self.keys, idx = merged_keys.topk(self.keys.shape[1], dim=1)
        self.rows, self.values = merged_rows.gather(1, idx), merged_vals.gather(1, idx)


class LayerStats:
    """Everything the pass keeps for one transcoder layer; size independent of the cache."""

    def __init__(self, n_features: int, top_k: int, n_samples: int, generator: torch.Generator):
        self.top = TopK(n_features, top_k)
        self.sample = TopK(n_features, n_samples)
        self.n_active = torch.zeros(n_features, dtype=torch.long)
        self.hist = torch.zeros(n_features, N_HIST, dtype=torch.long)
        self.generator = generator

    def update(self, acts: Tensor, rows: Tensor) -> None:
        """acts [n, F] for global rows [n]."""
        active = acts > 0
        self.n_active += active.sum(0)
        self.top.update(acts, rows, acts)
        noise = torch.rand(acts.shape, generator=self.generator)
        self.sample.update(torch.where(active, noise, -1.0), rows, acts)
        nz_row, nz_feat = active.nonzero(as_tuple=True)
        bins = hist_bin(acts[nz_row, nz_feat])
        self.hist.view(-1).index_add_(0, nz_feat * N_HIST + bins, torch.ones_like(bins))


def hist_bin(values: Tensor) -> Tensor:
    """Log2 bin of positive activations (HIST_PER_OCTAVE bins per octave, clamped)."""
    b = torch.floor((torch.log2(values) - HIST_LOW) * HIST_PER_OCTAVE).long()
    return b.clamp(0, N_HIST - 1)


def hist_centres() -> list[float]:
    return [2 ** (HIST_LOW + (b + 0.5) / HIST_PER_OCTAVE) for b in range(N_HIST)]


def layer_columns(cache, tc) -> list[int]:
    """For each transcoder layer, its column in the cache's [n, L, d] tensors."""
    missing = [m for m in tc.layers if m not in cache.layers]
    if missing or tc.d_model != cache.d_model or tc.input_hook != cache.input_hook:
        raise WiremapError(
            f"transcoders (layers {tc.layers}, d_model {tc.d_model}, input {tc.input_hook}) do "
            f"not match the cache (layers {cache.layers}, d_model {cache.d_model}, input "
            f"{cache.input_hook}); build a cache of the transcoders' model and hook"
        )
    return [cache.layers.index(m) for m in tc.layers]


@torch.no_grad()
def scan_cache(cache, tc, cfg: FeatureCardConfig) -> list[LayerStats]:
    """One pass over every cached row; returns the per-layer statistics."""
    gen = torch.Generator().manual_seed(cfg.seed)
    stats = [LayerStats(tc.d_transcoder, cfg.top_k, cfg.n_samples, gen) for _ in tc.layers]
    columns = layer_columns(cache, tc)
    chunk = max(1, cfg.chunk_elements // tc.d_transcoder)
    bar = _bar(cache.n_tokens, "feature statistics", cfg.progress)
    start = 0
    for s in range(cache.n_shards):
        x_all = cache.shard(s)[cache.input_hook]
        for r0 in range(0, x_all.shape[0], chunk):
            x = x_all[r0 : r0 + chunk].to(tc.device, torch.float32)
            rows = torch.arange(start + r0, start + r0 + x.shape[0])
            for i, col in enumerate(columns):
                stats[i].update(tc.encode(x[:, col].to(tc.dtype), i).float().cpu(), rows)
            bar.update(x.shape[0])
        start += x_all.shape[0]
    bar.close()
    return stats


# ---- contexts around kept rows ------------------------------------------------------------
@torch.no_grad()
def context_windows(cache, rows: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """For rows [m]: window row ids [m, width] and a mask of those in the same context."""
    after = min(4, width - 1)
    offsets = torch.arange(-(width - 1 - after), after + 1)
    win = (rows[:, None] + offsets).clamp(0, cache.n_tokens - 1)
    flat = win.reshape(-1)
    pos = cache.positions(flat).reshape(win.shape)
    own = cache.positions(rows)[:, None]
    # rows are in corpus order: same context <=> positions step exactly with the row ids
    same = (pos - own == win - rows[:, None]) & (rows[:, None] + offsets >= 0)
    same &= rows[:, None] + offsets < cache.n_tokens
    return win, same


@torch.no_grad()
def window_activations(
    cache, tc, col: int, layer: int, win: Tensor, feats: Tensor, chunk_elements: int = 2**22
) -> Tensor:
    """Activation of feature feats[j] on every row of win[j] -> [m, width]."""
    unique, inverse = win.reshape(-1).unique(return_inverse=True)
    x = cache.get(unique)[0][:, col].to(tc.device, tc.dtype)
    per_row = feats.repeat_interleave(win.shape[1])
    out = torch.empty(inverse.shape[0])
    step = max(1, chunk_elements // tc.d_transcoder)
    for s in range(0, unique.shape[0], step):  # encode in slices: bounded memory
        acts = tc.encode(x[s : s + step], layer).float().cpu()
        sel = (inverse >= s) & (inverse < s + step)
        out[sel] = acts[inverse[sel] - s, per_row[sel]]
    return out.reshape(win.shape)


# ---- logit lens ---------------------------------------------------------------------------
@torch.no_grad()
def logit_lens(model, tc, layer: int, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top values, top ids, bottom values, bottom ids) [F, n] of each feature's output."""
    from wiremap.models.adapters import get_adapter, get_module

    adapter = get_adapter(model)
    norm, unembed = get_module(model, adapter.final_norm), get_module(model, adapter.unembed)
    p = next(model.parameters())
    outs = [[], [], [], []]
    for f0 in range(0, tc.d_transcoder, BLOCK):
        feats = torch.arange(f0, min(f0 + BLOCK, tc.d_transcoder), device=tc.device)
        direction = tc.decoder(layer, feats).sum(1)  # a CLT writes to several layers: sum
        logits = unembed(norm(direction.to(p.device, p.dtype))).float().cpu()
        top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        parts = (top.values, top.indices, bottom.values, bottom.indices)
        for o, t in zip(outs, parts, strict=True):
            o.append(t)
    return tuple(torch.cat(o) for o in outs)


# ---- cards --------------------------------------------------------------------------------
class Decoder:
    """Token id -> display string, memoised (decoding one id at a time is slow)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.memo = tokenizer, {}

    def __call__(self, ids) -> list[str]:
        out = []
        for i in ids:
            if i not in self.memo:
                self.memo[i] = self.tokenizer.decode([i])
            out.append(self.memo[i])
        return out


def _examples(stats: LayerStats, f: int, cfg: FeatureCardConfig) -> list[tuple[int, dict]]:
    """(row, extra fields) of the examples of feature f: top-K, then quantile examples."""
    keep = stats.top.values[f] > 0
    out = [(int(r), {}) for r in stats.top.rows[f][keep].tolist()]
    sample_ok = stats.sample.keys[f] >= 0
    vals, order = stats.sample.values[f][sample_ok].sort()
    rows = stats.sample.rows[f][sample_ok][order]
    n = len(vals)
    for q in range(cfg.n_quantiles if n else 0):
        lo, hi = q * n // cfg.n_quantiles, (q + 1) * n // cfg.n_quantiles
        if hi <= lo:
            continue
        extra = {
            "binMin": float(vals[lo]),
            "binMax": float(vals[hi - 1]),
            "binContains": (hi - lo) / n,
        }
        out += [(int(r), extra) for r in rows[lo : min(hi, lo + 2)].tolist()]
    return out


def layer_cards(
    cache,
    tc,
    model,
    decode: Decoder,
    layer: int,
    col: int,
    stats: LayerStats,
    cfg: FeatureCardConfig,
    meta: dict,
) -> list[dict]:
    """The cards of every feature of one transcoder layer."""
    lens = logit_lens(model, tc, layer, cfg.n_logits)
    hist_x = hist_centres()
    cards = []
    for f0 in range(0, tc.d_transcoder, BLOCK):
        feats = range(f0, min(f0 + BLOCK, tc.d_transcoder))
        examples = {f: _examples(stats, f, cfg) for f in feats}
        acts = _block_contexts(cache, tc, decode, layer, col, examples, cfg)
        for f in feats:
            card = _card(f, layer, stats, lens, hist_x, meta, decode)
            card["activations"] = acts[f]
            cards.append(card)
    return cards


def _block_contexts(cache, tc, decode, layer, col, examples, cfg) -> dict[int, list[dict]]:
    flat = [(f, row, extra) for f, ex in examples.items() for row, extra in ex]
    out: dict[int, list[dict]] = {f: [] for f in examples}
    if not flat:
        return out
    rows = torch.tensor([r for _, r, _ in flat])
    feats = torch.tensor([f for f, _, _ in flat])
    width = cfg.context
    win, same = context_windows(cache, rows, width)
    values = window_activations(cache, tc, col, layer, win, feats, cfg.chunk_elements)
    tokens = cache.tokens(win.reshape(-1)).reshape(win.shape)
    centre = width - 1 - min(4, width - 1)
    for j, (f, row, extra) in enumerate(flat):
        keep = same[j]
        vals = values[j][keep].tolist()
        out[f].append(
            {
                "tokens": decode(tokens[j][keep].tolist()),
                "values": vals,
                "maxValue": max(vals),
                "minValue": min(vals),
                "maxValueTokenIndex": int(torch.tensor(vals).argmax()),
                "qualifyingTokenIndex": int(keep[:centre].sum()),
                "dataIndex": row,
                **extra,
            }
        )
    return out


def _card(f: int, layer: int, stats: LayerStats, lens, hist_x, meta, decode) -> dict[str, Any]:
    top_v, top_i, bot_v, bot_i = (t[f] for t in lens)
    heights = stats.hist[f].tolist()
    nz = [b for b, h in enumerate(heights) if h]
    span = range(nz[0], nz[-1] + 1) if nz else range(0)
    return {
        "modelId": meta["model"],
        "layer": str(layer),
        "index": f,
        "model_layer": meta["model_layers"][layer],
        "source": meta["transcoders"],
        "maxActApprox": max(float(stats.top.values[f, 0]), 0.0),
        "frac_nonzero": int(stats.n_active[f]) / max(1, meta["n_tokens"]),
        "freq_hist_data_bar_values": [hist_x[b] for b in span],
        "freq_hist_data_bar_heights": [heights[b] for b in span],
        "pos_str": decode(top_i.tolist()),
        "pos_values": top_v.tolist(),
        "neg_str": decode(bot_i.tolist()),
        "neg_values": bot_v.tolist(),
    }


# ---- storage ------------------------------------------------------------------------------
def write_layer(folder: Path, layer: int, cards: list[dict]) -> dict[str, Any]:
    """Write one layer's cards; returns its index entry."""
    path = folder / f"layer_{layer}.jsonl.gz"
    offsets = [0]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for b in range(0, len(cards), BLOCK):
            lines = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cards[b : b + BLOCK])
            offsets.append(offsets[-1] + f.write(gzip.compress(lines.encode("utf-8"), 6, mtime=0)))
    return {"file": path.name, "n_features": len(cards), "block": BLOCK, "offsets": offsets}


class FeatureStore:
    """Reads cards written by `build_feature_cards`, one gzip member at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "index.json"
        if not index.is_file():
            raise WiremapError(
                f"no feature cards in {self.folder}; compute them with `wiremap features "
                "--cache CACHE --transcoders TRANSCODERS`"
            )
        self.index = json.loads(index.read_text(encoding="utf-8"))

    def card(self, layer: int, index: int) -> dict[str, Any]:
        entry = self.index["layers"].get(str(layer))
        if entry is None or not 0 <= index < entry["n_features"]:
            raise WiremapError(
                f"no feature card for layer {layer}, feature {index} in "
                f"{self.folder}; the cards were computed for other transcoders?"
            )
        b = index // entry["block"]
        with open(self.folder / entry["file"], "rb") as f:
            f.seek(entry["offsets"][b])
            raw = f.read(entry["offsets"][b + 1] - entry["offsets"][b])
        lines = gzip.decompress(raw).decode("utf-8").splitlines()
        return json.loads(lines[index - b * entry["block"]])


# ---- per-feature JSON (Anthropic's feature format) ------------------------------------------
def _anthropic_example(act: dict) -> dict[str, Any]:
    return {
        "tokens": act["tokens"],
        "tokens_acts_list": act["values"],
        "train_token_ind": act.get("qualifyingTokenIndex", act.get("maxValueTokenIndex", 0)),
        "is_repeated_datapoint": False,
    }


def _quantiles(activations: list[dict]) -> list[dict[str, Any]]:
    """Top examples first, then each sampled activation interval, strongest first."""
    top = [a for a in activations if "binMin" not in a]
    bins: dict[tuple[float, float], list[dict]] = {}
    for a in activations:
        if "binMin" in a:
            bins.setdefault((a["binMin"], a["binMax"]), []).append(a)
    out = [{"quantile_name": "Top activations", "examples": [_anthropic_example(a) for a in top]}]
    for k, (lo, hi) in enumerate(sorted(bins, reverse=True)):
        out.append(
            {
                "quantile_name": f"Interval {k + 1} ({lo:.3g} to {hi:.3g})",
                "examples": [_anthropic_example(a) for a in bins[(lo, hi)]],
            }
        )
    return [q for q in out if q["examples"]]


def anthropic_feature(card: dict, feature_id: int) -> dict[str, Any]:
    """One stored card in the feature format circuit-tracer's/Neuronpedia's viewers read."""
    acts = card.get("activations", [])
    quantiles = _quantiles(acts)
    return {
        "index": feature_id,
        "transcoder_id": f"{card.get('source', '')}:layer_{card['layer']}:{card['index']}",
        "examples_quantiles": quantiles,
        "top_logits": list(card.get("pos_str", [])),
        "bottom_logits": list(card.get("neg_str", [])),
        "act_min": min([0.0, *(min(a["values"]) for a in acts if a["values"])]),
        "act_max": max([card.get("maxActApprox", 0.0), *(a["maxValue"] for a in acts)]),
        "quantile_values": sorted({a["binMin"] for a in acts if "binMin" in a}, reverse=True),
        "histogram": list(card.get("freq_hist_data_bar_heights", [])),
        "activation_frequency": card.get("frac_nonzero", 0.0),
    }


def write_feature_jsons(graph_obj: dict, store: FeatureStore, folder: str | Path) -> int:
    """Write `{folder}/{node.feature}.json` for every feature node of a graph JSON.

    The node's `feature` is the Cantor pair of (layer, feature index); the card is read from
    `store`. Returns how many files were written.
    """
    from wiremap.attribution.export import uncantor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    done: set[int] = set()
    for node in graph_obj["nodes"]:
        fid = node.get("feature")
        if node.get("feature_type") != "cross layer transcoder" or fid in done or fid is None:
            continue
        layer, index = uncantor(fid)
        body = anthropic_feature(store.card(layer, index), fid)
        (folder / f"{fid}.json").write_text(json.dumps(body, ensure_ascii=False), "utf-8")
        done.add(fid)
    return len(done)


# ---- the command --------------------------------------------------------------------------
def build_feature_cards(cfg: FeatureCardConfig, model=None, tokenizer=None) -> Path:
    """Compute and store the cards of every feature; returns the output folder."""
    from wiremap.cache import ActivationCache
    from wiremap.models.formats import load_transcoders

    cache = ActivationCache(cfg.cache)
    tc = load_transcoders(cfg.transcoders, device=cfg.device)
    out = Path(cfg.out) if cfg.out else Path(cfg.transcoders) / "features"
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)  # the temporary file of a layer a killed run was writing
    progress = CardProgress(out, fingerprint(cfg, cache))  # what a killed run finished
    with oom_guard(cfg, tc):
        _write_cards(cfg, cache, tc, out, progress, model, tokenizer)
    return out


def oom_guard(cfg: FeatureCardConfig, tc):
    """Out of memory while computing cards: the sizes that drive memory and what to lower."""
    rows = max(1, cfg.chunk_elements // tc.d_transcoder)
    figures = (
        f"{tc.n_layers} layers x {tc.d_transcoder} features on {cfg.device}, "
        f"{rows} rows per chunk (chunk_elements={cfg.chunk_elements}), top_k={cfg.top_k}, "
        f"n_samples={cfg.n_samples}"
    )
    fix = (
        f"lower FeatureCardConfig.chunk_elements (now {cfg.chunk_elements}), --top-k or "
        "--n-samples (the cards then start over), or rerun with --device cpu, on a device "
        "with more free memory or after freeing some (finished layers are kept)"
    )
    return oom_to_error("computing feature cards", figures, fix)


def _write_cards(cfg: FeatureCardConfig, cache, tc, out: Path, progress, model, tokenizer):
    """The pass (or its saved result), then each layer's cards, then the index."""
    stats = progress.stats() or progress.save_stats(scan_cache(cache, tc, cfg))
    if model is None:
        from wiremap.models.loading import load_model

        model, tokenizer = load_model(cfg.model or cache.manifest["model"], device=cfg.device)
    meta = {
        "model": cfg.model or cache.manifest["model"],
        "model_layers": list(tc.layers),
        "transcoders": str(cfg.transcoders),
        "n_tokens": cache.n_tokens,
    }
    decode, columns = Decoder(tokenizer), layer_columns(cache, tc)
    layers = {}
    for i in _bar(range(tc.n_layers), "feature cards", cfg.progress, total=tc.n_layers):
        if (entry := progress.layer(i)) is None:
            cards = layer_cards(cache, tc, model, decode, i, columns[i], stats[i], cfg, meta)
            entry = progress.done_layer(i, write_layer(out, i, cards))
        layers[str(i)] = entry
    index = {
        **meta,
        "cache": str(cfg.cache),
        "top_k": cfg.top_k,
        "n_samples": cfg.n_samples,
        "layers": layers,
        "format": "wiremap feature cards v1",
    }
    atomic_write(out / "index.json", json.dumps(index, indent=1))  # last: the cards are whole
    progress.finish()


def _bar(iterable_or_total, desc: str, enabled: bool, total: int | None = None):
    from tqdm.auto import tqdm

    if isinstance(iterable_or_total, int):
        return tqdm(total=iterable_or_total, desc=desc, disable=not enabled, unit="tok")
    return tqdm(iterable_or_total, desc=desc, disable=not enabled, total=total)
