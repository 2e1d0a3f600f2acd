"""inner_update against float64 PyTorch references: the Triton kernels (under TRITON_INTERPRET=1 on
CPU), the torch path, the custom ops (opcheck), first and second derivatives, bad input; the CUDA
extension in @gpu tests. inner_update_multi: tests/test_inner_update_multi.py."""
import importlib
import os

import pytest
import torch

from metafast.ops.inner_update import inner_update, inner_update_reference
from triton_compile import assert_compiles_for_sm90

# the module (metafast.ops.inner_update the attribute is the function of that name)
iu_mod = importlib.import_module("metafast.ops.inner_update")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

needs_interpreter = pytest.mark.skipif(not (INTERPRET and HAVE_TRITON),
                                       reason="the Triton kernels run on CPU only with TRITON_INTERPRET=1")

# forward tolerances per dtype (outputs are rounded once to the dtype; |values| ~ 1)
FWD_TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 2e-6), torch.bfloat16: (1.6e-2, 1.6e-2),
           torch.float16: (2e-3, 2e-3)}
# gradient tolerances (sums over T, or over T*P for a scalar lr, in float32)
BWD_TOL = {torch.float64: (1e-11, 1e-11), torch.float32: (3e-5, 3e-5)}

SHAPES = [(3, 1001), (2, 7), (1, 2048)]
LR_KINDS = ["float", "0d", "vector"]
CLIPS = [None, 0.5, 1e6]  # off, active (norms ~ sqrt(P) > 0.5), inactive


def make_inputs(T, P, dtype, broadcast, lr_kind, device="cpu", requires_grad=False):
    theta = torch.randn(P if broadcast else (T, P), dtype=torch.float64).to(device, dtype)
    grad = torch.randn(T, P, dtype=torch.float64).to(device, dtype)
    if lr_kind == "float":
        lr = 0.37
    elif lr_kind == "0d":
        lr = torch.tensor(0.37, dtype=torch.float64).to(device, dtype)
    else:
        lr = (0.1 + torch.rand(P, dtype=torch.float64)).to(device, dtype)
    if requires_grad:
        theta.requires_grad_()
        grad.requires_grad_()
        if torch.is_tensor(lr):
            lr.requires_grad_()
    return theta, grad, lr


def as64(x):
    if torch.is_tensor(x):
        return x.detach().to(torch.float64).requires_grad_(x.requires_grad)
    return x


def diff_inputs(theta, grad, lr):
    return [x for x in (theta, grad, lr) if torch.is_tensor(x) and x.requires_grad]


# ----------------------------------------------------------------------------------------------
# the reference itself
# ----------------------------------------------------------------------------------------------
def test_reference_matches_clip_grad_norm_per_task(assert_close):
    T, P = 4, 33
    theta, grad, _ = make_inputs(T, P, torch.float64, True, "float")
    grad[2] *= 1e-3  # this task is not clipped
    out = inner_update_reference(theta, grad, 0.1, max_norm=1.5)
    for t in range(T):
        p = torch.nn.Parameter(theta.clone())
        p.grad = grad[t].clone()
        torch.nn.utils.clip_grad_norm_([p], 1.5)
        assert_close(out[t], theta - 0.1 * p.grad, 1e-14, 1e-14, f"task {t}")


# ----------------------------------------------------------------------------------------------
# Triton kernels (interpreted) vs the float64 reference
# ----------------------------------------------------------------------------------------------
@needs_interpreter
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("broadcast", [True, False])
@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("max_norm", CLIPS)
def test_triton_forward(shape, dtype, broadcast, lr_kind, max_norm, assert_close):
    theta, grad, lr = make_inputs(*shape, dtype, broadcast, lr_kind)
    out = inner_update(theta, grad, lr, max_norm, backend="triton")
    assert out.dtype == dtype and out.shape == shape
    expected = inner_update_reference(as64(theta), as64(grad), as64(lr), max_norm)
    atol, rtol = FWD_TOL[dtype]
    assert_close(out, expected, atol, rtol, "fast")


