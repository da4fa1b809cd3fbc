"""Shared fixtures: offline environment, seeds, tiny models saved to disk and loaded by path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests run tiny models: intra-op threads only add synchronisation overhead there (and on a
# loaded 2-core machine OpenMP threads spinning against each other slow tests 10x or more).
torch.set_num_threads(1)

# tests/ mirrors the package (models/, cache/, train/, attribution/; package-wide tests at the
# top). `helpers.py` and the graph builders some test modules share (test_prune's hand_graph,
# test_viewer_browser's Browser, ...) import by name from any folder, also when one file runs.
HERE = Path(__file__).parent
sys.path[:0] = [str(HERE / d) for d in ("", "models", "cache", "train", "attribution")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir(arch, **kw)` -> path of a tiny random model saved to disk (cached)."""
    from wiremap.models.tiny import build_tiny_model

    built: dict = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def make(arch: str = "llama", **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in built:
            built[key] = build_tiny_model(arch, root / f"{arch}_{len(built)}", **kw)
        return built[key]

    return make


def pytest_terminal_summary(terminalreporter, config):
    """The real-model tier's wall time per step (tests/test_real.py records them)."""
    times = getattr(config, "wiremap_real_times", None)
    if not times:
        return
    terminalreporter.section("real-model tier: wall time per step")
    for step, size, seconds in times:
        terminalreporter.write_line(f"{step:<22} {seconds:7.1f} s   {size}")
