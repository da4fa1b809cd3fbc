"""Replacement model: exact logits, checks against the model, and the frozen model."""

import pytest
import torch

from wiremap.errors import WiremapError
from wiremap.models.hooks import remaining_hooks
from wiremap.models.loading import load_model
from wiremap.models.replacement import ReplacementModel
from wiremap.models.tiny import ARCHITECTURES
from wiremap.models.transcoders import build_transcoder

PROMPT = "The cat sees the moon today."
MAIN = ("llama", "gpt2", "gemma2", "gpt_neox")


def make_rm(tiny_model_dir, arch="llama", tc_arch="plt", n_layers=3, dtype=torch.float32, **tc_kw):
    """A replacement model; float64 where a test checks identities to rounding error."""
    model, tokenizer = load_model(str(tiny_model_dir(arch, n_layers=n_layers)), dtype=dtype)
    torch.manual_seed(1)
    tc = build_transcoder(tc_arch, n_layers, 32, 64, activation="relu", **tc_kw)
    tc = tc.to(model.dtype)
    if tc.skip_weight is not None:
        with torch.no_grad():
            tc.skip_weight.normal_(0, 0.05)
    return ReplacementModel(model, tokenizer, tc)


CASES = [(a, "plt") for a in ARCHITECTURES] + [(a, t) for a in MAIN for t in ("skip_plt", "clt")]


@pytest.mark.parametrize("arch,tc_arch", CASES)
def test_replacement_logits_equal_original(tiny_model_dir, arch, tc_arch):
    rm = make_rm(tiny_model_dir, arch, tc_arch, dtype=torch.float64)
    ids = rm.tokenize(PROMPT)
    with torch.no_grad():
        original = rm.model(ids[None]).logits[0]
    run = rm.run(ids)
    assert torch.equal(run.logits, original)
    # features recomputed from the residual each MLP sees, error held: same logits
    replaced = rm(ids)
    scale = original.abs().max()
    torch.testing.assert_close(replaced, original, rtol=0, atol=1e-10 * float(scale))
    # the decomposition is real: without the error term the logits move
    assert run.errors.abs().max() > 1e-3
    no_error = rm(ids, errors=torch.zeros_like(run.errors))
    assert (no_error - original).abs().max() > 1e-4 * scale
    assert remaining_hooks(rm.model) == 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_frozen_model_equals_clean_and_is_linear(tiny_model_dir, arch):
    rm = make_rm(tiny_model_dir, arch, "skip_plt", dtype=torch.float64)
    ids = rm.tokenize(PROMPT)
    n = len(ids)
    impl = rm.model.config._attn_implementation
    with torch.no_grad():
        clean = rm.model(ids[None]).logits
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(1, n, 32, generator=gen, dtype=torch.float64) * 0.1
    u = torch.randn(32, generator=gen, dtype=torch.float64)
    with rm.frozen(ids) as lin:
        with torch.no_grad():
            frozen = rm.model(ids[None]).logits
            base = lin.forward().final[0, -1]
            one = lin.forward(writes={0: delta}).final[0, -1] - base
            two = lin.forward(writes={0: 2 * delta}, embed_write=delta).final[0, -1] - base
            emb = lin.forward(embed_write=delta).final[0, -1] - base
        # the VJP of the frozen model predicts its response to a perturbation exactly
        leaf = torch.zeros(1, n, 32, dtype=torch.float64, requires_grad=True)
        out = lin.forward(writes={0: leaf}).final[0, -1]
        (vjp,) = torch.autograd.grad(out @ u, leaf)
    scale = float(clean.abs().max())
    # equal up to rounding: the models' own norms compute in float32 even in float64
    torch.testing.assert_close(frozen, clean, rtol=0, atol=1e-6 * scale)
    tol = 1e-10 * float(base.abs().max() + two.abs().max())
    torch.testing.assert_close(two, 2 * one + emb, rtol=0, atol=tol)
    torch.testing.assert_close(u @ one, (vjp * delta).sum(), rtol=1e-4, atol=tol)
    assert one.abs().max() > 1e-4  # the write reached the output
    assert rm.model.config._attn_implementation == impl
    assert remaining_hooks(rm.model) == 0
    assert all("forward" not in vars(m) for m in rm.model.modules())


