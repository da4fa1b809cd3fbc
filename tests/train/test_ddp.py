"""DDP: two CPU processes (gloo) train exactly like one process with the same global batch."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import tiny_cache

from wiremap.cache import CacheConfig
from wiremap.train.data import ActivationDataModule
from wiremap.train.module import TranscoderModule


@pytest.fixture(scope="module")
def cache_cfg(tiny_model_dir, tmp_path_factory) -> CacheConfig:
    model = tiny_model_dir("llama", d_model=16)
    return tiny_cache(
        model, tmp_path_factory.mktemp("ddp_cache"), 60, 7, n_tokens=1200, shard_tokens=512
    )


class DestroyGroupAtFitEnd(L.Callback):
    """Each worker leaves the gloo group together after training (Lightning leaves gloo groups
    to interpreter exit, where a worker aborted once: 'terminate called without an active
    exception', under a loaded machine)."""

    def on_fit_end(self, trainer, pl_module) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            trainer.strategy.barrier()
            torch.distributed.destroy_process_group()


def train(cfg: CacheConfig, tmp_path, devices: int) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    dm = ActivationDataModule(cfg, batch_tokens=128, buffer_size=512, val_fraction=0.0)
    module = TranscoderModule(
        dm.n_layers, dm.d_model, arch="clt", d_transcoder=32, activation="jumprelu",
        cache_info=dm.cache_info, loss={"dead_tokens": 256}, optim={"lr": 3e-3, "warmup_steps": 1},
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", devices=devices, precision="32-true",
        strategy="ddp_spawn" if devices > 1 else "auto", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
        gradient_clip_val=1.0, default_root_dir=str(tmp_path), callbacks=[DestroyGroupAtFitEnd()],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_two_process_ddp_matches_one_process(cache_cfg, tmp_path):
    single = train(cache_cfg, tmp_path / "one", devices=1)
    ddp = train(cache_cfg, tmp_path / "two", devices=2)
    assert not torch.equal(single["transcoder.W_enc"], ddp["transcoder.W_enc"] * 0)
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-5, atol=1e-6, msg=key)
