"""`wiremap.fit`: one training function behind `wiremap train`, the demo and the Python API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_cache
from safetensors.torch import load_file

import wiremap
from wiremap.cache import CacheConfig
from wiremap.errors import WiremapError
from wiremap.train import fit as fit_mod


@pytest.fixture(scope="module")
def cache_cfg(tiny_model_dir, tmp_path_factory) -> CacheConfig:
    model = tiny_model_dir("llama", d_model=16)
    return tiny_cache(
        model, tmp_path_factory.mktemp("fit_cache"), 60, 3, n_tokens=1200, shard_tokens=512
    )


def cli_args(c: CacheConfig, root: Path, name: str) -> list[str]:
    return [
        "--run.name", name, "--run.root", str(root), "--run.logger", "none",
        "--run.replacement_every", "0", "--run.checkpoint_every", "0", "--run.log_every", "0",
        "--trainer.max_steps", "6", "--trainer.enable_progress_bar", "false",
        "--trainer.precision", "32-true", "--trainer.accelerator", "cpu",
        "--model.arch", "clt", "--model.d_transcoder", "24", "--model.optim.lr", "3e-3",
        "--data.batch_tokens", "128", "--data.buffer_size", "512", "--data.val_fraction", "0",
        "--data.pin_memory", "false", "--trainer.limit_val_batches", "0",
        "--trainer.log_every_n_steps", "3",
        "--data.cache.model", c.model, "--data.cache.dataset", c.dataset,
        "--data.cache.n_tokens", str(c.n_tokens), "--data.cache.context_length", "32",
        "--data.cache.shard_tokens", "512", "--data.cache.out", c.out,
    ]  # fmt: skip


def fit_kwargs(c: CacheConfig, root: Path, name: str) -> dict:
    """The settings of `cli_args`, as keyword arguments (sections and plain names mixed)."""
    return dict(
        run={"name": name, "root": str(root), "logger": "none", "log_every": 0},
        replacement_every=0, checkpoint_every=0, max_steps=6, enable_progress_bar=False,
        precision="32-true", accelerator="cpu", arch="clt", d_transcoder=24, lr=3e-3,
        batch_tokens=128, buffer_size=512, val_fraction=0.0, pin_memory=False,
        limit_val_batches=0, log_every_n_steps=3, data={"cache": c},
    )  # fmt: skip


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    return out


def test_wiremap_train_and_fit_export_the_same_transcoders(cache_cfg, tmp_path):
    from wiremap.train.train_cmd import main

    assert main(cli_args(cache_cfg, tmp_path, "cli")) == 0
    result = wiremap.fit(**fit_kwargs(cache_cfg, tmp_path, "api"))
    assert result.export == tmp_path / "api" / "transcoders" and result.run_dir == tmp_path / "api"
    a, b = tensors(tmp_path / "cli" / "transcoders"), tensors(result.export)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert {"fvu", "l0", "l0_total"} <= result.metrics.keys()
    assert 0 < result.metrics["fvu"] < 2
    assert not (tmp_path / "api" / "checkpoints").exists()  # checkpoint_every=0: none
    # the same settings given as command-line arguments to fit
    again = wiremap.fit(cli_args(cache_cfg, tmp_path, "argv"))
    assert all(torch.equal(v, tensors(again.export)[k]) for k, v in a.items())


def test_fit_streams_and_exports_where_asked(cache_cfg, tmp_path):
    kw = fit_kwargs(cache_cfg, tmp_path, "stream")
    kw.update(source="stream", max_steps=2, export_dir=str(tmp_path / "out"))
    result = wiremap.fit(**kw)
    assert result.export == tmp_path / "out"
    assert (result.export / "config.yaml").is_file()
    assert wiremap.load_transcoders(result.export).n_layers == 2


def test_keywords_go_to_the_outermost_section_that_has_them():
    cfg = fit_mod.fit_config(
        {"trainer": {"max_steps": 5, "precision": "32-true"}},
        {"max_steps": 7, "lr": 1e-3, "n_tokens": 99, "source": "stream", "trainer": {"devices": 1}},
    )
    assert cfg["trainer"] == {"max_steps": 7, "precision": "32-true", "devices": 1}
    assert cfg["model"] == {"optim": {"lr": 1e-3}}
    assert cfg["data"] == {"cache": {"n_tokens": 99}, "source": "stream"}
    assert fit_mod.setting_path("batch_tokens") == ("data", "batch_tokens")
    assert fit_mod.setting_path("batch_contexts") == ("data", "cache", "batch_contexts")
    from jsonargparse import Namespace

    as_namespace = fit_mod.fit_config(Namespace(trainer=Namespace(max_steps=2)), {"devices": 1})
    assert as_namespace == {"trainer": {"max_steps": 2, "devices": 1}}
    with pytest.raises(WiremapError, match="no setting 'max_step'"):
        fit_mod.fit_config(None, {"max_step": 3})


def test_a_name_two_sections_share_is_refused(monkeypatch):
    levels = [{("run",): {"seed"}, ("data",): {"seed"}}]
    monkeypatch.setattr(fit_mod, "_setting_levels", lambda: levels)
    with pytest.raises(WiremapError, match="ambiguous: it is run.seed and data.seed"):
        fit_mod.setting_path("seed")


def test_presets_by_name_or_path(tmp_path):
    assert fit_mod.preset_path("debug-cpu").name == "debug-cpu.yaml"
    cfg = fit_mod.fit_config("debug-cpu", {"max_steps": 3})
    assert cfg["trainer"]["max_steps"] == 3 and cfg["model"]["arch"] == "clt"
    with pytest.raises(WiremapError, match="no preset 'nope'.*debug-cpu"):
        fit_mod.preset_path("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(WiremapError, match="not a mapping"):
        fit_mod.fit_config(bad, {})
    with pytest.raises(WiremapError, match="refused: .*'max_stepz'"):
        wiremap.fit("debug-cpu", trainer={"max_stepz": 1})
    with pytest.raises(WiremapError, match="not both"):
        wiremap.fit(["--trainer.max_steps", "3"], max_steps=4)
