"""`wiremap.fit`: train transcoders from a preset, a config or keyword arguments.

    import wiremap
    result = wiremap.fit("debug-cpu")                      # configs/debug-cpu.yaml
    result = wiremap.fit("configs/gpt2-clt.yaml", max_steps=2000, lr=1e-4)
    result = wiremap.fit(config_dict, trainer={"max_steps": 500}, source="stream")
    result.export, result.metrics                          # exported folder, final metrics

The settings are those of `wiremap train` (a preset's sections `run`, `trainer`, `model`,
`data`, `seed_everything`, plus `ckpt_path`; see `train_cmd.py`), and one LightningCLI parser
checks them whichever way they come:
- `config`: a preset name (`configs/<name>.yaml`), a YAML path, a mapping with the preset's
  sections (e.g. what `wiremap train --print_config` prints, loaded), or a list of command-
  line arguments as `wiremap train` takes them (`wiremap train` is `fit(argv)`);
- keyword arguments override it: a section name takes a mapping merged into that section
  (`trainer={"max_steps": 100}`); any other name is a setting of the outermost section that
  has it (`max_steps` -> trainer, `d_transcoder` -> model, `source` -> data, `lr` ->
  model.optim, `n_tokens` -> data.cache); a name two sections share raises WiremapError.
The data come from an activation cache (`data.source: cache`, the default) or are streamed
from the model (`source="stream"`).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import sys
from argparse import ArgumentError
from collections.abc import Mapping, Sequence
from contextlib import redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wiremap.errors import WiremapError, wiremap_cause

SECTIONS = ("run", "trainer", "model", "data", "seed_everything", "ckpt_path")


@dataclass
class FitResult:
    """What a training run left behind."""

    export: Path
    """The exported transcoders (load with `wiremap.load_transcoders`)."""
    run_dir: Path
    """The run folder: resolved config.yaml, checkpoints, logs."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Final metrics: fvu, l0, l0_total, dead_fraction (and replacement/* when it ran)."""


def fit(
    config: str | Path | Mapping[str, Any] | Sequence[str] | None = None, /, **settings: Any
) -> FitResult:
    """Train transcoders; see the module docstring for `config` and `settings`."""
    from wiremap.train.train_cmd import build_cli

    if isinstance(config, Sequence) and not isinstance(config, str):
        if settings:
            raise WiremapError(
                "give fit() command-line arguments or keyword settings, not both; put the "
                "keywords into the argument list (--trainer.max_steps 100)"
            )
        return train(_parsed(build_cli, list(config)))
    return train(_parsed(build_cli, fit_config(config, settings)))


def _parsed(build_cli, settings: list[str] | dict):
    """`build_cli(settings)`, with the parser's refusal as one WiremapError, not an exit.

    Command-line arguments (`wiremap train`) get the error first, then where the options
    are; settings given to `fit()` get it named as a refused setting.
    """
    tee = _Tee(sys.stderr)  # the parser says why on stderr; keep a copy of it
    try:
        with redirect_stderr(tee):
            return build_cli(settings)
    except ArgumentError as err:
        raise _refused(str(err), settings) from None
    except SystemExit as stop:
        if stop.code in (0, None):  # --help, --print_config
            raise
        said = [line for line in tee.copy.getvalue().splitlines() if line.startswith("error:")]
        reason = said[-1].removeprefix("error:").strip() if said else f"exit status {stop.code}"
        raise _refused(reason, settings) from None
    except Exception as err:  # jsonargparse wraps a config class's own WiremapError
        cause = wiremap_cause(err)
        if cause is None:
            raise
        raise cause from None


def _refused(reason: str, settings: list[str] | dict) -> WiremapError:
    if isinstance(settings, list):
        return WiremapError(f"{reason}. Run `wiremap train --help` for the options")
    return WiremapError(
        f"fit(): the training settings were refused: {reason}; fix that setting "
        "(`wiremap train --help` lists them all)"
    )


class _Tee:
    """A text stream that writes through to `stream` and keeps a copy (progress bars too)."""

    def __init__(self, stream) -> None:
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def train(cli) -> FitResult:
    """Run the instantiated `WiremapCLI` `cli`; the export folder and final metrics."""
    from wiremap.fileio import remove_leftovers
    from wiremap.train.checkpoints import resolve_ckpt_path
    from wiremap.train.train_cmd import as_run, finish_wandb, is_rank_zero, oom_guard

    run = as_run(cli.config_init.run)
    if is_rank_zero():
        for folder in ("checkpoints", "transcoders"):  # what a killed run was writing
            remove_leftovers(run.dir / folder)
    ckpt = resolve_ckpt_path(cli.config.ckpt_path, run.dir / "checkpoints")
    try:
        with oom_guard(cli):
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    finally:
        finish_wandb(cli.trainer)
    return FitResult(export=run.export, run_dir=run.dir, metrics=final_metrics(cli.trainer))