@needs_interpreter
@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("broadcast", [True, False])
@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("max_norm", CLIPS[:2])
def test_triton_backward(shape, dtype, broadcast, lr_kind, max_norm, assert_close):
    theta, grad, lr = make_inputs(*shape, dtype, broadcast, lr_kind, requires_grad=True)
    go = torch.randn(shape, dtype=torch.float64)
    out = inner_update(theta, grad, lr, max_norm, backend="triton")
    got = torch.autograd.grad(out, diff_inputs(theta, grad, lr), go.to(dtype))
    ref_in = [as64(x) for x in (theta, grad, lr)]
    expected = torch.autograd.grad(inner_update_reference(*ref_in, max_norm), diff_inputs(*ref_in), go)
    atol, rtol = BWD_TOL[dtype]
    for name, g, e in zip(["theta", "grad", "lr"], got, expected):
        assert g.dtype == dtype
        assert_close(g, e, atol, rtol, f"d {name}")


@needs_interpreter
@pytest.mark.parametrize("need", ["theta", "grad", "lr"])
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_triton_backward_single_input(need, max_norm, assert_close):
    """Only one input needs a gradient: the fused backward computes only that one."""
    theta, grad, lr = make_inputs(3, 1001, torch.float64, True, "vector")
    x = {"theta": theta, "grad": grad, "lr": lr}[need].requires_grad_()
    go = torch.randn(3, 1001, dtype=torch.float64)
    got, = torch.autograd.grad(inner_update(theta, grad, lr, max_norm, backend="triton"), x, go)
    expected, = torch.autograd.grad(inner_update_reference(theta, grad, lr, max_norm), x, go)
    assert_close(got, expected, 1e-12, 1e-12, f"d {need}")


@needs_interpreter
@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("max_norm", [None, 0.5])
@pytest.mark.parametrize("broadcast", [True, False])
def test_triton_double_backward(lr_kind, max_norm, broadcast, assert_close):
    """Second derivatives through the fused backward (what second-order MAML needs), against the
    reference differentiated twice by autograd."""
    T, P = 3, 37
    theta, grad, lr = make_inputs(T, P, torch.float64, broadcast, lr_kind, requires_grad=True)
    go = torch.randn(T, P, dtype=torch.float64, requires_grad=True)

    def second(fn):
        xs = diff_inputs(theta, grad, lr)
        firsts = torch.autograd.grad(fn(theta, grad, lr, max_norm), xs, go, create_graph=True)
        weights = [torch.randn_like(f) for f in firsts]
        loss = sum((w * f).sum() for w, f in zip(weights, firsts))
        return torch.autograd.grad(loss, xs + [go], allow_unused=True, materialize_grads=True)

    torch.manual_seed(1)
    got = second(lambda *a: inner_update(*a, backend="triton"))
    torch.manual_seed(1)
    expected = second(inner_update_reference)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, 1e-11, 1e-11, f"second derivative {i}")


@needs_interpreter
def test_triton_clip_zero_gradient_rows(assert_close):
    """A task whose gradient is all zeros: scale 1, no NaN in the clip derivative."""
    theta, grad, lr = make_inputs(3, 40, torch.float64, True, "vector", requires_grad=True)
    with torch.no_grad():
        grad[1] = 0
    go = torch.randn(3, 40, dtype=torch.float64)
    out = inner_update(theta, grad, lr, 0.5, backend="triton")
    got = torch.autograd.grad(out, [theta, grad, lr], go)
    expected = torch.autograd.grad(inner_update_reference(theta, grad, lr, 0.5), [theta, grad, lr], go)
    assert_close(out, inner_update_reference(theta, grad, lr, 0.5), 1e-12, 1e-12, "fast")
    for name, g, e in zip(["theta", "grad", "lr"], got, expected):
        assert torch.isfinite(g).all()
        assert_close(g, e, 1e-12, 1e-12, f"d {name}")


@needs_interpreter
@pytest.mark.parametrize("max_norm", [1e39, float("inf")])
def test_triton_clip_beyond_float32_range(max_norm, assert_close):
    """A max_norm float32 cannot hold reaches the kernel as (inf, 0), so nothing is clipped (no NaN)."""
    theta, grad, lr = make_inputs(2, 7, torch.float64, True, "float")
    out = inner_update(theta, grad, lr, max_norm, backend="triton")
    assert_close(out, inner_update_reference(theta, grad, lr, None), 1e-15, 1e-15, "fast")


@needs_interpreter
def test_triton_strided_rows(assert_close):
    """Rows with a stride larger than P (a column slice) are read in place."""
    big = torch.randn(3, 64, dtype=torch.float64)
    grad = big[:, 5:50]
    theta = torch.randn(45, dtype=torch.float64)
    out = inner_update(theta, grad, 0.2, 0.5, backend="triton")
    assert_close(out, inner_update_reference(theta, grad.contiguous(), 0.2, 0.5), 1e-12, 1e-12, "fast")


