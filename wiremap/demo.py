"""The whole pipeline, offline, on the built-in model organism (`wiremap demo`).

    from wiremap.demo import DemoConfig, run_demo
    report = run_demo(DemoConfig(out="wiremap_out/demo"))     # ~1-2 min on 2 CPU cores
    report.swap.worked, report.graphs["clt/dallas"].scores

Stages, one function each, in the order `run_demo` calls them:
1. `write_corpus`      — the organism's own synthetic corpus as a .txt file;
2. `cache_stage`       — the organism's MLP inputs/outputs on it (`wiremap.cache`);
3. `train_stage`       — a CLT and a PLT trained on that cache with `wiremap.fit`, exported;
4. `attribute_stage`   — attribution graphs of the Dallas prompt and one antonym prompt per
                         language, for each transcoder;
5. `swap_stage`        — the Texas→California feature swap (`wiremap.attribution.circuits`):
                         does the organism now answer " Sacramento"?
   `write_stage`       — every graph as graph JSON + standalone HTML (state features
                         labelled, grouped and pinned), with scores and strongest paths;
6. `cards_stage`       — feature cards of the CLT, so the viewer shows them.

Everything lands in `cfg.out`: `corpus.txt`, `cache/`, `clt/` and `plt/` (exported
transcoders, with their feature cards in `features/`), `graphs/` (`*.json` + `*.html`),
`report.json`, and `runs/<arch>/config.yaml` (each training run's resolved `wiremap.fit`
settings). Open the graphs with `wiremap serve <out>/graphs`.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from wiremap.errors import WiremapError

DALLAS = "Fact: the capital of the state containing Dallas is"
TARGET_STATE, SWAP_STATE = "Texas", "California"
Say = Callable[[str], None]


@dataclass
class DemoConfig:
    """Sizes and switches of the demo; the defaults take 1-2 minutes on 2 CPU cores."""

    out: str = "wiremap_out/demo"
    """Output folder (cache, transcoders, graphs, report)."""
    organism: str | None = None
    """Organism folder (default: the one shipped with wiremap)."""
    n_tokens: int = 40_000
    """Token positions of organism activations to cache."""
    context_length: int = 64
    """Tokens per cached context."""
    d_transcoder: int = 256
    """Features per layer of each transcoder."""
    steps: int = 1200
    """Optimizer steps per transcoder."""
    batch_size: int = 512
    """Tokens per optimizer step."""
    lr: float = 2e-3
    """Peak learning rate."""
    sparsity_coef: float = 2e-3
    """Final weight of the tanh sparsity penalty."""
    activation: Literal["relu", "jumprelu"] = "jumprelu"
    """Transcoder activation function."""
    plt: bool = True
    """Also train a per-layer transcoder, to compare its graph scores with the CLT's."""
    feature_cards: bool = True
    """Compute feature cards of the transcoders (the viewer shows them)."""
    n_paths: int = 3
    """Strongest paths printed per graph."""
    swap_city: str = "Oakland"
    """California city whose prompt provides the California features injected by the swap."""
    insert_scale: float = 1.0
    """Injected California features = this times their activation on the swap city's prompt."""
    remove_value: float = 0.0
    """Value the Texas features are set to (0 = ablated; negative = pushed the other way)."""
    threads: int = 1
    """Torch CPU threads. The demo's matrices are small: on 2 idle cores 2 threads save ~25%,
    but when other jobs share the CPU spinning OpenMP threads make 2 several times slower."""
    seed: int = 0
    """Seed of the corpus, the data order and the transcoder initialisation."""
    progress: bool = True
    """Show progress bars."""
    attention: bool = False
    """Also name the attention heads that carry the state (Dallas) and the adjective
    (antonyms) to the last position, and the QK pairs that make them attend there."""

    def __post_init__(self) -> None:
        from wiremap.errors import require_positive

        positive = ("n_tokens", "d_transcoder", "steps", "batch_size", "n_paths", "threads")
        require_positive(self, *positive)
        if self.n_tokens < 2 * self.batch_size:
            raise WiremapError(
                f"n_tokens={self.n_tokens} is less than two batches of {self.batch_size}; "
                "cache more tokens or lower the batch size"
            )
        from wiremap.train.organism import STATES

        if self.swap_city not in STATES[SWAP_STATE][1]:
            raise WiremapError(
                f"swap_city {self.swap_city!r} is not one of the organism's {SWAP_STATE} cities; "
                f"choose one of {', '.join(STATES[SWAP_STATE][1])}"
            )

    @property
    def path(self) -> Path:
        return Path(self.out)


