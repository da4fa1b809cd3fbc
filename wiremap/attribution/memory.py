"""Memory planning for attribution: what a graph will need, what is free, and the budget.

    counts = GraphCounts.from_table(rm, table, n_logits=3)
    plan = plan_memory(counts, budget=None, target_batch=None, host_free=free_bytes("cpu"))
    plan.max_feature_nodes, plan.target_batch, plan.note   # the decision, and why

The graph's memory is dominated by a few tensors whose sizes are known once the clean pass
has counted the active features (B = targets per backward pass, N = feature rows kept,
C = source columns = features + errors + tokens, P = positions, d = d_model, e = bytes):
- the adjacency rows: N × C × e (uncapped and small: one dense (C + logits)² buffer);
  the pruned graph's matrix after it (dense, or sparse COO at 20 bytes per non-zero);
- each backward pass: the residual gradients kept for every layer, B × P × d × e × (L + k),
  its edges B × C × e, and the frozen attention patterns L × heads × P² × e;
- the source table: every feature's write, padded per position (`[P, d, slots]` per layer),
  and the frozen model's recorded constants (a few L × P × d).
Model and transcoders are already loaded when the plan is made; they are reported, not
counted against what is free. Where rows live (host memory) and where backward passes run
(the device) are separate pools on a GPU and the same pool on a CPU.

Without an explicit budget the plan keeps every feature when that fits, else the largest
budget that fits; an explicit budget or batch size that does not fit, or a minimum that
does not, is a WiremapError with both figures and the flag to change. Allocator errors
raised anyway (estimates are estimates) become the same error through `oom_guard`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from wiremap.attribution.renamed import renamed_keywords
from wiremap.errors import WiremapError, deprecated, oom_to_error

USABLE = 0.7
"""Share of the free memory a plan may fill (the allocator's slack, Python, the OS). The
estimate can fall short: `bench/attribute_real.py` measured peaks up to 1.27x the plan on
SmolLM2 (8 tokens: 406 MiB vs 319; 128 tokens: 7.05 GB vs 5.88), so 0.7 x 1.27 < 0.9."""
DEFAULT_BATCH = 256
MIN_BATCH = 8
MIN_FEATURE_NODES = 100
"""Below this budget a graph says little: the plan stops instead of shrinking further."""
GRAD_COPIES = 4
"""Residual-sized gradient buffers alive in a backward pass besides the one kept per layer
(attention values, norms, the injected gradients): about 3.5 measured on a 4-layer model."""
COO_BYTES = 20  # int64 row and column + float32 value per stored edge
# Graphs with more nodes get a sparse COO adjacency (attribute.py). An uncapped graph is ~25%
# non-zero, so up to here dense storage (4 bytes per entry) is smaller than COO (20 bytes).
DENSE_MAX_NODES = 10_000
CHUNK_ELEMENTS = 2**25
"""Rows are ranked and folded a chunk of about this many entries at a time."""


@dataclass(frozen=True)
class GraphCounts:
    """The sizes a plan needs (see the module docstring for the letters)."""

    n_layers: int
    n_pos: int
    d_model: int
    n_heads: int
    n_features: int
    n_logits: int
    table_bytes: int  # source writes, padded, plus the error vectors
    resident_bytes: int  # model + transcoders (already allocated)
    elem: int = 4

    @property
    def n_cols(self) -> int:
        return self.n_features + self.n_layers * self.n_pos + self.n_pos

    @classmethod
    def from_table(cls, rm, table, n_logits: int) -> GraphCounts:
        elem = table.tokens.element_size()
        table_bytes = sum(b.writes.numel() * elem for b in table.blocks)
        return cls(
            n_layers=table.n_layers,
            n_pos=table.n_pos,
            d_model=int(table.tokens.shape[-1]),
            n_heads=_n_heads(rm.model),
            n_features=table.n_features,
            n_logits=n_logits,
            table_bytes=table_bytes + table.errors.numel() * elem,
            resident_bytes=_module_bytes(rm.model) + _module_bytes(rm.transcoders),
            elem=elem,
        )


def _n_heads(model) -> int:
    return int(getattr(model.config, "num_attention_heads", None) or model.config.n_head)


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# -- the estimate ------------------------------------------------------------------------
def backward_bytes(c: GraphCounts, target_batch: int) -> int:
    """Peak of one batched backward pass: gradients, its edges, the frozen patterns."""
    grads = target_batch * c.n_pos * c.d_model * c.elem * (c.n_layers + 1 + GRAD_COPIES)
    edges = 2 * target_batch * (c.n_cols + 1) * c.elem  # the edges and one contraction part
    patterns = (c.n_layers * c.n_heads + 1) * c.n_pos**2 * c.elem
    return grads + edges + patterns


def frozen_bytes(c: GraphCounts) -> int:
    """The source table and the frozen model's recorded constants (reads, outputs, q, k)."""
    return c.table_bytes + 6 * c.n_layers * c.n_pos * c.d_model * c.elem


def rows_bytes(c: GraphCounts, n_rows: int) -> int:
    """Adjacency rows for `n_rows` features, the graph assembled from them, and pruning."""
    uncapped = n_rows >= c.n_features
    n_nodes = c.n_logits + (c.n_cols if uncapped else n_rows + c.n_layers * c.n_pos + c.n_pos)
    if uncapped and n_nodes <= DENSE_MAX_NODES:
        return 3 * n_nodes**2 * c.elem  # the dense buffer, then pruning's copies of it
    rows = (n_rows + c.n_logits) * c.n_cols * c.elem
    if n_nodes <= DENSE_MAX_NODES:
        graph = n_nodes**2 * c.elem
    else:
        graph = _coo_bytes(n_rows + c.n_logits, n_nodes)
    # a chunk of rows being ranked or folded
    scratch = 2 * min(CHUNK_ELEMENTS, (n_rows + c.n_logits) * c.n_cols) * c.elem
    return rows + 3 * graph + scratch


def _coo_bytes(n_rows: int, n_nodes: int) -> int:
    # sources precede their targets: about half of each row can be non-zero
    return n_rows * n_nodes // 2 * COO_BYTES


def clean_pass_bytes(rm, n_pos: int) -> int:
    """The clean pass before any plan: logits, dense activations, per-layer captures."""
    tc = rm.transcoders
    elem = next(rm.model.parameters()).element_size()
    vocab = rm.unembed_weight().shape[0]
    dense_acts = 2 * tc.n_layers * n_pos * tc.d_transcoder
    return (n_pos * vocab + dense_acts + 6 * tc.n_layers * n_pos * rm.d_model) * elem


def check_clean_pass(rm, n_pos: int, free: int) -> None:
    """WiremapError before the clean pass of an `n_pos`-token prompt if it cannot fit."""
    need = clean_pass_bytes(rm, n_pos)
    if need > free * USABLE:
        raise WiremapError(
            f"the clean pass over {n_pos} tokens needs about {_gb(need)} but "
            f"{_gb(int(free * USABLE))} is usable; shorten the prompt or free memory"
        )


# -- what is free ------------------------------------------------------------------------
def free_bytes(device: str | torch.device = "cpu") -> int:
    """Bytes that can still be allocated: free GPU memory, or host memory (cgroup-aware)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return min(_mem_available(), _cgroup_free())


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages) * os.sysconf("SC_PAGE_SIZE") if pages else 2**62


def _cgroup_free() -> int:
    """Limit minus usage of this process's memory cgroup (v2, then v1); huge if none."""
    pairs = [
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ]
    for limit_file, usage_file in pairs:
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return max(int(limit) - usage, 0)
    return 2**62


# -- the decision ------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """What attribution will do about memory, and the figures it decided on."""

    max_feature_nodes: int | None  # None: every active feature
    target_batch: int  # targets per backward pass
    needed_bytes: int  # with the chosen budget and batch size
    full_bytes: int  # the uncapped graph with the chosen batch size
    available_bytes: int  # usable: USABLE × free (host + device pools on a GPU)
    resident_bytes: int
    note: str | None  # one line when the plan changed what the user asked for

    def as_settings(self) -> dict:
        return asdict(self)

    @property
    def batch_size(self) -> int:
        """Deprecated name of `target_batch` (goes away in the next version)."""
        deprecated("MemoryPlan.batch_size", "MemoryPlan.target_batch")
        return self.target_batch


def plan_memory(
    counts: GraphCounts,
    *,
    budget: int | None,
    target_batch: int | None = None,
    host_free: int,
    device_free: int | None = None,
    batch_size: int | None = None,
) -> MemoryPlan:
    """Choose the targets per backward pass and the feature budget that fit (module docstring).

    `budget`/`target_batch` None = choose; `device_free` None = one pool (CPU).
    `batch_size`: the old name of `target_batch` (this version only, with a warning).
    """
    target_batch, _ = renamed_keywords("plan_memory", target_batch, False, batch_size=batch_size)
    host = int(host_free * USABLE)
    device = None if device_free is None else int(device_free * USABLE)
    batch = _choose_batch(counts, target_batch, host, device)
    uncapped = budget is None or budget >= counts.n_features
    n_rows = counts.n_features if uncapped else budget
    need_host, need_dev = _needs(counts, n_rows, batch, device is not None)
    full_host, full_dev = _needs(counts, counts.n_features, batch, device is not None)
    fits = _fits(need_host, need_dev, host, device)
    common = dict(
        target_batch=batch,
        full_bytes=full_host + full_dev,
        available_bytes=host + (device or 0),
        resident_bytes=counts.resident_bytes,
    )
    if fits:
        return MemoryPlan(None if uncapped else budget, needed_bytes=need_host + need_dev,
                          note=_batch_note(batch, target_batch), **common)  # fmt: skip
    if budget is not None:
        raise _too_big(
            f"max_feature_nodes={budget}", need_host + need_dev, host + (device or 0), counts
        )
    chosen = _largest_budget(counts, batch, host, device)
    least = min(MIN_FEATURE_NODES, counts.n_features)
    if chosen < least:
        need_least = sum(_needs(counts, least, batch, device is not None))
        raise _too_big(f"even {least} feature nodes", need_least, host + (device or 0), counts)
    need = sum(_needs(counts, chosen, batch, device is not None))
    note = (
        f"memory: all {counts.n_features:,} active features need {_gb(full_host + full_dev)}, "
        f"{_gb(host + (device or 0))} usable; keeping the {chosen:,} most influential "
        "(--max-feature-nodes sets the budget)"
    )
    return MemoryPlan(chosen, needed_bytes=need, note=note, **common)


def _needs(c: GraphCounts, n_rows: int, batch: int, two_pools: bool) -> tuple[int, int]:
    """(host bytes, device bytes); on one pool everything counts as host."""
    host = rows_bytes(c, n_rows)
    dev = backward_bytes(c, batch) + frozen_bytes(c)
    return (host, dev) if two_pools else (host + dev, 0)


def _fits(need_host: int, need_dev: int, host: int, device: int | None) -> bool:
    return need_host <= host and (device is None or need_dev <= device)


def _choose_batch(c: GraphCounts, target_batch, host: int, device: int | None) -> int:
    """The asked batch size if it fits next to the smallest graph, else the largest that does."""
    least = min(c.n_features, MIN_FEATURE_NODES)
    pool = device if device is not None else host - rows_bytes(c, least)

    def need(b: int) -> int:
        return backward_bytes(c, b) + frozen_bytes(c)

    if target_batch is not None:
        if need(target_batch) > pool:
            raise _too_big(f"target_batch={target_batch}", need(target_batch), max(pool, 0), c,
                           flag="--target-batch")  # fmt: skip
        return target_batch
    # a chosen batch leaves at least half of one pool to the rows (more rows, more graph)
    share = 1.0 if device is not None else 0.5
    batch = DEFAULT_BATCH
    while batch > MIN_BATCH and need(batch) > pool * share:
        batch //= 2
    if need(batch) > pool:
        total = need(batch) + (0 if device is not None else rows_bytes(c, least))
        have = device if device is not None else host
        raise _too_big(f"even {least} feature nodes and target_batch={batch}", total, have, c)
    return batch


def _largest_budget(c: GraphCounts, batch: int, host: int, device: int | None) -> int:
    """Largest n_rows < n_features whose needs fit (bisection: needs grow with n_rows)."""
    lo, hi = 0, c.n_features - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(*_needs(c, mid, batch, device is not None), host, device):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _batch_note(batch: int, asked: int | None) -> str | None:
    if asked is None and batch < DEFAULT_BATCH:
        return f"memory: {batch} targets per backward pass (--target-batch sets it)"
    return None


def _too_big(what: str, need: int, have: int, c: GraphCounts, flag: str | None = None):
    flags = flag or "--max-feature-nodes (a smaller budget) or --target-batch"
    return WiremapError(
        f"attribution with {what} needs about {_gb(need)} but {_gb(have)} is usable "
        f"({c.n_pos} tokens, {c.n_features:,} active features); lower {flags}, "
        "shorten the prompt, or free memory"
    )


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# -- allocator errors ----------------------------------------------------------------------
@contextmanager
def oom_guard(plan: MemoryPlan | None, what: str = "attribution") -> Iterator[None]:
    """Turn an allocator error into a WiremapError with the plan's figures and the flags."""
    figures = (
        f"the plan estimated {_gb(plan.needed_bytes)} of {_gb(plan.available_bytes)} usable"
        if plan is not None
        else "no plan had been made yet"
    )
    fix = "lower --max-feature-nodes or --target-batch, or shorten the prompt"
    with oom_to_error(what, figures, fix):
        yield
