"""`wiremap serve` (the local graph viewer) and `wiremap features` (feature cards).

wiremap serve graphs/ [--host 127.0.0.1] [--port 8000] [--allow-host NAME] [--features DIR]
wiremap features --cache cache/ --transcoders tc/ [--out tc/features] [--top-k 20]
"""

from __future__ import annotations

import argparse


def serve_main(argv: list[str]) -> int:
    from wiremap.attribution.viewer import serve

    p = argparse.ArgumentParser(
        prog="wiremap serve",
        description=(
            "Open the graph JSON files of a folder in a local web viewer (offline; pins, "
            "supernodes, labels and steering)."
        ),
    )
    p.add_argument("dir", help="folder holding graph JSON files (only these are read/written)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default loopback; anything else is reachable by others)",
    )
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help=(
            "another host name the page may be opened under (repeatable); localhost, "
            "127.0.0.1, [::1] and --host are always allowed, other Host headers are refused"
        ),
    )
    p.add_argument(
        "--features",
        default=None,
        help="feature-card folder (default: <metadata.info.transcoders>/features)",
    )
    args = p.parse_args(argv)
    serve(args.dir, args.host, args.port, args.features, allow_hosts=args.allow_host, verbose=True)
    return 0


def features_main(argv: list[str]) -> int:
    from wiremap.attribution.features import FeatureCardConfig, build_feature_cards

    p = argparse.ArgumentParser(
        prog="wiremap features",
        description=(
            "Compute feature cards (top contexts, quantile examples, frequency, histogram, "
            "logit lens) for every transcoder feature in one streaming pass over a cache."
        ),
    )
    p.add_argument("--cache", required=True, help="activation cache folder (wiremap cache)")
    p.add_argument("--transcoders", required=True, help="exported transcoder folder")
    p.add_argument("--out", default=None, help="output folder (default <transcoders>/features)")
    p.add_argument("--model", default=None, help="LM for the logit lens (default: the cache's)")
    p.add_argument("--top-k", type=int, default=20, help="top contexts kept per feature")
    p.add_argument(
        "--n-samples",
        type=int,
        default=24,
        help="random active examples kept per feature for the quantile examples",
    )
    p.add_argument("--context", type=int, default=24, help="tokens shown around each example")
    p.add_argument("--n-logits", type=int, default=10, help="top/bottom output tokens per feature")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = FeatureCardConfig(
        cache=args.cache,
        transcoders=args.transcoders,
        out=args.out,
        model=args.model,
        top_k=args.top_k,
        n_samples=args.n_samples,
        context=args.context,
        n_logits=args.n_logits,
        device=args.device,
        seed=args.seed,
    )
    out = build_feature_cards(cfg)
    print(f"feature cards written to {out}")
    return 0