@dataclass
class GraphReport:
    """One attribution graph: where it is, its scores and its strongest paths."""

    prompt: str
    transcoder: str  # "clt" | "plt"
    json_path: str
    html_path: str
    top_token: str
    scores: dict[str, dict[str, float]]
    n_features: int
    summary: str


@dataclass
class DemoReport:
    """What `run_demo` did; `report.json` in the output folder holds the same."""

    out: str
    organism: str
    transcoders: dict[str, str]
    graphs: dict[str, GraphReport] = field(default_factory=dict)
    swap: Any = None  # wiremap.attribution.circuits.SwapResult
    features: dict[str, str] = field(default_factory=dict)  # arch -> feature-card folder
    seconds: dict[str, float] = field(default_factory=dict)
    training: dict[str, dict[str, float]] = field(default_factory=dict)
    attention: dict[str, Any] = field(default_factory=dict)  # prompt name -> heads (--attention)

    def to_json(self) -> dict[str, Any]:
        obj = asdict(self)
        obj["swap"] = None if self.swap is None else self.swap.to_json()
        return obj


# -- stage 1-2: text and activations -----------------------------------------------------
def write_corpus(cfg: DemoConfig, tokens_per_doc: float = 16.0) -> Path:
    """The organism's training corpus (same generator, same seed) as `<out>/corpus.txt`.

    Enough documents to fill `n_tokens` cached positions, one document per line.
    """
    from wiremap.train.organism import build_corpus

    n_docs = math.ceil(1.2 * cfg.n_tokens / tokens_per_doc)
    path = cfg.path / "corpus.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = build_corpus(n_docs=n_docs, seed=cfg.seed).documents
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


def cache_stage(cfg: DemoConfig, organism: str, model, tokenizer, corpus: Path) -> Path:
    """Cache the organism's `mlp_in` -> `mlp_out` activations (bfloat16 on disk: ~80 MB)."""
    from wiremap.cache import build_cache

    cache_cfg = cache_config(cfg, organism, corpus)
    return build_cache(cache_cfg, model=model, tokenizer=tokenizer, progress=cfg.progress)


def cache_dir(cfg: DemoConfig) -> Path:
    """One cache per size and seed: a rerun reuses it, other sizes get their own folder."""
    return cfg.path / "cache" / f"n{cfg.n_tokens}-ctx{cfg.context_length}-seed{cfg.seed}"


def cache_config(cfg: DemoConfig, organism: str, corpus: Path):
    from wiremap.cache import CacheConfig

    return CacheConfig(
        model=organism,
        dataset=str(corpus),
        n_tokens=cfg.n_tokens,
        context_length=cfg.context_length,
        batch_contexts=64,
        dtype="bfloat16",
        device="cpu",
        out=str(cache_dir(cfg)),
        shard_tokens=16384,
    )


# -- stage 3: transcoders ------------------------------------------------------------------
def train_stage(cfg: DemoConfig, cache_cfg, arch: str) -> tuple[Path, dict[str, float]]:
    """Train one transcoder (`clt` or `plt`) on the cache with `wiremap.fit`; export it to
    `<out>/<arch>` (the run's resolved config goes to `<out>/runs/<arch>/config.yaml`)."""
    import wiremap

    with _quiet_lightning():
        result = wiremap.fit(**demo_fit_settings(cfg, cache_cfg, arch))
    return result.export, result.metrics


