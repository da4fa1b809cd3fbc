"""`wiremap train`: train transcoders on a cached activation dataset (`wiremap.fit`).

    wiremap cache --config configs/gpt2-clt.yaml          # once: the activations
    wiremap train --config configs/gpt2-clt.yaml          # then: the transcoders
    wiremap train --config configs/gpt2-clt.yaml --trainer.max_steps 2000 --model.optim.lr 1e-4
    wiremap train --config configs/gpt2-clt.yaml --ckpt_path last          # resume
    wiremap train --config configs/gpt2-clt.yaml --trainer.strategy ddp --trainer.devices 8
    wiremap train --config configs/gpt2-clt.yaml --print_config             # resolved config

A preset has five sections: `run` (name, folder, logging, checkpoints, callbacks: see
`RunConfig`), `trainer` (any `lightning.Trainer` argument), `model` (`TranscoderModule`),
`data` (`ActivationDataModule`, whose `cache` section is the `wiremap cache` config) and
`seed_everything`. `model.n_layers`, `model.d_model` and `model.cache_info` are read from
the cache manifest (with `data.source: stream`, from the model), never written in a preset.

Everything a run writes goes to `<run.root>/<run.name>/`: `config.yaml` (the resolved
config), `checkpoints/` (Lightning .ckpt for resuming; `last.ckpt` too), the logger's files
and, at the end, `transcoders/` (the export, with `training_config.yaml` beside it; or
`run.export_dir`). `main` is `wiremap.fit(argv)`; this module holds the LightningCLI it
parses the settings with, the run section and the callbacks.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from argparse import ArgumentError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from wiremap.commands import UsageError, one_line, underscored
from wiremap.errors import WiremapError, oom_to_error
from wiremap.train.callbacks import (
    ExportTranscoders,
    NanGuard,
    ProgressLog,
    ReplacementQuality,
    ReuseHostMemory,
    Throughput,
)
from wiremap.train.checkpoints import AtomicCheckpointIO
from wiremap.train.data import ActivationDataModule
from wiremap.train.module import TranscoderModule


@dataclass
class RunConfig:
    """Where a run writes, how it logs, and how often the callbacks run."""

    name: str = "transcoders"
    """Run name: the run folder is `<root>/<name>` and the W&B run name."""
    root: str = "runs"
    """Folder holding the runs."""
    logger: Literal["wandb", "csv", "none"] = "wandb"
    """Where metrics go; `wandb` runs offline when no W&B credentials are configured."""
    wandb_project: str = "wiremap"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (team or user); None = your default."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    offline: bool | None = None
    """Force W&B offline (True) or online (False); None = online only with credentials."""
    upload_artifact: bool = False
    """Upload the exported transcoders as a W&B artifact at the end."""
    checkpoint_every: int = 1000
    """Save a checkpoint (for --ckpt_path) every this many steps (0 = no checkpoints)."""
    replacement_every: int = 1000
    """Splice the transcoders into the LM and log CE/KL every this many steps (0 = off)."""
    replacement_contexts: int = 16
    """Held-out contexts for the replacement check."""
    throughput_every: int = 50
    """Log tokens/s every this many steps."""
    log_every: int = 50
    """When stdout is not a terminal (nohup, SLURM, a pipe), print a progress line every this
    many steps: step/total, tokens/s, ETA, loss, FVU, L0, dead share, lr (0 = never)."""
    reuse_host_memory: bool = True
    """On CPU, keep freed memory for the next step instead of returning it to the OS
    (faster steps; the process keeps its peak memory)."""

    export_dir: str | None = None
    """Where the transcoders are exported at the end; None = `<root>/<name>/transcoders`."""

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name

    @property
    def export(self) -> Path:
        return Path(self.export_dir) if self.export_dir else self.dir / "transcoders"


def default_precision() -> str:
    """`bf16-mixed` on a GPU that supports bf16, else `32-true`."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def wandb_has_credentials() -> bool:
    """True when an API key is configured (env, ~/.netrc or wandb's settings)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return True
    try:
        import wandb

        return bool(wandb.api.api_key)
    except Exception:  # no settings file, no key: treat as not logged in
        return False


# settings that count something: a whole number of at least 1 (the batch size under either name)
COUNTS = ("model.d_transcoder", "model.k", "data.batch_size", "data.batch_tokens")


class WiremapCLI(LightningCLI):
    """LightningCLI with a `run` section, cache-linked dimensions and wiremap's callbacks."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunConfig, "run")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="checkpoint to resume from (a .ckpt path, or `last`)")  # fmt: skip
        for key in ("n_layers", "d_model", "cache_info"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        steps = self.config.trainer.max_steps
        if steps is None or steps <= 0:
            raise WiremapError(
                "set trainer.max_steps (the data stream is endless), e.g. --trainer.max_steps 10000"
            )
        for key in COUNTS:  # refused here, not as a negative tensor size deep in torch
            value = self.config.get(key)
            if isinstance(value, int) and value < 1:
                problem = f"{key} {value}: give a whole number of at least 1"
                raise UsageError("wiremap train", problem)

    def instantiate_trainer(self, **kwargs: Any):
        run = as_run(self.config_init.run)
        trainer_cfg = self.config_init.trainer
        logger, run = _logger(trainer_cfg.get("logger"), run)
        _warn_root_dir(trainer_cfg.get("default_root_dir"), run)
        os.makedirs(run.dir, exist_ok=True)
        config_path = run.dir / "config.yaml"
        if is_rank_zero():
            self.parser.save(self.config, config_path, overwrite=True, skip_check=True)
        callbacks = list(trainer_cfg.get("callbacks") or [])
        callbacks += wiremap_callbacks(run, config_path)
        if run.checkpoint_every <= 0:
            kwargs["enable_checkpointing"] = False
        return super().instantiate_trainer(
            callbacks=callbacks, logger=logger, default_root_dir=str(run.dir),
            plugins=_plugins(trainer_cfg.get("plugins")), **kwargs,
        )  # fmt: skip


def _logger(given, run: RunConfig):
    """`--trainer.logger false` means no logger (as `run.logger none`); a logger given under
    `trainer.logger` is used as given; otherwise `run.logger` decides."""
    if given is False:
        return False, dataclasses.replace(run, logger="none")
    if given is None or given is True:
        return make_logger(run), run
    return given, run


def _warn_root_dir(root, run: RunConfig) -> None:
    if root is not None and Path(root) != run.dir:
        print(
            f"wiremap train: trainer.default_root_dir {root!r} is not used: a run writes "
            f"everything to <run.root>/<run.name> ({run.dir}); set --run.root / --run.name instead",
            file=sys.stderr,
        )


def _plugins(given) -> list:
    """The user's plugins, plus atomic checkpoint writes unless they bring a CheckpointIO."""
    from lightning.pytorch.plugins.io import CheckpointIO

    plugins = list(given) if isinstance(given, list | tuple) else [] if given is None else [given]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def as_run(value) -> RunConfig:
    if isinstance(value, RunConfig):
        return value
    return RunConfig(**dict(value))


def wiremap_callbacks(run: RunConfig, config_path: Path) -> list:
    """The callbacks every `wiremap train` run has, in the order they must run."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    callbacks = [NanGuard(), Throughput(run.throughput_every), ProgressLog(run.log_every)]
    if run.reuse_host_memory:
        callbacks.append(ReuseHostMemory())
    if run.logger != "none":
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if run.replacement_every > 0:
        callbacks.append(ReplacementQuality(run.replacement_every, run.replacement_contexts))
    if run.checkpoint_every > 0:
        callbacks.append(
            ModelCheckpoint(
                dirpath=run.dir / "checkpoints",
                filename="{step}",
                every_n_train_steps=run.checkpoint_every,
                save_top_k=1,
                save_last=True,
            )
        )
    callbacks.append(ExportTranscoders(run.export, config_path, run.upload_artifact))
    return callbacks


def make_logger(run: RunConfig):
    """W&B (offline without credentials), CSV, or nothing."""
    if run.logger == "none":
        return False
    if run.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run.dir), name="csv")
    from lightning.pytorch.loggers import WandbLogger

    offline = (not wandb_has_credentials()) if run.offline is None else run.offline
    return WandbLogger(
        project=run.wandb_project,
        entity=run.wandb_entity,
        name=run.name,
        tags=list(run.tags) or None,
        save_dir=str(run.dir),
        offline=offline,
    )


def build_cli(argv: list[str] | dict, **kwargs: Any) -> WiremapCLI:
    """Parse `argv` and instantiate everything (no training); used by `main` and tests.

    Option names may be dashed (`--ckpt-path`, `--trainer.max-steps`); a refusal is one
    line (`ArgumentError`), which `wiremap.fit` reports with the pointer to `--help`.
    """
    try:
        return _cli(underscored(argv) if isinstance(argv, list) else argv, **kwargs)
    except ArgumentError as err:
        raise ArgumentError(None, one_line(str(err))) from None


def _cli(argv: list[str] | dict, **kwargs: Any) -> WiremapCLI:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        return WiremapCLI(
            TranscoderModule,
            ActivationDataModule,
            args=argv,
            run=False,
            save_config_callback=None,
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
            seed_everything_default=0,
            trainer_defaults=trainer_defaults(),
            parser_kwargs={
                "prog": "wiremap train",
                "description": __doc__.split("\n")[0],
                "exit_on_error": False,  # main() prints the error first, not 90 lines of usage
            },
            **kwargs,
        )


def trainer_defaults() -> dict[str, Any]:
    return {
        "precision": default_precision(),
        # a bar only where someone watches; elsewhere ProgressLog prints plain lines
        "enable_progress_bar": sys.stdout.isatty(),
        "max_steps": 10_000,
        "gradient_clip_val": 1.0,
        "log_every_n_steps": 50,
        "val_check_interval": 1000,
        "check_val_every_n_epoch": None,
        "limit_val_batches": 20,
        "num_sanity_val_steps": 0,
    }


def main(argv: list[str]) -> int:
    from wiremap.train.fit import fit

    fit(argv)  # the same function as `wiremap.fit`
    return 0


def oom_guard(cli):
    """Out of memory while training: the sizes that drive memory and the settings to lower."""
    module, dm = cli.model, cli.datamodule
    n_params = sum(p.numel() for p in module.parameters())
    d_tc = module.transcoder.d_transcoder
    figures = (
        f"{n_params / 1e6:,.1f}M parameters ({n_params * 16 / 1e9:.2f} GB with gradients and "
        f"Adam state in fp32), batch_tokens={dm.batch_tokens}, d_transcoder={d_tc}"
    )
    fix = (
        f"lower --data.batch_tokens (now {dm.batch_tokens}) or --model.d_transcoder (now {d_tc}), "
        "or train on a larger device; resume with --ckpt_path last"
    )
    return oom_to_error("training", figures, fix)


def finish_wandb(trainer) -> None:
    """Close the W&B run so that everything logged is flushed to disk (or the server)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