# ----------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck (float64) of the public op: torch path and forced Triton path
# ----------------------------------------------------------------------------------------------
PATHS = [None, pytest.param("triton", marks=needs_interpreter)]


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("broadcast", [True, False])
@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("max_norm", [None, 0.5, 1e6])
def test_gradcheck_and_gradgradcheck(backend, broadcast, lr_kind, max_norm):
    theta, grad, lr = make_inputs(2, 5, torch.float64, broadcast, lr_kind, requires_grad=True)
    inputs = tuple(diff_inputs(theta, grad, lr))

    def fn(*xs):
        it = iter(xs)
        th, g = next(it), next(it)
        lr_ = next(it) if torch.is_tensor(lr) else lr
        return inner_update(th, g, lr_, max_norm, backend=backend)

    fast = backend is not None  # the interpreter is slow: fast mode checks a random projection
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)


# ----------------------------------------------------------------------------------------------
# the custom ops: opcheck (schema, fake tensors, autograd registration, AOT dispatch)
# ----------------------------------------------------------------------------------------------
OP_BACKENDS = ["torch", pytest.param("triton", marks=needs_interpreter)]


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("lr_kind", ["float", "vector"])
@pytest.mark.parametrize("max_norm", [None, 0.5])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_inner_update(backend, lr_kind, max_norm, requires_grad):
    theta, grad, lr = make_inputs(3, 17, torch.float64, True, lr_kind, requires_grad=requires_grad)
    lr_t, lr_s = (lr, 0.0) if torch.is_tensor(lr) else (None, lr)
    torch.library.opcheck(iu_mod._inner_update_op, (theta, grad, lr_t, lr_s, max_norm, backend))


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("max_norm", [None, 0.5])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_inner_update_backward(backend, max_norm, requires_grad):
    _, grad, lr = make_inputs(3, 17, torch.float64, True, "0d", requires_grad=requires_grad)
    go = torch.randn(3, 17, dtype=torch.float64, requires_grad=requires_grad)
    torch.library.opcheck(iu_mod._inner_update_backward_op, (go, grad, lr, 0.0, max_norm, True, True, True, backend))


def test_custom_op_cpu_kernel_matches_reference(assert_close):
    """The op's CPU kernel ("torch") under the op's own autograd equals the reference's."""
    theta, grad, lr = make_inputs(3, 11, torch.float64, True, "vector", requires_grad=True)
    go = torch.randn(3, 11, dtype=torch.float64)
    out = iu_mod._inner_update_op(theta, grad, lr, 0.0, 0.5, "torch")
    ref = inner_update_reference(theta, grad, lr, 0.5)
    assert_close(out, ref, 1e-14, 1e-14, "fast")
    for g, e in zip(torch.autograd.grad(out, [theta, grad, lr], go), torch.autograd.grad(ref, [theta, grad, lr], go)):
        assert_close(g, e, 1e-13, 1e-13, "grad")


# ----------------------------------------------------------------------------------------------
# dispatch: CPU tensors take the reference directly (plain autograd nodes, no custom op)
# ----------------------------------------------------------------------------------------------
def test_cpu_path_is_plain_autograd(monkeypatch):
    monkeypatch.delenv("METAFAST_BACKEND", raising=False)
    theta, grad, lr = make_inputs(2, 5, torch.float32, True, "float", requires_grad=True)
    out = inner_update(theta, grad, lr)
    assert "CustomOp" not in type(out.grad_fn).__name__ and "Backward" in type(out.grad_fn).__name__
    assert torch.equal(out, inner_update_reference(theta, grad, lr))