def demo_fit_settings(cfg: DemoConfig, cache_cfg, arch: str) -> dict[str, Any]:
    """The `wiremap.fit` settings of one of the demo's transcoders: no logger, checkpoints,
    validation or replacement check (the demo's graphs measure the transcoders instead)."""
    run = dict(name=arch, root=str(cfg.path / "runs"), export_dir=str(cfg.path / arch))
    run.update(logger="none", checkpoint_every=0, replacement_every=0, log_every=0)
    return dict(
        run=run,
        trainer=dict(
            max_steps=cfg.steps, accelerator="cpu", devices=1, precision="32-true",
            enable_model_summary=False, enable_progress_bar=cfg.progress,
            gradient_clip_val=1.0, log_every_n_steps=max(1, cfg.steps // 20), limit_val_batches=0,
        ),
        model=dict(
            arch=arch, d_transcoder=cfg.d_transcoder, activation=cfg.activation,
            loss=dict(sparsity_coef=cfg.sparsity_coef, sparsity_ramp=0.5,
                      dead_tokens=50 * cfg.batch_size),
            optim=dict(lr=cfg.lr, warmup_steps=max(1, cfg.steps // 20)),
        ),
        data=dict(
            cache=cache_cfg, batch_tokens=cfg.batch_size, buffer_size=16 * cfg.batch_size,
            val_fraction=0.0, seed=cfg.seed, pin_memory=False,
        ),
        seed_everything=cfg.seed,
    )  # fmt: skip


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's start-up banners and known-harmless warnings; keep its progress bar."""
    import lightning  # noqa: F401 (imported first: importing it resets these loggers' levels)

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # inside Lightning itself
            warnings.filterwarnings("ignore", message=".*across ranks is zero.*")  # no val split
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# -- stage 4: attribution graphs -----------------------------------------------------------
def demo_prompts() -> dict[str, str]:
    """name -> prompt: the two-hop Dallas question and one antonym prompt per language."""
    from wiremap.train.organism import ANTONYMS

    prompts = {"dallas": DALLAS}
    for lang, (template, pairs) in ANTONYMS.items():
        prompts[f"antonym_{lang}"] = template.format(a=pairs[0][0], b="").rstrip()
    return prompts


def replacement_model(model, tokenizer, organism: str, transcoders: Path):
    """The organism with the transcoders exported in `transcoders` spliced in."""
    from wiremap.models.formats import load_transcoders
    from wiremap.models.replacement import ReplacementModel

    return ReplacementModel(
        model,
        tokenizer,
        load_transcoders(transcoders),
        model_name=organism,
        transcoders_path=str(transcoders),
    )


def attribute_prompt(rm, prompt: str):
    """(graph, pruning) of one prompt with every active feature visited (graphs are small)."""
    from wiremap.attribution.attribute import attribute
    from wiremap.attribution.prune import prune_graph

    graph = attribute(prompt, rm, verbose=False)
    return graph, prune_graph(graph)


def write_graph(
    graph, result, folder: Path, name: str, labels=None, supernodes=(), pinned=()
) -> tuple[Path, Path]:
    """`<folder>/<name>.json` (viewer format, checked) and the standalone `<name>.html`."""
    from wiremap.attribution.export import write_graph_json
    from wiremap.attribution.html import write_html

    json_path = folder / f"{name}.json"
    write_graph_json(
        graph,
        json_path,
        result=result,
        labels=labels,
        slug=name,
        supernodes=[list(s) for s in supernodes],
        pinned_ids=list(pinned),
    )
    obj = json.loads(json_path.read_text(encoding="utf-8"))
    return json_path, write_html(obj, folder / f"{name}.html")


def graph_report(graph, result, arch: str, paths: tuple[Path, Path], k: int, labels=None):
    from wiremap.attribution.export import summarize_paths

    top = graph.logit_strings[int(graph.logit_probs.argmax())]
    return GraphReport(
        prompt=graph.prompt,
        transcoder=arch,
        json_path=str(paths[0]),
        html_path=str(paths[1]),
        top_token=top,
        scores=result.scores,
        n_features=graph.n_features,
        summary=summarize_paths(graph, k=k, result=result, labels=labels),
    )


# -- stage 5: the Texas -> California swap -------------------------------------------------
def state_prompts(state: str) -> list[str]:
    """The two-hop question for every city of `state` (all the same length in tokens)."""
    from wiremap.train.organism import STATES, TWO_HOP

    return [TWO_HOP.format(city=c) for c in STATES[state][1]]


def capital(state: str) -> str:
    from wiremap.train.organism import STATES

    return " " + STATES[state][0]


def state_features(rm, graph, state: str, other: str, positions=None, everywhere=False):
    """Features of `graph` that stand for `state`: fire on the two-hop prompts of `state`'s
    cities and not on `other`'s, and push the capital's logit up (total effect in the graph);
    see `wiremap.attribution.circuits.concept_features`. `everywhere`: all of them, unranked
    cut-off; otherwise the strongest carrying 90% of their effect."""
    from wiremap.attribution.circuits import concept_features, contrast

    stats = contrast(rm, state_prompts(state), state_prompts(other))
    if everywhere:
        return concept_features(graph, stats, capital(state), share=1.0, max_features=10**9)
    return concept_features(graph, stats, capital(state), positions=positions)


def swap_prompt(city: str) -> str:
    from wiremap.train.organism import TWO_HOP

    return TWO_HOP.format(city=city)


def swap_stage(cfg: DemoConfig, rm, dallas_graph, dallas_result):
    """The Texas -> California swap on the Dallas prompt (circuit-tracer's Dallas experiment).

    The Texas features are looked for everywhere in the Dallas graph, but swapped only at the
    city's position: there the organism looks the state up from the city, while the ones at
    the last position read that state to say the capital. The California features come from
    the `cfg.swap_city` prompt, at the same position. Returns (SwapResult, extras).
    """
    from wiremap.attribution.circuits import insertion_values, swap

    _check_answers(dallas_graph, capital(TARGET_STATE))
    city = dallas_graph.token_strings.index(" Dallas")
    found = state_features(rm, dallas_graph, TARGET_STATE, SWAP_STATE, everywhere=True)
    texas = state_features(rm, dallas_graph, TARGET_STATE, SWAP_STATE, positions={city})
    other_graph, other_result = attribute_prompt(rm, swap_prompt(cfg.swap_city))
    california = state_features(rm, other_graph, SWAP_STATE, TARGET_STATE, positions={city})
    insert = insertion_values(rm, swap_prompt(cfg.swap_city), california, cfg.insert_scale)
    result = swap(rm, DALLAS, texas, insert, cfg.remove_value, expected=capital(SWAP_STATE))
    result.extra["where"] = _where(dallas_graph, found)
    result.extra["path"] = _dallas_path(dallas_graph, dallas_result, texas, city)
    return result, (other_graph, other_result, california)


def _check_answers(graph, token: str) -> None:
    if token not in graph.logit_strings:
        raise WiremapError(
            f"the organism does not answer {token!r} to {graph.prompt!r} (its top tokens: "
            f"{graph.logit_strings[:3]}); rebuild it with `wiremap organism train`"
        )


def _where(graph, features) -> dict[str, dict]:
    """'<token>@<pos>' -> {n, layers} of the features found, position by position."""
    out: dict[str, dict] = {}
    for layer, pos, _ in sorted(features, key=lambda f: f[1]):
        entry = out.setdefault(f"{graph.token_strings[pos]!r}@{pos}", {"n": 0, "layers": []})
        entry["n"] += 1
        entry["layers"] = sorted(set(entry["layers"]) | {layer})
    return out


def _dallas_path(graph, result, texas, city: int) -> dict[str, Any]:
    """Is there a path ' Dallas' -> a Texas feature -> ' Austin' in the pruned graph, and
    which is the strongest (as text, with its share of the logit's attribution)?"""
    from wiremap.attribution.circuits import (
        feature_nodes,
        logit_node,
        path_through,
        strongest_path_through,
    )
    from wiremap.attribution.export import node_name

    austin, start = logit_node(graph, capital(TARGET_STATE)), graph.token_index(city)
    via = feature_nodes(graph, texas)
    best = strongest_path_through(graph, result, start, via, austin)
    labels = {(layer, feat): TARGET_STATE for layer, _, feat in texas}
    text = None if best is None else " -> ".join(node_name(graph, i, labels) for i in best[2])
    return {
        "exists": path_through(graph, result, start, via, austin),
        "strongest": text,
        "share": None if best is None else round(best[0], 4),
    }


# -- stage 6: feature cards ----------------------------------------------------------------
def cards_stage(cfg: DemoConfig, cache: Path, folder: Path, organism: str, model, tokenizer):
    """Feature cards of one transcoder in `<folder>/features`, where `wiremap serve` looks."""
    from wiremap.attribution.features import FeatureCardConfig, build_feature_cards

    cards = FeatureCardConfig(
        cache=str(cache),
        transcoders=str(folder),
        model=organism,
        top_k=10,
        n_samples=12,
        context=16,
        seed=cfg.seed,
        progress=cfg.progress,
    )
    return build_feature_cards(cards, model=model, tokenizer=tokenizer)


# -- the whole run -------------------------------------------------------------------------
class _Clock:
    """Seconds per stage, for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start = self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 1)
        self._last = now

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def run_demo(cfg: DemoConfig, say: Say = print) -> DemoReport:
    """Run every stage, printing what each finds; write `<out>/report.json`; return the report."""
    import torch

    from wiremap.models.loading import load_model
    from wiremap.models.organism import organism_path

    torch.set_num_threads(cfg.threads)
    clock = _Clock()
    organism = str(Path(cfg.organism).resolve() if cfg.organism else organism_path())
    model, tokenizer = load_model(organism)
    say(f"[1/6] organism {organism}: {_describe(model)}")
    corpus = write_corpus(cfg)
    say(f"[2/6] caching {cfg.n_tokens:,} tokens of its MLP activations -> {cache_dir(cfg)}")
    cache = cache_stage(cfg, organism, model, tokenizer, corpus)
    clock.lap("cache")
    archs = ["clt", "plt"] if cfg.plt else ["clt"]
    report = DemoReport(out=str(cfg.path.resolve()), organism=organism, transcoders={})
    say(
        f"[3/6] training {' and '.join(a.upper() for a in archs)}: {cfg.d_transcoder} features "
        f"per layer, {cfg.steps} steps of {cfg.batch_size} tokens"
    )
    for arch in archs:
        folder, metrics = train_stage(cfg, cache_config(cfg, organism, corpus), arch)
        report.transcoders[arch], report.training[arch] = str(folder.resolve()), metrics
        say(f"      {arch.upper()}: {_metrics_line(metrics)} -> {folder}")
    clock.lap("train")
    _graphs_and_swap(cfg, report, model, tokenizer, organism, say, clock)
    if cfg.feature_cards:
        say("[6/6] feature cards (top contexts, logit lens) -> <out>/<clt|plt>/features")
        for arch, folder in report.transcoders.items():
            cards = cards_stage(cfg, cache, Path(folder), organism, model, tokenizer)
            report.features[arch] = str(cards)
        clock.lap("feature_cards")
    report.seconds = {**clock.seconds, "total": clock.total()}
    (cfg.path / "report.json").write_text(json.dumps(report.to_json(), indent=1) + "\n")
    _print_outputs(cfg, report, say)
    return report


def attribute_stage(cfg: DemoConfig, rms: dict) -> dict[str, dict[str, tuple]]:
    """{arch: {prompt name: (graph, pruning)}} for every demo prompt and replacement model."""
    prompts = demo_prompts()
    return {
        arch: {name: attribute_prompt(rm, p) for name, p in _bar(prompts.items(), arch, cfg)}
        for arch, rm in rms.items()
    }


def write_stage(cfg: DemoConfig, computed: dict, states: dict) -> dict[str, GraphReport]:
    """Write every graph as `<out>/graphs/<arch>-<name>.json` + `.html`; return their reports.

    `states` maps "<arch>/<name>" to (state, its features, its city's position) for the graphs
    where the swap found them: those features get the state as label, form a supernode, and
    are pinned with the city token and the capital's logit, so the viewer opens on them.
    """
    folder, reports = cfg.path / "graphs", {}
    for arch, graphs in computed.items():
        for name, (graph, result) in graphs.items():
            key = f"{arch}/{name}"
            labels, marks, pins = _state_marks(graph, result, *states.get(key, (None, [], 0)))
            paths = write_graph(graph, result, folder, f"{arch}-{name}", labels, marks, pins)
            reports[key] = graph_report(graph, result, arch, paths, cfg.n_paths, labels)
    return reports


def _state_marks(graph, result, state: str | None, features, city: int):
    """(labels, supernodes, pinned ids) naming `features` as `state` in one graph."""
    from wiremap.attribution.circuits import logit_node
    from wiremap.attribution.export import node_ids

    if state is None or not features:
        return None, [], []
    # Labels are per (layer, feature): only this graph, where the features were found, gets them.
    labels = {(layer, feat): state for layer, _, feat in features}
    ids, kept = node_ids(graph), result.node_mask.tolist()
    wanted = {tuple(f) for f in features}
    members = [
        ids[i]
        for i, f in enumerate(graph.active_features.tolist())
        if tuple(f) in wanted and kept[i]
    ]
    if not members:
        return labels, [], []
    ends = [ids[graph.token_index(city)], ids[logit_node(graph, capital(state))]]
    return labels, [[state, *members]], [ends[0], *members, ends[1]]


def _graphs_and_swap(cfg, report: DemoReport, model, tokenizer, organism, say, clock) -> None:
    """Stages 4 and 5: graphs for every transcoder, then the swap with the CLT."""
    say(f"[4/6] attribution graphs of {len(demo_prompts())} prompts -> {cfg.path / 'graphs'}")
    rms = {
        a: replacement_model(model, tokenizer, organism, Path(p))
        for a, p in report.transcoders.items()
    }
    computed = attribute_stage(cfg, rms)
    clock.lap("attribute")
    dallas, dallas_result = computed["clt"]["dallas"]
    swap, (other, other_result, california) = swap_stage(cfg, rms["clt"], dallas, dallas_result)
    other_name = cfg.swap_city.lower()
    computed["clt"][other_name] = (other, other_result)
    clock.lap("swap")
    city = dallas.token_strings.index(" Dallas")
    states = {
        "clt/dallas": (TARGET_STATE, swap.removed, city),
        f"clt/{other_name}": (SWAP_STATE, california, city),
    }
    report.graphs = write_stage(cfg, computed, states)
    clock.lap("write_graphs")
    _print_graphs(report, say)
    report.swap = swap
    say(f"[5/6] swap: {TARGET_STATE} features -> {SWAP_STATE} features on {DALLAS!r}")
    _print_swap(swap, cfg.swap_city, say)
    if cfg.attention:
        report.attention = attention_stage(rms["clt"], computed["clt"], swap.removed, say)


# -- `--attention`: the heads that move the state and the adjective -------------------------
def attention_stage(rm, graphs: dict, texas, say: Say, n_edges: int = 10) -> dict[str, Any]:
    """For the Dallas graph (from the Texas features at ' Dallas', or every node there) and
    each antonym graph (from the adjective): the heads carrying the strongest edges to the
    last position, and for the top two the QK terms of their score (query: last position,
    key: the source position). Printed, and returned for the report."""
    from wiremap.train.organism import ANTONYMS

    say("[attention] heads carrying the strongest edges to the last position (CLT graphs)")
    found = {}
    for name, (graph, result) in graphs.items():
        if name == "dallas":
            word, labels = " Dallas", {(layer, f): TARGET_STATE for layer, _, f in texas}
        elif name.startswith("antonym_"):
            word, labels = ANTONYMS[name.split("_", 1)[1]][1][0][0], None
        else:
            continue
        pos = _word_position(graph, word)
        wanted = {tuple(f) for f in texas} if name == "dallas" else set()
        sources = [i for i, f in enumerate(graph.active_features.tolist()) if tuple(f) in wanted]
        found[name] = _heads_of(rm, graph, result, pos, sources or None, labels, n_edges, say)
    return found


def _word_position(graph, word: str) -> int:
    strings = [t.strip() for t in graph.token_strings]
    if word.strip() not in strings:
        raise WiremapError(f"{word!r} is not a token of {graph.prompt!r}; the organism changed")
    return strings.index(word.strip())


def _heads_of(rm, graph, result, pos, sources, labels, n_edges, say: Say) -> dict[str, Any]:
    from wiremap.attribution.attention import heads_between

    found = heads_between(rm, graph, result, pos, n_edges=n_edges, sources=sources)
    toks, last = graph.token_strings, graph.n_pos - 1
    what = "the Texas features" if sources else "the nodes"
    say(
        f"      {graph.prompt!r}: the {len(found.loadings)} strongest edges from {what} at "
        f"{toks[pos]!r} to {toks[last]!r}"
    )
    if not found.loadings:
        say("        no kept edge between them")
        return {"source_pos": pos, "n_edges": 0, "heads": []}
    top = [h for h in found.heads if h[2] > 0][:2]
    shares = ", ".join(f"L{layer} H{head} {100 * v:.0f}%" for layer, head, v in top)
    rest = 1.0 - sum(v for *_, v in top)
    say(f"        carried by {shares or 'no head'}; other heads {100 * rest:.0f}%")
    heads = [_why_attended(rm, graph, layer, head, pos, labels, say) for layer, head, _ in top]
    for item, (_, _, share) in zip(heads, top, strict=True):
        item["share"] = share
    return {"source_pos": pos, "n_edges": len(found.loadings), "heads": heads}


def _why_attended(rm, graph, layer: int, head: int, pos: int, labels, say: Say) -> dict:
    """Print the head's attention weight on `pos` from the last position and its top terms."""
    import torch

    from wiremap.attribution.attention import qk_attributions, readable

    last, toks = graph.n_pos - 1, graph.token_strings
    keys = list(range(last + 1))  # every key: the weight is a softmax over them
    scores = qk_attributions(rm, graph, [(layer, head, last, k) for k in keys])
    weight = torch.softmax(torch.tensor([s.capped_score for s in scores]), 0)[pos]
    qk = scores[pos]
    say(
        f"        L{layer} H{head} puts {float(weight):.2f} of its attention from {toks[last]!r} "
        f"on {toks[pos]!r} (score {qk.score:.2f}); the largest terms:"
    )

    def name(node_id):
        return readable(graph, node_id, labels)

    sides = []
    for side, nodes, sums in (
        ("key", qk.key_nodes, qk.col_sums()),
        ("query", qk.query_nodes, qk.row_sums()),
    ):
        order = sums.abs().argsort(descending=True)[:3].tolist()
        sides.append([(name(nodes[i]), float(sums[i])) for i in order])
        say(f"          {side:>5} side: " + ", ".join(f"{n} {v:+.2f}" for n, v in sides[-1]))
    pairs = [(name(q), name(k), v) for q, k, v in qk.top(3)]
    for q, k, v in pairs:
        say(f"          pair {v:+.2f}: query {q} x key {k}")
    return {
        "layer": layer,
        "head": head,
        "weight": float(weight),
        "score": qk.score,
        "key_side": sides[0],
        "query_side": sides[1],
        "pairs": pairs,
    }


def _bar(items, arch: str, cfg: DemoConfig):
    from tqdm.auto import tqdm

    items = list(items)
    return tqdm(items, desc=f"attributing ({arch.upper()})", disable=not cfg.progress)


# -- printing ------------------------------------------------------------------------------
def _describe(model) -> str:
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    size = f"{c.num_hidden_layers} layers, d_model {c.hidden_size}"
    return f"{c.model_type}, {size}, {n / 1e6:.1f}M parameters"


def _metrics_line(m: dict[str, float]) -> str:
    parts = []
    if "fvu" in m:
        parts.append(f"FVU {m['fvu']:.3f}")
    if "l0" in m:  # `l0`: per token and layer; `l0_total`: per token, all layers together
        total = f" ({m['l0_total']:.1f} all layers)" if "l0_total" in m else ""
        parts.append(f"L0 {m['l0']:.1f} features/token per layer{total}")
    if "dead_fraction" in m:
        parts.append(f"dead {100 * m['dead_fraction']:.0f}%")
    return ", ".join(parts) or "trained"


def _print_graphs(report: DemoReport, say: Say) -> None:
    say("      scores: replacement / completeness of the full graph (1 = no error nodes)")
    names = list(dict.fromkeys(k.split("/", 1)[1] for k in report.graphs))
    for name in names:
        cells = [
            f"{arch.upper()} {g.scores['full']['replacement']:.2f} / "
            f"{g.scores['full']['completeness']:.2f}"
            for arch in ("clt", "plt")
            if (g := report.graphs.get(f"{arch}/{name}")) is not None
        ]
        g = report.graphs[f"clt/{name}"]
        say(f"      {g.prompt!r:<56} -> {g.top_token!r:<13} {'   '.join(cells)}")
    say("      strongest paths in the CLT graphs (share of the top logit's attribution):")
    for name in names:
        g = report.graphs[f"clt/{name}"]
        say(f"      {g.prompt!r} -> {g.top_token!r}")
        say("\n".join("      " + line for line in g.summary.splitlines()[3:]))


def _print_swap(swap, city: str, say: Say) -> None:
    tx, ca, austin = TARGET_STATE, SWAP_STATE, capital(TARGET_STATE)
    where = swap.extra.get("where", {})
    places = "; ".join(
        f"{w['n']} at {k} (layers {', '.join(map(str, w['layers']))})" for k, w in where.items()
    )
    say(f"      {tx} features of the Dallas graph (fire for {tx} cities, not {ca}'s; push")
    say(f"      '{austin}' up): {places or 'none'}")
    say("      swapped at the city's position, where the organism looks the state up:")
    say(f"        {tx} features removed:    {_feature_list(swap.removed)}")
    inserted = _feature_list([f[:3] for f in swap.inserted])
    say(f"        {ca} features inserted: {inserted}  (values from the {city} prompt)")
    path = swap.extra.get("path") or {}
    if path:
        found = "yes" if path["exists"] else "no"
        say(f"      path ' Dallas' -> {tx} feature -> '{austin}' in the pruned graph: {found}")
    if path.get("strongest"):
        say(f"        strongest: {path['strongest']} ({100 * path['share']:.1f}%)")
    rows = (("before", swap.before), (f"{tx} removed", swap.ablated), ("swapped", swap.after))
    for label, tops in rows:
        say(f"      {label:<14} " + "  ".join(f"{t!r} {p:.3f}" for t, p in tops))
    say(f"      does the model now say {swap.expected!r}? {'yes' if swap.worked else 'no'}")


def _feature_list(features, limit: int = 8) -> str:
    if not features:
        return "(none found)"
    shown = ", ".join(f"L{l}/F{f}@{p}" for l, p, f in features[:limit])
    more = f" and {len(features) - limit} more" if len(features) > limit else ""
    return f"{len(features)}: {shown}{more}"


def _print_outputs(cfg: DemoConfig, report: DemoReport, say: Say) -> None:
    out = cfg.path
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in report.seconds.items() if k != "total")
    say(f"done in {report.seconds['total']:.0f} s ({stages})")
    say(f"outputs in {out}:")
    say(f"  graphs/        graph JSON + standalone HTML ({len(report.graphs)} graphs)")
    for arch in report.transcoders:
        say(f"  {arch}/           exported {arch.upper()} (circuit-tracer layout)")
    for arch in report.features:
        say(f"  {arch}/features/  feature cards")
    say("  cache/         organism activations;  report.json  everything printed above")
    say(f"open the viewer:  wiremap serve {out / 'graphs'}")
