"""Hook points are the right tensors for every supported architecture."""

import dataclasses

import pytest
import torch

from wiremap.errors import WiremapError
from wiremap.models.adapters import ADAPTERS, get_adapter, register_adapter
from wiremap.models.hooks import capture, remaining_hooks, replace_mlp_out
from wiremap.models.loading import load_model
from wiremap.models.tiny import ARCHITECTURES

ALL_HOOKS = ["resid_pre", "resid_mid", "mlp_in", "mlp_out", "resid_post"]


def _ids(tokenizer):
    body = tokenizer("The cat sees the moon today. A dog likes bread.").input_ids
    return torch.tensor([[tokenizer.bos_token_id, *body]])


@pytest.fixture(params=ARCHITECTURES)
def loaded(request, tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir(request.param, n_layers=3)))
    return model, tokenizer, get_adapter(model)


@torch.no_grad()
def test_hook_points(loaded):
    model, tokenizer, adapter = loaded
    ids = _ids(tokenizer)
    base = model(ids).logits
    with capture(model, ALL_HOOKS) as acts:
        model(ids)
    n = adapter.n_layers(model)
    assert set(acts["mlp_out"]) == set(range(n))

    # replacing mlp_out by its own value is exact; replacing it by zeros is not
    with replace_mlp_out(model, acts["mlp_out"]):
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    with replace_mlp_out(model, {i: torch.zeros_like(t) for i, t in acts["mlp_out"].items()}):
        assert (model(ids).logits - base).abs().max() > 1e-3

    for layer in range(n):
        # mlp_in is what the MLP receives: the MLP block maps it to mlp_out
        out = adapter.module(model, layer, adapter.mlp)(acts["mlp_in"][layer])
        if adapter.post_mlp_norm:
            out = adapter.module(model, layer, adapter.post_mlp_norm)(out)
        torch.testing.assert_close(out, acts["mlp_out"][layer])
        # mlp_in is the MLP norm of resid_mid (or resid_mid itself when there is no norm)
        norm = adapter.module(model, layer, adapter.mlp_norm) if adapter.mlp_norm else None
        expected = norm(acts["resid_mid"][layer]) if norm else acts["resid_mid"][layer]
        torch.testing.assert_close(acts["mlp_in"][layer], expected)
        if layer + 1 < n:
            torch.testing.assert_close(acts["resid_post"][layer], acts["resid_pre"][layer + 1])
            if not adapter.is_parallel(model):
                torch.testing.assert_close(
                    acts["resid_mid"][layer] + acts["mlp_out"][layer], acts["resid_pre"][layer + 1]
                )
    assert remaining_hooks(model) == 0


def test_gpt_neox_is_parallel(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir("gpt_neox", n_layers=3)))
    adapter = get_adapter(model)
    assert adapter.is_parallel(model)
    with torch.no_grad(), capture(model, ["resid_pre", "resid_mid"]) as acts:
        model(_ids(tokenizer))
    # parallel attention + MLP: the MLP's norm reads the residual *before* attention
    torch.testing.assert_close(acts["resid_mid"][1], acts["resid_pre"][1])


def test_hooks_removed_on_error(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir("llama", n_layers=3)))
    with pytest.raises(RuntimeError), capture(model, ALL_HOOKS):
        raise RuntimeError("boom")
    bad = {0: torch.zeros(1, 2, 3)}
    with pytest.raises(ValueError), torch.no_grad(), replace_mlp_out(model, bad):
        model(_ids(tokenizer))
    assert remaining_hooks(model) == 0


def test_every_architecture_has_an_adapter():
    assert {a.name for a in ADAPTERS.values()} >= {"gpt2", "llama", "gemma2", "gpt_neox", "olmo2"}
    for arch in ARCHITECTURES:
        assert get_adapter(arch).name


def test_unknown_architecture_lists_supported():
    with pytest.raises(WiremapError, match="supports .*llama"):
        get_adapter("bert")


def test_layer_out_of_range(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir("llama", n_layers=3)))
    with pytest.raises(WiremapError, match="out of range"), capture(model, ["mlp_out"], [7]):
        pass
    with pytest.raises(WiremapError, match="unknown hook"), capture(model, ["attn_out"]):
        pass


def test_missing_model_path(tmp_path):
    with pytest.raises(WiremapError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(WiremapError, match="config.json"):
        load_model(str(tmp_path))


def test_registering_a_taken_adapter_raises_unless_replaced():
    llama = ADAPTERS["llama"]
    with pytest.raises(WiremapError, match="language-model adapter 'llama' is already registered"):
        register_adapter(dataclasses.replace(llama, model_types=("llama_copy",)))
    with pytest.raises(WiremapError, match=r"model types \['llama'\] already have an adapter"):
        register_adapter(dataclasses.replace(llama, name="other_llama"))
    assert get_adapter("llama") is llama and "other_llama" not in ADAPTERS
    assert "llama_copy" not in ADAPTERS and get_adapter("mistral").name == "mistral"
    moved = dataclasses.replace(llama, model_types=("llama", "test_llama_alias"))
    try:
        assert register_adapter(moved, replace=True) is moved
        assert get_adapter("test_llama_alias") is moved and get_adapter("llama") is moved
    finally:
        register_adapter(llama, replace=True)
    assert get_adapter("llama") is llama
    with pytest.raises(WiremapError, match="unsupported architecture 'test_llama_alias'"):
        get_adapter("test_llama_alias")
