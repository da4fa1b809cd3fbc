"""`wiremap attribute` and `wiremap steer`: attribution graphs and interventions from the shell.

    wiremap attribute --model gpt2 --transcoders tc/ --prompt "The capital of France is" \\
        --out graphs/ [--slug france --scan gpt2] [--node-threshold 0.8 --edge-threshold 0.98] \\
        [--heads 1000]
    wiremap steer --model gpt2 --transcoders tc/ --prompt "I love" \\
        --feature 5:3:1234 --feature 6:*:77=2.5 --scale 4 --generate 20

`attribute` writes the pruned graph JSON (DESIGN.md §8) to `{slug}.json` in the --out folder
(or to --out itself when it names a `.json` file; its name is then the slug), lists it in
that folder's `graph-metadata.json` (circuit-tracer's frontend layout), writes the full graph
(tensors + metadata) next to it (`{slug}.safetensors`, `{slug}.meta.json`), then prints the
scores and the strongest paths from the prompt to the top logit. With --heads N it adds
the JSON's "heads" block: which attention heads carry each of the N strongest links and the
QK pairs that made those heads attend (wiremap/attribution/attention.py).

`steer` edits features given as `LAYER:POS:FEATURE[=VALUE]` (POS `*` = every position,
including generated ones): with --scale X they are multiplied by X, with --ablate set to
zero, with --add X shifted by X, and with none of these set to their VALUE. It prints the
top next tokens before and after, and with --generate N a continuation.

The options are the fields of `ModelArgs` and the parameters of `attribute_graph` / `steer`
(`wiremap.commands`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from wiremap.commands import UsageError, at_least, parse, split
from wiremap.errors import WiremapError

ATTRIBUTE, STEER = "wiremap attribute", "wiremap steer"


@dataclass
class ModelArgs:
    """The replacement model and the prompt, as `attribute` and `steer` take them."""

    model: str
    """Hub name or local model folder (or a .gguf file)."""
    transcoders: str
    """Folder of exported transcoders."""
    prompt: str
    """Text to analyse (BOS is prepended)."""
    device: str = "cpu"
    """cpu, cuda, cuda:1, or auto."""
    dtype: str = "float32"
    """float32 (exact), bfloat16, float16."""
    check_model_name: bool = True
    """Refuse transcoders whose config names another model (--no-check-model-name: accept)."""


def _load(args: ModelArgs):
    from wiremap.models.replacement import ReplacementModel

    if not Path(args.transcoders).exists():
        raise WiremapError(f"transcoders folder {args.transcoders!r} does not exist")
    return ReplacementModel.from_pretrained(
        args.model,
        args.transcoders,
        device=args.device,
        dtype=args.dtype,
        check_model_name=args.check_model_name,
    )


def attribute_main(argv: list[str]) -> int:
    source, options = attribute_args(argv)
    return attribute_graph(source, **options)


def attribute_args(argv: list[str]) -> tuple[ModelArgs, dict]:
    """(model and prompt, the other options of `attribute_graph`) from the command line."""
    values = parse(
        argv, ATTRIBUTE, ModelArgs, attribute_graph,
        skip={"source"}, custom={"memory_limit": {"type": parse_bytes}},
        bare={"heads": "1000"},
        deprecated={"--keep_bos": "--include_bos", "--batch_size": "--target_batch"},
    )  # fmt: skip
    return split(values, ModelArgs)


def attribute_graph(
    source: ModelArgs,
    out: str,
    slug: str | None = None,
    scan: str | None = None,
    node_threshold: float = 0.8,
    node_pool: Literal["all", "features"] = "all",
    edge_threshold: float = 0.98,
    max_feature_nodes: int | None = None,
    target_batch: int | None = None,
    memory_limit: int | None = None,
    target: list[str] | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    include_bos: bool = False,
    paths: int = 5,
    edges_per_node: int = 16,
    max_edges: int = 20000,
    features: str | None = None,
    feature_json_base_url: str | None = None,
    full_graph: bool = True,
    html: str | None = None,
    png: str | None = None,
    heads: int | None = None,
    quiet: bool = False,
) -> int:
    """Build an attribution graph for a prompt.

    Args:
        source: the replacement model and the prompt
        out: folder for {slug}.json, or a .json file
        slug: graph name [a-zA-Z0-9_.-] (default: from the prompt)
        scan: model id for Neuronpedia (default: the model name)
        node_threshold: cumulative influence kept
        node_pool: what the node threshold is a share of: all nodes (circuit-tracer's rule)
            or feature and error nodes only (keeps more features)
        edge_threshold: cumulative edge score kept
        max_feature_nodes: feature budget (default: every active feature if it fits in
            memory, else the most influential that fit)
        target_batch: attribution targets per backward pass (default: 256, fewer when memory
            is short; was --batch-size)
        memory_limit: memory attribution may use, e.g. 8GB (default: what is free)
        target: a target token or id (once per target)
        max_n_logits: most logit targets
        desired_logit_prob: their total probability
        include_bos: BOS features and errors are sources too (left out by default; was
            --keep-bos)
        paths: how many top paths to print
        edges_per_node: edge budget of the JSON: each node's strongest inputs and outputs
            kept (0 = all)
        max_edges: edge budget: most links in the JSON (0 = all)
        features: feature cards folder (default: <transcoders>/features when it exists):
            their per-feature JSON goes to <out folder>/features/<scan>/
        feature_json_base_url: public URL of that folder for Neuronpedia (default:
            features/<scan>, relative)
        full_graph: also write the full graph beside --out (<out>.safetensors: a dense
            adjacency takes 4·N² bytes for N nodes, e.g. 263 MB for 8,111 nodes)
        html: also write a self-contained HTML view here
        png: also write a static PNG of the pruned graph
        heads: store head loadings of the N strongest links (--heads alone: 1000) and QK
            pairs of their top heads in the JSON's 'heads' block
        quiet: no progress output
    """
    from wiremap.attribution.attribute import attribute
    from wiremap.attribution.export import (
        check_name,
        default_scan,
        graph_file,
        summarize_paths,
        write_graph_json,
    )

    path, slug = graph_file(out, slug, source.prompt)  # refuse bad names before the work
    if scan:
        check_name("scan", scan)
    _check_attribute_args(
        path, html, png, node_threshold, edge_threshold, desired_logit_prob,
        max_n_logits=max_n_logits, paths=paths, edges_per_node=edges_per_node,
        max_edges=max_edges, heads=heads,
    )  # fmt: skip
    rm = _load(source)
    graph = attribute(
        source.prompt, rm, max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob,
        target_tokens=target, max_feature_nodes=max_feature_nodes, target_batch=target_batch,
        include_bos=include_bos, memory_limit=memory_limit, verbose=not quiet,
    )  # fmt: skip
    note = graph.settings["memory"]["note"]
    if note and quiet:  # otherwise attribute() has said it
        print(note)
    graph.settings.update(node_threshold=node_threshold, edge_threshold=edge_threshold)
    scan = scan or default_scan(graph.settings)
    store = _feature_store(features, source.transcoders)
    base_url = feature_json_base_url or (f"features/{scan}" if store else None)
    result = write_graph_json(
        graph, path, slug=slug, scan=scan, feature_json_base_url=base_url,
        node_threshold=node_threshold, edge_threshold=edge_threshold, node_pool=node_pool,
        edges_per_node=edges_per_node or None, max_edges=max_edges or None,
    )  # fmt: skip
    if heads:
        _write_heads(rm, graph, path, heads)
    print(summarize_paths(graph, k=paths, result=result))
    listed = f"{path} (listed in {path.parent / 'graph-metadata.json'})"
    if not full_graph:
        print(f"wrote {listed}")
    else:
        base = graph.save(path.with_suffix(""))
        print(f"wrote {listed} and {base}.safetensors / {base}.meta.json")
    if store is not None:
        _write_feature_jsons(path, store, path.parent / "features" / scan)
    _write_pictures(path, html, png)
    return 0


def _write_heads(rm, graph, out: Path, n_edges: int) -> None:
    import json

    from wiremap.attribution.attention import heads_block
    from wiremap.attribution.export import add_heads_block

    links = json.loads(out.read_text(encoding="utf-8"))["links"]
    block = heads_block(rm, graph, links, n_edges=n_edges)
    add_heads_block(out, block)
    print(f"head loadings of {len(block['edges'])} edges, QK pairs of {len(block['qk'])} heads")


def _feature_store(features: str | None, transcoders: str):
    """The FeatureStore of --features (an error if missing), else of <transcoders>/features."""
    from wiremap.attribution.features import FeatureStore

    folder = Path(features or Path(transcoders) / "features")
    if features is None and not (folder / "index.json").is_file():
        return None  # no cards computed: the graph has no feature_details
    return FeatureStore(folder)


def _write_feature_jsons(graph_json: Path, store, folder: Path) -> None:
    import json

    from wiremap.attribution.features import write_feature_jsons

    obj = json.loads(graph_json.read_text(encoding="utf-8"))
    n = write_feature_jsons(obj, store, folder)
    print(f"wrote {n} feature JSON files to {folder}")


def _check_attribute_args(
    out: Path,
    html: str | None,
    png: str | None,
    node_threshold: float,
    edge_threshold: float,
    desired_logit_prob: float,
    heads: int | None,
    **counts: int,
) -> None:
    """Refuse bad settings before the model is loaded and the attribution runs."""
    from wiremap.attribution.prune import check_thresholds

    try:
        check_thresholds(node_threshold, edge_threshold)
    except WiremapError as err:  # a bad value given on the command line
        raise UsageError(ATTRIBUTE, str(err)) from None
    at_least(ATTRIBUTE, 1, max_n_logits=counts.pop("max_n_logits"))
    at_least(ATTRIBUTE, 0, **counts)
    if heads is not None:
        at_least(ATTRIBUTE, 1, heads=heads)
    if not 0.0 < desired_logit_prob <= 1.0:
        raise UsageError(ATTRIBUTE, f"--desired-logit-prob {desired_logit_prob} is outside (0, 1]")
    for path in (out, html, png):  # out: the graph file --out names
        if path is not None:
            check_writable(Path(path))


def check_writable(path: Path) -> None:
    """WiremapError now, not after the work, when `path` cannot be written."""
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    if path.is_dir():
        raise WiremapError(f"{path} is a folder; give a file name such as graph.json")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WiremapError(
            f"cannot write {path}: {folder} is read-only or not yours; choose a writable folder"
        )


def parse_bytes(text: str) -> int:
    """`8GB`, `512MB`, `1.5e9` -> bytes (decimal units; GiB/MiB binary)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    try:
        value = float(num) * units[t[len(num) :]]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r}: write a size such as 8GB or 512MB") from None
    return int(value)


