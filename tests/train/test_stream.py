"""Streamed activations: same batches as the cache, disjoint DDP slices, exact resume, no disk."""

from __future__ import annotations

import hashlib
import time
from itertools import islice
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import Crash
from lightning.pytorch.callbacks import ModelCheckpoint

from wiremap.cache import ActivationCache, CacheConfig
from wiremap.cache.text import TextPosition, pack_contexts, pack_positions
from wiremap.errors import WiremapError
from wiremap.models.tiny import sample_corpus
from wiremap.train.data import ActivationDataModule
from wiremap.train.module import TranscoderModule
from wiremap.train.stream import Cursor, prefetched

# 4 contexts per forward batch, 31 rows each: windows of 192 rows end inside forward batches
CACHE = {"context_length": 32, "batch_contexts": 4, "shard_tokens": 700, "device": "cpu"}
DATA = {"batch_tokens": 64, "buffer_size": 192, "val_contexts": 8}


@pytest.fixture(scope="module")
def cfg(tiny_model_dir, tmp_path_factory) -> CacheConfig:
    """A cache holding the whole text (so its stream order wraps where the text ends)."""
    root = tmp_path_factory.mktemp("stream")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(sample_corpus(80, seed=3)))
    cfg = CacheConfig(
        model=str(tiny_model_dir("llama", d_model=16)), dataset=str(corpus), n_tokens=10**6,
        out=str(root / "cache"), **CACHE,
    )  # fmt: skip
    ActivationDataModule(cfg, build_missing=True).cache  # noqa: B018
    return cfg


def stream_dm(cfg: CacheConfig, **kw) -> ActivationDataModule:
    return ActivationDataModule(cfg, **{**DATA, "source": "stream", **kw})


def cached_dm(cfg: CacheConfig, **kw) -> ActivationDataModule:
    return ActivationDataModule(cfg, **{**DATA, "order": "stream", **kw})


def ready(dm: ActivationDataModule, rank: int = 0, world_size: int = 1) -> ActivationDataModule:
    dm.rank, dm.world_size = rank, world_size
    dm.setup("fit")
    return dm


# -- text positions -------------------------------------------------------------------------


def test_packing_restarts_exactly_at_a_recorded_position():
    docs = [list(range(100 * d, 100 * d + n)) for d, n in enumerate([5, 17, 2, 40, 9, 1, 23])]
    packed = list(pack_positions(enumerate(docs), 8, bos=-1, eos=-2))
    assert [c for c, _ in packed] == list(pack_contexts(docs, 8, -1, -2))
    for i, (_, pos) in enumerate(packed):
        rest = [(d, docs[d]) for d in range(pos.doc, len(docs))]
        again = [c for c, _ in pack_positions(rest, 8, -1, -2, offset=pos.offset)]
        assert again == [c for c, _ in packed[i:]], pos
    assert packed[1][1] == TextPosition(1, 1)  # context 1 starts at doc 1's second token


# -- stream vs cache ------------------------------------------------------------------------


