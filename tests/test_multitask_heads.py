"""multitask_heads_cross_entropy: Triton kernel (interpreted on CPU) and the CUDA extension against
float64 pure-PyTorch references. Run: TRITON_INTERPRET=1 python -m pytest tests/test_multitask_heads.py -q"""
import os

import pytest
import torch
import torch.nn.functional as F

from metafast import _backend
from metafast.ops.multitask_heads import multitask_heads_cross_entropy, multitask_heads_cross_entropy_reference
from gpu_backends import assert_some_gpu_backend, require_gpu_backend
from triton_compile import assert_compiles_for_sm90

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

TOL = {
    torch.float64: dict(atol=1e-11, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=3e-3, rtol=5e-3),
}


def make_inputs(H, N, I, O, dtype=torch.float64, shared=False, seed=0, device="cpu", bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*((N, I) if shared else (H, N, I)), generator=g, dtype=torch.float64)
    w = torch.randn(H, O, I, generator=g, dtype=torch.float64) / I ** 0.5 * 2
    b = torch.randn(H, O, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, O, (H, N), generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), y.to(device)


def per_head_loop(x, w, b, y, reduction="mean"):
    """Independent oracle: one F.linear + F.cross_entropy per head."""
    return torch.stack([F.cross_entropy(F.linear(x if x.dim() == 2 else x[h], w[h], None if b is None else b[h]),
                                        y[h], reduction=reduction) for h in range(w.shape[0])])


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def grads_of(loss, inputs, g):
    live = [t for t in inputs if t is not None]
    out = iter(torch.autograd.grad(loss, live, g))
    return [None if t is None else next(out) for t in inputs]


# --------------------------------------------------------------------------------------------
# The reference against a per-head loop of F.linear + F.cross_entropy
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reference_matches_per_head_cross_entropy(shared, reduction, assert_close):
    x, w, b, y = make_inputs(3, 7, 5, 4, shared=shared)
    got = multitask_heads_cross_entropy_reference(x, w, b, y, reduction)
    assert_close(got, per_head_loop(x, w, b, y, reduction), name="loss", **TOL[torch.float64])


def test_reference_gradcheck_gradgradcheck():
    x, w, b, y = make_inputs(2, 3, 4, 3, seed=3)
    inputs = tuple(leaves(x, w, b))
    fn = lambda x, w, b: multitask_heads_cross_entropy_reference(x, w, b, y)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


# --------------------------------------------------------------------------------------------
# Triton kernel (interpreted) against the float64 reference
# --------------------------------------------------------------------------------------------
CASES = [  # (H, N, I, O, shared)
    (3, 7, 13, 5, False),
    (2, 33, 40, 17, False),  # two row tiles, two chunks of I, odd everything
    (3, 7, 13, 5, True),
    (4, 5, 9, 70, True),
]


