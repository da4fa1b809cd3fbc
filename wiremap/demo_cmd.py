"""`wiremap demo`: the whole pipeline, offline, on the built-in model organism.

wiremap demo                                   # ~5 min on 2 CPU cores -> wiremap_out/demo
wiremap demo --out /tmp/demo --steps 300 --n-tokens 20000 --features-per-layer 128
wiremap demo --attention                       # + the heads behind the edges (attention.py)
wiremap serve wiremap_out/demo/graphs          # then open the graphs in the viewer

The options are the fields of `wiremap.demo.DemoConfig`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wiremap.demo import DemoConfig

DESCRIPTION = (
    "Cache the built-in organism's activations, train a CLT and a PLT, attribute the Dallas "
    "two-hop prompt and antonym prompts, write graph JSON + HTML, and swap the Texas features "
    "for California's. Offline, CPU."
)
# the names these options had before they came from DemoConfig
ALIASES = {"--features_per_layer": "--d_transcoder", "--quiet": "--no_progress"}


def main(argv: list[str]) -> int:
    from wiremap.demo import run_demo

    report = run_demo(config(argv))
    return 0 if report.swap is not None else 1


def config(argv: list[str]) -> DemoConfig:
    """The DemoConfig of the command line."""
    from wiremap.commands import parse, renamed
    from wiremap.demo import DemoConfig

    values = parse(
        argv, "wiremap demo", DemoConfig, description=DESCRIPTION, aliases=ALIASES,
        deprecated=renamed(DemoConfig, {"batch_size": "batch_tokens"}),
    )  # fmt: skip
    return DemoConfig(**values)
