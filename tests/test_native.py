"""The compiled elementwise kernels equal the fused path's PyTorch loop, and fall back cleanly."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from wiremap.train import fused, native

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler on this machine")
F = 37  # not a multiple of any vector width: the kernels' scalar tails run too


def layer_inputs(n: int, dtype: torch.dtype, with_theta: bool):
    pre = (torch.randn(n, F) * 2).to(dtype)
    b, cn = 0.3 * torch.randn(F), 2 * torch.rand(F)
    theta = torch.rand(F) if with_theta else None
    return pre, b, theta, cn


def pytorch_forward(pre, window, b, theta, cn, bandwidth):
    stats = [torch.zeros(F) for _ in range(3)]  # gap, below, active
    with torch.no_grad(), native.disabled():
        tanh = fused._threshold_layer(b, theta, cn, bandwidth, (pre, window), stats)
    return tanh, stats


@needs_native
@pytest.mark.parametrize("threads", [1, 3, 40])  # 40 threads > 23 rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("theta_mode", ["relu", "fixed", "learned"])
def test_forward_kernel_equals_the_pytorch_loop(monkeypatch, threads, dtype, theta_mode):
    monkeypatch.setattr(native, "_threads", lambda: threads)
    n = 23  # rows split unevenly over the threads
    pre, b, theta, cn = layer_inputs(n, dtype, theta_mode != "relu")
    windows = [torch.full((n, F), 7.0, dtype=torch.bfloat16) for _ in range(2)]
    if theta_mode != "learned":
        windows = [None, None]
    want_a, got_a = pre.clone(), pre.clone()
    want_tanh, want_stats = pytorch_forward(want_a, windows[0], b, theta, cn, 0.4)
    got_stats = [torch.zeros(F) for _ in range(3)]
    got_tanh = fused._threshold_layer(b, theta, cn, 0.4, (got_a, windows[1]), got_stats)
    assert torch.equal(got_a, want_a)  # bias, threshold and bf16 rounding exactly as torch
    if windows[0] is not None:
        assert torch.equal(windows[1], windows[0])
        assert 0 < windows[1].sum() < n * F  # the window test ran both ways
    for got, want in zip(got_stats, want_stats, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_tanh, want_tanh, rtol=1e-6, atol=1e-5)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_grad_a", [False, True])
@pytest.mark.parametrize("with_window", [False, True])
def test_backward_kernel_equals_the_pytorch_loop(monkeypatch, dtype, with_grad_a, with_window):
    monkeypatch.setattr(native, "_threads", lambda: 2)
    n = 19
    a = torch.relu(torch.randn(n, F)).to(dtype)
    grad_a = torch.randn(n, F).to(dtype) if with_grad_a else None
    window = (torch.rand(n, F) < 0.3).to(torch.bfloat16) if with_window else None
    cn, k, below = torch.rand(F), torch.randn(F), torch.randn(F)
    want_pre, got_pre = torch.empty(n, F, dtype=dtype), torch.empty(n, F, dtype=dtype)
    want = fused._grad_chunks(a, grad_a, cn, k, below, window, want_pre)
    got = native.backward(a, grad_a, window, got_pre, cn, k, below)
    torch.testing.assert_close(got_pre, want_pre, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@needs_native
def test_bf16_rounding_and_tanh_accuracy_over_a_wide_range():
    # activations from 1e-6 to 1e4: round to nearest even like torch; tanh via the exp polynomial
    values = torch.logspace(-6, 4, 125 * F).reshape(125, F)
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.zeros(125, F, dtype=dtype)  # not fired: below θ = 0
        sums = native.forward(a, None, torch.zeros(F), None, torch.ones(F), 1.0)
        assert sums[2].sum() == 0  # a = 0 everywhere: tanh(0) = 0 exactly
    b = torch.randn(F) * 1e-3
    raw = values.to(torch.bfloat16)
    a = raw.clone()
    sums = native.forward(a, None, b, None, torch.full((F,), 0.5), 1.0)
    pre = (raw.float() + b).clamp_min(0)  # ReLU: the smallest values fall below zero
    assert torch.equal(a, pre.to(torch.bfloat16))
    want = torch.tanh(0.5 * pre).double().sum(0)
    torch.testing.assert_close(sums[2].double(), want, rtol=1e-6, atol=1e-5)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("WIREMAP_NATIVE", "0")
    native._library.cache_clear()
    try:
        assert not native.available()
        assert not native.supports(torch.zeros(2, 2))
    finally:
        native._library.cache_clear()


def test_a_failing_compiler_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("WIREMAP_NATIVE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=native.__name__):
            assert not native.available()
        assert "no-such-compiler" in caplog.text and "set CC" in caplog.text
        assert len(caplog.records) == 1  # one warning, after both sets of flags failed
        assert not list((tmp_path / "wiremap" / "kernels").iterdir())  # no partial file left
    finally:
        native._library.cache_clear()


@needs_native
def test_compiled_once_then_loaded_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", f"{shutil.which('cc') or shutil.which('gcc')} -O2")  # CC with flags
    native._library.cache_clear()
    try:
        assert native.available()
        (built,) = (tmp_path / "wiremap" / "kernels").glob("*.so")
        native._library.cache_clear()

        def no_compiler(*args, **kwargs):
            raise AssertionError("compiled again")

        monkeypatch.setattr(native.subprocess, "run", no_compiler)
        assert native.available()
        assert list((tmp_path / "wiremap" / "kernels").glob("*.so")) == [built]
    finally:
        native._library.cache_clear()


@needs_native
def test_blocks_that_do_not_match_are_refused():
    a, cn = torch.zeros(4, F), torch.ones(F)
    with pytest.raises(ValueError, match="contiguous"):
        native.backward(a, None, None, torch.zeros(4, F, dtype=torch.bfloat16), cn, cn, cn)
    with pytest.raises(ValueError, match="contiguous"):
        native.forward(a, torch.zeros(4, F), cn, None, cn, 1.0)  # window must be bf16
    with pytest.raises(ValueError, match="contiguous"):
        native.forward(torch.zeros(F, 4).T, None, cn, None, cn, 1.0)
    with pytest.raises(ValueError, match="per-feature"):
        native.forward(a, None, torch.zeros(F - 1), None, cn, 1.0)


def test_an_unloadable_cached_library_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("WIREMAP_NATIVE", raising=False)
    damaged = tmp_path / "damaged.so"
    damaged.write_bytes(b"not a shared library")
    monkeypatch.setenv("CC", "cc")  # any name: _compiled is replaced
    monkeypatch.setattr(native, "_compiled", lambda compiler, flags: (damaged, ""))
    native._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=native.__name__):
            assert not native.available()
        assert "cannot load" in caplog.text and str(damaged) in caplog.text
    finally:
        native._library.cache_clear()


@needs_native
def test_disabled_turns_the_kernels_off_within_the_block():
    block = torch.zeros(2, 2)
    with native.disabled():
        assert not native.supports(block)
    assert native.supports(block)