def test_frozen_prefix_matches_clean_prefix(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "gemma2", "clt")
    ids = rm.tokenize(PROMPT)
    with torch.no_grad():
        clean = rm.model(ids[None, :4]).logits
    with rm.frozen(ids) as lin, torch.no_grad():
        prefix = rm.softcap(lin.logits(lin.forward(ids[None, :4]).final))
    torch.testing.assert_close(prefix, clean, rtol=0, atol=1e-5 * float(clean.abs().max()))


def test_frozen_restored_after_error(tiny_model_dir):
    rm = make_rm(tiny_model_dir)
    ids = rm.tokenize(PROMPT)
    with pytest.raises(RuntimeError), rm.frozen(ids):
        raise RuntimeError("boom")
    assert rm.model.config._attn_implementation != "wiremap_frozen"
    assert remaining_hooks(rm.model) == 0
    assert all("forward" not in vars(m) for m in rm.model.modules())


def test_mismatched_transcoders(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir("llama", n_layers=3)))
    with pytest.raises(WiremapError, match="d_model"):
        ReplacementModel(model, tokenizer, build_transcoder("plt", 3, 48, 16))
    with pytest.raises(WiremapError, match="layers"):
        ReplacementModel(model, tokenizer, build_transcoder("plt", 2, 32, 16))
    other = build_transcoder("plt", 3, 32, 16, model_name="someone/other-model")
    with pytest.raises(WiremapError, match="trained for"):
        ReplacementModel(model, tokenizer, other, model_name="my-llama")
    ok = ReplacementModel(model, tokenizer, other, model_name="x", check_model_name=False)
    assert ok.n_layers == 3


def test_tokenize_errors(tiny_model_dir):
    rm = make_rm(tiny_model_dir)
    ids = rm.tokenize("A dog")
    assert int(ids[0]) == rm.tokenizer.bos_token_id and len(ids) > 1
    with pytest.raises(WiremapError, match="empty"):
        rm.tokenize("   ")
    with pytest.raises(WiremapError, match="context"):
        rm.tokenize("the cat " * 200)


def test_from_pretrained_with_saved_transcoders(tiny_model_dir, tmp_path):
    from wiremap.models.io import save_transcoders

    path = tiny_model_dir("llama", n_layers=3)
    tc = build_transcoder("clt", 3, 32, 16, model_name=str(path))
    save_transcoders(tc, tmp_path / "tc")
    rm = ReplacementModel.from_pretrained(str(path), tmp_path / "tc")
    assert rm.transcoders_path == str(tmp_path / "tc")
    assert rm.transcoders.arch == "clt" and rm.n_layers == 3 and rm.d_model == 32
    ids = rm.tokenize(PROMPT)
    with torch.no_grad():
        original = rm.model(ids[None]).logits[0]
    torch.testing.assert_close(rm(ids), original, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch,tc_arch", [("llama", "clt"), ("gpt_neox", "skip_plt")])
def test_training_splice_is_the_replacement_models_splice(tiny_model_dir, arch, tc_arch):
    # one splicing mechanism: training's metric (scales 1, BOS spliced too) and the
    # replacement model without error terms give the same logits, each in one forward pass
    from wiremap.train.callbacks import spliced_transcoders

    rm = make_rm(tiny_model_dir, arch, tc_arch)  # training splices in fp32
    ids = rm.tokenize(PROMPT)
    errors = torch.zeros(
        rm.n_layers,
        len(ids),
        rm.d_model,
    )
    ones = torch.ones(rm.n_layers)
    calls = []
    handle = rm.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad(), spliced_transcoders(rm.model, rm.transcoders, ones, ones, False):
            spliced = rm.model(ids[None]).logits[0]
        replaced = rm(ids, errors=errors)
    finally:
        handle.remove()
    assert len(calls) == 2
    torch.testing.assert_close(spliced, replaced, rtol=0, atol=1e-5 * float(replaced.abs().max()))
    assert remaining_hooks(rm.model) == 0