@needs_interpreter
@pytest.mark.parametrize("H,N,I,O,shared", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_loss_and_grads(H, N, I, O, shared, dtype, assert_close):
    x, w, b, y = make_inputs(H, N, I, O, dtype=dtype, shared=shared, seed=H * 100 + O)
    xs = leaves(x, w, b)
    xr = leaves(*(t.double() for t in (x, w, b)))
    loss = multitask_heads_cross_entropy(*xs, y, backend="triton")
    ref = multitask_heads_cross_entropy_reference(*xr, y)
    assert loss.dtype == dtype and loss.shape == (H,)
    assert_close(loss, ref, name="loss", **TOL[dtype])
    g = torch.randn(H, dtype=torch.float64) * 2 + 0.5  # grad_output != 1
    for name, a, e in zip(("d features", "d weight", "d bias"), grads_of(loss, xs, g.to(dtype)), grads_of(ref, xr, g)):
        assert a.dtype == dtype
        assert_close(a, e, name=name, **TOL[dtype])


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half(dtype, assert_close):
    x, w, b, y = make_inputs(3, 7, 13, 5, dtype=dtype, seed=5)
    xs = leaves(x, w, b)
    xr = leaves(*(t.double() for t in (x, w, b)))
    loss = multitask_heads_cross_entropy(*xs, y, backend="triton")
    ref = multitask_heads_cross_entropy_reference(*xr, y)
    assert loss.dtype == torch.float32  # fp32 accumulation, fp32 loss
    assert_close(loss, ref, name="loss", atol=1e-4, rtol=1e-4)
    g = torch.rand(3, dtype=torch.float64) + 0.5
    for name, a, e in zip(("d features", "d weight", "d bias"), grads_of(loss, xs, g.float()), grads_of(ref, xr, g)):
        assert_close(a, e, name=name, **TOL[dtype])


@needs_interpreter
def test_triton_no_bias_sum_and_strided(assert_close):
    """bias=None, reduction="sum", non-contiguous features and weight."""
    H, N, I, O = 3, 6, 11, 7
    x, w, _, y = make_inputs(H, N, I, O, seed=9, bias=False)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # [H, N, I] with strides (N*I, 1, N)
    wt = w.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xt.is_contiguous() and not wt.is_contiguous()
    a, c = leaves(xt, wt)
    loss = multitask_heads_cross_entropy(a, c, None, y, "sum", backend="triton")
    ar, cr = leaves(x, w)
    ref = per_head_loop(ar, cr, None, y, "sum")
    assert_close(loss, ref, name="loss", **TOL[torch.float64])
    g = torch.randn(H, dtype=torch.float64)
    for name, u, v in zip(("d features", "d weight"), grads_of(loss, [a, c], g), grads_of(ref, [ar, cr], g)):
        assert_close(u, v, name=name, **TOL[torch.float64])


@needs_interpreter
def test_triton_wide_heads_take_the_unfused_path(monkeypatch, assert_close):
    from metafast.kernels import multitask_heads as k

    monkeypatch.setattr(k, "MAX_BLOCK_O", 16)
    x, w, b, y = make_inputs(2, 5, 6, 40, shared=True, seed=4)
    xs = leaves(x, w, b)
    loss = multitask_heads_cross_entropy(*xs, y, backend="triton")
    ref = per_head_loop(x, w, b, y)
    assert_close(loss, ref, name="loss", **TOL[torch.float64])
    g = torch.randn(2, dtype=torch.float64)
    xr = leaves(x, w, b)
    for u, v in zip(grads_of(loss, xs, g), grads_of(per_head_loop(*xr, y), xr, g)):
        assert_close(u, v, name="grad", **TOL[torch.float64])


@needs_interpreter
@pytest.mark.parametrize("shared", [False, True])
def test_triton_gradcheck_gradgradcheck(shared):
    x, w, b, y = make_inputs(2, 3, 5, 4, shared=shared, seed=13)
    fn = lambda x, w, b: multitask_heads_cross_entropy(x, w, b, y, backend="triton")  # noqa: E731
    inputs = tuple(leaves(x, w, b))
    # fast mode: each full-Jacobian column is one interpreted kernel launch
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@needs_interpreter
def test_opcheck():
    x, w, b, y = make_inputs(2, 3, 5, 4, seed=17)
    op = torch.ops.metafast.multitask_heads_cross_entropy.default
    torch.library.opcheck(op, (*leaves(x, w, b), y, "mean", "triton"))
    xs, ws, bs, ys = make_inputs(2, 3, 5, 4, shared=True, seed=18)
    torch.library.opcheck(op, (*leaves(xs, ws, bs), ys, "sum", "triton"))


@needs_interpreter
def test_kernel_never_reads_a_bad_label():
    """Unchecked out-of-range labels (the CUDA opt-out) give NaN rows, not out-of-bounds reads."""
    from metafast.kernels import multitask_heads as k

    x, w, b, y = make_inputs(2, 3, 4, 5, seed=4)
    y[0, 1], y[1, 2] = 5, -7
    row_loss, dlogits = k.multitask_heads_fwd(x, w, b, y, True)
    bad = torch.zeros(2, 3, dtype=torch.bool)
    bad[0, 1] = bad[1, 2] = True
    assert torch.isnan(row_loss[bad]).all() and torch.isfinite(row_loss[~bad]).all()
    assert torch.isnan(dlogits[bad]).all() and torch.isfinite(dlogits[~bad]).all()


# --------------------------------------------------------------------------------------------
# Errors and dispatch
# --------------------------------------------------------------------------------------------
_X, _W, _B = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5)
_Y = torch.zeros(2, 3, dtype=torch.long)
BAD = [  # (features, weight, bias, labels, kwargs, exception, message)
    (_X, torch.randn(5, 4), _B, _Y, {}, ValueError, r"weight must be a 3-D tensor \[H, O, I\]"),
    (_X, _W.long(), _B, _Y, {}, TypeError, "weight must be float16, bfloat16, float32 or float64"),
    (torch.randn(3, 4, 5, 6), _W, _B, _Y, {}, ValueError, r"features must be \[H, N, I\] or shared \[N, I\]"),
    (torch.randn(2, 3, 6), _W, _B, _Y, {}, ValueError, "features must have I = 4"),
    (torch.randn(3, 3, 4), _W, _B, _Y, {}, ValueError, "features .* must have H = 2 heads"),
    (_X.double(), _W, _B, _Y, {}, TypeError, "features must have weight's dtype torch.float32"),
    (_X, _W, torch.randn(2, 4), _Y, {}, ValueError, r"bias must have shape \[H, O\] = \(2, 5\)"),
    (_X, _W, _B.double(), _Y, {}, TypeError, "bias must have weight's dtype"),
    (_X, _W, _B, _Y.int(), {}, TypeError, "labels must have dtype torch.int64"),
    (_X, _W, _B, torch.zeros(3, 2, dtype=torch.long), {}, ValueError, r"labels must have shape \[H, N\] = \(2, 3\)"),
    (_X, _W, _B, torch.tensor([[0, 1, 5], [0, 0, 0]]), {}, ValueError, r"labels must be class ids in \[0, 5\).*got 5"),
    (_X, _W, _B, torch.tensor([[0, 1, 0], [0, -1, 0]]), {}, ValueError, "labels must be class ids.*got -1"),
    (_X, _W, _B, _Y, {"reduction": "none"}, ValueError, "reduction must be one of"),
    ([[0.0]], _W, _B, _Y, {}, TypeError, "features must be a Tensor"),
    (_X, _W, _B, _Y, {"backend": "cuda"}, _backend.BackendUnavailableError, "cuda backend cannot run it"),
]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs_raise_naming_the_argument(backend, case):
    x, w, b, y, kwargs, exc, msg = BAD[case]
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(exc, match=msg):
        multitask_heads_cross_entropy(x, w, b, y, **kwargs)


