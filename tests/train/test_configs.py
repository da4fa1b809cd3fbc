"""Every preset in configs/ parses against the current signatures (no model or cache loaded)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from wiremap.cache import CacheConfig
from wiremap.cache.command import read_preset
from wiremap.errors import WiremapError
from wiremap.train.data import ActivationDataModule
from wiremap.train.module import LossConfig, OptimConfig, TranscoderModule
from wiremap.train.train_cmd import WiremapCLI

PRESETS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


class ParseOnly(WiremapCLI):
    """Parse and type-check a config, instantiate nothing."""

    def instantiate_classes(self) -> None:
        pass


def parse(argv: list[str]):
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    cli = ParseOnly(
        TranscoderModule, ActivationDataModule, args=argv, run=False, save_config_callback=None,
        auto_configure_optimizers=False, load_from_checkpoint_support=False,
    )  # fmt: skip
    return cli.config


def test_there_are_presets():
    names = {p.stem for p in PRESETS}
    assert {"gpt2-plt", "gpt2-clt", "llama-3.2-1b-clt", "gemma-2-2b-plt"} <= names
    assert {"qwen3-0.6b-plt", "smollm2-plt", "debug-cpu"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_parses(preset):
    config = parse(["--config", str(preset)])
    written = yaml.safe_load(preset.read_text())["model"]
    assert not {"n_layers", "d_model", "cache_info"} & set(written)  # read from the cache
    assert config.trainer.max_steps > 0
    assert config.model.activation in ("relu", "jumprelu", "topk", "batchtopk")
    if config.model.activation in ("topk", "batchtopk"):
        assert config.model.k and config.model.k <= config.model.d_transcoder
    # schedules are fractions of the run, so a preset fits any max_steps
    optim = OptimConfig(**dict(config.model.optim or {}))
    assert optim.warmup_steps is None and optim.warmup_fraction + optim.decay_fraction <= 1
    if config.model.activation in ("relu", "jumprelu"):  # λ ≈ 1.0 · d_model / 576 (README)
        assert LossConfig(**dict(config.model.loss or {})).sparsity_coef >= 0.1
    # the same file drives `wiremap cache`: its data.cache section is a valid CacheConfig
    cache = CacheConfig(**read_preset(str(preset)))
    assert cache.out == config.data.cache.out and cache.model == config.data.cache.model


def test_max_steps_is_required():
    with pytest.raises(WiremapError, match="max_steps"):
        parse(["--data.cache.model", "m", "--data.cache.dataset", "d", "--trainer.max_steps", "-1"])


def test_a_preset_with_the_old_names_still_loads(tmp_path):
    """`data.batch_size`, `data.cache.batch_size` and `data.cache.exclude_bos` (before
    `batch_tokens`, `batch_contexts`, `include_bos`): accepted for one version, with a warning."""
    preset = yaml.safe_load((Path(__file__).parents[2] / "configs/debug-cpu.yaml").read_text())
    data = preset["data"]
    data["batch_size"] = data.pop("batch_tokens")
    data["cache"].update(batch_size=8, exclude_bos=False)
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(preset))
    config = parse(["--config", str(old)])
    assert config.data.batch_size == 512 and config.data.cache.exclude_bos is False
    with pytest.warns(DeprecationWarning, match="batch_size"):
        cache = CacheConfig(**config.data.cache.as_dict())
        dm = ActivationDataModule(cache, batch_size=config.data.batch_size)
    assert dm.batch_tokens == 512 and cache.batch_contexts == 8 and cache.include_bos is True
    assert CacheConfig(**read_preset(str(old))) == cache  # `wiremap cache --config` reads it so
