"""The sparse training path equals the dense reference path, values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import reference_outputs, run

from wiremap.train import losses, sparse
from wiremap.train.module import TranscoderModule

N, L, D, F, K = 29, 3, 8, 24, 4
ARCHS = ("plt", "skip_plt", "clt", "skip_clt")
ACTIVATIONS = ("relu", "jumprelu", "topk", "batchtopk")


def make(arch: str, activation: str) -> TranscoderModule:
    module = TranscoderModule(
        L, D, arch=arch, d_transcoder=F, activation=activation,
        k=K if activation in ("topk", "batchtopk") else None,
        activation_kwargs={"bandwidth": 0.5, "init_threshold": 0.3} if activation == "jumprelu"
        else None,
        loss={"sparsity_coef": 0.05, "preact_coef": 0.1, "dead_tokens": 10},
    )  # fmt: skip
    with torch.no_grad():  # non-trivial biases and skip weights so every path carries gradient
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
        module.silent_tokens[:, ::3] = 100  # a third of the features dead: AuxK runs
    return module


@pytest.fixture
def always_sparse(monkeypatch):
    """ReLU / JumpReLU batches decode sparsely whatever their density."""
    monkeypatch.setattr(sparse, "MAX_DENSITY", 1.0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_step_equals_the_dense_reference(arch, activation, always_sparse):
    module = make(arch, activation)
    x, y = torch.randn(N, L, D), torch.randn(N, L, D)
    ref = run(copy.deepcopy(module), reference_outputs, x, y)
    out = run(module, TranscoderModule.step_outputs, x, y)
    assert out[0].keys() == ref[0].keys()
    if activation in ("topk", "batchtopk"):
        assert set(ref[0]) == {"mse", "auxk"} and float(ref[0]["auxk"].detach()) > 0
    for key in ref[0]:
        torch.testing.assert_close(out[0][key], ref[0][key], rtol=1e-5, atol=1e-6)
    for got, want in zip(out[1:4], ref[1:4], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert ref[4].keys() == out[4].keys()
    for name, want in ref[4].items():
        torch.testing.assert_close(out[4][name], want, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_step_under_bf16_autocast_is_close_to_the_reference(arch, activation, always_sparse):
    module = make(arch, activation)
    x, y = torch.randn(N, L, D), torch.randn(N, L, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = run(copy.deepcopy(module), reference_outputs, x, y)
        out = run(module, TranscoderModule.step_outputs, x, y)
    for key in ref[0]:
        torch.testing.assert_close(out[0][key], ref[0][key], rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(out[1], ref[1], rtol=2e-2, atol=2e-2)
    for name, want in ref[4].items():
        err = (out[4][name] - want).norm() / want.norm()
        assert err < 2e-2, (name, float(err))


def test_batchtopk_records_the_same_threshold_on_both_paths():
    module = make("plt", "batchtopk")
    x = torch.randn(N, L, D)
    ref = copy.deepcopy(module)
    reference_outputs(ref, x, x)
    module.step_outputs(x, x)
    act, want = module.transcoder.activation, ref.transcoder.activation
    assert bool((act.n_recorded == 1).all())
    torch.testing.assert_close(act.batch_threshold, want.batch_threshold)


def test_relu_decodes_densely_above_the_measured_density(monkeypatch):
    module = make("plt", "relu")
    x, y = torch.randn(N, L, D), torch.randn(N, L, D)
    used = []
    monkeypatch.setattr(sparse, "dense_bags", lambda *a: used.append(1) or 1 / 0)
    module.step_outputs(x, y)  # random weights: about half the features fire
    assert not used
    limit = sparse.MAX_DENSITY * 1000
    assert sparse.worth_it(limit, 1000) and not sparse.worth_it(limit + 1, 1000)
    monkeypatch.setattr(sparse, "MAX_DENSITY", 1.0)
    with pytest.raises(ZeroDivisionError):
        module.step_outputs(x, y)


def random_bags(n_bags: int, n_rows: int, nnz: int) -> sparse.Bags:
    """Random sorted pattern with empty bags and unused rows."""
    bag = torch.randint(0, n_bags - 2, (nnz,)).sort().values + 1  # first and last bag empty
    return sparse.Bags(bag, torch.randint(0, n_rows - 3, (nnz,)), n_bags, n_rows)


def dense_matrix(bags: sparse.Bags, values: torch.Tensor) -> torch.Tensor:
    """The [n_bags, n_rows] matrix of the pattern (repeated entries add up)."""
    m = torch.zeros(bags.n_bags, bags.n_rows, dtype=values.dtype)
    return m.index_put((bags.bag, bags.rows), values, accumulate=True)


def test_sparse_decode_and_gather_equal_dense_matmuls():
    bags = random_bags(11, 13, 40)
    values = torch.randn(40, requires_grad=True)
    table = torch.randn(13, 5, requires_grad=True)
    weights = torch.randn(11, 5)
    got = torch.autograd.grad((sparse.sparse_decode(values, table, bags) * weights).sum(),
                              [values, table])  # fmt: skip
    want = torch.autograd.grad(((dense_matrix(bags, values) @ table) * weights).sum(),
                               [values, table])  # fmt: skip
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert bool((got[1][-3:] == 0).all())  # unused rows get no gradient

    x, w_enc, b_enc = torch.randn(11, 5), torch.randn(13, 5), torch.randn(13)
    inputs = [t.requires_grad_() for t in (x, w_enc, b_enc)]
    pre = (x @ w_enc.T + b_enc)[bags.bag, bags.rows]
    coef = torch.randn(40)
    got = torch.autograd.grad((sparse.gather_pre(pre.detach(), x, w_enc, b_enc, bags) * coef)
                              .sum(), inputs)  # fmt: skip
    want = torch.autograd.grad((pre * coef).sum(), inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_sparse_auxk_equals_the_dense_auxk():
    module = make("clt", "topk")
    tc = module.transcoder
    x, residual = torch.randn(N, L, D), torch.randn(N, L, D)
    pre = tc.pre_activations(x)
    dead = module.dead_mask()
    want = losses.auxk_loss(tc, pre, dead, residual, k_aux=5)
    (w_want,) = torch.autograd.grad(want, [tc.W_enc])
    got = sparse.auxk_loss(tc, x, pre.detach(), dead, residual, k_aux=5)
    (w_got,) = torch.autograd.grad(got, [tc.W_enc])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(w_got, w_want)
    assert float(sparse.auxk_loss(tc, x, pre.detach(), dead & False, residual, 5)) == 0


def test_empty_batch_decodes_to_the_bias():
    module = make("clt", "topk")
    tc = module.transcoder
    bags = sparse.Bags(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                       L * N, L * F)  # fmt: skip
    y = sparse.decode(tc, bags, torch.zeros(0), N)
    torch.testing.assert_close(y, tc.b_dec.expand(N, L, D))
