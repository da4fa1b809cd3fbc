"""Activation cache: contents, crash safety, corruption, bad input and the `wiremap cache` CLI."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import wiremap.cache.writer as writer_mod
from wiremap.cache import ActivationCache, CacheConfig, build_cache, read_manifest
from wiremap.cache.command import main as cache_main
from wiremap.cache.text import iter_texts, pack_contexts, tokenize
from wiremap.errors import WiremapError
from wiremap.models.hooks import capture
from wiremap.models.loading import load_model
from wiremap.models.tiny import sample_corpus


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; on a busy machine extra threads mostly wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(sample_corpus(n_docs=150, seed=3)) + "\n")
    return str(path)


def _cfg(model_dir, corpus, out, **kw):
    settings = dict(
        model=model_dir,
        dataset=corpus,
        out=str(out),
        n_tokens=700,  # not a whole number of contexts, batches or shards
        context_length=16,
        batch_contexts=4,
        shard_tokens=150,  # shard boundaries fall inside batches
        device="cpu",
    )
    return CacheConfig(**{**settings, **kw})


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.name != ".lock"}


@pytest.fixture(scope="module")
def reference(model_dir, corpus, tmp_path_factory):
    """An uninterrupted run that the crash tests must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    build_cache(_cfg(model_dir, corpus, out), progress=False)
    return out


# -- contents ------------------------------------------------------------------------------


