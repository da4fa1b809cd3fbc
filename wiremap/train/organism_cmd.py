"""`wiremap organism`: rebuild or evaluate the built-in model organism.

    wiremap organism train --out organism              # ~5-10 min on 2 CPU cores
    wiremap organism train --out wiremap/data/organism # replace the shipped copy
    wiremap organism eval                              # the shipped copy
    wiremap organism eval --path organism

The shipped copy is only replaced when --out points at it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wiremap.errors import WiremapError


def _parser() -> argparse.ArgumentParser:
    from wiremap.train.organism import OrganismConfig

    defaults = OrganismConfig()
    parser = argparse.ArgumentParser(
        prog="wiremap organism", description="Build or evaluate the built-in model organism."
    )
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="build corpus, tokenizer and model from scratch")
    train.add_argument("--out", default="organism", help="output folder (default: ./organism)")
    train.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    train.add_argument("--seed", type=int, default=defaults.seed, help="corpus/init seed")
    train.add_argument("--layers", type=int, default=defaults.n_layers, help="decoder layers")
    train.add_argument("--d-model", type=int, default=defaults.d_model, help="residual width")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size, help="rows/step")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ev = sub.add_parser("eval", help="greedy accuracy on the organism's prompts")
    ev.add_argument("--path", default=None, help="organism folder (default: the shipped one)")
    return parser


def _print_metrics(metrics: dict[str, float]) -> None:
    width = max(map(len, metrics))
    for group, acc in metrics.items():
        print(f"  {group:<{width}}  {acc:6.1%}")


def _train(args: argparse.Namespace) -> int:
    from wiremap.train.organism import OrganismConfig, train_organism

    cfg = OrganismConfig(
        n_layers=args.layers,
        d_model=args.d_model,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
    )
    report = train_organism(cfg, args.out)
    print(
        f"organism: {report['n_parameters']:,} parameters, trained in "
        f"{report['train_seconds']:.0f} s, saved to {args.out}"
    )
    _print_metrics(report["metrics"])
    print(f"held-out cities (two-hop never trained): {', '.join(report['heldout_cities'])}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from wiremap.models.organism import organism_path
    from wiremap.train.organism import evaluate_path

    path = Path(args.path) if args.path else organism_path()
    if not (path / "config.json").exists():
        raise WiremapError(f"{path} holds no organism; build one with `wiremap organism train`")
    metrics = evaluate_path(path)
    print(f"organism at {path}:")
    _print_metrics(metrics)
    print(json.dumps(metrics))
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return _train(args) if args.action == "train" else _eval(args)