def test_cpu_default_is_the_reference(monkeypatch, assert_close):
    monkeypatch.delenv(_backend.ENV, raising=False)
    assert _backend.resolve("multitask_heads_cross_entropy", "cpu") == "torch"
    x, w, b, y = make_inputs(2, 3, 4, 5, seed=9)
    xs = leaves(x, w, b)
    loss = multitask_heads_cross_entropy(*xs, y)
    assert "metafast" not in type(loss.grad_fn).__name__
    assert torch.equal(loss, multitask_heads_cross_entropy(x, w, b, y, backend="torch"))
    assert_close(loss, per_head_loop(x, w, b, y), name="loss", **TOL[torch.float64])


# --------------------------------------------------------------------------------------------
# The Triton kernel also compiles for sm_90 (no device needed). A child process: the interpreter,
# once active, patches triton.language.
# --------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
from metafast.kernels import multitask_heads as k

n = 0
for dtype, block_o in [("fp32", 16), ("bf16", 128), ("fp16", 1024), ("fp64", 16)]:
    acc = "fp64" if dtype == "fp64" else "fp32"
    consts = {"BLOCK_N": 16, "BLOCK_O": block_o, "BLOCK_K": 16, "MEAN": True, "IEEE": dtype == "fp32",
              "UPCAST": False, "ACC_DTYPE": tl.float64 if dtype == "fp64" else tl.float32}
    sig = {"x_ptr": "*" + dtype, "w_ptr": "*" + dtype, "b_ptr": "*" + dtype, "labels_ptr": "*i64",
           "loss_ptr": "*" + acc, "dlogits_ptr": "*" + dtype,
           **{s: "i64" for s in ["stride_xh", "stride_xn", "stride_xi", "stride_wh", "stride_wo", "stride_wi",
                                 "stride_bh", "stride_bo", "stride_yh", "stride_yn"]},
           "N": "i32", "I": "i32", "O": "i32", **{c: "constexpr" for c in consts}}
    compile_(k._mth_fwd_kernel, sig, consts)
    n += 1
print("COMPILED", n)
"""


def test_triton_kernel_compiles_for_sm90():
    assert_compiles_for_sm90(_COMPILE_SCRIPT, 4)


# --------------------------------------------------------------------------------------------
# GPU: the CUDA extension and Triton compiled for the device
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("H,N,I,O,shared", [(3, 7, 13, 5, False), (16, 300, 257, 10, True),
                                            (5, 129, 64, 1000, False), (2, 9, 32, 3000, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gpu_matches_reference(backend, H, N, I, O, shared, dtype, assert_close):
    require_gpu_backend("multitask_heads_cross_entropy", backend)
    x, w, b, y = make_inputs(H, N, I, O, dtype=dtype, shared=shared, seed=O, device="cuda")
    xs = leaves(x, w, b)
    xr = leaves(*(t.double() for t in (x, w, b)))
    loss = multitask_heads_cross_entropy(*xs, y, backend=backend)
    ref = multitask_heads_cross_entropy_reference(*xr, y)
    half = dtype == torch.bfloat16
    # bf16 on CUDA: the cuBLAS logits are rounded to bf16 before the softmax
    assert_close(loss, ref, name="loss", **(dict(atol=5e-2, rtol=2e-2) if half else TOL[dtype]))
    g = torch.rand(H, device="cuda", dtype=torch.float64) + 0.5
    for name, a, e in zip(("d features", "d weight", "d bias"), grads_of(loss, xs, g.to(loss.dtype)),
                          grads_of(ref, xr, g)):
        # gradients scale with 1/N: bf16 tolerance relative to the largest entry
        tol = dict(atol=3e-2 * e.abs().max().item(), rtol=3e-2) if half else TOL[dtype]
        assert_close(a, e, name=name, **tol)


@pytest.mark.gpu
def test_gpu_has_a_backend():
    assert_some_gpu_backend("multitask_heads_cross_entropy")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_gradcheck_and_bad_label(backend):
    require_gpu_backend("multitask_heads_cross_entropy", backend)
    x, w, b, y = make_inputs(2, 3, 5, 4, seed=31, device="cuda")
    fn = lambda x, w, b: multitask_heads_cross_entropy(x, w, b, y, backend=backend)  # noqa: E731
    inputs = tuple(leaves(x, w, b))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    torch.library.opcheck(torch.ops.metafast.multitask_heads_cross_entropy.default, (*inputs, y, "mean", backend))
    y_bad = y.clone()
    y_bad[0, 0] = 4
    with pytest.raises(ValueError, match="labels must be class ids"):
        multitask_heads_cross_entropy(x, w, b, y_bad, backend=backend)