def _write_pictures(graph_json: Path, html: str | None, png: str | None) -> None:
    if not (html or png):
        return
    import json

    obj = json.loads(graph_json.read_text(encoding="utf-8"))
    if html:
        from wiremap.attribution.html import write_html

        print(f"wrote {write_html(obj, html)}")
    if png:
        from wiremap.attribution.png import write_png

        print(f"wrote {write_png(obj, png)}")


def parse_feature(spec: str) -> tuple[int, int | None, int, float | None]:
    """`L:POS:F[=VALUE]` -> (layer, pos or None, feature, value or None)."""
    head, _, value = spec.partition("=")
    parts = head.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        layer, pos, feat = parts
        return (
            int(layer),
            None if pos in ("*", "all") else int(pos),
            int(feat),
            float(value) if value else None,
        )
    except ValueError:
        raise UsageError(
            STEER,
            f"--feature {spec!r}: write LAYER:POS:FEATURE or LAYER:POS:FEATURE=VALUE, "
            "e.g. 5:3:1234 or 5:*:1234=2.0",
        ) from None


def steer_main(argv: list[str]) -> int:
    source, options = split(parse(argv, STEER, ModelArgs, steer, skip={"source"}), ModelArgs)
    return steer(source, **options)


def steer(
    source: ModelArgs,
    feature: list[str],
    scale: float | None = None,
    ablate: bool = False,
    add: float | None = None,
    frozen: bool = False,
    generate: int = 0,
    temperature: float = 0.0,
    top: int = 5,
) -> int:
    """Edit transcoder features and see what the model says.

    Args:
        source: the replacement model and the prompt
        feature: LAYER:POS:FEATURE[=VALUE]; POS * = every position (once per feature)
        scale: multiply the features by X
        ablate: set the features to zero
        add: add X to the features
        frozen: direct effects only (frozen model)
        generate: also generate N tokens, steered
        temperature: sampling temperature of --generate (0 = greedy)
        top: how many next tokens to show
    """
    from wiremap.attribution.interventions import feature_intervention, generate_with_interventions
    from wiremap.attribution.targets import top_tokens

    at_least(STEER, 1, top=top)
    at_least(STEER, 0, generate=generate)
    if not temperature >= 0.0:
        raise UsageError(STEER, f"--temperature {temperature}: give 0 (greedy) or more")
    edits, mode = _edits(feature, scale, ablate, add)
    rm = _load(source)
    ids = rm.tokenize(source.prompt)
    before = rm.run(ids).logits
    after = feature_intervention(rm, ids, edits, frozen=frozen, mode=mode).logits
    kind = "frozen (direct effects)" if frozen else "free"
    print(f"prompt: {source.prompt!r}; {mode} {len(edits)} feature(s), {kind}")
    for name, logits in (("before", before), ("after", after)):
        tops = ", ".join(f"{t.token!r} {t.prob:.3f}" for t in top_tokens(rm, logits, top))
        print(f"  {name:>6}: {tops}")
    if generate > 0:
        for name, chosen in (("plain", []), ("steered", edits)):
            text = generate_with_interventions(
                rm, ids, chosen, generate, mode=mode, temperature=temperature
            )
            print(f"  {name:>7}: {source.prompt}{text}")
    return 0


def _edits(
    feature: list[str], scale: float | None, ablate: bool, add: float | None
) -> tuple[list[tuple[int, int | None, int, float]], str]:
    specs = [parse_feature(s) for s in feature]
    modes = {"scale": scale, "ablate": 0.0 if ablate else None, "add": add}
    given = {mode: value for mode, value in modes.items() if value is not None}
    if len(given) > 1:
        raise UsageError(
            STEER, f"give one of --scale, --ablate and --add, not {' and '.join(given)}"
        )
    if given:
        mode, value = next(iter(given.items()))
        return [(layer, pos, f, value) for layer, pos, f, _ in specs], mode
    if any(v is None for *_, v in specs):
        raise UsageError(STEER, "give --scale X, --ablate, --add X or a =VALUE for every --feature")
    return [(layer, pos, f, v) for layer, pos, f, v in specs], "set"
