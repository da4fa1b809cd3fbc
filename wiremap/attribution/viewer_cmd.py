"""`wiremap serve` (the local graph viewer) and `wiremap features` (feature cards).

wiremap serve graphs/ [--host 127.0.0.1] [--port 8000] [--allow-host NAME] [--features DIR]
wiremap features --cache cache/ --transcoders tc/ [--out tc/features] [--top-k 20]
"""

from __future__ import annotations

from wiremap.commands import parse

FEATURES = (
    "Compute feature cards (top contexts, quantile examples, frequency, histogram, logit lens) "
    "for every transcoder feature in one streaming pass over a cache."
)


def serve_main(argv: list[str]) -> int:
    return serve(**parse(argv, "wiremap serve", serve, positional=True))


def serve(
    folder: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    allow_host: list[str] | None = None,
    features: str | None = None,
) -> int:
    """Open the graph JSON files of a folder in a local web viewer (offline; pins,
    supernodes, labels and steering).

    Args:
        folder: folder holding graph JSON files (only these are read/written)
        host: address to bind (default loopback; anything else is reachable by others)
        port: port (0 picks a free one)
        allow_host: another host name the page may be opened under (once per name);
            localhost, 127.0.0.1, [::1] and --host are always allowed, other Host headers
            are refused
        features: feature-card folder (default: <metadata.info.transcoders>/features)
    """
    from wiremap.attribution.viewer import serve as serve_graphs

    serve_graphs(folder, host, port, features, allow_hosts=allow_host or (), verbose=True)
    return 0


def features_main(argv: list[str]) -> int:
    from wiremap.attribution.features import FeatureCardConfig, build_feature_cards

    values = parse(argv, "wiremap features", FeatureCardConfig, description=FEATURES)
    print(f"feature cards written to {build_feature_cards(FeatureCardConfig(**values))}")
    return 0
