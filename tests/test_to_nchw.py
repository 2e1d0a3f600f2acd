"""metafast.ops.to_nchw: the C++ channels_last -> NCHW copy equals x.contiguous() bit for bit (tile
edges, odd sizes, every AVX2 / scalar boundary), which path runs when, and its argument checks."""
import pytest
import torch

from metafast import _backend
from metafast.ops import to_nchw as tn

from cxx_ext import skipif_missing

pytestmark = skipif_missing("to_nchw_cxx")
CL = torch.channels_last

# (N, C, H, W): Conv4's grouped and per-image maps, then sizes off the 16 x 8 tiles and the 8 x 8 blocks
SHAPES = [(5, 2048, 14, 14), (160, 64, 14, 14), (1, 8, 4, 4), (2, 13, 3, 5), (3, 5, 7, 9), (1, 1, 17, 1),
          (2, 24, 1, 33), (0, 8, 4, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_equals_contiguous(shape):
    x = torch.randn(shape).contiguous(memory_format=CL)
    out = torch.ops.metafast.to_nchw_cxx(x)
    assert out.is_contiguous() and out.shape == x.shape
    assert torch.equal(out, x.contiguous())


def test_which_path_runs(monkeypatch):
    monkeypatch.delenv("METAFAST_BACKEND", raising=False)
    _backend.reset()
    calls = []
    real = torch.ops.metafast.to_nchw_cxx

    class Ops:  # counts kernel calls without touching the real op registry
        to_nchw_cxx = staticmethod(lambda x: calls.append(1) or real(x))

    monkeypatch.setattr(tn.torch.ops, "metafast", Ops())
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=CL)
    assert torch.equal(tn.to_nchw(x), x.contiguous()) and calls == [1]
    for other in (x.contiguous(), x.double(), x.clone().requires_grad_()):  # NCHW already; float64; autograd
        assert torch.equal(tn.to_nchw(other), other.contiguous())
    assert calls == [1]
    monkeypatch.setenv("METAFAST_BACKEND", "torch")
    tn.to_nchw(x)
    monkeypatch.setenv("METAFAST_BACKEND", "triton")  # no Triton kernel: torch, no error
    tn.to_nchw(x)
    assert calls == [1]


def test_bad_arguments_name_the_argument():
    with pytest.raises(RuntimeError, match="x must be channels_last"):
        torch.ops.metafast.to_nchw_cxx(torch.randn(2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.metafast.to_nchw_cxx(torch.randn(2, 3, 4, 4, dtype=torch.float64).contiguous(memory_format=CL))
    with pytest.raises(RuntimeError, match=r"x must be \[N, C, H, W\]"):
        torch.ops.metafast.to_nchw_cxx(torch.randn(2, 3, 4))