@torch.no_grad()
def _direct(cfg: CacheConfig, layers: list[int]):
    """The same packed contexts, run batch by batch through `capture` (no cache code)."""
    model, tokenizer = load_model(cfg.model)
    docs = tokenize(iter_texts(cfg.text_spec()), tokenizer)
    first = 0 if cfg.include_bos else 1
    needed = -(-cfg.n_tokens // (cfg.context_length - first))
    contexts = list(pack_contexts(docs, cfg.context_length, 1, 2))[:needed]
    xs, ys, toks = [], [], []
    for start in range(0, len(contexts), cfg.batch_contexts):
        ids = torch.tensor(contexts[start : start + cfg.batch_contexts])
        with capture(model, [cfg.input_hook, cfg.output_hook], layers) as acts:
            model(ids)
        xs.append(torch.stack([acts[cfg.input_hook][i][:, first:] for i in layers], 2))
        ys.append(torch.stack([acts[cfg.output_hook][i][:, first:] for i in layers], 2))
        toks.append(ids[:, first:])
    d = xs[0].shape[-1]
    n = cfg.n_tokens
    x, y = (torch.cat(t).reshape(-1, len(layers), d)[:n] for t in (xs, ys))
    return x, y, torch.cat(toks).reshape(-1)[:n]


@pytest.mark.parametrize(
    "settings",
    [
        dict(dtype="bfloat16"),
        dict(dtype="float32", layers=[1], input_hook="resid_mid", include_bos=True),
    ],
    ids=["bf16-all-layers", "fp32-layer1-resid_mid-with-bos"],
)
def test_shards_equal_a_direct_capture(model_dir, corpus, tmp_path, settings):
    cfg = _cfg(model_dir, corpus, tmp_path / "c", **settings)
    cache = ActivationCache(build_cache(cfg, progress=False), verify=True)
    layers = settings.get("layers", [0, 1])
    x_ref, y_ref, tokens = _direct(cfg, layers)

    assert len(cache) == cfg.n_tokens and cache.n_shards == 5 and cache.layers == layers
    x, y = cache.get(slice(None))
    assert x.dtype == y.dtype == cache.dtype == getattr(torch, cfg.dtype)
    assert torch.equal(x, x_ref.to(x.dtype)) and torch.equal(y, y_ref.to(y.dtype))
    assert torch.equal(cache.tokens(slice(None)), tokens)
    rows_per_context = cfg.context_length - (0 if cfg.include_bos else 1)
    first_pos = cfg.context_length - rows_per_context
    expected_pos = torch.arange(cfg.n_tokens) % rows_per_context + first_pos
    assert torch.equal(cache.positions(slice(None)), expected_pos)
    assert y.float().abs().sum() > 0


def test_manifest_and_random_access(reference):
    cache = ActivationCache(reference)
    m = cache.manifest
    assert m["complete"] and m["n_tokens"] == 700 and m["architecture"] == "llama"
    assert m["hooks"] == {"input": "mlp_in", "output": "mlp_out"} and m["layers"] == [0, 1]
    assert m["dataset"]["text_column"] == "text" and m["wiremap_version"]
    assert [s["n_tokens"] for s in m["shards"]] == [150, 150, 150, 150, 100]
    x_all, y_all = cache.get(slice(None))
    idx = torch.tensor([699, 0, 151, 149, 450, 151])
    x, y = cache.get(idx)
    assert torch.equal(x, x_all[idx]) and torch.equal(y, y_all[idx])
    assert torch.equal(cache.get(-1)[1], y_all[-1]) and cache.get(3)[0].shape == (2, cache.d_model)
    norms = x_all.float().norm(dim=-1)
    torch.testing.assert_close(
        torch.tensor(cache.norm_stats["input"]["mean_norm"], dtype=torch.float64),
        norms.mean(0).double(),
    )
    torch.testing.assert_close(
        torch.tensor(cache.norm_stats["input"]["mean_sq_norm"], dtype=torch.float64),
        norms.square().mean(0).double(),
    )
    cache.check_matches(layers=[0, 1], input_hook="mlp_in")
    with pytest.raises(WiremapError, match="does not match what is asked"):
        cache.check_matches(input_hook="resid_mid")
    with pytest.raises(IndexError):
        cache.get(700)


# -- crash safety --------------------------------------------------------------------------

_SLOW_WRITER = """
import sys, time
import wiremap.fileio as c

def slow_write(f, data):  # widen the window in which a kill lands inside a write
    f.write(data[: len(data) // 2]); f.flush(); time.sleep(0.25); f.write(data[len(data) // 2 :])

c.write_all = slow_write
from wiremap.cache.command import main
sys.exit(main(sys.argv[1:]))
"""


def _argv(cfg: CacheConfig) -> list[str]:
    return [
        *("--model", cfg.model, "--dataset", cfg.dataset, "--out", cfg.out, "--device", "cpu"),
        *("--n-tokens", str(cfg.n_tokens), "--context-length", str(cfg.context_length)),
        *("--batch-contexts", str(cfg.batch_contexts), "--shard-tokens", str(cfg.shard_tokens)),
        "--quiet",
    ]


def _listed(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def test_kill_9_mid_write_then_rerun_is_byte_identical(model_dir, corpus, tmp_path, reference):
    cfg = _cfg(model_dir, corpus, tmp_path / "c")
    out = Path(cfg.out)
    # Same thread count as this process: float results (and so bytes) depend on it.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, *_argv(cfg)], env=env)
    deadline = time.time() + 120
    try:
        # Kill while a later shard is being written: one listed, a temporary file present.
        while not (_listed(out) >= 1 and any(out.glob(".shard_*.tmp"))):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "the run never reached its second shard"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 1 <= _listed(out) < 5 and not read_manifest(out)["complete"]
    with pytest.raises(WiremapError, match="incomplete"):
        ActivationCache(out)

    assert cache_main(_argv(cfg)) == 0  # the same command again resumes and finishes
    assert _files(out) == _files(reference)
    ActivationCache(out, verify=True)


def test_crash_between_shard_rename_and_manifest(
    model_dir, corpus, tmp_path, reference, monkeypatch
):
    cfg = _cfg(model_dir, corpus, tmp_path / "c")
    real, calls = writer_mod.dump_manifest, []

    def dump_then_die(out, manifest):
        calls.append(len(manifest["shards"]))
        if len(manifest["shards"]) == 3:  # shard_00002 is on disk, the manifest never says so
            raise RuntimeError("simulated crash")
        real(out, manifest)

    monkeypatch.setattr(writer_mod, "dump_manifest", dump_then_die)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(cfg, progress=False)
    monkeypatch.setattr(writer_mod, "dump_manifest", real)
    assert (Path(cfg.out) / "shard_00002.safetensors").exists() and _listed(Path(cfg.out)) == 2

    build_cache(cfg, progress=False)
    assert _files(cfg.out) == _files(reference)


def test_resume_refuses_changed_text(model_dir, corpus, tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text(Path(corpus).read_text())
    cfg = _cfg(model_dir, str(text), tmp_path / "c")
    real = writer_mod.dump_manifest

    def die_at_two(out, manifest):
        if len(manifest["shards"]) == 2:
            raise RuntimeError("simulated crash")
        real(out, manifest)

    monkeypatch.setattr(writer_mod, "dump_manifest", die_at_two)
    with pytest.raises(RuntimeError):
        build_cache(cfg, progress=False)
    monkeypatch.setattr(writer_mod, "dump_manifest", real)
    text.write_text("Something else entirely. " + text.read_text())
    with pytest.raises(WiremapError, match="no longer gives the tokens"):
        build_cache(cfg, progress=False)


# -- corruption ----------------------------------------------------------------------------


def test_corrupt_and_truncated_shards_are_detected(reference, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(reference, broken)
    shard = broken / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # inside the activations: only the checksum can notice
    shard.write_bytes(bytes(data))
    cache = ActivationCache(broken)
    with pytest.raises(WiremapError, match="checksum mismatch in shard_00001"):
        cache.verify()
    with pytest.raises(WiremapError, match="checksum"):
        ActivationCache(broken, verify=True)

    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(WiremapError, match="truncated"):
        ActivationCache(broken)

    header = bytearray(data)
    header[8:20] = b"not json at!"  # the safetensors header right after its length
    shard.write_bytes(bytes(header))
    with pytest.raises(WiremapError, match="corrupt"):
        ActivationCache(broken).shard(1)


# -- bad input -----------------------------------------------------------------------------


def test_bad_inputs_give_wiremap_errors(model_dir, corpus, tmp_path):
    cases = {
        "does not exist": dict(model=str(tmp_path / "no-such-model")),
        "no column 'body'": dict(text_column="body"),
        "beyond model": dict(context_length=4096),
        "out of range": dict(layers=[0, 5]),
        "not supported": dict(input_hook="mlp_out"),
        "layers is empty": dict(layers=[]),
    }
    for match, kw in cases.items():
        with pytest.raises(WiremapError, match=match):
            build_cache(_cfg(model_dir, corpus, tmp_path / "c", **kw), progress=False)
    with pytest.raises(WiremapError, match="is a file"):
        build_cache(_cfg(model_dir, corpus, corpus), progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(WiremapError, match="holds no text"):
        build_cache(_cfg(model_dir, str(empty), tmp_path / "c"), progress=False)


def test_never_overwrites_another_cache(model_dir, corpus, reference, capsys):
    before = _files(reference)
    cfg = _cfg(model_dir, corpus, reference, layers=[0])
    with pytest.raises(WiremapError, match="other settings.*layers: \\[0, 1\\] there, \\[0\\] now"):
        build_cache(cfg, progress=False)
    build_cache(_cfg(model_dir, corpus, reference), progress=False)  # same settings
    assert "already holds this cache, complete" in capsys.readouterr().err
    assert _files(reference) == before


def test_parquet_source_and_include_bos(model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": sample_corpus(40, seed=5)}), tmp_path / "d.parquet")
    cfg = _cfg(model_dir, str(tmp_path / "*.parquet"), tmp_path / "c", text_column="body")
    cfg.include_bos, cfg.n_tokens = True, 64
    cache = ActivationCache(build_cache(cfg, progress=False))
    assert cache.positions(0) == 0 and cache.tokens(0) == 1 and cache.tokens(16) == 1


# -- command line --------------------------------------------------------------------------


def test_cli_help(capsys):
    from wiremap.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["cache", "--help"])
    assert exit_.value.code == 0
    assert "--n-tokens" in capsys.readouterr().out


def test_cli_builtin_default(tmp_path, capsys):
    out = tmp_path / "default"
    assert cache_main(["--out", str(out), "--n-tokens", "2k", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "built-in default" in captured.err and "cached 2,000 tokens" in captured.out
    cache = ActivationCache(out, verify=True)
    assert cache.manifest["model"] == str(out / "tiny-model") and len(cache) == 2000


def test_cli_preset_with_overrides(model_dir, corpus, tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text(
        textwrap.dedent(f"""
        data:
          init_args:
            cache:
              model: {model_dir}
              dataset: {corpus}
              out: {tmp_path / "from-preset"}
              n_tokens: 1k
              context_length: 16
              layers: [1]
        """)
    )
    assert (
        cache_main(["--config", str(preset), "--n-tokens", "300", "--layers", "0-1", "--quiet"])
        == 0
    )
    m = read_manifest(tmp_path / "from-preset")
    assert m["n_tokens"] == 300 and m["layers"] == [0, 1] and m["context_length"] == 16
    preset.write_text("data:\n  cache:\n    model: x\n    bogus: 1\n")
    with pytest.raises(WiremapError, match="unknown cache settings bogus"):
        cache_main(["--config", str(preset)])
    with pytest.raises(WiremapError, match="give both --model and --dataset"):
        cache_main(["--model", model_dir])


# -- old names (accepted for one version) --------------------------------------------------


def test_old_import_paths_warn_and_give_the_same_objects():
    import importlib

    import wiremap.cache as cache
    import wiremap.cache.text as text

    for old, new, name in [
        ("wiremap.train.cache", cache, "ActivationCache"),
        ("wiremap.train.cache", cache, "build_cache"),
        ("wiremap.train.text", text, "pack_contexts"),
    ]:
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"{old} moved to"):
            module = importlib.import_module(old)
        assert getattr(module, name) is getattr(new, name)


def test_old_setting_names_warn_and_map_to_the_new_ones(model_dir, corpus, tmp_path):
    with pytest.warns(DeprecationWarning, match="batch_size is deprecated.*batch_contexts"):
        cfg = _cfg(model_dir, corpus, tmp_path, batch_contexts=32, batch_size=3)
    assert cfg.batch_contexts == 3 and cfg.batch_size is None
    for old, include in [(True, False), (False, True)]:
        with pytest.warns(DeprecationWarning, match="exclude_bos is deprecated.*include_bos"):
            cfg = _cfg(model_dir, corpus, tmp_path, exclude_bos=old)
        assert cfg.include_bos is include and cfg.exclude_bos is None


def test_a_manifest_of_the_previous_version_still_reads_and_resumes(
    model_dir, corpus, reference, tmp_path, capsys
):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(reference, old)
    m = json.loads((old / "manifest.json").read_text())
    assert m["include_bos"] is False and m["batch_contexts"] == 4
    m["exclude_bos"], m["batch_size"] = not m.pop("include_bos"), m.pop("batch_contexts")
    (old / "manifest.json").write_text(json.dumps(m))
    cache = ActivationCache(old, verify=True)
    assert cache.include_bos is False and cache.manifest["batch_contexts"] == 4
    assert "exclude_bos" not in cache.manifest and "batch_size" not in cache.manifest
    build_cache(_cfg(model_dir, corpus, old), progress=False)  # the same settings: nothing to do
    assert "already holds this cache, complete" in capsys.readouterr().err
