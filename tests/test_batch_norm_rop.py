"""Batch norm's R-operators (metafast.ops.batch_norm_rop): the PyTorch reference against central
finite differences of batch norm's forward and backward in float64, the C++ kernels against the
reference (float64 to 1e-12, float32), which path runs when, the argument checks, and Conv4's
meta-gradient through BatchedMAML with and without the kernels."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from metafast import BatchedMAML, _backend
from metafast.models import Conv4
from metafast.ops import batch_norm_rop as bnr

from cxx_ext import skipif_missing

needs_kernel = skipif_missing("batch_norm_rforward_cxx", "batch_norm_rbackward_cxx")
SHAPES = [(5, 6, 7, 7), (9, 4), (3, 5, 2, 3, 4)]  # 2-d maps, BatchNorm1d's [N, C], a 3-d map
EPS = 1e-5


def _stats(x):
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x, dims, correction=0)
    return mean, torch.rsqrt(var + EPS)


def _bn(x, w, b):
    return F.batch_norm(x, None, None, w, b, True, 0.0, EPS)


def _bn_backward(x, w, gy):
    """(dx, dw, db) of sum(gy * batch_norm(x)) at (x, w), batch statistics."""
    mean, invstd = _stats(x)
    return torch.ops.aten.native_batch_norm_backward(gy, x, w, None, None, mean, invstd, True, EPS,
                                                     [True, True, True])


def _case(shape, dtype, gen):
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.7).to(dtype)
    c = shape[1]
    w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    maps = {k: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for k in ("rx", "gy", "rgy")}
    rw, rb = (torch.randn(c, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    return x, w, b, maps, rw, rb


@pytest.mark.parametrize("shape", SHAPES, ids=["4d", "2d", "5d"])
def test_reference_is_the_directional_derivative(shape):
    gen = torch.Generator().manual_seed(0)
    x, w, b, m, rw, rb = _case(shape, torch.float64, gen)
    rx, gy, rgy = m["rx"], m["gy"], m["rgy"]
    mean, invstd = _stats(x)
    h = 1e-6

    def central(f):
        plus, minus = f(h), f(-h)
        return [(p - q) / (2 * h) for p, q in zip(plus, minus)]

    # R(y) along (rx, rw, rb)
    ry, sx_rx, s_rx = bnr.rforward_reference(x, w, mean, invstd, rx, rw, rb)
    (fd,) = central(lambda e: [_bn(x + e * rx, w + e * rw, b + e * rb)])
    assert ((ry - fd).norm() / fd.norm()).item() < 1e-7
    xhat = (x - mean.view(1, -1, *[1] * (x.dim() - 2))) * invstd.view(1, -1, *[1] * (x.dim() - 2))
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(sx_rx, (rx * xhat).sum(dims), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_rx, rx.sum(dims), rtol=1e-12, atol=1e-12)
    # R of (dx, dw, db) along (rx, rw) with gy moving along rgy
    rgx, r_gw, r_gb = bnr.rbackward_reference(x, w, mean, invstd, gy, rgy, rx, sx_rx, s_rx, rw, True)
    fd = central(lambda e: _bn_backward(x + e * rx, w + e * rw, gy + e * rgy))
    for name, got, want in (("R(dx)", rgx, fd[0]), ("R(dw)", r_gw, fd[1]), ("R(db)", r_gb, fd[2])):
        assert ((got - want).norm() / want.norm()).item() < 1e-7, name


@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=["4d", "2d", "5d"])
def test_kernels_match_reference(shape, dtype, tol):
    gen = torch.Generator().manual_seed(1)
    x, w, b, m, rw, rb = _case(shape, dtype, gen)
    mean, invstd = _stats(x)
    checked = 0
    for affine, has_rx, has_rw, need_gx in itertools.product([True, False], repeat=4):
        if not has_rx and not has_rw:
            continue
        ww = w if affine else None
        rx = m["rx"] if has_rx else None
        rwv, rbv = (rw, rb) if has_rw else (None, None)
        got = bnr.rforward(x, ww, mean, invstd, rx, rwv, rbv, backend="cpp")
        want = bnr.rforward_reference(x, ww, mean, invstd, rx, rwv, rbv)
        got2 = bnr.rbackward(x, ww, mean, invstd, m["gy"], m["rgy"], rx, got[1], got[2], rwv, need_gx,
                             backend="cpp")
        want2 = bnr.rbackward_reference(x, ww, mean, invstd, m["gy"], m["rgy"], rx, want[1], want[2], rwv, need_gx)
        for g, r in zip(got + got2, want + want2):
            assert (g is None) == (r is None)
            if g is not None:
                assert g.dtype == r.dtype and g.shape == r.shape
                err = ((g.double() - r.double()).norm() / r.double().norm()).item()
                assert err < tol, (affine, has_rx, has_rw, need_gx, err)
                checked += 1
    assert checked == 58  # 12 configurations: R(y) (+ its two sums with rx), R(dw), R(db) (+ R(dx) when asked)


@needs_kernel
def test_which_path_runs(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    x, w, b, m, rw, rb = _case((4, 3, 5, 5), torch.float32, gen)
    mean, invstd = _stats(x)
    calls = []
    real = bnr.rforward_reference  # counted where the registry calls it: the torch implementation
    monkeypatch.setattr(_backend.implementation("batch_norm_rop", "torch"), "rforward",
                        lambda *a: calls.append(1) or real(*a))
    monkeypatch.delenv("METAFAST_BACKEND", raising=False)
    _backend.reset()
    bnr.rforward(x, w, mean, invstd, m["rx"], rw, rb)
    assert calls == [], "contiguous float32 CPU maps take the C++ kernel"
    bnr.rforward(x.half(), w, mean, invstd, m["rx"].half(), rw, rb)  # float16: the reference
    bnr.rforward(x, w, mean, invstd, m["rx"].transpose(2, 3), rw, rb)  # non-contiguous: the reference
    bnr.rforward(x.requires_grad_(), w, mean, invstd, m["rx"], rw, rb)  # autograd: the reference
    assert len(calls) == 3
    x = x.detach()
    for env in ("torch", "triton"):  # triton: this op has no Triton kernel, the reference runs
        monkeypatch.setenv("METAFAST_BACKEND", env)
        bnr.rforward(x, w, mean, invstd, m["rx"], rw, rb)
    assert len(calls) == 5
    with pytest.raises(_backend.BackendUnavailableError, match="batch_norm_rop has no triton"):
        bnr.rforward(x, w, mean, invstd, m["rx"], rw, rb, backend="triton")


@needs_kernel
def test_bad_arguments_name_the_argument():
    x = torch.randn(4, 3, 5, 5)
    mean, invstd = _stats(x)
    with pytest.raises(RuntimeError, match=r"rx must have x's shape"):
        torch.ops.metafast.batch_norm_rforward_cxx(x, None, mean, invstd, torch.randn(4, 3, 5, 4), None, None)
    with pytest.raises(RuntimeError, match=r"invstd must have C = 3 elements"):
        torch.ops.metafast.batch_norm_rforward_cxx(x, None, mean, invstd[:2], x, None, None)
    with pytest.raises(RuntimeError, match=r"gy must be contiguous"):
        torch.ops.metafast.batch_norm_rbackward_cxx(x, None, mean, invstd, x.transpose(2, 3), x, None, None, None,
                                                    None, True)
    with pytest.raises(RuntimeError, match=r"sum_rx_xhat and sum_rx"):
        torch.ops.metafast.batch_norm_rbackward_cxx(x, None, mean, invstd, x, x, x, None, None, None, True)
    with pytest.raises(ValueError, match="rx or rw must be given"):
        bnr.rforward(x, None, mean, invstd, None)
    with pytest.raises(ValueError, match="rw and rb must be given together"):
        bnr.rforward(x, None, mean, invstd, x, torch.ones(3), None)


@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_conv4_meta_gradient_with_and_without_kernels(dtype, tol, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    T, ways = 4, 3
    sx, qx = (torch.rand(T, ways, 1, 28, 28, generator=gen, dtype=dtype) for _ in range(2))
    sy = qy = torch.arange(ways).repeat(T, 1)
    model = Conv4.omniglot(ways).to(dtype)

    def meta_grad():
        model.zero_grad()
        maml = BatchedMAML(model, inner_lr=0.4, inner_steps=2, loss="cross_entropy")
        maml(sx, sy, qx, qy).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    calls = []
    real = bnr.rbackward_reference  # counted where the registry calls it: the torch implementation
    monkeypatch.setattr(_backend.implementation("batch_norm_rop", "torch"), "rbackward",
                        lambda *a: calls.append(1) or real(*a))
    monkeypatch.delenv("METAFAST_BACKEND", raising=False)
    with_kernels = meta_grad()
    assert calls == []
    monkeypatch.setenv("METAFAST_BACKEND", "torch")
    reference = meta_grad()
    assert len(calls) == 2 * 4  # 2 inner steps x 4 batch norms
    assert ((with_kernels - reference).norm() / reference.norm()).item() < tol
