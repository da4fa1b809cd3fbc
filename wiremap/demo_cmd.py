"""`wiremap demo`: the whole pipeline, offline, on the built-in model organism.

wiremap demo                                   # ~5 min on 2 CPU cores -> wiremap_out/demo
wiremap demo --out /tmp/demo --steps 300 --n-tokens 20000 --features-per-layer 128
wiremap demo --attention                       # + the heads behind the edges (attention.py)
wiremap serve wiremap_out/demo/graphs          # then open the graphs in the viewer
"""

from __future__ import annotations

import argparse
from dataclasses import fields


def _parser():
    from wiremap.demo import DemoConfig

    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog="wiremap demo",
        description=(
            "Cache the built-in organism's activations, train a CLT and a PLT, attribute the "
            "Dallas two-hop prompt and antonym prompts, write graph JSON + HTML, and swap the "
            "Texas features for California's. Offline, CPU."
        ),
    )
    p.add_argument("--out", default=d.out, help=f"output folder (default: {d.out})")
    p.add_argument(
        "--n-tokens", type=int, default=d.n_tokens, help=f"tokens to cache (default: {d.n_tokens})"
    )
    p.add_argument(
        "--features-per-layer",
        dest="d_transcoder",
        metavar="N",
        type=int,
        default=d.d_transcoder,
        help=f"transcoder features per layer (default: {d.d_transcoder})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=d.steps,
        help=f"training steps per transcoder (default: {d.steps})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"tokens per step (default: {d.batch_size})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help=f"seed of corpus, data and init (default: {d.seed})",
    )
    p.add_argument("--organism", default=None, help="organism folder (default: the shipped one)")
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help=f"torch CPU threads (default: {d.threads}, fastest on a shared CPU)",
    )
    p.add_argument("--no-plt", dest="plt", action="store_false", help="skip the PLT")
    p.add_argument(
        "--no-feature-cards",
        dest="feature_cards",
        action="store_false",
        help="skip the feature cards",
    )
    p.add_argument(
        "--attention",
        action="store_true",
        help="also name the heads that carry the state / adjective to the last position and "
        "the QK pairs that make them attend there",
    )
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")
    return p


def main(argv: list[str]) -> int:
    from wiremap.demo import DemoConfig, run_demo

    args = vars(_parser().parse_args(argv))
    names = {f.name for f in fields(DemoConfig)}
    cfg = DemoConfig(**{k: v for k, v in args.items() if k in names})
    report = run_demo(cfg)
    return 0 if report.swap is not None else 1
