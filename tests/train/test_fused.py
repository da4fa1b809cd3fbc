"""The fused encoder + penalties equal the unfused reference path, values and gradients."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys

import pytest
import torch
from helpers import reference_outputs, run

from wiremap.models.activations import _JumpReLUFn
from wiremap.train import fused
from wiremap.train.module import TranscoderModule

N, L, D, F = 37, 3, 8, 24  # 37 tokens: chunks of 4 rows leave a ragged last chunk


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 4 * F)


@pytest.fixture(params=["compiled", "eager"])
def backend(request):
    """Run a test with the passes compiled (torch.compile) and again op by op."""
    if request.param == "compiled" and fused.backend("cpu") != "compiled":
        pytest.skip("torch.compile is off or unavailable here")
    with fused.use(request.param):
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
    env = {**os.environ, "WIREMAP_COMPILE": "0"}  # the allocator alone, no compile
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    plain, reused = map(int, out.stdout.split())
    assert plain > 10_000 and reused < plain / 10, (plain, reused)


needs_compile = pytest.mark.skipif(
    fused.backend("cpu") != "compiled", reason="torch.compile is off or unavailable here"
)


def pass_inputs(n: int, dtype: torch.dtype, theta_mode: str):
    a = (2 * torch.randn(n, F)).to(dtype)
    window = torch.zeros(n, F, dtype=torch.bfloat16) if theta_mode == "learned" else None
    theta = None if theta_mode == "relu" else torch.rand(F)
    return a, window, 0.3 * torch.randn(F), theta, 2 * torch.rand(F), 0.2


@needs_compile
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("theta_mode", ["relu", "fixed", "learned"])
def test_compiled_passes_equal_the_eager_ones(dtype, theta_mode):
    from torch._dynamo.utils import counters

    a, window, *rest = pass_inputs(23, dtype, theta_mode)
    grad_a, k, below = torch.randn(23, F).to(dtype), torch.randn(F), torch.randn(F)
    outs = {}
    for name in ("eager", "compiled"):
        got_a, got_w = a.clone(), None if window is None else window.clone()
        with fused.use(name):
            sums = fused._run(fused._forward_pass, got_a, got_w, *rest)
            pre = torch.empty(23, F, dtype=dtype)
            bwd = fused._run(fused._backward_pass, got_a, grad_a, got_w, pre, rest[2], k, below)
        if name == "compiled":  # it went through Dynamo, not an eager fallback
            assert not fused._compile_failed and counters["stats"]["unique_graphs"] > 0
        outs[name] = got_a, got_w, sums, pre, bwd
    (ea, ew, es, ep, eb), (ca, cw, cs, cp, cb) = outs["eager"], outs["compiled"]
    assert torch.equal(ca, ea)  # bias, threshold and rounding to the storage dtype exactly
    assert (cw is None and ew is None) or (torch.equal(cw, ew) and 0 < cw.sum() < cw.numel())
    torch.testing.assert_close(cs, es, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cp, ep, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb, eb, rtol=1e-5, atol=1e-5)


@needs_compile
def test_another_batch_size_does_not_compile_again():
    from torch._dynamo.utils import counters

    w = torch.randn(L, F, D, requires_grad=True)
    b, theta, cn = torch.zeros(L, F), torch.rand(L, F, requires_grad=True), torch.rand(L, F)
    graphs = []
    with fused.use("compiled"):
        for n in (N, 29, 61):  # a smaller last batch, a larger validation batch
            out = fused.fused_encode(torch.randn(n, L, D), w, b, theta, cn, bandwidth=0.5)
            (out.a.square().sum() + out.tanh_sum + out.gap_sum.sum()).backward()
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0] == graphs[2]


@pytest.mark.parametrize(
    "env, device, triton, want",
    [
        ({}, "cpu", False, "compiled"),
        ({"WIREMAP_COMPILE": "0"}, "cpu", False, "eager"),
        ({"TORCHDYNAMO_DISABLE": "1"}, "cpu", False, "eager"),
        ({}, "cuda", True, "compiled"),
        ({}, "cuda", False, "eager"),
        ({}, "mps", False, "eager"),
    ],
)
def test_backend_choice(monkeypatch, env, device, triton, want):
    import torch.utils._triton

    monkeypatch.delenv("WIREMAP_COMPILE", raising=False)
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: triton)
    monkeypatch.setattr(fused, "_compile_failed", False)
    assert fused.backend(device) == want
    monkeypatch.setattr(sys, "platform", "win32")
    assert fused.backend(device) == "eager"
    with fused.use("eager"):
        assert fused.backend("cpu") == "eager"


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken(fn):
        def raise_(*args):
            raise torch._dynamo.exc.BackendCompilerFailed(broken, RuntimeError("no cl.exe"), None)

        return raise_

    monkeypatch.setattr(fused, "_compiled", broken)
    monkeypatch.setattr(fused, "MIN_COMPILE_ELEMENTS", 0)
    monkeypatch.setattr(fused, "_compile_failed", False)
    monkeypatch.setattr(fused, "_compile_works", lambda device_type: not fused._compile_failed)
    x, w = torch.randn(N, L, D), torch.randn(L, F, D)
    b, cn = torch.zeros(L, F), torch.rand(L, F)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        out = fused.fused_encode(x, w, b, None, cn)
        again = fused.fused_encode(x, w, b, None, cn)
    assert len(caplog.records) == 1 and "WIREMAP_COMPILE=0" in caplog.text
    assert fused.backend("cpu") == "eager"
    want = torch.relu(torch.einsum("nld,lfd->nlf", x, w))
    assert torch.equal(out.a, want) and torch.equal(again.a, want)
