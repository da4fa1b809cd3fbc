"""Interventions: frozen edits move logits exactly as the graph predicts; free edits propagate."""

import pytest
import torch

from wiremap.attribution.attribute import attribute
from wiremap.attribution.cli import parse_feature
from wiremap.attribution.interventions import (
    feature_intervention,
    generate_with_interventions,
    scale_features,
)
from wiremap.errors import WiremapError
from wiremap.models.loading import load_model
from wiremap.models.replacement import ReplacementModel
from wiremap.models.transcoders import build_transcoder

PROMPT = "The cat sees the moon."


def make_rm(tiny_model_dir, arch="llama", tc_arch="plt"):
    model, tokenizer = load_model(str(tiny_model_dir(arch, n_layers=3)))
    torch.manual_seed(3)
    tc = build_transcoder(tc_arch, 3, 32, 48, activation="relu")
    if tc.W_skip is not None:
        with torch.no_grad():
            tc.W_skip.normal_(0, 0.05)
    return ReplacementModel(model, tokenizer, tc)


def demeaned(logits):
    last = logits[-1]
    return last - last.mean()


@pytest.mark.parametrize(
    "arch,tc_arch", [("llama", "plt"), ("gpt2", "clt"), ("gpt_neox", "skip_plt")]
)
def test_frozen_interventions_move_logits_as_the_graph_predicts(tiny_model_dir, arch, tc_arch):
    rm = make_rm(tiny_model_dir, arch, tc_arch)
    graph = attribute(PROMPT, rm, verbose=False)
    A = graph.dense_adjacency()[graph.logit_slice]
    base = feature_intervention(rm, PROMPT, [], frozen=True).logits
    torch.testing.assert_close(base, rm.run(graph.input_ids).logits, rtol=0, atol=1e-4)
    tokens = graph.logit_tokens
    strongest = A[:, : graph.n_features].abs().sum(0).topk(3).indices.tolist()
    # one feature scaled by 3: change = 2 × its column
    layer, pos, feat = graph.active_features[strongest[0]].tolist()
    res = feature_intervention(rm, PROMPT, [(layer, pos, feat, 3.0)], frozen=True, mode="scale")
    change = (demeaned(res.logits) - demeaned(base))[tokens]
    expected = 2 * A[:, strongest[0]]
    torch.testing.assert_close(change, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert expected.abs().max() > 1e-3
    # a supernode ablated together: change = − sum of its columns
    group = [tuple(graph.active_features[i].tolist()) for i in strongest]
    res = scale_features(rm, PROMPT, group, 0.0, frozen=True)
    change = (demeaned(res.logits) - demeaned(base))[tokens]
    expected = -A[:, strongest].sum(1)
    torch.testing.assert_close(change, expected, rtol=0, atol=1e-5 * float(A.abs().max()))
    dense = res.activations.to_dense()
    assert all(dense[layer, pos, f] == 0 for layer, pos, f in group)


def test_free_interventions_propagate(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "llama", "clt")
    ids = rm.tokenize(PROMPT)
    run = rm.run(ids)
    same = feature_intervention(rm, ids, [(0, 2, 5, 1.0)], mode="scale")
    torch.testing.assert_close(same.logits, run.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(same.activations.to_dense(), run.activations.to_dense())
    acts = run.activations.to_dense()
    feat = int(acts[0, 2].argmax())
    edit = [(0, 2, feat, 5.0 * float(acts[0, 2, feat]))]
    free = feature_intervention(rm, ids, edit, mode="set")
    frozen = feature_intervention(rm, ids, edit, mode="set", frozen=True)
    new = free.activations.to_dense()
    assert new[0, 2, feat] == pytest.approx(5.0 * float(acts[0, 2, feat]))
    # later layers' features are recomputed from the changed residual (free), not frozen
    assert (new[1:, 2:] - acts[1:, 2:]).abs().max() > 1e-4
    # causal: earlier positions untouched (up to rounding of recon + error)
    torch.testing.assert_close(new[:, :2], acts[:, :2], rtol=0, atol=1e-4)
    assert torch.equal(frozen.activations.to_dense()[1:], acts[1:])
    assert (free.logits - frozen.logits).abs().max() > 1e-4
    assert (free.logits - run.logits).abs().max() > 1e-4
    # ablate == set to zero; add 0 == nothing
    ab = feature_intervention(rm, ids, [(0, 2, feat, 7.0)], mode="ablate")
    zero = feature_intervention(rm, ids, [(0, 2, feat, 0.0)], mode="set")
    torch.testing.assert_close(ab.logits, zero.logits)
    add = feature_intervention(rm, ids, [(1, None, feat, 0.0)], mode="add")
    torch.testing.assert_close(add.logits, run.logits, rtol=0, atol=1e-4)


def test_generation_with_and_without_steering(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "gpt2", "plt")
    ids = rm.tokenize("A dog")
    plain = generate_with_interventions(rm, ids, [], max_new_tokens=6)
    with torch.no_grad():
        hf = rm.model.generate(ids[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
    new = hf[0, len(ids) :]
    if rm.tokenizer.eos_token_id in new.tolist():
        new = new[: new.tolist().index(rm.tokenizer.eos_token_id) + 1]
    assert plain == rm.tokenizer.decode(new)
    # a feature of the last layer pushed hard at every position (held while generating)
    w = rm.transcoders.decoder(2)[:, 0, :] @ rm.unembed_weight().T  # [F, vocab]
    feat = int(w.max(1).values.argmax())
    steered = generate_with_interventions(rm, ids, [(2, None, feat, 1e3)], 6, mode="set")
    assert steered != plain
    boosted = rm.tokenizer.decode([int(w[feat].argmax())])
    assert steered.startswith(boosted)


def test_bad_interventions(tiny_model_dir):
    rm = make_rm(tiny_model_dir)
    with pytest.raises(WiremapError, match="layer"):
        feature_intervention(rm, PROMPT, [(3, 0, 0, 1.0)])
    with pytest.raises(WiremapError, match="position"):
        feature_intervention(rm, PROMPT, [(0, 99, 0, 1.0)])
    with pytest.raises(WiremapError, match="feature"):
        feature_intervention(rm, PROMPT, [(0, 1, 48, 1.0)])
    with pytest.raises(WiremapError, match="mode"):
        feature_intervention(rm, PROMPT, [(0, 1, 1, 1.0)], mode="double")
    with pytest.raises(WiremapError, match="LAYER:POS:FEATURE"):
        parse_feature("3:x")
    assert parse_feature("2:*:7=1.5") == (2, None, 7, 1.5)


def test_steer_cli(tiny_model_dir, tmp_path, capsys):
    from wiremap.cli import main
    from wiremap.models.formats import save_transcoders

    path = tiny_model_dir("llama", n_layers=3)
    save_transcoders(build_transcoder("plt", 3, 32, 48, model_name=str(path)), tmp_path / "tc")
    args = ["steer", "--model", str(path), "--transcoders", str(tmp_path / "tc")]
    code = main(
        [*args, "--prompt", PROMPT, "--feature", "1:*:3", "--scale", "10", "--generate", "3"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "steered" in out
    assert main([*args, "--prompt", PROMPT, "--feature", "1:2:3"]) == 2  # no value, no mode
    assert "--scale" in capsys.readouterr().err
