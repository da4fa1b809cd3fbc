"""Logit probabilities are the model's own: Gemma's final soft-cap is applied once, by the model.

The tiny Gemma models here use `final_logit_softcapping=2` and a final norm scaled ×100, so
their pre-cap logits are far above the cap and capping twice changes every probability.
"""

from types import SimpleNamespace

import pytest
import torch

from wiremap.attribution.attribute import attribute
from wiremap.attribution.targets import select_targets
from wiremap.models.loading import load_model
from wiremap.models.replacement import ReplacementModel
from wiremap.models.tiny import ARCHITECTURES
from wiremap.models.transcoders import build_transcoder

PROMPT = "The cat sees the moon today."
CAP = 2.0
CAPPED = ("gemma2", "gemma3_text")


def make_rm(tiny_model_dir, arch: str, cap: float | None = None) -> ReplacementModel:
    kw = {} if cap is None else {"final_logit_softcapping": cap}
    model, tokenizer = load_model(str(tiny_model_dir(arch, n_layers=2, **kw)))
    if cap is not None:
        with torch.no_grad():  # Gemma's final norm multiplies by (1 + w): ×100
            w = model.model.norm.weight
            w.copy_((1 + w) * 100 - 1)
    torch.manual_seed(3)
    tc = build_transcoder("plt", 2, 32, 48, activation="relu")
    return ReplacementModel(model, tokenizer, tc)


def own_probs(rm, ids) -> torch.Tensor:
    """softmax of the logits the Hugging Face model itself returns, last position."""
    with torch.no_grad():
        return torch.softmax(rm.model(ids[None]).logits[0, -1].float(), dim=-1)


@pytest.mark.parametrize("arch", CAPPED)
def test_the_cap_bites_and_the_model_applies_it(tiny_model_dir, arch):
    rm = make_rm(tiny_model_dir, arch, CAP)
    ids = rm.tokenize(PROMPT)
    with rm.frozen(ids) as lin, torch.no_grad():
        pre_cap = lin.logits(lin.forward().final)[0, -1]
    with torch.no_grad():
        out = rm.model(ids[None]).logits[0, -1]
    assert pre_cap.abs().max() > 5 * CAP  # the cap changes the distribution a lot
    assert out.abs().max() <= CAP  # Hugging Face's model caps its own logits
    # the frozen model's logits, capped once, are the model's logits
    torch.testing.assert_close(rm.softcap(pre_cap), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logit_targets_are_the_models_own_probabilities(tiny_model_dir, arch):
    cap = CAP if arch in CAPPED else None
    rm = make_rm(tiny_model_dir, arch, cap)
    ids = rm.tokenize(PROMPT)
    expected = own_probs(rm, ids)
    targets = select_targets(rm, rm.run(ids).logits[-1], max_n_logits=5, desired_logit_prob=1.0)
    torch.testing.assert_close(targets.probs, expected[targets.tokens], rtol=0, atol=1e-6)
    torch.testing.assert_close(targets.probs, expected.topk(5).values, rtol=0, atol=1e-6)


def test_graph_probabilities_on_a_capped_gemma(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "gemma2", CAP)
    ids = rm.tokenize(PROMPT)
    graph = attribute(PROMPT, rm, max_feature_nodes=8, verbose=False)
    expected = own_probs(rm, ids)
    torch.testing.assert_close(graph.logit_probs, expected[graph.logit_tokens], atol=1e-6, rtol=0)


def test_steer_and_viewer_report_the_models_own_probabilities(tiny_model_dir):
    from wiremap.attribution.interventions import feature_intervention
    from wiremap.attribution.targets import top_tokens
    from wiremap.attribution.viewer.steer import run_steering

    rm = make_rm(tiny_model_dir, "gemma2", CAP)
    ids = rm.tokenize(PROMPT)
    expected = own_probs(rm, ids)
    best = expected.topk(3)
    for frozen in (False, True):  # no edits: both passes give the model's logits
        logits = feature_intervention(rm, ids, [], frozen=frozen).logits
        tops = top_tokens(rm, logits, 3)
        assert [t.id for t in tops] == best.indices.tolist()
        torch.testing.assert_close(
            torch.tensor([t.prob for t in tops]), best.values, atol=1e-5, rtol=0
        )
    viewer = run_steering(rm, PROMPT, [(1, 2, 0)], 1.0, False, 0, 3)["baseline"]
    assert [t["id"] for t in viewer] == best.indices.tolist()
    assert [t["prob"] for t in viewer] == pytest.approx(best.values.tolist(), abs=1e-5)


def test_top_tokens_stops_at_the_cumulative_probability():
    from wiremap.attribution.targets import token_probs, top_tokens

    model = SimpleNamespace(tokenizer=SimpleNamespace(decode=lambda ids: f"t{ids[0]}"))
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    torch.testing.assert_close(token_probs(logits), torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert [t.id for t in top_tokens(model, logits, 10, desired_prob=0.8)] == [0, 1]
    assert [t.id for t in top_tokens(model, logits, 10, desired_prob=0.81)] == [0, 1, 2]
    assert [t.id for t in top_tokens(model, logits, 2)] == [0, 1]
    assert top_tokens(model, logits, 1)[0].token == "t0"
