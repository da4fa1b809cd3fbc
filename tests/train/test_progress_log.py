"""`wiremap train` without a terminal: one flushed progress line every `run.log_every` steps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from test_train import cache_cfg, make_dm, make_module, trainer  # noqa: F401 (fixture)

from wiremap.train.callbacks import ProgressLog

LINE = re.compile(
    r"step (\d+)/6 \(\d+%\) \| ([\d,]+|-) tok/s \| ETA (\S+) \| loss \S+ \| fvu [\d.]+ \| "
    r"l0 ([\d.]+)/layer, ([\d,]+) total \| dead [\d.]+% \| lr [\d.e+-]+$"
)


def test_train_with_stdout_a_pipe_prints_progress_lines(cache_cfg, tmp_path):  # noqa: F811
    c = cache_cfg
    argv = [
        "--run.name", "t", "--run.root", str(tmp_path), "--run.logger", "none",
        "--run.log_every", "2", "--run.replacement_every", "0", "--trainer.max_steps", "6",
        "--trainer.log_every_n_steps", "5", "--trainer.val_check_interval", "6",
        "--model.arch", "plt", "--model.d_transcoder", "32", "--data.batch_size", "128",
        "--data.cache.model", c.model, "--data.cache.dataset", c.dataset,
        "--data.cache.n_tokens", str(c.n_tokens), "--data.cache.context_length", "32",
        "--data.cache.shard_tokens", "1024", "--data.cache.out", c.out,
    ]  # fmt: skip
    root = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "wiremap.cli", "train", *argv],
        capture_output=True, text=True, env=env, cwd=tmp_path,  # stdout: a pipe, no TTY
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [m for m in map(LINE.match, proc.stdout.splitlines()) if m]
    # every 2 steps, though Lightning itself logs metrics only every 5
    assert [int(m.group(1)) for m in lines] == [2, 4, 6], proc.stdout
    assert lines[-1].group(3) == "0:00:00" and lines[-1].group(2) != "-"
    for m in lines:  # 2 layers: the total is twice the mean per layer
        l0, total = float(m.group(4)), float(m.group(5).replace(",", ""))
        assert abs(total - 2 * l0) <= 0.5 + 1e-6 and l0 > 0
    assert "\r" not in proc.stdout  # no progress bar in a log file


def test_on_a_terminal_the_bar_is_enough(cache_cfg, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    dm = make_dm(cache_cfg)
    module, log = make_module(dm), ProgressLog(every_n_steps=1)
    trainer(tmp_path, 2, [log]).fit(module, datamodule=dm)
    assert not log.enabled and module.progress_every == 0
    assert "tok/s" not in capsys.readouterr().out
