"""task_cross_entropy: Triton kernels (interpreted on CPU) and the CUDA extension against float64
pure-PyTorch references. Run: TRITON_INTERPRET=1 python -m pytest tests/test_task_cross_entropy.py -q"""
import os

import pytest
import torch
import torch.nn.functional as F

from metafast import _backend
from metafast.ops.task_cross_entropy import (
    task_cross_entropy,
    task_cross_entropy_reference,
    task_cross_entropy_reference_with_grad,
    task_cross_entropy_with_grad,
)
from gpu_backends import assert_some_gpu_backend, require_gpu_backend
from triton_compile import assert_compiles_for_sm90

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")
# The interpreter evaluates padding lanes of a tile too (log(0), 0 * inf); they are masked out.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

# (loss atol, gradient atol) per logits dtype; rtol alongside.
TOL = {
    torch.float64: dict(atol=1e-11, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=5e-3),
}
# Loss of half logits is accumulated and returned in float32.
LOSS_TOL_HALF = dict(atol=1e-5, rtol=1e-5)


def assert_close(name, actual, expected, atol, rtol):
    """assert_close that prints the first mismatching entries."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=False)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rows = [f"  {tuple(i)}: got {a[tuple(i)].item():.10g}, expected {e[tuple(i)].item():.10g}" for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} mismatches (atol={atol}, rtol={rtol}); "
                             "first:\n" + "\n".join(rows))


def make_inputs(T, N, C, dtype=torch.float64, seed=0, ignore=True, all_ignored_task=False,
                device="cpu", scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, N, C, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    labels = torch.randint(0, C, (T, N), generator=g)
    if ignore:
        labels[torch.rand(T, N, generator=g) < 0.25] = -100
    if all_ignored_task:
        labels[-1] = -100
    return logits, labels.to(device)


def oracle(logits, labels, **kw):
    """float64 reference on the same (possibly rounded) logit values."""
    return task_cross_entropy_reference(logits.detach().double(), labels, **kw)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force the multi-chunk (online softmax) sweep at small C."""
    from metafast.kernels import task_cross_entropy as k

    monkeypatch.setattr(k, "MAX_BLOCK_C", 32)
    monkeypatch.setattr(k, "MAX_BLOCK_C_FP64", 32)


# ----------------------------------------------------------------------------------------------
# The reference itself, against torch.nn.functional.cross_entropy task by task
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_functional_cross_entropy(smoothing, reduction):
    logits, labels = make_inputs(3, 7, 5, all_ignored_task=True)
    got = task_cross_entropy_reference(logits, labels, smoothing, reduction=reduction)
    for t in range(2):  # the last task is all ignored: F.cross_entropy's mean is 0/0 there
        want = F.cross_entropy(logits[t], labels[t], label_smoothing=smoothing, reduction=reduction)
        assert_close(f"task {t}", got[t], want, **TOL[torch.float64])
    # Defined result for an all-ignored task: 0, never NaN.
    assert torch.all(got[-1] == 0)


def test_reference_with_grad_is_the_autograd_gradient():
    logits, labels = make_inputs(3, 7, 5, all_ignored_task=True)
    for reduction in ["mean", "sum", "none"]:
        x = logits.clone().requires_grad_()
        loss = task_cross_entropy_reference(x, labels, 0.1, reduction=reduction)
        (want,) = torch.autograd.grad(loss.sum(), x)
        loss2, dlogits = task_cross_entropy_reference_with_grad(logits, labels, 0.1, reduction=reduction)
        assert_close("loss", loss2, loss, **TOL[torch.float64])
        assert_close(f"dlogits ({reduction})", dlogits, want, **TOL[torch.float64])


# ----------------------------------------------------------------------------------------------
# Triton kernels (interpreted) against the float64 reference
# ----------------------------------------------------------------------------------------------
FWD_CASES = [  # (T, N, C, chunked)
    (3, 7, 5, False),
    (3, 7, 100, False),
    (3, 4, 1000, False),
    (3, 5, 100, True),  # 4 chunks of 32, the last one partial
]