def final_metrics(trainer) -> dict[str, float]:
    """The run's last fvu, l0, l0_total, dead_fraction and replacement/* values (4 digits)."""
    from wiremap.train.callbacks import ReplacementQuality

    keep = {
        "fvu": "fvu",
        "l0": "l0",
        "l0_total": "l0_total",
        "train/dead_fraction": "dead_fraction",
    }
    got = trainer.callback_metrics
    out = {short: round(float(got[k]), 4) for k, short in keep.items() if k in got}
    for callback in trainer.callbacks:
        if isinstance(callback, ReplacementQuality):
            out.update({k: round(float(v), 4) for k, v in callback.last.items()})
    return out


# -- settings --------------------------------------------------------------------------------
def fit_config(config: str | Path | Mapping | Any, settings: Mapping[str, Any]) -> dict:
    """The settings dict the CLI parser checks: `config` with `settings` merged in."""
    if config is None:
        base: dict = {}
    elif isinstance(config, str | Path):
        base = read_yaml(preset_path(config))
    else:  # a mapping, a jsonargparse Namespace
        base = _plain(config)
        if not isinstance(base, dict):
            raise WiremapError(
                f"fit() got a {type(config).__name__} as config; give a preset name or path, "
                "a mapping of sections, or a list of `wiremap train` arguments"
            )
    for key, value in settings.items():
        path = (key,) if key in SECTIONS else setting_path(key)
        _merge(base, path, value)
    return base


def preset_path(name: str | Path) -> Path:
    """A YAML file: `name` itself, or `configs/<name>.yaml` here or in wiremap's checkout."""
    candidates = [Path(name)]
    if Path(name).suffix not in (".yaml", ".yml"):
        here = Path("configs") / f"{name}.yaml"
        candidates += [here, Path(__file__).resolve().parents[2] / here]
    for path in candidates:
        if path.is_file():
            return path
    shipped = sorted(
        p.stem for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")
    )
    raise WiremapError(
        f"no preset {str(name)!r}: not a file, nor configs/{name}.yaml; give a YAML path"
        + (f" or one of {', '.join(shipped)}" if shipped else "")
    )


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise WiremapError(f"preset {path} is not valid YAML ({err}); fix the file") from err
    if not isinstance(obj, dict):
        raise WiremapError(f"preset {path} is not a mapping of sections ({', '.join(SECTIONS)})")
    return obj


def setting_path(name: str) -> tuple[str, ...]:
    """Where keyword `name` goes: the outermost section that has a setting of that name."""
    for level in _setting_levels():
        found = [path for path, names in level.items() if name in names]
        if len(found) > 1:
            where = " and ".join(".".join((*p, name)) for p in found)
            raise WiremapError(
                f"fit({name}=...) is ambiguous: it is {where}; pass it inside its section, "
                f"e.g. {found[0][0]}={{{name!r}: ...}}"
            )
        if found:
            return (*found[0], name)
    raise WiremapError(
        f"fit() has no setting {name!r}; give a section ({', '.join(SECTIONS)}) or a setting "
        "of one (see `wiremap train --help`)"
    )


def _setting_levels() -> list[dict[tuple[str, ...], set[str]]]:
    """Setting names by section, outermost sections first."""
    import lightning as L

    from wiremap.cache import CacheConfig
    from wiremap.train.data import ActivationDataModule
    from wiremap.train.module import LossConfig, OptimConfig, TranscoderModule
    from wiremap.train.train_cmd import RunConfig

    return [
        {
            ("run",): {f.name for f in dataclasses.fields(RunConfig)},
            # wiremap sets the trainer's logger, callbacks and folder from `run`
            ("trainer",): _params(L.Trainer) - {"logger", "callbacks", "default_root_dir"},
            ("model",): _params(TranscoderModule) - {"n_layers", "d_model", "cache_info"},
            ("data",): _params(ActivationDataModule),
        },
        {
            ("model", "optim"): {f.name for f in dataclasses.fields(OptimConfig)},
            ("model", "loss"): {f.name for f in dataclasses.fields(LossConfig)},
            ("data", "cache"): {f.name for f in dataclasses.fields(CacheConfig)},
        },
    ]


def _params(cls) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def _merge(base: dict, path: tuple[str, ...], value: Any) -> None:
    """`value` into `base` at `path`; mappings merge key by key into mappings already there."""
    node = base
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    value, last = _plain(value), path[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        for k, v in value.items():
            _merge(node[last], (k,), v)
    else:
        node[last] = value


def _plain(obj: Any) -> Any:
    """Nested mappings (a jsonargparse Namespace too) as plain dicts; dataclasses as dicts."""
    if hasattr(obj, "as_dict"):
        obj = obj.as_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    return obj
