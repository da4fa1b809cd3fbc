"""kill -9 at several moments of `wiremap cache`, `wiremap train` (cached and streamed) and
`wiremap features`; the same command run again finishes with what an uninterrupted run gives:
byte-identical shards, exported tensors and feature cards.

Each killed run is a real subprocess. A small wrapper slows the moments worth hitting (file
writes, training steps, the feature scan) so that a poll of the output folder can land a
SIGKILL inside them; the reruns and the uninterrupted references run in this process, with
the same single thread (float results, and so bytes, depend on the thread count).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from wiremap.cache import ActivationCache, CacheConfig, build_cache
from wiremap.cli import main as wiremap_main
from wiremap.errors import WiremapError
from wiremap.models.tiny import sample_corpus

# Test hooks of the killed runs, chosen by WIREMAP_KILL_SLOW (comma-separated).
_WRAPPER = """
import os, sys, time
slow = set(os.environ.get("WIREMAP_KILL_SLOW", "").split(","))
if "write" in slow:  # every atomic write stops half-way for a while
    import wiremap.fileio as fileio

    def slow_write(f, data):
        f.write(bytes(data[: len(data) // 2])); f.flush(); time.sleep(0.3)
        f.write(bytes(data[len(data) // 2 :]))

    fileio.write_all = slow_write
if "step" in slow:
    from wiremap.train.module import TranscoderModule

    step = TranscoderModule.training_step

    def slow_step(self, batch, batch_idx):
        time.sleep(0.15)
        return step(self, batch, batch_idx)

    TranscoderModule.training_step = slow_step
if "features" in slow:
    import wiremap.attribution.features as features

    scan, write = features.scan_cache, features.write_layer

    def slow_scan(*args, **kw):
        open(os.environ["WIREMAP_KILL_MARK"], "w").close(); time.sleep(1.0)
        return scan(*args, **kw)

    def slow_layer(*args, **kw):
        entry = write(*args, **kw); time.sleep(1.0)
        return entry

    features.scan_cache, features.write_layer = slow_scan, slow_layer
from wiremap.cli import main
sys.exit(main(sys.argv[1:]))
"""


def kill_at(argv: list[str], moment: Callable[[], bool], slow: str, tmp: Path) -> None:
    """Run `wiremap argv` in a subprocess and SIGKILL it as soon as `moment()` holds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "WIREMAP_KILL_SLOW": slow, "WIREMAP_KILL_MARK": str(tmp / "mark")}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 240
    try:
        while not moment():
            if proc.poll() is not None:
                raise AssertionError(
                    f"the run ended before the moment: {proc.stderr.read()[-2000:]}"
                )
            assert time.time() < deadline, "the moment never came"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def files(folder: Path, pattern: str = "*") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob(pattern)) if p.is_file()}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export by file and name (file bytes differ: safetensors writes the
    metadata mapping in a per-process hash order)."""
    from safetensors.torch import load_file

    return {f"{p.name}:{k}": v for p in sorted(folder.glob("*.safetensors"))
            for k, v in load_file(str(p)).items()}  # fmt: skip


def leftovers(folder: Path) -> list[Path]:
    return list(Path(folder).rglob(".*.tmp"))


# -- wiremap cache -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(sample_corpus(80, seed=4)))
    model = str(tiny_model_dir("llama", d_model=16))
    cfg = CacheConfig(model=model, dataset=str(corpus), n_tokens=640, context_length=32,
                      batch_size=4, shard_tokens=128, device="cpu",
                      out=str(root / "cache"))  # fmt: skip
    build_cache(cfg, progress=False)
    return cfg, root


def cache_argv(cfg: CacheConfig, out: Path) -> list[str]:
    return ["cache", "--model", cfg.model, "--dataset", cfg.dataset, "--out", str(out),
            "--n-tokens", str(cfg.n_tokens), "--context-length", "32", "--batch-contexts", "4",
            "--shard-tokens", "128", "--device", "cpu", "--quiet"]  # fmt: skip


def entries(path: Path, key: str) -> int:
    """How many entries `key` of the JSON file `path` lists; -1 while it is missing or torn."""
    try:
        return len(json.loads(path.read_text())[key])
    except (OSError, ValueError, KeyError):
        return -1


def listed(out: Path) -> int:
    return entries(out / "manifest.json", "shards")


CACHE_MOMENTS = {
    "claimed": lambda out: listed(out) == 0,  # the manifest exists, no shard yet
    "mid-shard": lambda out: listed(out) >= 1 and any(out.glob(".shard_*.tmp")),
    "mid-manifest": lambda out: listed(out) >= 2 and any(out.glob(".manifest.json.*.tmp")),
    "late": lambda out: listed(out) >= 4,
}


@pytest.mark.parametrize("moment", CACHE_MOMENTS)
def test_cache_killed_then_rerun_is_byte_identical(setup, tmp_path, moment):
    cfg, _ = setup
    out = tmp_path / "c"
    kill_at(cache_argv(cfg, out), lambda: CACHE_MOMENTS[moment](out), "write", tmp_path)
    with pytest.raises(WiremapError, match="incomplete"):
        ActivationCache(out)
    assert wiremap_main(cache_argv(cfg, out)) == 0
    assert files(out) == files(Path(cfg.out)) and not leftovers(out)


# -- wiremap train -------------------------------------------------------------------------
def train_argv(cfg: CacheConfig, root: Path, *extra: str) -> list[str]:
    return [
        "train", "--run.name", "r", "--run.root", str(root), "--run.logger", "none",
        "--run.checkpoint_every", "2", "--run.replacement_every", "0",
        "--trainer.max_steps", "8", "--trainer.enable_progress_bar", "false",
        "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1",
        "--model.arch", "clt", "--model.d_transcoder", "24", "--model.activation", "jumprelu",
        "--data.batch_size", "64", "--data.buffer_size", "256", "--data.cache.model", cfg.model,
        "--data.cache.dataset", cfg.dataset, "--data.cache.n_tokens", str(cfg.n_tokens),
        "--data.cache.context_length", "32", "--data.cache.batch_size", "4",
        "--data.cache.shard_tokens", "128", "--data.cache.out", cfg.out, *extra,
    ]  # fmt: skip


STREAM = ("--data.source", "stream", "--data.val_contexts", "4", "--data.norm_tokens", "256")


@pytest.fixture(scope="module")
def references(setup, tmp_path_factory):
    """The uninterrupted runs' exported files, per data source."""
    cfg, _ = setup
    made = {}
    for source, extra in (("cache", ()), ("stream", STREAM)):
        root = tmp_path_factory.mktemp(f"train_{source}")
        assert wiremap_main(train_argv(cfg, root, *extra)) == 0
        made[source] = tensors(root / "r" / "transcoders")
    return made


def _ckpts(root: Path) -> Path:
    return root / "r" / "checkpoints"


TRAIN_MOMENTS = {
    "after-checkpoint": lambda root: (_ckpts(root) / "last.ckpt").is_file(),
    "mid-checkpoint": lambda root: (
        (_ckpts(root) / "last.ckpt").is_file() and any(_ckpts(root).glob(".*.tmp"))
    ),
    "mid-export": lambda root: any((root / "r" / "transcoders").glob(".checksums.json.*.tmp")),
}
CASES = [("cache", m) for m in TRAIN_MOMENTS] + [("stream", "mid-checkpoint")]


@pytest.mark.parametrize("source, moment", CASES)
def test_train_killed_then_resumed_exports_what_the_uninterrupted_run_does(
    setup, references, tmp_path, source, moment
):
    cfg, _ = setup
    extra = STREAM if source == "stream" else ()
    argv = train_argv(cfg, tmp_path, *extra)
    kill_at(argv, lambda: TRAIN_MOMENTS[moment](tmp_path), "write,step", tmp_path)
    assert not (tmp_path / "r" / "transcoders" / "config.yaml").exists()  # unfinished export
    assert wiremap_main([*argv, "--ckpt_path", "last"]) == 0
    export = tmp_path / "r" / "transcoders"
    got, want = tensors(export), references[source]
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)  # bitwise
    assert not leftovers(tmp_path)
    from wiremap.models.formats import load_transcoders

    load_transcoders(export)  # checksums.json matches what was written


# -- wiremap features ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def export(setup):
    from wiremap.models.formats import save_transcoders
    from wiremap.models.transcoders import build_transcoder

    cfg, root = setup
    torch.manual_seed(0)
    tc = build_transcoder("plt", n_layers=2, d_model=16, d_transcoder=12, model_name=cfg.model)
    with torch.no_grad():
        tc.b_enc.copy_(torch.linspace(-1.0, 0.3, 12).expand(2, 12))
    folder = save_transcoders(tc, root / "tc")
    out = root / "features_ref"
    assert wiremap_main(features_argv(cfg, folder, out)) == 0
    return folder, files(out)


def features_argv(cfg: CacheConfig, tc: Path, out: Path) -> list[str]:
    return ["features", "--cache", cfg.out, "--transcoders", str(tc), "--out", str(out),
            "--top-k", "3", "--n-samples", "4", "--context", "6", "--n-logits", "3"]  # fmt: skip


def layers_done(out: Path) -> int:
    return entries(out / ".progress.json", "layers")


# moment -> (when to kill, whether the rerun scans again, the layers it computes again)
FEATURE_MOMENTS = {
    "scanning": (lambda out, mark: mark.exists(), True, [0, 1]),
    "scanned": (lambda out, mark: layers_done(out) == 0, False, [0, 1]),
    "between-layers": (lambda out, mark: layers_done(out) == 1, False, [1]),
}


@pytest.mark.parametrize("moment", FEATURE_MOMENTS)
def test_features_killed_then_rerun_continues_to_the_same_cards(
    setup, export, tmp_path, moment, monkeypatch
):
    import wiremap.attribution.features as features

    cfg, _ = setup
    tc, reference = export
    out = tmp_path / "f"
    argv = features_argv(cfg, tc, out)
    when, rescans, recomputed = FEATURE_MOMENTS[moment]
    kill_at(argv, lambda: when(out, tmp_path / "mark"), "features", tmp_path)
    with pytest.raises(WiremapError, match="no feature cards"):
        features.FeatureStore(out)  # no index yet: the half-done folder never passes for whole
    # what a kill in the middle of writing a layer leaves (the moments above miss it at times)
    (out / ".layer_1.jsonl.gz.killed.tmp").write_bytes(b"half a layer")

    scans, computed = [], []
    scan, cards = features.scan_cache, features.layer_cards
    monkeypatch.setattr(features, "scan_cache", lambda *a: scans.append(1) or scan(*a))
    monkeypatch.setattr(features, "layer_cards",
                        lambda *a: computed.append(a[4]) or cards(*a))  # fmt: skip
    assert wiremap_main(argv) == 0
    assert files(out) == reference and not leftovers(out)  # progress files removed too
    assert bool(scans) == rescans and computed == recomputed


# -- a viewer save -------------------------------------------------------------------------
_SAVER = """
import json, sys, time
from pathlib import Path
import wiremap.fileio as fileio
from wiremap.attribution.viewer.graphfile import write_graph

dump = json.dumps

def slow_dump(obj, f, **kw):  # the viewer's writer, stopped half-way
    text = dump(obj, **kw); f.write(text[: len(text) // 2]); f.flush(); time.sleep(0.3)
    f.write(text[len(text) // 2 :])

def slow_write(f, data):  # the same, should it write through wiremap.fileio
    f.write(bytes(data[: len(data) // 2])); f.flush(); time.sleep(0.3)
    f.write(bytes(data[len(data) // 2 :]))

json.dump, fileio.write_all = slow_dump, slow_write
path = Path(sys.argv[1])
for version in range(1, 1000):
    graph = json.loads(path.read_text())
    graph["metadata"]["version"] = version
    write_graph(path, graph)
"""


def test_viewer_save_killed_mid_write_leaves_the_old_or_the_new_graph(tmp_path):
    path = tmp_path / "g.json"
    nodes = [{"node_id": f"{i}_0_0", "feature_type": "cross layer transcoder"} for i in range(2000)]
    path.write_text(json.dumps({"metadata": {"version": 0}, "qParams": {}, "nodes": nodes,
                                "links": []}))  # fmt: skip
    for n_saves in (0, 2):  # inside the first save, and inside a later one
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)])
        deadline = time.time() + 120
        try:
            while not (any(tmp_path.glob(".*.tmp")) and _version(path) >= n_saves):
                assert proc.poll() is None and time.time() < deadline
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
        graph = json.loads(path.read_text())  # whole: the old version or the new one
        assert graph["nodes"] == nodes and graph["metadata"]["version"] >= n_saves
        for leftover in tmp_path.glob(".*.tmp"):
            leftover.unlink()


def _version(path: Path) -> int:
    try:
        return json.loads(path.read_text())["metadata"]["version"]
    except (OSError, ValueError, KeyError):
        return -1
