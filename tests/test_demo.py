"""`wiremap demo` and the circuit helpers it uses (wiremap.attribution.circuits).

The end-to-end runs use the shipped organism; the fast one runs reduced sizes, the full-size
one (the Dallas path and the Texas -> California swap at the demo's defaults) is `slow`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wiremap.attribution.circuits import (
    Contrast,
    concept_features,
    feature_nodes,
    logit_node,
    path_through,
    total_effects,
)
from wiremap.attribution.graph import Graph
from wiremap.errors import WiremapError


# -- circuits on a hand-made graph -----------------------------------------------------------
def _toy_graph() -> Graph:
    """2 layers, 2 positions; features f0 (L0, pos 1, #3, a=2) and f1 (L1, pos 1, #5, a=2).

    Edges: token1 -> f0 (2), f0 -> f1 (1), f1 -> logit (3), f0 -> logit (0.5),
    f2 (L0, pos 1, #4, a=1) -> logit (-1).
    """
    feats = torch.tensor([[0, 1, 3], [0, 1, 4], [1, 1, 5]])
    n = 3 + 4 + 2 + 1
    adj = torch.zeros(n, n)
    f0, f2, f1, tok1, logit = 0, 1, 2, 3 + 4 + 1, n - 1
    adj[f0, tok1] = 2.0
    adj[f1, f0] = 1.0
    adj[logit, f1] = 3.0
    adj[logit, f0] = 0.5
    adj[logit, f2] = -1.0
    return Graph(
        prompt="a b",
        input_ids=torch.tensor([1, 7]),
        token_strings=["<s>", " b"],
        active_features=feats,
        activations=torch.tensor([2.0, 1.0, 2.0]),
        logit_tokens=torch.tensor([9]),
        logit_probs=torch.tensor([0.9]),
        logit_strings=[" c"],
        adjacency=adj,
        n_layers=2,
    )


def test_total_effects_sum_paths_divided_by_intermediate_activations():
    g = _toy_graph()
    effect = total_effects(g, logit_node(g, " c"))
    # f0: direct 0.5 + via f1: 1 * 3 / a_f1(2) = 2.0; f2: -1; f1: 3
    torch.testing.assert_close(effect, torch.tensor([2.0, -1.0, 3.0]))


def test_logit_node_by_string_or_id_and_unknown():
    g = _toy_graph()
    assert logit_node(g, " c") == logit_node(g, 9) == g.n_nodes - 1
    with pytest.raises(WiremapError, match="not a logit target"):
        logit_node(g, " d")


def test_concept_features_keep_selective_positive_features_by_effect():
    g = _toy_graph()
    shape = (2, 2, 8)
    mean, other, frac = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    for layer, pos, feat in ((0, 1, 3), (0, 1, 4), (1, 1, 5)):
        mean[layer, pos, feat], frac[layer, pos, feat] = 1.0, 1.0
    other[1, 1, 5] = 0.9  # f1 fires almost as much on the other concept: not selective
    stats = Contrast(mean=mean, mean_other=other, frac=frac)
    # f2 is selective but lowers the logit; f1 is not selective: only f0 remains
    assert concept_features(g, stats, target=" c") == [(0, 1, 3)]
    assert concept_features(g, Contrast(other, other, frac), target=" c") == []


def test_path_through_follows_kept_edges():
    from wiremap.attribution.prune import prune_graph

    g = _toy_graph()
    result = prune_graph(g, node_threshold=1.0, edge_threshold=1.0)
    tok1, logit = g.token_index(1), g.n_nodes - 1
    assert path_through(g, result, tok1, feature_nodes(g, [(1, 1, 5)]), logit)
    assert not path_through(g, result, g.token_index(0), feature_nodes(g, [(1, 1, 5)]), logit)
    assert not path_through(g, result, tok1, feature_nodes(g, [(0, 1, 4)]), logit)


# -- the demo end to end on the shipped organism ---------------------------------------------
REDUCED = dict(n_tokens=20_000, d_transcoder=128, steps=300)  # ~15 s of training on one core
PROMPTS = ("dallas", "antonym_en", "antonym_fr", "antonym_es")


def _run(out: Path, **sizes):
    from wiremap.demo import DemoConfig, run_demo

    lines: list[str] = []
    report = run_demo(DemoConfig(out=str(out), progress=False, **sizes), say=lines.append)
    return report, "\n".join(lines)


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("demo"), **REDUCED)


def test_reduced_demo_writes_valid_graph_json_html_cards_and_report(reduced):
    from wiremap.attribution.export import validate_graph_json
    from wiremap.attribution.features import FeatureStore

    report, printed = reduced
    assert {k for k in report.graphs if k.startswith("plt/")} == {f"plt/{n}" for n in PROMPTS}
    assert {f"clt/{n}" for n in PROMPTS} | {"clt/oakland"} <= set(report.graphs)
    for g in report.graphs.values():
        obj = json.loads(Path(g.json_path).read_text(encoding="utf-8"))
        validate_graph_json(obj)
        assert obj["metadata"]["prompt"] == g.prompt
        assert Path(obj["metadata"]["info"]["transcoders"]).name == g.transcoder
        html = Path(g.html_path).read_text(encoding="utf-8")
        assert 'id="wiremap-graph"' in html and "static/viewer.js" not in html
    saved = json.loads((Path(report.out) / "report.json").read_text())
    assert saved["swap"]["expected"] == " Sacramento"
    assert set(saved["graphs"]) == set(report.graphs)
    for arch in ("clt", "plt"):
        assert FeatureStore(report.features[arch]).card(layer=0, index=0)["index"] == 0
    dallas = json.loads(Path(report.graphs["clt/dallas"].json_path).read_text(encoding="utf-8"))
    texas = dallas["qParams"]["supernodes"][0]
    assert texas[0] == "Texas" and set(texas[1:]) <= set(dallas["qParams"]["pinnedIds"])
    assert f"wiremap serve {report.out}/graphs" in printed
    for answer in (" Austin", " large", " grand", " grande"):  # the organism answers right
        assert any(g.top_token == answer for g in report.graphs.values())


def test_reduced_demo_labels_l0_per_layer_and_all_layers(reduced):
    # `l0` is per token and layer, `l0_total` per token over all layers: the printed line
    # puts "all layers" on the total, never on the per-layer mean.
    report, printed = reduced
    n_layers = 4  # the organism's
    for arch, m in report.training.items():
        assert m["l0_total"] == pytest.approx(n_layers * m["l0"], rel=1e-3)
        line = next(x for x in printed.splitlines() if x.strip().startswith(f"{arch.upper()}:"))
        assert f"L0 {m['l0']:.1f} features/token per layer ({m['l0_total']:.1f} all layers)" in line


def _check_dallas_circuit_and_swap(report) -> None:
    """The Dallas graph routes ' Dallas' through Texas features to ' Austin' (checked on the
    written JSON), those features respond to Texas, and swapping them makes ' Sacramento'."""
    from wiremap.demo import state_prompts
    from wiremap.models.replacement import ReplacementModel

    swap = report.swap
    assert swap.removed and swap.inserted
    assert swap.before[0][0] == " Austin" and swap.after[0][0] == " Sacramento" and swap.worked
    rm = ReplacementModel.from_pretrained(report.organism, report.transcoders["clt"])
    graph = json.loads(Path(report.graphs["clt/dallas"].json_path).read_text(encoding="utf-8"))
    city = graph["metadata"]["prompt_tokens"].index(" Dallas")
    texas_ids = {f"{layer}_{feat}_{pos}" for layer, pos, feat in swap.removed}
    assert all(pos == city for _, pos, _ in swap.removed)
    assert _json_path_through(graph, city, texas_ids, " Austin")
    assert swap.extra["path"]["exists"] and "[Texas]" in swap.extra["path"]["strongest"]
    on_texas = _activations(rm, state_prompts("Texas"), swap.removed)  # [cities, features]
    on_california = _activations(rm, state_prompts("California"), swap.removed)
    assert bool(((on_texas > 0).float().mean(0) >= 0.5).all())
    assert bool((on_texas.mean(0) > 3 * on_california.mean(0)).all())


def _activations(rm, prompts: list[str], features) -> torch.Tensor:
    rows = []
    for prompt in prompts:
        acts = rm.run(rm.tokenize(prompt)).activations.to_dense()
        rows.append(torch.stack([acts[layer, pos, feat] for layer, pos, feat in features]))
    return torch.stack(rows)


def _json_path_through(graph: dict, city: int, via: set[str], answer: str) -> bool:
    """Links of the graph JSON: is there a path embedding(city) -> a `via` node -> answer?"""
    nodes = {n["node_id"]: n for n in graph["nodes"]}
    start = next(i for i, n in nodes.items() if n["layer"] == "E" and n["ctx_idx"] == city)
    end = next(i for i, n in nodes.items() if n["clerp"].startswith(f'Output "{answer}"'))
    forward: dict[str, list[str]] = {}
    backward: dict[str, list[str]] = {}
    for link in graph["links"]:
        forward.setdefault(link["source"], []).append(link["target"])
        backward.setdefault(link["target"], []).append(link["source"])
    from wiremap.attribution.circuits import reachable

    return bool(reachable(forward, start) & reachable(backward, end) & via)


def test_reduced_demo_finds_the_texas_path_and_the_swap_says_sacramento(reduced):
    report, printed = reduced
    _check_dallas_circuit_and_swap(report)
    assert "does the model now say ' Sacramento'? yes" in printed


@pytest.mark.slow
def test_full_size_demo_swap_says_sacramento(tmp_path):
    report, printed = _run(tmp_path / "demo")  # the defaults of `wiremap demo`
    _check_dallas_circuit_and_swap(report)
    assert report.graphs["clt/dallas"].scores["full"]["replacement"] > 0.9


def test_demo_command_help_and_bad_sizes(capsys):
    from wiremap.cli import main
    from wiremap.demo import DemoConfig

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--features-per-layer" in capsys.readouterr().out
    with pytest.raises(WiremapError, match="two batches"):
        DemoConfig(n_tokens=100, batch_size=512)
    with pytest.raises(WiremapError, match="Fresno"):
        DemoConfig(swap_city="Dallas")
    assert main(["demo", "--n-tokens", "100", "--out", "unused"]) == 2
    assert "two batches" in capsys.readouterr().err
