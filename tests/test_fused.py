"""The fused encoder + penalties equal the unfused reference path, values and gradients."""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys

import pytest
import torch
from helpers import reference_outputs, run

from wiremap.models.activations import _JumpReLUFn
from wiremap.train import fused, native
from wiremap.train.module import TranscoderModule

N, L, D, F = 37, 3, 8, 24  # 37 tokens: chunks of 4 rows leave a ragged last chunk


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 4 * F)


@pytest.fixture(params=["native", "pytorch"])
def backend(request):
    """Run a test with the compiled kernels and again with the PyTorch loop."""
    if request.param == "native" and not native.available():
        pytest.skip("no C compiler on this machine")
    with contextlib.nullcontext() if request.param == "native" else native.disabled():
        yield request.param


def make(arch: str, activation: str) -> TranscoderModule:
    module = TranscoderModule(
        L, D, arch=arch, d_transcoder=F, activation=activation,
        activation_kwargs={"bandwidth": 0.5, "init_threshold": 0.3} if activation == "jumprelu"
        else None,
        loss={"sparsity_coef": 0.05, "preact_coef": 0.1},
    )  # fmt: skip
    with torch.no_grad():  # non-trivial biases and skip weights so every path carries gradient
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
@pytest.mark.parametrize("arch", ["plt", "skip_plt", "clt", "skip_clt"])
def test_fused_step_equals_the_reference(arch, activation, backend):
    module = make(arch, activation)
    assert module.fused
    x, y = torch.randn(N, L, D), torch.randn(N, L, D)
    ref = run(copy.deepcopy(module), reference_outputs, x, y)
    out = run(module, TranscoderModule.step_outputs, x, y)
    assert out[0].keys() == ref[0].keys() == {"mse", "sparsity", "preact"}
    for key in ref[0]:
        torch.testing.assert_close(out[0][key], ref[0][key], rtol=1e-5, atol=1e-6)
    for got, want in zip(out[1:4], ref[1:4], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert ref[4].keys() == out[4].keys()
    if activation == "jumprelu":  # the threshold learns through the window and preact terms
        assert ref[4]["transcoder.activation.log_threshold"].abs().max() > 1e-3
    for name, want in ref[4].items():
        torch.testing.assert_close(out[4][name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_step_under_bf16_autocast_is_close_to_the_reference(backend):
    module = make("plt", "jumprelu")
    x, y = torch.randn(N, L, D), torch.randn(N, L, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = run(copy.deepcopy(module), reference_outputs, x, y)
        out = run(module, TranscoderModule.step_outputs, x, y)
    # same bf16 matmuls and float32 elementwise math: the penalties agree to float32 rounding
    for key in ("sparsity", "preact"):
        torch.testing.assert_close(out[0][key], ref[0][key], rtol=1e-4, atol=0)
    torch.testing.assert_close(out[0]["mse"], ref[0]["mse"], rtol=2e-2, atol=0)
    for name, want in ref[4].items():
        err = (out[4][name] - want).norm() / want.norm()
        assert err < 2e-2, (name, float(err))


def direct_reference(x, w, b, theta, cn, bandwidth):
    pre = torch.einsum("nld,lfd->nlf", x, w) + b
    a = torch.relu(pre) if theta is None else _JumpReLUFn.apply(pre, theta, bandwidth)
    gap = torch.relu((0.0 if theta is None else theta) - pre).sum(0)
    return a, torch.tanh(a * cn).sum(), gap


@pytest.mark.parametrize("theta_mode", ["none", "fixed", "learned"])
def test_fused_encode_gradients_for_every_input(theta_mode, backend):
    x = torch.randn(N, L, D, requires_grad=True)
    w = torch.randn(L, F, D, requires_grad=True)
    b = torch.randn(L, F, requires_grad=True)
    cn = torch.rand(L, F, requires_grad=True)
    theta = None if theta_mode == "none" else torch.rand(L, F)
    if theta_mode == "learned":
        theta.requires_grad_()
    inputs = [t for t in (x, w, b, cn, theta) if t is not None and t.requires_grad]
    weights = torch.randn(N, L, F), torch.randn(L, F)

    def loss(a, tanh_sum, gap):
        return (a * weights[0]).sum() + 0.3 * tanh_sum + (gap * weights[1]).sum()

    want = torch.autograd.grad(loss(*direct_reference(x, w, b, theta, cn, 0.5)), inputs)
    out = fused.fused_encode(x, w, b, theta, cn, bandwidth=0.5)
    got = torch.autograd.grad(loss(out.a, out.tanh_sum, out.gap_sum), inputs)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_fused_encode_with_only_the_activations_used(backend):
    w = torch.randn(L, F, D, requires_grad=True)
    x, b, cn = torch.randn(N, L, D), torch.zeros(L, F), torch.rand(L, F)
    out = fused.fused_encode(x, w, b, torch.full((L, F), 0.2), cn)
    (grad,) = torch.autograd.grad(out.a.square().sum(), [w])
    pre = torch.einsum("nld,lfd->nlf", x, w)
    a = pre * (pre > 0.2)
    (want,) = torch.autograd.grad(a.square().sum(), [w])
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.active, (a != 0).sum(0, dtype=torch.float32))


def test_topk_trains_through_the_reference_path():
    module = TranscoderModule(L, D, arch="plt", d_transcoder=F, activation="topk", k=3)
    assert not module.fused
    terms = module.step_outputs(torch.randn(N, L, D), torch.randn(N, L, D)).terms
    assert set(terms) == {"mse", "auxk"}


@pytest.mark.parametrize("reuse", [True, False])
def test_run_reuse_host_memory_adds_the_callback(tmp_path, reuse):
    from wiremap.train.callbacks import ReuseHostMemory
    from wiremap.train.train_cmd import RunConfig, wiremap_callbacks

    run = RunConfig(root=str(tmp_path), logger="none", reuse_host_memory=reuse)
    callbacks = wiremap_callbacks(run, tmp_path / "config.yaml")
    assert any(isinstance(c, ReuseHostMemory) for c in callbacks) is reuse


def test_reusing_freed_memory_stops_page_faults():
    # Training steps whose [L, N, F] tensors (40 MiB) are above glibc's 32 MiB mmap threshold.
    script = """
import resource, torch
from wiremap.train.fused import fused_encode
from wiremap.train.host_memory import reuse_freed_memory
torch.set_num_threads(1)
w_enc, w_dec = (torch.randn(5, 4096, 16, requires_grad=True) for _ in range(2))
x, b, cn = torch.randn(512, 5, 16), torch.zeros(5, 4096), torch.ones(5, 4096)
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = fused_encode(x, w_enc, b, None, cn)
    y_hat = torch.einsum("nlf,lfd->nld", out.a, w_dec)
    (y_hat.square().sum() + out.tanh_sum).backward()
    w_enc.grad = w_dec.grad = None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
plain = [step() for _ in range(3)]
assert reuse_freed_memory()
reused = sorted(step() for _ in range(8))  # the first one or two still fault
print(min(plain), reused[4])
"""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    plain, reused = map(int, out.stdout.split())
    assert plain > 10_000 and reused < plain / 10, (plain, reused)
