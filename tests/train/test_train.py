"""TranscoderModule, losses and callbacks on a tiny cache: learning, resume, NaN, export, W&B."""

from __future__ import annotations

import glob
import json
import struct
import time

import lightning as L
import pytest
import torch
from helpers import Crash, tiny_cache, train_argv
from lightning.pytorch.callbacks import ModelCheckpoint

from wiremap.cache import CacheConfig
from wiremap.errors import WiremapError
from wiremap.train import losses
from wiremap.train.callbacks import NanGuard, heldout_contexts, replacement_metrics
from wiremap.train.data import ActivationDataModule
from wiremap.train.module import TranscoderModule

ARCHS = ("plt", "skip_plt", "clt", "skip_clt")
ACTIVATIONS = ("relu", "jumprelu", "topk", "batchtopk")


@pytest.fixture(scope="module")
def cache_cfg(tiny_model_dir, tmp_path_factory) -> CacheConfig:
    model = tiny_model_dir("llama", d_model=16)
    return tiny_cache(
        model, tmp_path_factory.mktemp("train_cache"), 120, 5, n_tokens=2400, shard_tokens=1024
    )


def make_dm(cfg: CacheConfig, **kw) -> ActivationDataModule:
    return ActivationDataModule(cfg, **{"batch_tokens": 128, "buffer_size": 512, **kw})


def make_module(dm: ActivationDataModule, **kw) -> TranscoderModule:
    kw = {"arch": "clt", "d_transcoder": 48, "activation": "jumprelu", **kw}
    kw.setdefault("optim", {"lr": 3e-3, "warmup_steps": 2})
    return TranscoderModule(dm.n_layers, dm.d_model, cache_info=dm.cache_info, **kw)


def trainer(tmp_path, max_steps: int, callbacks=(), **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, precision="32-true", logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **kw,
    )  # fmt: skip


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_decreases(cache_cfg, arch, activation):
    dm = make_dm(cache_cfg)
    dm.setup("fit")
    k = 6 if activation in ("topk", "batchtopk") else None
    # dead_tokens=128: features silent for one batch count as dead, so AuxK runs too
    module = make_module(
        dm, arch=arch, activation=activation, k=k, loss={"dead_tokens": 128, "sparsity_coef": 1e-4}
    )
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    batches = [
        dm.on_after_batch_transfer(b, 0)
        for b, _ in zip(dm.train_dataloader(), range(6), strict=False)
    ]
    mse = []
    for step in range(30):
        x, y = module.normalised(*batches[step % len(batches)])
        terms, _, _, active = module.step_outputs(x, y)
        torch.stack(list(terms.values())).sum().backward()
        opt.step()
        opt.zero_grad()
        module.track_firing(active, x.shape[0])
        mse.append(float(terms["mse"]))
        assert all(torch.isfinite(t) for t in terms.values())
    assert sum(mse[-6:]) < 0.7 * sum(mse[:6])
    assert ("auxk" in terms) == (k is not None)


