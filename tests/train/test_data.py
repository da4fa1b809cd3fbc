"""ActivationDataModule: shuffle plan, DDP slices, workers, resume position, cache checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import tiny_cache

from wiremap.cache import CacheConfig
from wiremap.errors import WiremapError
from wiremap.train.data import ActivationDataModule, BatchPlan, rank_slice
from wiremap.train.stream import window_permutation


@pytest.fixture(scope="module")
def cache_cfg(tiny_model_dir, tmp_path_factory) -> CacheConfig:
    """A small cache (2 layers, d_model 16, 3 shards), built through build_missing=True."""
    model = tiny_model_dir("llama", d_model=16)
    return tiny_cache(
        model, tmp_path_factory.mktemp("data_cache"), 150, 3, n_tokens=3000, shard_tokens=1024
    )


def test_plan_covers_rows_once_per_epoch_and_is_seeded():
    plan = BatchPlan(n_rows=1000, batch_tokens=64, buffer_size=256, chunk_rows=10, seed=1)
    epoch = np.concatenate([plan.rows(i) for i in range(plan.batches_per_epoch)])
    assert len(epoch) == len(np.unique(epoch)) == 15 * 64
    assert epoch.min() >= 0 and epoch.max() < 1000
    again = BatchPlan(1000, 64, 256, 10, seed=1)
    assert np.array_equal(again.rows(3), plan.rows(3))
    assert not np.array_equal(plan.rows(0), plan.rows(plan.batches_per_epoch))  # new epoch
    assert not np.array_equal(BatchPlan(1000, 64, 256, 10, seed=2).rows(0), plan.rows(0))


def test_plan_mixes_distant_rows_within_a_batch():
    plan = BatchPlan(n_rows=100_000, batch_tokens=256, buffer_size=4096, chunk_rows=64, seed=0)
    rows = plan.rows(0)
    assert rows.max() - rows.min() > 50_000  # chunks from all over the cache
    assert len(np.unique(rows // 64)) > 30  # and from many chunks


def test_rank_slices_partition_the_global_batch():
    rows = BatchPlan(500, 96, 192, 7, seed=0).rows(2)
    parts = [rank_slice(rows, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [32, 32, 32]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.sort(rows))


def test_batches_have_the_cache_shape_and_val_rows_are_held_out(cache_cfg):
    dm = ActivationDataModule(cache_cfg, batch_tokens=64, buffer_size=512, val_fraction=0.2)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (64, 2, 16) and x.dtype == torch.bfloat16
    assert dm.n_train + dm.n_val == dm.cache.n_tokens and dm.n_val > 0
    train_rows = np.concatenate([dm.plan().rows(i) for i in range(dm.plan().batches_per_epoch)])
    assert train_rows.max() < dm.n_train
    vx, _ = next(iter(dm.val_dataloader()))
    expected, _ = dm.cache.get(torch.arange(dm.n_train, dm.n_train + 64))
    assert torch.equal(vx, expected)


def test_worker_processes_give_the_same_stream(cache_cfg):
    def first_batches(workers: int) -> list[torch.Tensor]:
        dm = ActivationDataModule(cache_cfg, batch_tokens=64, buffer_size=256, num_workers=workers)
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        return [next(it)[0] for _ in range(5)]

    for a, b in zip(first_batches(0), first_batches(2), strict=True):
        assert torch.equal(a, b)


def test_resume_position_restarts_the_stream_where_it_stopped(cache_cfg):
    dm = ActivationDataModule(cache_cfg, batch_tokens=64, buffer_size=256)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(4)]
    for batch in batches[:3]:
        dm.on_after_batch_transfer(batch, 0)  # without a trainer every batch counts
    state = dm.state_dict()
    resumed = ActivationDataModule(cache_cfg, batch_tokens=64, buffer_size=256)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    assert torch.equal(next(iter(resumed.train_dataloader()))[1], batches[3][1])
    with pytest.raises(WiremapError, match="batch_tokens"):
        ActivationDataModule(cache_cfg, batch_tokens=32).load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "batch_tokens"} | {"batch_size": 64}
    before = ActivationDataModule(cache_cfg, batch_tokens=64)
    before.load_state_dict(old)  # a checkpoint of the previous version
    assert before.batches_consumed == 3


def test_old_names_warn_and_mean_the_new_ones(cache_cfg):
    with pytest.warns(DeprecationWarning, match="data.batch_size is deprecated.*batch_tokens"):
        dm = ActivationDataModule(cache_cfg, batch_size=64)
    assert dm.batch_tokens == 64 and dm.plan().batch_tokens == 64
    assert dm.include_bos is False and dm.cache.include_bos is False
    with pytest.warns(DeprecationWarning, match="exclude_bos"):
        assert dm.exclude_bos is True
    with pytest.warns(DeprecationWarning, match="batch_size"):
        assert dm.batch_size == 64


def test_missing_cache_says_how_to_build_it(cache_cfg, tmp_path):
    cfg = dataclasses.replace(cache_cfg, out=str(tmp_path / "nothing"))
    with pytest.raises(WiremapError, match="wiremap cache --config"):
        ActivationDataModule(cfg).n_layers  # noqa: B018


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layers": [1]}, "layers"),
        ({"input_hook": "resid_mid"}, "hooks"),
        ({"model": "gpt2"}, "model"),
    ],
)
def test_cache_that_does_not_match_the_config_is_refused(cache_cfg, change, message):
    cfg = dataclasses.replace(cache_cfg, **change)
    with pytest.raises(WiremapError, match=message):
        ActivationDataModule(cfg).d_model  # noqa: B018


def test_global_batch_must_split_evenly_over_processes(cache_cfg):
    dm = ActivationDataModule(cache_cfg, batch_tokens=63)
    dm.world_size = 2
    dm.trainer = None
    with pytest.raises(WiremapError, match="divide evenly"):
        dm.setup("fit")


def test_window_shuffle_is_the_shared_window_permutation():
    """Both readers shuffle a window with `window_permutation` (stream.py relies on it)."""
    plan = BatchPlan(n_rows=500, batch_tokens=50, buffer_size=200, chunk_rows=500, seed=4)
    window = np.concatenate([plan.rows(i) for i in range(4)])
    assert np.array_equal(window, window_permutation(4, 0, 0, 200))  # one chunk: rows in order
    assert np.array_equal(plan.rows(4), 200 + window_permutation(4, 0, 1, 200)[:50])