def test_stream_and_cache_in_stream_order_give_identical_batches(cfg):
    cached, streamed = ready(cached_dm(cfg)), ready(stream_dm(cfg))
    n = 2 * cached.plan().batches_per_epoch + 3  # two passes over the text, and some
    for i, (a, b) in enumerate(
        islice(zip(cached.train_dataloader(), streamed.train_dataloader(), strict=False), n)
    ):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), f"batch {i}"
    val_a, val_b = list(cached.val_dataloader()), list(streamed.val_dataloader())
    assert len(val_a) == len(val_b) > 0
    for a, b in zip(val_a, val_b, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(cached.heldout_contexts(5), streamed.heldout_contexts(5))
    assert cached.lm_source == streamed.lm_source
    assert cached.include_bos is streamed.include_bos is False


def test_validation_contexts_are_never_trained_on(cfg):
    dm = ready(cached_dm(cfg))
    assert dm.n_val == 8 * 31  # 8 contexts held out, BOS left out
    rows = torch.cat([torch.from_numpy(dm.plan().rows(i)) for i in range(30)])
    assert int(rows.min()) >= 0 and int(rows.max()) < dm.n_train  # plan rows start after n_val
    x, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(x, dm.cache.get(torch.arange(64))[0])  # validation: the first rows
    ids = dm.heldout_contexts(20)
    assert len(ids) == 8 and torch.equal(ids[:, 1:].reshape(-1), dm.cache.tokens(slice(0, 248)))


def test_norm_statistics_are_estimated_from_the_first_rows(cfg):
    streamed = stream_dm(cfg, norm_tokens=2 * 31)
    cached = ActivationCache(cfg.out)
    x, y = cached.get(slice(0, 62))
    info = streamed.cache_info
    for side, acts in (("input", x), ("output", y)):
        mean_norm = acts.float().norm(dim=-1).mean(0)
        torch.testing.assert_close(torch.tensor(info["norm_stats"][side]["mean_norm"]), mean_norm)
    assert info["layers"] == [0, 1] and info["source"] == "stream" and info["path"] is None
    assert (streamed.n_layers, streamed.d_model) == (2, 16)
    module = TranscoderModule(2, 16, d_transcoder=8, cache_info=info)
    assert bool(module.scales_ready)  # the module's scales come from these statistics
    with pytest.raises(WiremapError, match="no activation cache"):
        streamed.cache  # noqa: B018


# -- DDP slices -------------------------------------------------------------------------------


def test_processes_pack_disjoint_documents(cfg):
    """Process r of 2 packs exactly the training documents d with (d - k) % 2 == r."""
    lines = [t for t in Path(cfg.dataset).read_text().splitlines() if t.strip()]
    for rank in (0, 1):
        stream = ready(stream_dm(cfg), rank, 2).stream
        start, (_, eos) = stream.train_start, stream.boundaries
        contexts = stream.contexts(stream.first_cursor().position, stream.mine)
        packed = [t for c, _ in contexts for t in c[1:]]
        expected = []
        for d in range(start.doc + rank, len(lines), 2):
            ids = stream.tokenizer(lines[d], add_special_tokens=False)["input_ids"]
            expected += [*ids, eos][start.offset if d == start.doc else 0 :]
        assert packed == expected[: len(packed)] and len(expected) - len(packed) < 31, rank
        assert len(packed) > 500


class RecordRows(L.Callback):
    """Each process writes a fingerprint of every training row it saw to `folder`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.rows: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows += [fingerprint(row) for row in batch[0]]

    def on_fit_end(self, trainer, pl_module):
        (self.folder / f"rows_{trainer.global_rank}.txt").write_text("\n".join(self.rows))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            trainer.strategy.barrier()  # leave the gloo group together (see test_ddp.py)
            torch.distributed.destroy_process_group()


def fingerprint(row: torch.Tensor) -> str:
    return hashlib.sha1(row.float().numpy().tobytes()).hexdigest()


def test_two_processes_train_on_their_own_slices(cfg, tmp_path):
    """Under DDP (gloo, 2 processes) each process trains on exactly the batches of its own
    slice of the text (which holds other documents: test above). Row fingerprints can repeat
    across contexts that begin alike, so the token check is the one above."""
    L.seed_everything(0)
    dm = stream_dm(cfg, val_contexts=0)
    module = TranscoderModule(dm.n_layers, dm.d_model, arch="plt", d_transcoder=16,
                              activation="relu", cache_info=dm.cache_info)  # fmt: skip
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", devices=2, strategy="ddp_spawn", precision="32-true",
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0, default_root_dir=str(tmp_path),
        callbacks=[RecordRows(tmp_path)],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    seen = [(tmp_path / f"rows_{r}.txt").read_text().split("\n") for r in (0, 1)]
    assert [len(s) for s in seen] == [3 * 32, 3 * 32]
    assert seen[0] != seen[1]
    for rank in (0, 1):  # each process got exactly its own slice's batches
        alone = ready(stream_dm(cfg, val_contexts=0), rank, 2)
        batches = islice(alone.train_dataloader(), 3)
        assert seen[rank] == [fingerprint(row) for x, _ in batches for row in x]


# -- resume -----------------------------------------------------------------------------------


def test_streamed_run_resumed_from_a_checkpoint_reproduces_the_uninterrupted_run(cfg, tmp_path):
    def run(callbacks, ckpt_path=None):
        L.seed_everything(0)
        dm = stream_dm(cfg)
        module = TranscoderModule(
            dm.n_layers, dm.d_model, arch="clt", d_transcoder=32, activation="jumprelu",
            cache_info=dm.cache_info, optim={"lr": 3e-3, "warmup_steps": 2},
        )  # fmt: skip
        trainer = L.Trainer(
            max_steps=11, accelerator="cpu", devices=1, precision="32-true", logger=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=callbacks,
            enable_checkpointing=bool(callbacks),
        )  # fmt: skip
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return module, dm

    straight, _ = run([])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run([ckpt, Crash(at_step=7)])
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)
    cursor = Cursor(**saved["ActivationDataModule"]["cursors"][0])
    assert cursor.batch == 3 and cursor.skip > 0  # step 4 lies in window 1, mid forward batch
    resumed, dm = run([], ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert dm.batches_consumed == 11
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_resume_needs_the_same_source_and_process_count(cfg):
    dm = ready(stream_dm(cfg))
    state = dm.state_dict()
    with pytest.raises(WiremapError, match="same data.source"):
        ready(cached_dm(cfg)).load_state_dict(state)
    with pytest.raises(WiremapError, match="same number of processes"):
        ready(stream_dm(cfg), 0, 2).load_state_dict(state)


def test_streamed_settings_that_cannot_work_are_refused(cfg):
    with pytest.raises(WiremapError, match="num_workers: 0"):
        ActivationDataModule(cfg, source="stream", num_workers=2)
    with pytest.raises(WiremapError, match="data.order"):
        ActivationDataModule(cfg, source="stream", order="window")
    with pytest.raises(WiremapError, match="held out"):
        ready(stream_dm(cfg, val_contexts=400)).train_dataloader()
    few_docs = ready(stream_dm(cfg, batch_tokens=40 * 64), rank=39, world_size=40)
    with pytest.raises(WiremapError, match="less than one batch"):
        next(iter(few_docs.train_dataloader()))


# -- disk -------------------------------------------------------------------------------------


def test_streamed_run_on_the_organism_uses_under_1_percent_of_a_caches_disk(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from wiremap.models.organism import organism_path
    from wiremap.train.organism import build_corpus

    corpus = tmp_path / "organism.txt"
    corpus.write_text("\n".join(build_corpus(n_docs=3000, seed=0).documents))
    cfg = CacheConfig(
        model=str(organism_path()), dataset=str(corpus), context_length=64, batch_contexts=32,
        device="cpu", out=str(tmp_path / "never-written"),
    )  # fmt: skip
    dm = ActivationDataModule(cfg, source="stream", batch_tokens=1024, buffer_size=8192)
    module = TranscoderModule(dm.n_layers, dm.d_model, arch="plt", d_transcoder=16,
                              activation="topk", k=4, cache_info=dm.cache_info)  # fmt: skip
    run, steps = tmp_path / "run", 40
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, precision="32-true",
        logger=CSVLogger(run), enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=run / "checkpoints")], val_check_interval=20,
        check_val_every_n_epoch=None, limit_val_batches=1, default_root_dir=str(run),
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert len(list((run / "checkpoints").glob("*.ckpt"))) == 1
    cache_bytes = 2 * dm.n_layers * dm.d_model * 2 * steps * 1024  # bf16 x and y per token
    written = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file() and f != corpus)
    assert written < 0.01 * cache_bytes, (written, cache_bytes)
    assert not Path(cfg.out).exists()


def test_prefetch_runs_at_most_one_item_ahead_and_hands_errors_on():
    made: list[int] = []

    def items():
        for i in range(5):
            made.append(i)
            yield i
        raise WiremapError("the text ran dry")

    it = prefetched(items())
    assert next(it) == 0
    time.sleep(0.3)  # give the thread time to run ahead, if it wrongly would
    assert len(made) <= 2  # the item in use and one ahead
    assert [next(it) for _ in range(4)] == [1, 2, 3, 4]
    with pytest.raises(WiremapError, match="ran dry"):
        next(it)