def test_fvu_and_l0_definitions():
    y = torch.randn(100, 3, 8)
    assert torch.allclose(losses.fvu_per_layer(y, y), torch.zeros(3))
    mean = y.mean(0, keepdim=True).expand_as(y)
    assert torch.allclose(losses.fvu_per_layer(mean, y), torch.ones(3), atol=1e-5)
    a = torch.zeros(4, 2, 10)
    a[:, 0, :3] = 1.0
    assert losses.l0_per_layer(a).tolist() == [3.0, 0.0]
    assert losses.ramp(5, 2.0, 10) == 1.0 and losses.ramp(50, 2.0, 10) == 2.0
    assert losses.lr_factor(0, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert losses.lr_factor(100, 10, 100, "cosine", 0.1) == pytest.approx(0.1)


def test_schedule_fractions_of_the_run_and_lr_scaled_with_width():
    from wiremap.train.module import OptimConfig

    cfg = OptimConfig(warmup_fraction=0.1, decay_fraction=0.2, decay="linear", min_lr_ratio=0.0)
    warmup, decay = cfg.phases(1000)
    assert (warmup, decay) == (100, 200)
    factors = [losses.lr_factor(s, warmup, 1000, cfg.decay, 0.0, decay) for s in range(1000)]
    assert factors[0] == pytest.approx(0.01) and factors[99] == 1.0
    assert factors[100:800] == [1.0] * 700  # plateau until the last 20 %
    assert factors[900] == pytest.approx(0.5) and factors[999] == pytest.approx(1 / 200)
    assert OptimConfig(warmup_steps=7).phases(1000)[0] == 7  # old presets keep working
    # old behaviour: decay over everything after warm-up
    assert losses.lr_factor(55, 10, 100, "linear", 0.0) == pytest.approx(0.5)
    ref = OptimConfig(base_lr=1e-3, lr_ref_width=4096)
    assert ref.peak_lr(4096) == pytest.approx(1e-3) and ref.peak_lr(16384) == pytest.approx(5e-4)
    assert OptimConfig(lr=3e-3).peak_lr(16384) == 3e-3
    with pytest.raises(WiremapError, match="exceed the whole run"):
        OptimConfig(warmup_fraction=0.5, decay_fraction=0.6)


def test_trainer_uses_the_width_scaled_lr_and_fractional_warmup(cache_cfg, tmp_path):
    dm = make_dm(cache_cfg)
    module = make_module(dm, d_transcoder=64, optim={"base_lr": 1e-3, "lr_ref_width": 256})
    fit = trainer(tmp_path, 10, [])
    fit.fit(module, datamodule=dm)
    scheduler = fit.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [pytest.approx(2e-3)]  # 1e-3 * sqrt(256 / 64)
    # warm-up 5 % of 10 steps rounds to 0 (none); decay over the last 2 steps to 0.1 lr
    assert [scheduler.lr_lambdas[0](s) for s in (0, 7, 9)] == pytest.approx([1.0, 1.0, 0.55])


def test_resume_reproduces_the_uninterrupted_run(cache_cfg, tmp_path):
    def run(callbacks, ckpt_path=None):
        L.seed_everything(0)
        dm = make_dm(cache_cfg)
        module = make_module(dm, activation="batchtopk", k=6, loss={"dead_tokens": 256})
        trainer(tmp_path, 12, callbacks).fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return module, dm

    straight, _ = run([])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run([ckpt, Crash(at_step=7)])
    resumed, dm = run([], ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=5.ckpt"))
    assert dm.batches_consumed == 12
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_nan_loss_stops_with_step_and_cause(cache_cfg, tmp_path):
    dm = make_dm(cache_cfg)
    module = make_module(dm)
    with torch.no_grad():
        module.transcoder.W_enc[0, 0, 0] = float("nan")
    with pytest.raises(WiremapError, match=r"NaN at step 0.*learning rate too high"):
        trainer(tmp_path, 3, [NanGuard()]).fit(module, datamodule=dm)


class GradNorms(L.Callback):
    """The gradient norm each optimiser step used (clipping has run by batch end)."""

    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_adamw_is_fused_unless_a_grad_scaler_must_unscale(cache_cfg, tmp_path, precision):
    from lightning.pytorch.plugins import MixedPrecision

    dm = make_dm(cache_cfg)
    module, norms = make_module(dm), GradNorms()
    # Lightning turns 16-mixed into bf16-mixed on CPU; an explicit plugin keeps the GradScaler
    scaled = precision == "16-mixed"
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu")) if scaled else None
    fit = L.Trainer(
        max_steps=3, accelerator="cpu", gradient_clip_val=1e-3, plugins=plugin,
        precision=None if scaled else precision,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0, default_root_dir=str(tmp_path),
        callbacks=[norms],
    )  # fmt: skip
    fit.fit(module, datamodule=dm)
    assert fit.optimizers[0].defaults["fused"] is not scaled
    # (a GradScaler skips its first steps on overflow: those gradients are not finite)
    finite = [n for n in norms.norms if n == n and n != float("inf")]
    assert len(norms.norms) == 3 and finite and max(finite) <= 1e-3 * 1.001


def test_checkpoint_of_another_shape_is_refused(cache_cfg):
    dm = make_dm(cache_cfg)
    saved = make_module(dm, d_transcoder=32)
    with pytest.raises(WiremapError, match="d_transcoder"):
        make_module(dm).on_load_checkpoint({"hyper_parameters": dict(saved.hparams)})


@pytest.mark.parametrize("arch, activation", [("skip_clt", "jumprelu"), ("plt", "batchtopk")])
def test_export_works_on_raw_activations(cache_cfg, arch, activation):
    dm = make_dm(cache_cfg)
    dm.setup("fit")
    module = make_module(dm, arch=arch, activation=activation, k=6)
    with torch.no_grad():  # non-trivial thresholds, skip weights and decoder bias
        module.transcoder.b_dec.normal_()
        if module.transcoder.W_skip is not None:
            module.transcoder.W_skip.normal_(std=0.1)
    it = iter(dm.train_dataloader())
    module.train()
    module(module.normalised(*dm.on_after_batch_transfer(next(it), 0))[0])  # calibrates BatchTopK
    x, y = dm.on_after_batch_transfer(next(it), 0)  # another batch: no exact threshold ties
    exported = module.export_transcoder()
    with module.per_token() as tc, torch.no_grad():
        xn = x * module.in_scale[:, None]
        expected = tc(xn)[0] / module.out_scale[:, None]
        got = exported(x)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert exported.activation.name == "jumprelu"


def test_replacement_metrics_of_a_silent_transcoder_recover_nothing(cache_cfg):
    from wiremap.models.loading import load_model

    dm = make_dm(cache_cfg, val_fraction=0.2)
    module = make_module(dm, activation="relu")
    with torch.no_grad():
        for p in module.transcoder.parameters():
            p.zero_()  # reconstruction = 0: the same as zero-ablating the MLPs
    ids = heldout_contexts(dm.cache, dm.n_train, 3)
    assert ids.shape == (3, 32) and bool((ids[:, 0] == dm.cache.manifest["bos_token_id"]).all())
    lm, _ = load_model(cache_cfg.model)
    with torch.no_grad():
        tc, scales = module.transcoder, (module.in_scale, module.out_scale)
        m = replacement_metrics(lm, tc, *scales, ids, 2, include_bos=True)
    assert m["ce_spliced"] == pytest.approx(m["ce_zero_ablated"], rel=1e-5)
    assert abs(m["ce_recovered"]) < 1e-3
    assert m["kl"] >= 0 and 0 <= m["agreement"] <= 1


def test_splice_keeps_bos_mlp_outputs(cache_cfg):
    # The cache leaves BOS rows out, so the transcoders never saw them: position 0 keeps the
    # clean model's MLP outputs, every other position gets the reconstruction.
    from wiremap.models.hooks import capture
    from wiremap.models.loading import load_model
    from wiremap.train.callbacks import spliced_mlp_outputs

    dm = make_dm(cache_cfg, val_fraction=0.2)
    module = make_module(dm, activation="relu")
    with torch.no_grad():
        for p in module.transcoder.parameters():
            p.zero_()
    ids = heldout_contexts(dm.cache, dm.n_train, 2)
    lm, _ = load_model(cache_cfg.model)
    with torch.no_grad():
        with capture(lm, ["mlp_out"]) as clean:
            lm(ids)
        out = spliced_mlp_outputs(lm, module.transcoder, module.in_scale, module.out_scale, ids)
    for layer, value in out.items():
        torch.testing.assert_close(value[:, 0], clean["mlp_out"][layer][:, 0])
        assert bool((value[:, 1:] == 0).all())
        assert clean["mlp_out"][layer][:, 0].abs().max() > 0
    args = (lm, module.transcoder, module.in_scale, module.out_scale, ids)
    with torch.no_grad():
        spliced = spliced_mlp_outputs(*args, include_bos=True)  # BOS reconstructed too
        with pytest.warns(DeprecationWarning, match="keep_bos"):
            old = spliced_mlp_outputs(*args, keep_bos=False)  # the old, negated spelling
    for layer, value in spliced.items():
        assert bool((value == 0).all()) and torch.equal(old[layer], value)


def test_cli_run_exports_and_logs_fvu_l0_to_wandb_offline(cache_cfg, tmp_path, monkeypatch):
    from wiremap.train.train_cmd import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    settings = {
        "run.name": "t", "run.logger": "wandb", "run.replacement_every": 2,
        "run.replacement_contexts": 2, "trainer.log_every_n_steps": 2,
        "model.d_transcoder": 32, "data.batch_tokens": 128, "data.val_fraction": 0.1,
        "data.cache.shard_tokens": 1024,
    }  # fmt: skip
    argv = train_argv(cache_cfg, tmp_path, settings)
    assert main(argv) == 0
    run = tmp_path / "t"
    export = run / "transcoders"
    assert (export / "config.yaml").is_file() and (export / "training_config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    logged = wandb_offline_history(run)
    assert {"train/fvu", "train/l0", "val/fvu", "replacement/ce_recovered"} <= logged


def wandb_offline_history(run_dir) -> set[str]:
    """Keys of the history rows in a W&B offline run file (LevelDB-log records of protobufs)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    for _ in range(120):  # wandb's writer process flushes the file shortly after finish()
        records = list(_log_records(open(path, "rb").read()))
        if any(_is_exit(r) for r in records):
            break
        time.sleep(0.5)
    keys: set[str] = set()
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                keys.add(item.key or "/".join(item.nested_key))
                json.loads(item.value_json)
    return keys


def _is_exit(data: bytes) -> bool:
    from wandb.proto import wandb_internal_pb2

    record = wandb_internal_pb2.Record()
    record.ParseFromString(data)
    return record.WhichOneof("record_type") == "exit"


def _log_records(data: bytes, block: int = 32768):
    """Records of a LevelDB-style log: 7-byte file header, 7-byte record headers, 32 KiB blocks."""
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            yield buf
            buf = b""
