"""Every failure a user can cause is one WiremapError naming the cause and the fix; nothing
half-written looks whole. One test (or a few) per class of failure: corruption, memory,
disk, bad input, checkpoints."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_cache, train_argv

import wiremap.checksums as checksums
import wiremap.fileio as fileio
from wiremap.cache import ActivationCache, CacheConfig, build_cache
from wiremap.cli import main as wiremap_main
from wiremap.errors import WiremapError, disk_error
from wiremap.models.io import load_transcoders, save_transcoders
from wiremap.models.transcoders import build_transcoder

ALLOCATOR = "[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried to allocate 98819660140 bytes"  # noqa: E501


@pytest.fixture(scope="module")
def cache_cfg(tiny_model_dir, tmp_path_factory) -> CacheConfig:
    model = tiny_model_dir("llama", d_model=16)
    return tiny_cache(
        model,
        tmp_path_factory.mktemp("failures"),
        60,
        3,
        n_tokens=600,
        batch_contexts=4,
        shard_tokens=256,
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("shard_*.safetensors"))}


def _flip(path: Path, at: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


# -- corruption ----------------------------------------------------------------------------
def test_flipped_byte_mid_shard_is_caught_on_first_read_and_a_rerun_repairs(cache_cfg, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache_cfg.out, copy)
    _flip(copy / "shard_00001.safetensors")
    cache = ActivationCache(copy)  # cheap: sizes only
    x, _ = cache.get(slice(0, 10))  # shard 0 is intact
    assert x.shape[0] == 10
    cache._ahead.join()  # opening shard 0 hashed shard 1 in the background
    ahead = str((copy / "shard_00001.safetensors").resolve())
    assert any(key[0] == ahead for key in checksums._verified)
    with pytest.raises(WiremapError, match=r"shard_00001.*corrupt.*Delete.*wiremap cache"):
        cache.get(slice(300, 310))

    (copy / "shard_00001.safetensors").unlink()  # the fix the message gives
    cfg = CacheConfig(**{**cache_cfg.__dict__, "out": str(copy)})
    build_cache(cfg, progress=False)
    assert _files(copy) == _files(Path(cache_cfg.out))
    ActivationCache(copy).get(slice(300, 310))


def test_training_on_a_corrupt_shard_stops_with_the_shard_named(cache_cfg, tmp_path):
    from wiremap.train.data import ActivationDataModule

    copy = tmp_path / "cache"
    shutil.copytree(cache_cfg.out, copy)
    _flip(copy / "shard_00000.safetensors", at=0.9)
    cfg = CacheConfig(**{**cache_cfg.__dict__, "out": str(copy)})
    dm = ActivationDataModule(cfg, batch_tokens=64, buffer_size=256)
    with pytest.raises(WiremapError, match="shard_00000.safetensors is corrupt"):
        dm.setup("fit")
        next(iter(dm.train_dataloader()))


def test_exports_carry_checksums_that_loading_verifies(tmp_path):
    for arch in ("clt", "plt"):
        folder = tmp_path / arch
        save_transcoders(build_transcoder(arch, 2, 8, 12), folder)
        sums = json.loads((folder / "checksums.json").read_text())["sha256"]
        assert sorted(sums) == sorted(p.name for p in folder.glob("*.safetensors"))
        load_transcoders(folder)
        name = "W_enc_0.safetensors" if arch == "clt" else "layer_1.safetensors"
        _flip(folder / name, at=0.8)  # inside the weights: the file still parses
        with pytest.raises(WiremapError, match=rf"{name} is corrupt.*export .* again"):
            load_transcoders(folder)
        (folder / "checksums.json").unlink()  # an older export, or a foreign layout
        load_transcoders(folder)


def test_saved_graph_truncated_or_not_json_is_named(tmp_path):
    from test_graph import make_graph

    from wiremap.attribution.graph import Graph

    base = make_graph().save(tmp_path / "g")
    tensors = base.with_name("g.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-40])
    with pytest.raises(WiremapError, match="g.safetensors is damaged.*attribution again"):
        Graph.load(base)
    meta = base.with_name("g.meta.json")
    meta.write_text(meta.read_text()[:30])
    with pytest.raises(WiremapError, match="g.meta.json is truncated or not JSON"):
        Graph.load(base)


def test_truncated_graph_json_is_refused_by_the_viewer(tmp_path):
    from wiremap.attribution.viewer.graphfile import ViewerError, read_graph

    path = tmp_path / "g.json"
    path.write_text('{"metadata": {"slug": "x"}, "nodes": [{"node_id": "a"')
    with pytest.raises(ViewerError, match="not valid JSON"):
        read_graph(path)


# -- memory --------------------------------------------------------------------------------
def test_out_of_memory_while_caching_names_the_batch_and_the_flags(
    cache_cfg, tmp_path, monkeypatch
):
    import wiremap.cache.build as cache_mod

    def no_memory(model, ids):
        raise RuntimeError(ALLOCATOR)

    monkeypatch.setattr(cache_mod, "_forward", no_memory)
    cfg = CacheConfig(**{**cache_cfg.__dict__, "out": str(tmp_path / "c")})
    with pytest.raises(
        WiremapError, match=r"caching ran out of memory.*4 contexts.*--batch-contexts"
    ):
        build_cache(cfg, progress=False)


def test_out_of_memory_while_training_names_the_sizes_and_the_flags(
    cache_cfg, tmp_path, monkeypatch
):
    from wiremap.train.module import TranscoderModule
    from wiremap.train.train_cmd import main

    def no_memory(self, batch, batch_idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(TranscoderModule, "training_step", no_memory)
    with pytest.raises(
        WiremapError, match=r"training ran out of memory.*--data.batch_tokens \(now 64"
    ):
        main(_train_argv(cache_cfg, tmp_path))


# -- disk ----------------------------------------------------------------------------------
def _full_disk(monkeypatch):
    def half_then_enospc(f, data):
        f.write(bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")  # as os.write: no file name

    monkeypatch.setattr(fileio, "write_all", half_then_enospc)


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_leaves_no_partial(
    tmp_path, monkeypatch
):
    target = tmp_path / "g.json"
    target.write_text("old")
    target.chmod(0o644)
    fileio.atomic_write(target, "new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o644
    _full_disk(monkeypatch)
    with pytest.raises(OSError):
        fileio.atomic_write(target, "x" * 10_000)
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["g.json"]


def test_cache_on_a_full_disk_is_one_clear_error_and_nothing_partial(
    cache_cfg, tmp_path, monkeypatch, capsys
):  # noqa: E501
    _full_disk(monkeypatch)
    out = tmp_path / "c"
    argv = ["cache", "--model", cache_cfg.model, "--dataset", cache_cfg.dataset, "--out", str(out),
            "--n-tokens", "600", "--context-length", "32", "--batch-contexts", "4",
            "--shard-tokens", "256", "--device", "cpu", "--quiet"]  # fmt: skip
    assert wiremap_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("wiremap cache: error: the disk is full at ")
    assert str(out) in err and "run the same command again" in err
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert not list(out.glob("shard_*"))  # nothing half-written under a real name


def test_disk_errors_are_found_inside_wrapped_errors(tmp_path):
    wrapped = RuntimeError(
        "SafetensorError: Error while serializing: I/O error: No space left on device"
    )  # noqa: E501
    assert "the disk is full" in str(disk_error(wrapped))
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "g.json"))
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file") from inner
    except RuntimeError as outer:
        mapped = disk_error(outer)
    assert "read-only" in str(mapped) and "g.json" in str(mapped)
    assert disk_error(ValueError("bad value")) is None


def test_attribute_refuses_an_unwritable_out_before_any_work(tmp_path, monkeypatch, capsys):
    import wiremap.attribution.cli as cli

    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)  # as on a read-only mount
    argv = ["attribute", "--model", "no/such-model", "--transcoders", "nowhere",
            "--prompt", "hi", "--out", str(tmp_path / "ro" / "g.json")]  # fmt: skip
    assert wiremap_main(argv) == 2
    assert "read-only or not yours" in capsys.readouterr().err


def test_attribute_on_a_full_disk_writes_nothing_that_looks_whole(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):  # noqa: E501
    path = tiny_model_dir("llama", n_layers=3)
    save_transcoders(build_transcoder("plt", 3, 32, 24, model_name=str(path)), tmp_path / "tc")
    args = ["attribute", "--model", str(path), "--transcoders", str(tmp_path / "tc"),
            "--prompt", "The cat sat", "--quiet"]  # fmt: skip
    assert wiremap_main([*args, "--out", str(tmp_path / "g.json"), "--no-full-graph"]) == 0
    assert sorted(p.name for p in tmp_path.glob("g.*")) == ["g.json"]  # no dense sidecar
    capsys.readouterr()
    _full_disk(monkeypatch)
    assert wiremap_main([*args, "--out", str(tmp_path / "h.json")]) == 2
    assert f"the disk is full at {tmp_path / 'h.json'}: free space" in capsys.readouterr().err
    assert not list(tmp_path.glob("h*")) and not list(tmp_path.glob(".*.tmp"))


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["steer", "--top", "-1"], "--top -1: give a whole number of at least 1"),
        (["steer", "--generate", "-3"], "--generate -3: give a whole number of at least 0"),
        (["attribute", "--node-threshold", "5"], r"node_threshold=5.0 is outside \(0, 1\]"),
        (["attribute", "--edge-threshold", "0"], r"edge_threshold=0.0 is outside \(0, 1\]"),
        (["attribute", "--max-n-logits", "0"], "--max-n-logits 0"),
        (["attribute", "--heads", "0"], "--heads 0: give a whole number of at least 1"),
        (["attribute", "--memory-limit", "lots"], "'lots': write a size such as 8GB"),
        (["steer", "--top", "x"], "--top x: expected int"),
        (["steer", "--ablate", "--add", "1"], "give one of --scale, --ablate and --add"),
    ],
)
def test_bad_cli_values_are_refused_before_loading_anything(argv, message, tmp_path, capsys):
    # the model and transcoders do not exist: a refusal about them would mean the check ran late
    common = ["--model", "no/such-model", "--transcoders", str(tmp_path / "none"), "--prompt", "a"]
    extra = ["--feature", "0:0:1", "--scale", "2"] if argv[0] == "steer" else ["--out", "g.json"]
    assert wiremap_main([*argv, *common, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert err.endswith(f"Run `wiremap {argv[0]} --help` for the options"), err


def test_missing_or_odd_model_file_says_what_is_supported(tmp_path):
    from wiremap.models.loading import load_model

    with pytest.raises(WiremapError, match="'model.gguf' does not exist.*a .gguf file"):
        load_model("model.gguf")
    odd = tmp_path / "weights.bin"
    odd.write_bytes(b"\0" * 16)
    with pytest.raises(WiremapError, match=r"is a file; --model takes a folder.*\.gguf"):
        load_model(str(odd))


def test_non_utf8_text_names_the_file_and_byte(cache_cfg, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 3)
    cfg = CacheConfig(**{**cache_cfg.__dict__, "dataset": str(bad), "out": str(tmp_path / "c")})
    with pytest.raises(WiremapError, match=r"latin1.txt is not UTF-8 text \(.* at byte 3\).*iconv"):
        build_cache(cfg, progress=False)


def test_model_name_error_names_the_cli_flag(tiny_model_dir):
    from wiremap.models.loading import load_model
    from wiremap.models.replacement import ReplacementModel

    model, tokenizer = load_model(str(tiny_model_dir("llama", n_layers=3)))
    other = build_transcoder("plt", 3, 32, 16, model_name="someone/other-model")
    with pytest.raises(WiremapError, match="--no-check-model-name"):
        ReplacementModel(model, tokenizer, other, model_name="my-llama")


# -- training presets and checkpoints ------------------------------------------------------
def _train_argv(cfg: CacheConfig, root: Path, *extra: str) -> list[str]:
    settings = {
        "run.name": "r", "trainer.limit_val_batches": 1, "model.arch": "plt",
        "model.d_transcoder": 16, "data.batch_tokens": 64, "data.buffer_size": 256,
        "data.cache.batch_contexts": 4, "data.cache.shard_tokens": 256,
    }  # fmt: skip
    return train_argv(cfg, root, settings, *extra)


def test_unknown_preset_key_prints_the_error_first_and_briefly(cache_cfg, tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("run:\n  dir: somewhere\n")
    argv = ["train", *_train_argv(cache_cfg, tmp_path), "--config", str(preset)]
    assert wiremap_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("wiremap train: error: ") and "'dir'" in err[0]
    assert err[0].endswith("Run `wiremap train --help` for the options")


def test_train_takes_dashed_names_and_refuses_a_bad_value_in_one_line(cache_cfg, tmp_path, capsys):
    argv = [
        a.replace("_", "-") if a.startswith("--") else a for a in _train_argv(cache_cfg, tmp_path)
    ]
    assert wiremap_main(["train", *argv, "--trainer.max-steps", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "wiremap train: error: --trainer.max-steps x: expected int. "
        "Run `wiremap train --help` for the options"
    ]


@pytest.mark.parametrize(
    "key", ["--model.d_transcoder", "--data.batch_tokens", "--data.batch_size"]
)
def test_train_refuses_a_count_below_one_before_building_anything(key, cache_cfg, tmp_path):
    from wiremap.train.train_cmd import main

    with pytest.raises(WiremapError, match=rf"^{key[2:]} -3: give a whole number of at least 1"):
        main(_train_argv(cache_cfg, tmp_path, key, "-3"))


def test_negative_learning_rate_is_refused(cache_cfg, tmp_path):
    from wiremap.train.train_cmd import main

    with pytest.raises(WiremapError, match="learning rate .* must be positive"):
        main(_train_argv(cache_cfg, tmp_path, "--model.optim.lr", "-1.0"))


def test_logger_false_is_honoured_and_default_root_dir_is_not_silent(cache_cfg, tmp_path, capsys):
    from wiremap.train.train_cmd import build_cli

    argv = _train_argv(cache_cfg, tmp_path, "--run.logger", "csv", "--trainer.logger", "false",
                       "--trainer.default_root_dir", str(tmp_path / "elsewhere"))  # fmt: skip
    cli = build_cli(argv)
    assert cli.trainer.loggers == []
    err = capsys.readouterr().err
    assert "trainer.default_root_dir" in err and "--run.root" in err


def test_ckpt_path_last_without_or_with_a_truncated_checkpoint(cache_cfg, tmp_path, monkeypatch):
    from wiremap.train.train_cmd import main

    with pytest.raises(WiremapError, match="holds no last.ckpt, so there is nothing to resume"):
        main(_train_argv(cache_cfg, tmp_path, "--ckpt_path", "last"))
    assert main(_train_argv(cache_cfg, tmp_path)) == 0
    folder = tmp_path / "r" / "checkpoints"
    assert {p.name for p in folder.glob("*.ckpt")} == {"last.ckpt", "step=4.ckpt"}

    last = folder / "last.ckpt"
    whole = last.read_bytes()
    _full_disk(monkeypatch)  # a save on a full disk leaves the old last.ckpt whole
    from wiremap.train.checkpoints import AtomicCheckpointIO

    with pytest.raises(OSError):
        AtomicCheckpointIO().save_checkpoint({"x": torch.zeros(1000)}, last)
    assert last.read_bytes() == whole and not list(folder.glob(".*.tmp"))
    monkeypatch.undo()

    last.write_bytes(whole[: len(whole) // 3])  # e.g. written by a tool without atomic saves
    with pytest.raises(WiremapError, match=r"last.ckpt is truncated .*--ckpt_path .*step=4.ckpt"):
        main(_train_argv(cache_cfg, tmp_path, "--ckpt_path", "last"))


def test_nan_before_the_first_checkpoint_does_not_promise_one(cache_cfg, tmp_path, monkeypatch):
    from wiremap.train.module import TranscoderModule
    from wiremap.train.train_cmd import main

    real = TranscoderModule.training_step

    def nan_loss(self, batch, batch_idx):
        return real(self, batch, batch_idx) * float("nan")

    monkeypatch.setattr(TranscoderModule, "training_step", nan_loss)
    with pytest.raises(WiremapError, match="No checkpoint had been written yet") as info:
        main(_train_argv(cache_cfg, tmp_path))
    assert "intact" not in str(info.value)