@needs_interpreter
@pytest.mark.parametrize("T,N,C,chunked", FWD_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("smoothing,reduction", [(0.0, "mean"), (0.1, "mean"), (0.0, "sum"), (0.1, "none")])
def test_triton_loss_grad_double_grad(T, N, C, chunked, dtype, smoothing, reduction, request):
    if chunked:
        request.getfixturevalue("small_chunks")
    tol = TOL[dtype]
    logits, labels = make_inputs(T, N, C, dtype=dtype, seed=T * 1000 + C, all_ignored_task=True)
    x = logits.clone().requires_grad_()
    xr = logits.detach().double().requires_grad_()

    loss = task_cross_entropy(x, labels, smoothing, reduction=reduction, backend="triton")
    ref = task_cross_entropy_reference(xr, labels, smoothing, reduction=reduction)
    assert loss.dtype == dtype
    assert_close("loss", loss, ref, **tol)
    assert torch.isfinite(loss).all()

    g = torch.randn(loss.shape, dtype=torch.float64) * 2 + 0.5  # grad_output != 1
    (gx,) = torch.autograd.grad(loss, x, g.to(loss.dtype), create_graph=True)
    (gr,) = torch.autograd.grad(ref, xr, g, create_graph=True)
    assert gx.dtype == dtype
    assert_close("dloss/dlogits", gx, gr, **tol)

    # Second order: d<gx, v>/dlogits runs through the fused softmax JVP.
    v = torch.randn(T, N, C, dtype=torch.float64)
    (hx,) = torch.autograd.grad(gx, x, v.to(dtype))
    (hr,) = torch.autograd.grad(gr, xr, v)
    assert_close("d2loss/dlogits2 . v", hx, hr, **tol)


@needs_interpreter
@pytest.mark.parametrize("T,N,C,chunked", [(3, 7, 5, False), (3, 5, 100, True)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_with_grad(T, N, C, chunked, reduction, request):
    if chunked:
        request.getfixturevalue("small_chunks")
    tol = TOL[torch.float64]
    logits, labels = make_inputs(T, N, C, seed=7, all_ignored_task=True)
    x = logits.clone().requires_grad_()
    xr = logits.clone().requires_grad_()
    loss, dl = task_cross_entropy_with_grad(x, labels, 0.15, reduction=reduction, backend="triton")
    loss_r, dl_r = task_cross_entropy_reference_with_grad(xr, labels, 0.15, reduction=reduction)
    assert_close("loss", loss, loss_r, **tol)
    assert_close("dlogits", dl, dl_r, **tol)

    # dlogits is differentiable (MAML's hand-made inner gradient); loss and dlogits together too.
    v = torch.randn(T, N, C, dtype=torch.float64)
    g = torch.randn(loss.shape, dtype=torch.float64)
    for name, out, out_r in [("dlogits only", (dl * v).sum(), (dl_r * v).sum()),
                             ("loss and dlogits", (dl * v).sum() + (loss * g).sum(),
                              (dl_r * v).sum() + (loss_r * g).sum())]:
        (h,) = torch.autograd.grad(out, x, retain_graph=True)
        (h_r,) = torch.autograd.grad(out_r, xr, retain_graph=True)
        assert_close(name, h, h_r, **tol)


@needs_interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_task_is_zero_not_nan(backend, reduction):
    logits, labels = make_inputs(2, 4, 6, ignore=False, all_ignored_task=True)
    x = logits.clone().requires_grad_()
    loss = task_cross_entropy(x, labels, 0.1, reduction=reduction, backend=backend)
    assert torch.all(loss[-1] == 0) and torch.isfinite(loss).all()
    assert torch.all(loss[0] != 0)
    (gx,) = torch.autograd.grad(loss.sum(), x)
    assert torch.all(gx[-1] == 0) and torch.isfinite(gx).all()
    _, dl = task_cross_entropy_with_grad(logits, labels, 0.1, reduction=reduction, backend=backend)
    assert torch.all(dl[-1] == 0)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [5, 100])
def test_triton_half_forward(dtype, C):
    logits, labels = make_inputs(3, 7, C, dtype=dtype, seed=C)
    loss, dl = task_cross_entropy_with_grad(logits, labels, 0.1, backend="triton")
    loss_r, dl_r = task_cross_entropy_reference_with_grad(logits.double(), labels, 0.1)
    assert loss.dtype == torch.float32 and dl.dtype == dtype
    assert_close("loss", loss, loss_r, **LOSS_TOL_HALF)  # fp32 accumulation of the exact inputs
    assert_close("dlogits", dl, dl_r, **TOL[dtype])  # rounded once to the half dtype
    # The reference path follows the same dtype rule.
    assert task_cross_entropy_reference(logits, labels).dtype == torch.float32


@needs_interpreter
@pytest.mark.parametrize("chunked", [False, True])
def test_triton_masked_classes_and_strided_inputs(chunked, request):
    """-inf logits (masked classes, also filling whole chunks) and non-contiguous logits/labels."""
    if chunked:
        request.getfixturevalue("small_chunks")
    T, N, C = 3, 5, 70
    base, labels_nt = make_inputs(N, T, C, seed=3, ignore=False)
    masked = (torch.arange(C) < 40) & (torch.arange(C) % 3 != 2)  # chunk 0 keeps only 10 classes
    base[..., masked] = float("-inf")
    allowed = (~masked).nonzero().squeeze(1)
    logits = base.transpose(0, 1)  # [T, N, C] with strides (C, T * C, 1)
    labels = allowed[labels_nt % len(allowed)].t()
    assert not logits.is_contiguous() and not labels.is_contiguous()

    x = logits.clone().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not x.is_contiguous()
    loss = task_cross_entropy(x, labels, backend="triton")
    (gx,) = torch.autograd.grad(loss.sum(), x)
    xr = logits.clone().requires_grad_()
    ref = task_cross_entropy_reference(xr, labels)
    (gr,) = torch.autograd.grad(ref.sum(), xr)
    assert torch.isfinite(ref).all() and torch.all(gr[..., masked] == 0)
    assert_close("loss", loss, ref, **TOL[torch.float64])
    assert_close("grad", gx, gr, **TOL[torch.float64])


# ----------------------------------------------------------------------------------------------
# Derivative checks and op registration
# ----------------------------------------------------------------------------------------------
def test_reference_gradcheck_gradgradcheck():
    logits, labels = make_inputs(2, 3, 5, seed=11)
    x = logits.clone().requires_grad_()
    for red in ["mean", "none"]:
        fn = lambda x: task_cross_entropy_reference(x, labels, 0.1, reduction=red)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


@needs_interpreter
def test_triton_gradcheck_gradgradcheck_full():
    logits, labels = make_inputs(2, 2, 3, seed=5, ignore=False)
    labels[0, 1] = -100
    x = logits.clone().requires_grad_()
    fn = lambda x: task_cross_entropy(x, labels, 0.1, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@needs_interpreter
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_gradcheck_gradgradcheck_fast(reduction):
    logits, labels = make_inputs(3, 4, 7, seed=13, all_ignored_task=True)
    x = logits.clone().requires_grad_()
    fn = lambda x: task_cross_entropy(x, labels, 0.1, reduction=reduction, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)
    # (loss, dlogits): gradgradcheck here is a third derivative of the loss.
    fn2 = lambda x: task_cross_entropy_with_grad(x, labels, 0.1, reduction=reduction, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn2, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn2, (x,), fast_mode=True)


@needs_interpreter
def test_opcheck():
    logits, labels = make_inputs(2, 3, 5, seed=17)
    x = logits.clone().requires_grad_()
    torch.library.opcheck(torch.ops.metafast.task_cross_entropy.default, (x, labels, 0.1, -100, "mean", "triton"))
    torch.library.opcheck(torch.ops.metafast.task_cross_entropy.default, (x, labels, 0.0, -100, "none", "triton"))
    lse = torch.logsumexp(logits, -1)
    v = torch.randn_like(logits).requires_grad_()
    w = torch.rand(2, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.metafast.task_cross_entropy_softmax_jvp.default, (x, lse, v, w, "triton"))


@needs_interpreter
def test_second_order_maml_meta_gradient():
    """One inner SGD step of a per-task linear classifier with the inner gradient formed by hand
    from dlogits, then the query loss: the meta-gradient must match the reference exactly."""
    T, S, Q, D, C = 3, 5, 4, 6, 5
    g = torch.Generator().manual_seed(23)
    xs, xq = torch.randn(T, S, D, generator=g, dtype=torch.float64), torch.randn(T, Q, D, generator=g, dtype=torch.float64)
    ys, yq = torch.randint(0, C, (T, S), generator=g), torch.randint(0, C, (T, Q), generator=g)
    ys[1, 2] = -100
    w0 = torch.randn(D, C, generator=g, dtype=torch.float64)

    def meta_grad(loss_fn, with_grad_fn):
        w = w0.clone().requires_grad_()
        wt = w.expand(T, D, C)
        _, dlogits = with_grad_fn(torch.bmm(xs, wt), ys, 0.1)
        fast = wt - 0.5 * torch.bmm(xs.transpose(1, 2), dlogits)  # d sum_t L_t / dW_t
        outer = loss_fn(torch.bmm(xq, fast), yq, 0.1).mean()
        return torch.autograd.grad(outer, w)[0]

    want = meta_grad(task_cross_entropy_reference, task_cross_entropy_reference_with_grad)
    got = meta_grad(lambda *a: task_cross_entropy(*a, backend="triton"),
                    lambda *a: task_cross_entropy_with_grad(*a, backend="triton"))
    # ... and the reference itself against plain autograd(create_graph) through the inner loss.
    w = w0.clone().requires_grad_()
    wt = w.expand(T, D, C)
    inner = task_cross_entropy_reference(torch.bmm(xs, wt), ys, 0.1).sum()
    (gw,) = torch.autograd.grad(inner, wt, create_graph=True)
    autograd_ref = torch.autograd.grad(task_cross_entropy_reference(torch.bmm(xq, wt - 0.5 * gw), yq, 0.1).mean(), w)[0]
    assert_close("reference vs autograd", want, autograd_ref, **TOL[torch.float64])
    assert_close("meta-gradient", got, want, **TOL[torch.float64])


# ----------------------------------------------------------------------------------------------
# Errors and dispatch
# ----------------------------------------------------------------------------------------------
_X, _Y = torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
BAD_INPUTS = [  # (logits, labels, kwargs, exception, message)
    (torch.randn(4, 5), torch.zeros(4, dtype=torch.long), {}, ValueError, r"logits must be a 3-D tensor \[T, N, C\]"),
    (_X.long(), _Y, {}, TypeError, "logits must be float16, bfloat16, float32 or float64"),
    (torch.randn(2, 3, 0), _Y, {}, ValueError, "logits must have at least one class"),
    ([[0.0]], _Y, {}, TypeError, "logits must be a Tensor"),
    (_X, _Y.int(), {}, TypeError, "labels must have dtype torch.int64, got torch.int32"),
    (_X, torch.zeros(3, 2, dtype=torch.long), {}, ValueError, r"labels must have shape \[T, N\] = \(2, 3\)"),
    (_X, torch.zeros(2, 3, 1, dtype=torch.long), {}, ValueError, "labels must have shape"),
    (_X, torch.tensor([[0, 1, 4], [0, 0, 0]]), {}, ValueError, r"labels must be class ids in \[0, 4\).*got 4"),
    (_X, torch.tensor([[0, 1, -1], [0, 0, 0]]), {}, ValueError, "labels must be class ids.*got -1"),
    (_X, _Y, {"label_smoothing": 1.0}, ValueError, r"label_smoothing must be a float in \[0, 1\)"),
    (_X, _Y, {"label_smoothing": -0.1}, ValueError, "label_smoothing must be"),
    (_X, _Y, {"reduction": "avg"}, ValueError, "reduction must be one of"),
    (_X, _Y, {"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
    (_X, _Y, {"backend": "cuda"}, _backend.BackendUnavailableError, "cuda backend cannot run it"),
    (_X, _Y, {"backend": "numpy"}, ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_inputs_raise_naming_the_argument(backend, case):
    logits, labels, kwargs, exc, msg = BAD_INPUTS[case]
    kwargs = {"backend": backend, **kwargs}
    for fn in (task_cross_entropy, task_cross_entropy_with_grad):
        with pytest.raises(exc, match=msg):
            fn(logits, labels, **kwargs)
    if "backend" not in BAD_INPUTS[case][2]:
        with pytest.raises(exc, match=msg):
            task_cross_entropy_reference(logits, labels, **{k: v for k, v in kwargs.items() if k != "backend"})


def test_ignore_index_other_than_default_and_in_range():
    logits, labels = make_inputs(2, 6, 4, ignore=False, seed=2)
    labels[0, :3] = 2  # ignore_index inside [0, C): those rows are skipped, not counted as class 2
    got = task_cross_entropy_reference(logits, labels, ignore_index=2)
    want = torch.stack([F.cross_entropy(logits[t], labels[t], ignore_index=2) for t in range(2)])
    assert_close("loss", got, want, **TOL[torch.float64])
    if INTERPRET:
        assert_close("triton", task_cross_entropy(logits, labels, ignore_index=2, backend="triton"), want,
                     **TOL[torch.float64])


@needs_interpreter
def test_kernel_never_reads_a_bad_label():
    """Unchecked out-of-range labels (the CUDA opt-out) give NaN rows, not out-of-bounds reads."""
    from metafast.kernels import task_cross_entropy as k

    logits, labels = make_inputs(2, 3, 5, ignore=False, seed=4)
    labels[0, 1] = 5
    labels[1, 2] = -7
    w = torch.ones(2, 3, dtype=torch.float64)
    row_loss, dlogits, _ = k.task_cross_entropy_fwd(logits, labels, w, 0.0, -100)
    bad = torch.zeros(2, 3, dtype=torch.bool)
    bad[0, 1] = bad[1, 2] = True
    assert torch.isnan(row_loss[bad]).all() and torch.isfinite(row_loss[~bad]).all()
    assert torch.isnan(dlogits[bad]).all() and torch.isfinite(dlogits[~bad]).all()


def test_cpu_default_is_the_reference(monkeypatch):
    monkeypatch.delenv(_backend.ENV, raising=False)
    assert _backend.resolve("task_cross_entropy", "cpu") == "torch"
    logits, labels = make_inputs(2, 3, 5, seed=9)
    x = logits.clone().requires_grad_()
    loss = task_cross_entropy(x, labels, 0.1)  # auto -> "torch" on CPU
    assert "metafast" not in type(loss.grad_fn).__name__  # plain autograd, no custom op
    assert torch.equal(loss, task_cross_entropy(logits, labels, 0.1, backend="torch"))
    # an independent oracle, not the reference the default runs: one F.cross_entropy per task
    want = torch.stack([F.cross_entropy(logits[t], labels[t], label_smoothing=0.1) for t in range(2)])
    assert_close("loss", loss, want, **TOL[torch.float64])


def test_empty_batch():
    logits = torch.randn(2, 0, 5, dtype=torch.float64)
    labels = torch.zeros(2, 0, dtype=torch.long)
    assert torch.equal(task_cross_entropy(logits, labels, backend="torch"), torch.zeros(2, dtype=torch.float64))
    if INTERPRET:
        assert torch.equal(task_cross_entropy(logits, labels, backend="triton"), torch.zeros(2, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# The Triton kernels also compile for real GPUs (no device needed): the interpreter alone misses
# compile-only errors (non-constexpr globals, the code generator's type rules). Runs in a child
# process because the interpreter, once active, patches triton.language.
# ----------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
from metafast.kernels import task_cross_entropy as k

n = 0
for dtype, single, smoothing in [("fp32", True, True), ("fp32", False, False), ("bf16", True, False),
                                 ("fp64", False, True)]:
    acc = "fp64" if dtype == "fp64" else "fp32"
    tiles = {"BLOCK_R": 256 if single else 1, "BLOCK_C": 8 if single else 2048, "SINGLE_CHUNK": single,
             "ACC_DTYPE": tl.float64 if dtype == "fp64" else tl.float32}
    i64 = lambda *names: {n: "i64" for n in names}
    sizes = {"R": "i32", "N": "i32", "C": "i32"}
    sig = {"logits_ptr": "*" + dtype, "labels_ptr": "*i64", "weight_ptr": "*" + acc, "loss_ptr": "*" + acc,
           "dlogits_ptr": "*" + dtype, "lse_ptr": "*" + acc,
           **i64("stride_xt", "stride_xn", "stride_xc", "stride_yt", "stride_yn"), **sizes,
           "ignore_index": "i32", "smoothing_hi": "fp32", "smoothing_lo": "fp32",
           **{name: "constexpr" for name in [*tiles, "HAS_SMOOTHING"]}}
    compile_(k._tce_fwd_kernel, sig, {**tiles, "HAS_SMOOTHING": smoothing})
    sig = {"logits_ptr": "*" + dtype, "lse_ptr": "*" + acc, "v_ptr": "*" + dtype, "scale_ptr": "*" + acc,
           "out_ptr": "*" + dtype, **i64("stride_xt", "stride_xn", "stride_xc", "stride_vt", "stride_vn", "stride_vc"),
           **sizes, **{name: "constexpr" for name in tiles}}
    compile_(k._tce_softmax_jvp_kernel, sig, tiles)
    n += 2
print("COMPILED", n)
"""


def test_triton_kernels_compile_for_sm90():
    assert_compiles_for_sm90(_COMPILE_SCRIPT, 8)


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA extension and Triton compiled for the device
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("T,N,C", [(3, 7, 5), (4, 33, 100), (2, 9, 1000), (2, 5, 3000), (2, 3, 20000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gpu_matches_reference(backend, T, N, C, dtype):
    require_gpu_backend("task_cross_entropy", backend)
    logits, labels = make_inputs(T, N, C, dtype=dtype, seed=C, all_ignored_task=True, device="cuda")
    x = logits.clone().requires_grad_()
    loss, dl = task_cross_entropy_with_grad(x, labels, 0.1, backend=backend)
    loss_r, dl_r = task_cross_entropy_reference_with_grad(logits.double(), labels, 0.1)
    assert_close("loss", loss, loss_r, **(LOSS_TOL_HALF if dtype == torch.bfloat16 else TOL[dtype]))
    assert_close("dlogits", dl, dl_r, **TOL[dtype])
    if dtype == torch.bfloat16:
        return
    xr = logits.double().requires_grad_()
    g = torch.randn(T, device="cuda", dtype=torch.float64) + 0.5
    (gx,) = torch.autograd.grad(task_cross_entropy(x, labels, 0.1, backend=backend), x, g.to(dtype), create_graph=True)
    (gr,) = torch.autograd.grad(task_cross_entropy_reference(xr, labels, 0.1), xr, g, create_graph=True)
    assert_close("grad", gx, gr, **TOL[dtype])
    v = torch.randn(T, N, C, device="cuda", dtype=torch.float64)
    assert_close("double grad", torch.autograd.grad(gx, x, v.to(dtype))[0], torch.autograd.grad(gr, xr, v)[0], **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_gradcheck_gradgradcheck(backend):
    require_gpu_backend("task_cross_entropy", backend)
    logits, labels = make_inputs(3, 4, 7, seed=31, all_ignored_task=True, device="cuda")
    x = logits.clone().requires_grad_()
    for red in ["mean", "none"]:
        fn = lambda x: task_cross_entropy_with_grad(x, labels, 0.1, reduction=red, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))
    torch.library.opcheck(torch.ops.metafast.task_cross_entropy.default, (x, labels, 0.1, -100, "mean", backend))


@pytest.mark.gpu
def test_gpu_has_a_backend():
    assert_some_gpu_backend("task_cross_entropy")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_bad_label_raises(backend):
    require_gpu_backend("task_cross_entropy", backend)
    logits, labels = make_inputs(2, 3, 5, device="cuda")
    labels[0, 0] = 9
    with pytest.raises(ValueError, match="labels must be class ids"):
        task_cross_entropy(logits, labels, backend=backend)
