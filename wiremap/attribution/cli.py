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
zero, with --set they are set to VALUE (default mode when a VALUE is given: set). It
prints the top next tokens before and after, and with --generate N a continuation.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from wiremap.errors import WiremapError


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub name or local model folder")
    parser.add_argument("--transcoders", required=True, help="folder of exported transcoders")
    parser.add_argument("--prompt", required=True, help="text to analyse (BOS is prepended)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, or auto")
    parser.add_argument("--dtype", default="float32", help="float32 (exact), bfloat16, float16")
    parser.add_argument(
        "--no-check-model-name",
        action="store_true",
        help="accept transcoders whose config names another model",
    )


def _load(args):
    from wiremap.models.replacement import ReplacementModel

    if not Path(args.transcoders).exists():
        raise WiremapError(f"transcoders folder {args.transcoders!r} does not exist")
    return ReplacementModel.from_pretrained(
        args.model,
        args.transcoders,
        device=args.device,
        dtype=args.dtype,
        check_model_name=not args.no_check_model_name,
    )


def attribute_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wiremap attribute", description="Build an attribution graph for a prompt."
    )
    _model_args(p)
    p.add_argument("--out", required=True, help="folder for {slug}.json, or a .json file")
    p.add_argument("--slug", default=None, help="graph name [a-zA-Z0-9_.-] (default: prompt)")
    p.add_argument("--scan", default=None, help="model id for Neuronpedia (default: model name)")
    p.add_argument("--node-threshold", type=float, default=0.8, help="cumulative influence kept")
    p.add_argument(
        "--node-pool",
        choices=("all", "features"),
        default="all",
        help="what the node threshold is a share of: all nodes (circuit-tracer's rule) or "
        "feature and error nodes only (keeps more features)",
    )
    p.add_argument("--edge-threshold", type=float, default=0.98, help="cumulative edge score kept")
    p.add_argument(
        "--max-feature-nodes",
        type=int,
        default=None,
        help="feature budget (default: every active feature if it fits in memory, else the "
        "most influential that fit)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="targets per backward pass (default: 256, fewer when memory is short)",
    )
    p.add_argument(
        "--memory-limit",
        type=parse_bytes,
        default=None,
        help="memory attribution may use, e.g. 8GB (default: what is free)",
    )
    p.add_argument(
        "--target", action="append", default=None, help="a target token (repeatable) or id"
    )
    p.add_argument("--max-n-logits", type=int, default=10, help="most logit targets")
    p.add_argument("--desired-logit-prob", type=float, default=0.95, help="their total prob")
    p.add_argument("--keep-bos", action="store_true", help="keep BOS features and errors")
    p.add_argument("--paths", type=int, default=5, help="how many top paths to print")
    p.add_argument(
        "--edges-per-node",
        type=int,
        default=16,
        help="edge budget of the JSON: each node's strongest inputs and outputs kept (0 = all)",
    )
    p.add_argument(
        "--max-edges", type=int, default=20000, help="edge budget: most links in the JSON (0 = all)"
    )
    p.add_argument(
        "--features",
        default=None,
        help="feature cards folder (default: <transcoders>/features when it exists): their "
        "per-feature JSON goes to <out folder>/features/<scan>/",
    )
    p.add_argument(
        "--feature-json-base-url",
        default=None,
        help="public URL of that folder for Neuronpedia (default: features/<scan>, relative)",
    )
    p.add_argument(
        "--no-full-graph",
        action="store_true",
        help="skip the full graph beside --out (<out>.safetensors: a dense adjacency takes "
        "4·N² bytes for N nodes, e.g. 263 MB for 8,111 nodes)",
    )
    p.add_argument("--html", default=None, help="also write a self-contained HTML view here")
    p.add_argument("--png", default=None, help="also write a static PNG of the pruned graph")
    p.add_argument(
        "--heads",
        type=_n_edges,
        nargs="?",
        const=1000,
        default=None,
        help="store head loadings of the N strongest links (default 1000) and QK pairs of "
        "their top heads in the JSON's 'heads' block",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def attribute_main(argv: list[str]) -> int:
    from wiremap.attribution.attribute import attribute
    from wiremap.attribution.export import (
        check_name,
        default_scan,
        graph_file,
        summarize_paths,
        write_graph_json,
    )

    args = attribute_parser().parse_args(argv)
    out, slug = graph_file(args.out, args.slug, args.prompt)  # refuse bad names before the work
    if args.scan:
        check_name("scan", args.scan)
    _check_attribute_args(args, out)
    rm = _load(args)
    graph = attribute(
        args.prompt,
        rm,
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        target_tokens=args.target,
        max_feature_nodes=args.max_feature_nodes,
        batch_size=args.batch_size,
        zero_bos=not args.keep_bos,
        memory_limit=args.memory_limit,
        verbose=not args.quiet,
    )
    note = graph.settings["memory"]["note"]
    if note and args.quiet:  # otherwise attribute() has said it
        print(note)
    graph.settings.update(node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
    scan = args.scan or default_scan(graph.settings)
    store = _feature_store(args)
    base_url = args.feature_json_base_url or (f"features/{scan}" if store else None)
    result = write_graph_json(
        graph,
        out,
        slug=slug,
        scan=scan,
        feature_json_base_url=base_url,
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
        node_pool=args.node_pool,
        edges_per_node=args.edges_per_node or None,
        max_edges=args.max_edges or None,
    )
    if args.heads:
        _write_heads(rm, graph, out, args.heads)
    print(summarize_paths(graph, k=args.paths, result=result))
    listed = f"{out} (listed in {out.parent / 'graph-metadata.json'})"
    if args.no_full_graph:
        print(f"wrote {listed}")
    else:
        base = graph.save(out.with_suffix(""))
        print(f"wrote {listed} and {base}.safetensors / {base}.meta.json")
    if store is not None:
        _write_feature_jsons(out, store, out.parent / "features" / scan)
    _write_pictures(out, args.html, args.png)
    return 0


def _n_edges(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of edges, e.g. 1000")
    return n


def _write_heads(rm, graph, out: Path, n_edges: int) -> None:
    import json

    from wiremap.attribution.attention import heads_block
    from wiremap.attribution.export import add_heads_block

    links = json.loads(out.read_text(encoding="utf-8"))["links"]
    block = heads_block(rm, graph, links, n_edges=n_edges)
    add_heads_block(out, block)
    print(f"head loadings of {len(block['edges'])} edges, QK pairs of {len(block['qk'])} heads")


def _feature_store(args):
    """The FeatureStore of --features (an error if missing), else of <transcoders>/features."""
    from wiremap.attribution.features import FeatureStore

    folder = Path(args.features or Path(args.transcoders) / "features")
    if args.features is None and not (folder / "index.json").is_file():
        return None  # no cards computed: the graph has no feature_details
    return FeatureStore(folder)


def _write_feature_jsons(graph_json: Path, store, folder: Path) -> None:
    import json

    from wiremap.attribution.features import write_feature_jsons

    obj = json.loads(graph_json.read_text(encoding="utf-8"))
    n = write_feature_jsons(obj, store, folder)
    print(f"wrote {n} feature JSON files to {folder}")


def _check_attribute_args(args, out: Path) -> None:
    """Refuse bad settings before the model is loaded and the attribution runs."""
    from wiremap.attribution.prune import check_thresholds

    check_thresholds(args.node_threshold, args.edge_threshold)
    _at_least(1, max_n_logits=args.max_n_logits)
    _at_least(0, paths=args.paths, edges_per_node=args.edges_per_node, max_edges=args.max_edges)
    if not 0.0 < args.desired_logit_prob <= 1.0:
        raise WiremapError(f"--desired-logit-prob {args.desired_logit_prob} is outside (0, 1]")
    for path in (out, args.html, args.png):  # out: the graph file --out names
        if path is not None:
            check_writable(Path(path))


def _at_least(low: int, **values: int) -> None:
    for name, value in values.items():
        if value < low:
            flag = "--" + name.replace("_", "-")
            raise WiremapError(f"{flag} {value}: give a whole number of at least {low}")


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


def steer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wiremap steer", description="Edit transcoder features and see what the model says."
    )
    _model_args(p)
    p.add_argument(
        "--feature",
        action="append",
        required=True,
        help="LAYER:POS:FEATURE[=VALUE]; POS * = every position (repeatable)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--scale", type=float, default=None, help="multiply the features by X")
    mode.add_argument("--ablate", action="store_true", help="set the features to zero")
    mode.add_argument("--add", type=float, default=None, help="add X to the features")
    p.add_argument("--frozen", action="store_true", help="direct effects only (frozen model)")
    p.add_argument("--generate", type=int, default=0, help="also generate N tokens, steered")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top", type=int, default=5, help="how many next tokens to show")
    return p


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
        raise WiremapError(
            f"--feature {spec!r}: write LAYER:POS:FEATURE or LAYER:POS:FEATURE=VALUE, "
            "e.g. 5:3:1234 or 5:*:1234=2.0"
        ) from None


def _edits(args) -> tuple[list[tuple[int, int | None, int, float]], str]:
    specs = [parse_feature(s) for s in args.feature]
    if args.ablate:
        return [(layer, pos, f, 0.0) for layer, pos, f, _ in specs], "ablate"
    if args.scale is not None:
        return [(layer, pos, f, args.scale) for layer, pos, f, _ in specs], "scale"
    if args.add is not None:
        return [(layer, pos, f, args.add) for layer, pos, f, _ in specs], "add"
    if any(v is None for *_, v in specs):
        raise WiremapError("give --scale X, --ablate, --add X, or a =VALUE for every --feature")
    return [(layer, pos, f, v) for layer, pos, f, v in specs], "set"


def steer_main(argv: list[str]) -> int:
    from wiremap.attribution.interventions import feature_intervention, generate_with_interventions
    from wiremap.attribution.targets import top_tokens

    args = steer_parser().parse_args(argv)
    _at_least(1, top=args.top)
    _at_least(0, generate=args.generate)
    if not args.temperature >= 0.0:
        raise WiremapError(f"--temperature {args.temperature}: give 0 (greedy) or more")
    edits, mode = _edits(args)
    rm = _load(args)
    ids = rm.tokenize(args.prompt)
    before = rm.run(ids).logits
    after = feature_intervention(rm, ids, edits, frozen=args.frozen, mode=mode).logits
    kind = "frozen (direct effects)" if args.frozen else "free"
    print(f"prompt: {args.prompt!r}; {mode} {len(edits)} feature(s), {kind}")
    for name, logits in (("before", before), ("after", after)):
        tops = ", ".join(f"{t.token!r} {t.prob:.3f}" for t in top_tokens(rm, logits, args.top))
        print(f"  {name:>6}: {tops}")
    if args.generate > 0:
        for name, chosen in (("plain", []), ("steered", edits)):
            text = generate_with_interventions(
                rm, ids, chosen, args.generate, mode=mode, temperature=args.temperature
            )
            print(f"  {name:>7}: {args.prompt}{text}")
    return 0