def test_half_precision_reference_rounds_once(assert_close):
    theta, grad, lr = make_inputs(3, 101, torch.bfloat16, False, "vector")
    out = inner_update(theta, grad, lr, 0.5)
    assert out.dtype == torch.bfloat16
    assert_close(out, inner_update_reference(as64(theta), as64(grad), as64(lr), 0.5), *FWD_TOL[torch.bfloat16],
                 "bf16 fast")


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _bad_cases():
    T, P = 3, 5
    th, g = torch.randn(P), torch.randn(T, P)
    return [
        ((th, torch.randn(P), 0.1), ValueError, "grad must be a 2-D tensor"),
        ((torch.randn(P + 1), g, 0.1), ValueError, "theta must have shape"),
        ((torch.randn(T + 1, P), g, 0.1), ValueError, "theta must have shape"),
        ((th.double(), g, 0.1), TypeError, "theta must have grad's dtype"),
        ((th.long(), g.long(), 0.1), TypeError, "grad must be float16"),
        ((th.to("meta"), g, 0.1), ValueError, "theta must be on grad's device"),
        ((th, g, torch.rand(P + 1)), ValueError, "lr must be a float, a 0-d tensor or a tensor of shape"),
        ((th, g, torch.rand(T, P)), ValueError, r"lr must be .*shape \[P\]"),
        ((th, g, torch.rand(P).double()), TypeError, "lr must have grad's dtype"),
        ((th, g, "0.1"), TypeError, "lr must be a float"),
        ((th, g, True), TypeError, "lr must be a float"),
        ((th, "g", 0.1), TypeError, "grad must be a Tensor"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_input_raises_naming_the_argument(case):
    args, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        inner_update(*args)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan"), True, "1"])
def test_bad_max_norm(max_norm):
    with pytest.raises(ValueError, match="max_norm must be None or a float > 0"):
        inner_update(torch.randn(4), torch.randn(2, 4), 0.1, max_norm)


def test_bad_backend_argument():
    with pytest.raises(ValueError, match="backend must be one of"):
        inner_update(torch.randn(4), torch.randn(2, 4), 0.1, backend="fast")


# ----------------------------------------------------------------------------------------------
# the Triton kernels also compile for a real GPU (sm_90; no device needed). The interpreter alone
# misses compile-only errors (non-constexpr globals, type rules). A child process, because the
# interpreter patches triton.language once active.
# ----------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
from metafast.kernels import inner_update as k

n = 0
for dtype, lr_mode, flag in [("fp32", 0, True), ("bf16", 2, False), ("fp64", 1, True), ("fp16", 2, True)]:
    acc = "fp64" if dtype == "fp64" else "fp32"
    ACC = tl.float64 if dtype == "fp64" else tl.float32
    sig = {"grad_ptr": "*" + dtype, "gout_ptr": "*" + dtype, "lr_ptr": "*" + dtype, "sumsq_ptr": "*" + acc,
           "dot_ptr": "*" + acc, "stride_g": "i32", "stride_go": "i32", "P": "i32", "lr_hi": "fp32",
           "lr_lo": "fp32", **{c: "constexpr" for c in ["NPARTS", "BLOCK", "LR_MODE", "WITH_DOT", "ACC"]}}
    compile_(k._row_partials_kernel, sig, {"NPARTS": 8, "BLOCK": 1024, "LR_MODE": lr_mode, "WITH_DOT": flag, "ACC": ACC})
    sig = {"theta_ptr": "*" + dtype, "grad_ptr": "*" + dtype, "lr_ptr": "*" + dtype, "sumsq_ptr": "*" + acc,
           "out_ptr": "*" + dtype, "stride_th": "i64", "stride_g": "i64", "stride_o": "i64", "P": "i32",
           "lr_hi": "fp32", "lr_lo": "fp32", "mn_hi": "fp32", "mn_lo": "fp32",
           **{c: "constexpr" for c in ["NPARTS", "NPARTS_POW2", "BLOCK", "LR_MODE", "CLIP", "ACC"]}}
    compile_(k._inner_update_fwd_kernel, sig, {"NPARTS": 5, "NPARTS_POW2": 8, "BLOCK": 1024, "LR_MODE": lr_mode,
                                               "CLIP": flag, "ACC": ACC})
    sig = {"gout_ptr": "*" + dtype, "grad_ptr": "*" + dtype, "lr_ptr": "*" + dtype, "scale_ptr": "*" + acc,
           "kk_ptr": "*" + acc, "dgrad_ptr": "*" + dtype, "dtheta_ptr": "*" + dtype, "dlr_ptr": "*" + acc,
           "stride_go": "i64", "stride_g": "i64", "stride_dg": "i64", "T": "i32", "P": "i32",
           "lr_hi": "fp32", "lr_lo": "fp32",
           **{c: "constexpr" for c in ["BLOCK", "LR_MODE", "CLIP", "NEED_DGRAD", "NEED_DTHETA", "NEED_DLR", "ACC"]}}
    compile_(k._inner_update_bwd_kernel, sig, {"BLOCK": 1024, "LR_MODE": lr_mode, "CLIP": flag, "NEED_DGRAD": True,
                                               "NEED_DTHETA": flag, "NEED_DLR": True, "ACC": ACC})
    sig = {"sumsq_ptr": "*" + acc, "dot_ptr": "*" + acc, "scale_ptr": "*" + acc, "kk_ptr": "*" + acc, "T": "i32",
           "mn_hi": "fp32", "mn_lo": "fp32", **{c: "constexpr" for c in ["NPARTS", "NPARTS_POW2", "BLOCK_T", "ACC"]}}
    compile_(k._clip_coeffs_kernel, sig, {"NPARTS": 5, "NPARTS_POW2": 8, "BLOCK_T": 16, "ACC": ACC})
    n += 4
print("COMPILED", n)
"""


def test_triton_kernels_compile_for_sm90():
    assert_compiles_for_sm90(_COMPILE_SCRIPT, 16)


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA extension and the compiled Triton kernels against the float64 reference
# ----------------------------------------------------------------------------------------------
def _amax(x: torch.Tensor) -> float:
    return x.abs().max().item() if x.numel() else 0.0


def _cuda_backends():
    from metafast import _backend

    out = []
    for b in ("cuda", "triton"):
        try:
            _backend.resolve("inner_update", "cuda", b)
            out.append(b)
        except Exception:  # noqa: BLE001 - reported by test_gpu_backends_available
            pass
    return out


@pytest.mark.gpu
def test_gpu_backends_available():
    from metafast import _backend

    assert _backend.available()["cuda"][0], _backend.available()["cuda"][1]
    assert _backend.resolve("inner_update", "cuda") == "cuda"


GPU_SHAPES = [(3, 1001), (2, 1 << 20), (70000, 3)]
GPU_FWD_TOL = {**FWD_TOL, torch.float32: (1e-5, 1e-5)}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("broadcast", [True, False])
@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("max_norm", CLIPS[:2])
def test_gpu_forward_backward(backend, shape, dtype, broadcast, lr_kind, max_norm, assert_close):
    if backend not in _cuda_backends():
        pytest.fail(f"backend {backend} unavailable on this GPU machine")
    theta, grad, lr = make_inputs(*shape, dtype, broadcast, lr_kind, device="cuda", requires_grad=True)
    out = inner_update(theta, grad, lr, max_norm, backend=backend)
    ref_in = [as64(x) for x in (theta, grad, lr)]
    ref = inner_update_reference(*ref_in, max_norm)
    assert_close(out, ref, *GPU_FWD_TOL[dtype], f"{backend} fast")
    go = torch.randn(shape, dtype=torch.float64, device="cuda")
    got = torch.autograd.grad(out, diff_inputs(theta, grad, lr), go.to(dtype))
    expected = torch.autograd.grad(ref, diff_inputs(*ref_in), go)
    # sums over T (and P for a 0-d lr): scale the tolerance by the number of terms
    terms = shape[0] * (shape[1] if lr_kind == "0d" else 1)
    base = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 2e-6, torch.float64: 1e-13}[dtype]
    for name, g, e in zip(["theta", "grad", "lr"], got, expected):
        tol = base * max(1.0, terms ** 0.5)
        assert_close(g, e, tol * max(1.0, _amax(e)), tol, f"{backend} d {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_gpu_gradcheck_and_gradgradcheck(backend, lr_kind, max_norm):
    theta, grad, lr = make_inputs(3, 7, torch.float64, True, lr_kind, device="cuda", requires_grad=True)
    inputs = tuple(diff_inputs(theta, grad, lr))

    def fn(*xs):
        lr_ = xs[2] if len(xs) > 2 else lr
        return inner_update(xs[0], xs[1], lr_, max_norm, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 1])
def test_gpu_unaligned_views(offset, assert_close):
    """Views at an odd element offset take the scalar (unvectorised) path."""
    base = torch.randn(3 * 1025 + 8, device="cuda")
    grad = base[offset:offset + 3 * 1024].view(3, 1024)
    theta = torch.randn(1025, device="cuda")[offset:offset + 1024]
    out = inner_update(theta, grad, 0.1, 0.5, backend="cuda")
    assert_close(out, inner_update_reference(as64(theta), as64(grad), 0.1, 0.5), 1e-5, 1e-5, "fast")


@pytest.mark.gpu
def test_gpu_opcheck():
    theta, grad, lr = make_inputs(3, 1001, torch.float32, True, "vector", device="cuda", requires_grad=True)
    torch.library.opcheck(iu_mod._inner_update_op, (theta, grad, lr, 0.0, 0.5, "cuda"))
    go = torch.randn(3, 1001, device="cuda")
    torch.library.opcheck(iu_mod._inner_update_backward_op, (go, grad, lr, 0.0, 0.5, True, True, True, "cuda"))
