"""Running out of memory ends as one WiremapError naming the sizes and the settings to lower.

Attribution, caching and training have theirs in test_memory.py and test_failures.py; here:
feature cards (CUDA's torch.OutOfMemoryError and the CPU's MemoryError, in the pass and in
the cards of a layer) and caching hit by a plain MemoryError.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_cache

from wiremap.attribution import features
from wiremap.attribution.features import FeatureCardConfig, FeatureStore, build_feature_cards
from wiremap.cache import CacheConfig, build_cache
from wiremap.errors import WiremapError
from wiremap.models.io import save_transcoders
from wiremap.models.transcoders import build_transcoder

CUDA_OOM = "CUDA out of memory. Tried to allocate 20.00 GiB"


@pytest.fixture(scope="module")
def cache_cfg(tiny_model_dir, tmp_path_factory) -> CacheConfig:
    root = tmp_path_factory.mktemp("oom")
    settings = dict(n_tokens=160, context_length=16, batch_size=4, dtype="float32")
    return tiny_cache(tiny_model_dir("llama"), root, n_docs=20, seed=3, **settings)


@pytest.fixture
def card_cfg(cache_cfg, tmp_path) -> FeatureCardConfig:
    torch.manual_seed(0)
    model = cache_cfg.model
    tc = build_transcoder("plt", n_layers=2, d_model=32, d_transcoder=24, model_name=model)
    tc_dir = save_transcoders(tc, tmp_path / "tc")
    return FeatureCardConfig(
        cache=cache_cfg.out,
        transcoders=str(tc_dir),
        top_k=3,
        n_samples=4,
        context=6,
        progress=False,
    )


def test_out_of_memory_in_the_feature_pass_names_the_chunk_and_the_flags(card_cfg, monkeypatch):
    def no_memory(cache, tc, cfg):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(features, "scan_cache", no_memory)
    with pytest.raises(WiremapError) as err:
        build_feature_cards(card_cfg)
    message = str(err.value)
    assert message.startswith("computing feature cards ran out of memory")
    assert "2 layers x 24 features on cpu" in message and "Tried to allocate 20.00 GiB" in message
    assert "chunk_elements (now 4194304)" in message and "--top-k" in message
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)


def test_memory_error_in_a_layer_keeps_the_finished_ones(card_cfg, monkeypatch):
    lens, built = features.logit_lens, []

    def lens_without_memory_for_layer_1(model, tc, layer, n):
        built.append(layer)
        if layer == 1:
            raise MemoryError()
        return lens(model, tc, layer, n)

    monkeypatch.setattr(features, "logit_lens", lens_without_memory_for_layer_1)
    with pytest.raises(WiremapError, match="computing feature cards ran out of memory") as err:
        build_feature_cards(card_cfg)
    assert isinstance(err.value.__cause__, MemoryError) and built == [0, 1]
    monkeypatch.setattr(features, "logit_lens", lambda *a: (built.append(a[2]), lens(*a))[1])
    store = FeatureStore(build_feature_cards(card_cfg))  # the rerun the message advises
    assert built == [0, 1, 1], "layer 0 was finished and must not be computed again"
    assert store.card(0, 5)["index"] == 5 and store.card(1, 5)["index"] == 5


def test_other_runtime_errors_are_not_called_out_of_memory(card_cfg, monkeypatch):
    def bug(cache, tc, cfg):
        raise RuntimeError("shape mismatch in a kernel")

    monkeypatch.setattr(features, "scan_cache", bug)
    with pytest.raises(RuntimeError, match="shape mismatch") as err:
        build_feature_cards(card_cfg)
    assert not isinstance(err.value, WiremapError)


def test_memory_error_while_caching_names_the_batch_and_the_flags(cache_cfg, tmp_path, monkeypatch):
    import wiremap.cache.build as cache_mod

    def no_memory(model, ids):
        raise MemoryError()

    monkeypatch.setattr(cache_mod, "_forward", no_memory)
    cfg = CacheConfig(**{**cache_cfg.__dict__, "out": str(tmp_path / "c")})
    with pytest.raises(
        WiremapError, match=r"caching ran out of memory.*4 contexts.*--batch-contexts"
    ):
        build_cache(cfg, progress=False)
