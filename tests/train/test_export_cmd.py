"""`wiremap export`: transcoders from a mid-run checkpoint, equal to the module's own export."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from test_train import cache_cfg, make_dm, make_module, trainer  # noqa: F401 (fixture)

from wiremap.cli import main as wiremap
from wiremap.models.formats import load_transcoders
from wiremap.train.export_cmd import load_checkpoint


class ExportAt(L.Callback):
    """The module's own export right after step `step` (when the checkpoint is written)."""

    def __init__(self, step: int):
        self.step, self.state = step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.state = pl_module.export_transcoder().state_dict()  # a copy already


@pytest.fixture(scope="module")
def mid_run(cache_cfg, tmp_path_factory):  # noqa: F811
    """A 6-step BatchTopK PLT run checkpointed every 3 steps; the export captured at step 3."""
    tmp = tmp_path_factory.mktemp("export_run")
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {arch: plt}\n")
    dm = make_dm(cache_cfg)
    module = make_module(dm, arch="plt", activation="batchtopk", k=6)
    ckpt = ModelCheckpoint(dirpath=run / "checkpoints", filename="{step}",
                           every_n_train_steps=3, save_top_k=-1, save_last=True)  # fmt: skip
    at3 = ExportAt(3)
    trainer(tmp, 6, [ckpt, at3]).fit(module, datamodule=dm)
    return run, at3.state, module


def test_export_of_a_mid_run_checkpoint_equals_the_module_at_that_step(mid_run, tmp_path):
    run, expected, _ = mid_run
    out = tmp_path / "tc"
    assert wiremap(["export", str(run / "checkpoints" / "step=3.ckpt"), "--out", str(out)]) == 0
    got = load_transcoders(out).state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["training"]["steps"] == 3
    assert (out / "training_config.yaml").read_text() == "model: {arch: plt}\n"


def test_export_of_last_ckpt_defaults_beside_the_run(mid_run, capsys):
    run, _, module = mid_run
    assert wiremap(["export", str(run / "checkpoints" / "last.ckpt")]) == 0
    out = run / "export-step=6"
    assert "step 6" in capsys.readouterr().out
    got = load_transcoders(out).state_dict()
    for key, value in module.export_transcoder().state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7)


def test_missing_and_corrupt_checkpoints_are_clear_errors(mid_run, tmp_path, capsys):
    run, _, _ = mid_run
    assert wiremap(["export", str(tmp_path / "nope.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes((run / "checkpoints" / "step=3.ckpt").read_bytes()[:5000])
    assert wiremap(["export", str(broken), "--out", str(tmp_path / "x")]) == 2
    assert "could not read training checkpoint" in capsys.readouterr().err
    not_ours = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}}, not_ours)
    with pytest.raises(Exception, match="not a `wiremap train` checkpoint"):
        load_checkpoint(not_ours)
