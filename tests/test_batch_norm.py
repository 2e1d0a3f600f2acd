"""metafast.ops.batch_norm: the C++ CPU forward with batch statistics against the float64 formula and
ATen's native_batch_norm, which path runs when, and its argument checks."""
import pytest
import torch

from metafast import _backend
from metafast.ops import batch_norm as bn

from cxx_ext import skipif_missing

pytestmark = skipif_missing("batch_norm_forward_cxx")
kernel = torch.ops.metafast.batch_norm_forward_cxx if hasattr(torch.ops.metafast, "batch_norm_forward_cxx") else None

# Conv4's task-grouped 14x14 map, BatchNorm1d's [N, C] and [N, C, L], one value per channel, odd sizes
SHAPES = [(5, 2048, 14, 14), (7, 3), (4, 5, 9), (1, 6, 1, 1), (3, 7, 5, 3)]


def _affine(C, dtype, which):
    g = torch.Generator().manual_seed(C)
    w = torch.rand(C, generator=g, dtype=dtype) + 0.5 if which in ("both", "weight") else None
    b = torch.randn(C, generator=g, dtype=dtype) if which in ("both", "bias") else None
    return w, b


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("which", ["both", "none", "weight", "bias"])
def test_float64_matches_the_formula(shape, which):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    w, b = _affine(shape[1], torch.float64, which)
    got = kernel(x, w, b, 1e-5)
    want = bn.forward_reference(x, w, b, 1e-5)
    for name, g, r in zip(("y", "mean", "invstd"), got, want):
        assert g.dtype == torch.float64 and g.shape == r.shape, name
        err = ((g - r).norm() / r.norm().clamp_min(1e-300)).item()
        assert err <= 1e-13, f"{name}: rel err {err:.1e}"


@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[4:], ids=[str(s) for s in SHAPES[:3] + SHAPES[4:]])
def test_float32_matches_native(shape):
    # (one value per channel is left to the float64 test: y = b there, up to ATen's rounding of x alpha)
    x = torch.randn(shape) * 2 - 0.5
    w, b = _affine(shape[1], torch.float32, "both")
    got = kernel(x, w, b, 1e-3)
    want = torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.0, 1e-3)
    for name, g, r in zip(("y", "mean", "invstd"), got, want):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        torch.testing.assert_close(g, r, rtol=2e-6, atol=2e-6, msg=name)


def test_constant_channel_and_nan_stay_per_channel():
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    x[:, 1] = 2.5  # zero variance: invstd = 1 / sqrt(eps), y = b
    x[1, 2, 3, 3] = float("nan")
    w, b = _affine(4, torch.float64, "both")
    y, mean, invstd = kernel(x, w, b, 1e-4)
    assert mean[1].item() == 2.5 and invstd[1].item() == pytest.approx(100.0, rel=1e-12)
    assert torch.allclose(y[:, 1], b[1].expand_as(y[:, 1]))
    assert y[:, 2].isnan().all() and mean[2].isnan() and invstd[2].isnan()
    assert torch.isfinite(y[:, [0, 1, 3]]).all()


def test_which_path_runs(monkeypatch):
    monkeypatch.delenv("METAFAST_BACKEND", raising=False)
    _backend.reset()
    calls = []
    real = torch.ops.metafast.batch_norm_forward_cxx

    class Ops:  # counts kernel calls without touching the real op registry
        batch_norm_forward_cxx = staticmethod(lambda *a: calls.append(1) or real(*a))

    monkeypatch.setattr(bn.torch.ops, "metafast", Ops())
    x = torch.randn(5, 8, 7, 7)
    w, b = _affine(8, torch.float32, "both")
    bn.forward(x, w, b, 1e-5)
    assert calls == [1]
    small = torch.randn(5, 8, 2, 2)  # 20 values per channel: ATen's kernel
    strided = torch.randn(5, 7, 7, 8).permute(0, 3, 1, 2)
    for args in ((small, w, b), (strided, w, b), (x.half(), None, None)):
        y = bn.forward(*args, 1e-5)[0]
        torch.testing.assert_close(y, torch.ops.aten.native_batch_norm(*args, None, None, True, 0.0, 1e-5)[0])
    # under autograd: ATen's, and gradients flow
    xr = x.clone().requires_grad_()
    bn.forward(xr, w, b, 1e-5)[0].sum().backward()
    assert xr.grad is not None
    with torch.no_grad():
        bn.forward(xr, w, b, 1e-5)
    assert calls == [1, 1]
    monkeypatch.setenv("METAFAST_BACKEND", "torch")
    bn.forward(x, w, b, 1e-5)
    monkeypatch.setenv("METAFAST_BACKEND", "triton")  # no Triton kernel: torch, no error
    bn.forward(x, w, b, 1e-5)
    assert calls == [1, 1]


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        kernel(x.transpose(2, 3), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        kernel(x.half(), None, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"x must be \[N, C, \*spatial\]"):
        kernel(torch.randn(5), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="weight must have C = 3 elements"):
        kernel(x, torch.ones(4), None, 1e-5)
    with pytest.raises(RuntimeError, match="bias must have C = 3 elements"):
        kernel(x, None, torch.ones(2), 1e-5)
    with pytest.raises(RuntimeError, match="x must have at least one value per channel"):
        kernel(torch.randn(0, 3, 4, 4), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="eps must be >= 0"):
        kernel(x, None, None, -1.0)
