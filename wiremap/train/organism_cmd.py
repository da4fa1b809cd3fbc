"""`wiremap organism`: rebuild or evaluate the built-in model organism.

    wiremap organism train --out organism              # ~5-10 min on 2 CPU cores
    wiremap organism train --out wiremap/data/organism # replace the shipped copy
    wiremap organism eval                              # the shipped copy
    wiremap organism eval --path organism

The shipped copy is only replaced when --out points at it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from wiremap.errors import WiremapError

if TYPE_CHECKING:
    from wiremap.train.organism import OrganismConfig


PROG = "wiremap organism"


def main(argv: list[str]) -> int:
    from wiremap.commands import UsageError

    actions = {"train": train_main, "eval": eval_main}
    if argv and argv[0] in actions:
        return actions[argv[0]](argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} {{train,eval}} [options]\n\n{__doc__}")
        raise SystemExit(0)
    given = f"unknown action {argv[0]!r}" if argv else "no action given"
    raise UsageError(PROG, f"{given}; give `train` or `eval`")


def train_main(argv: list[str]) -> int:
    from wiremap.commands import parse, split
    from wiremap.train.organism import OrganismConfig

    values = parse(
        argv, f"{PROG} train", OrganismConfig, train, skip={"cfg"},
        aliases={"--layers": "--n_layers"},
    )  # fmt: skip
    cfg, options = split(values, OrganismConfig)
    return train(cfg, **options)


def eval_main(argv: list[str]) -> int:
    from wiremap.commands import parse

    return evaluate(**parse(argv, f"{PROG} eval", evaluate))


def _print_metrics(metrics: dict[str, float]) -> None:
    width = max(map(len, metrics))
    for group, acc in metrics.items():
        print(f"  {group:<{width}}  {acc:6.1%}")


def train(cfg: OrganismConfig, out: str = "organism") -> int:
    """Build the organism's corpus, tokenizer and model from scratch.

    Args:
        cfg: the OrganismConfig
        out: output folder (wiremap/data/organism replaces the shipped copy)
    """
    from wiremap.train.organism import train_organism

    report = train_organism(cfg, out)
    print(
        f"organism: {report['n_parameters']:,} parameters, trained in "
        f"{report['train_seconds']:.0f} s, saved to {out}"
    )
    _print_metrics(report["metrics"])
    print(f"held-out cities (two-hop never trained): {', '.join(report['heldout_cities'])}")
    return 0


def evaluate(path: str | None = None) -> int:
    """Greedy accuracy of an organism on its prompts.

    Args:
        path: organism folder (default: the shipped one)
    """
    from wiremap.models.organism import organism_path
    from wiremap.train.organism import evaluate_path

    folder = Path(path) if path else organism_path()
    if not (folder / "config.json").exists():
        raise WiremapError(f"{folder} holds no organism; build one with `wiremap organism train`")
    metrics = evaluate_path(folder)
    print(f"organism at {folder}:")
    _print_metrics(metrics)
    print(json.dumps(metrics))
    return 0
