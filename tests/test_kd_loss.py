"""kd_loss: Triton kernel (interpreted on CPU) and the CUDA extension against float64 pure-PyTorch
references. Run: TRITON_INTERPRET=1 python -m pytest tests/test_kd_loss.py -q"""
import os

import pytest
import torch
import torch.nn.functional as F

from metafast import _backend
from metafast.ops.kd_loss import KDLoss, kd_loss, kd_loss_reference
from gpu_backends import assert_some_gpu_backend, require_gpu_backend
from triton_compile import assert_compiles_for_sm90

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")
# The interpreter evaluates padding lanes of a tile too (log(0), 0 * inf); they are masked out.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

TOL = {
    torch.float64: dict(atol=1e-11, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=5e-3),
}
# Loss of half logits is accumulated and returned in float32.
LOSS_TOL_HALF = dict(atol=2e-5, rtol=2e-5)


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


def make_inputs(shape, dtype=torch.float64, seed=0, target=True, device="cpu", scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g).to(device) if target else None
    return s, t, y


@pytest.fixture
def small_chunks(monkeypatch):
    """Force the multi-chunk (online softmax, two sweeps) path at small C."""
    from metafast.kernels import kd_loss as k

    monkeypatch.setattr(k, "MAX_BLOCK_C", 32)
    monkeypatch.setattr(k, "MAX_BLOCK_C_FP64", 32)


# ----------------------------------------------------------------------------------------------
# The reference itself, against the textbook formula row by row
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_target", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_hinton_formula(with_target, reduction):
    T_, alpha = 2.5, 0.7
    s, t, y = make_inputs((3, 5, 7), target=with_target)
    got = kd_loss_reference(s, t, y, T_, alpha, reduction)
    for k in range(3):
        log_p, log_r = F.log_softmax(s[k] / T_, -1), F.log_softmax(t[k] / T_, -1)
        kl = (log_r.exp() * (log_r - log_p)).sum(-1)
        rows = alpha * T_ ** 2 * kl
        if with_target:
            rows = rows + (1 - alpha) * F.cross_entropy(s[k], y[k], reduction="none")
        want = {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
        assert_close(f"task {k}", got[k], want, **TOL[torch.float64])
    # [B, C]: "mean" is kl_div's batchmean, a scalar
    flat = kd_loss_reference(s[0], t[0], None if y is None else y[0], T_, alpha, reduction)
    assert_close("2-D", flat, got[0], **TOL[torch.float64])


def test_reference_alpha_endpoints_and_teacher_is_constant():
    s, t, y = make_inputs((6, 9), seed=1)
    ce = F.cross_entropy(s, y)
    assert_close("alpha=0 is CE", kd_loss_reference(s, t, y, 3.0, 0.0), ce, **TOL[torch.float64])
    pure = kd_loss_reference(s, t, None, 3.0, 1.0)
    assert_close("alpha=1 ignores the target", kd_loss_reference(s, t, y, 3.0, 1.0), pure, **TOL[torch.float64])
    # KL(r || r) = 0: a student equal to its teacher has zero KD loss
    assert_close("KL(r||r)", kd_loss_reference(t, t, None), torch.zeros((), dtype=torch.float64), atol=1e-12, rtol=0)
    tt = t.clone().requires_grad_()
    kd_loss_reference(s.requires_grad_(), tt, y).backward()
    assert tt.grad is None


# ----------------------------------------------------------------------------------------------
# Triton kernel (interpreted) against the float64 reference
# ----------------------------------------------------------------------------------------------
CASES = [  # (shape, chunked)
    ((3, 7, 5), False),
    ((2, 3, 300), False),
    ((2, 5, 100), True),  # 4 chunks of 32, the last one partial
    ((9, 13), False),
    ((5, 70), True),
]


@needs_interpreter
@pytest.mark.parametrize("shape,chunked", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_target,reduction,temperature,alpha",
                         [(True, "mean", 4.0, 0.9), (False, "sum", 2.0, 1.0), (True, "none", 1.0, 0.3),
                          (False, "mean", 0.5, 0.6)])
def test_triton_loss_grad_double_grad(shape, chunked, dtype, with_target, reduction, temperature, alpha, request):
    if chunked:
        request.getfixturevalue("small_chunks")
    tol = TOL[dtype]
    s, t, y = make_inputs(shape, dtype=dtype, seed=sum(shape), target=with_target)
    x = s.clone().requires_grad_()
    xr = s.detach().double().requires_grad_()

    loss = kd_loss(x, t, y, temperature, alpha, reduction, backend="triton")
    ref = kd_loss_reference(xr, t.double(), y, temperature, alpha, reduction)
    assert loss.dtype == dtype
    assert_close("loss", loss, ref, **tol)

    g = torch.randn(loss.shape, dtype=torch.float64) * 2 + 0.5  # grad_output != 1
    (gx,) = torch.autograd.grad(loss, x, g.to(loss.dtype), create_graph=True)
    (gr,) = torch.autograd.grad(ref, xr, g, create_graph=True)
    assert gx.dtype == dtype
    assert_close("dloss/dstudent", gx, gr, **tol)

    v = torch.randn(shape, dtype=torch.float64)
    (hx,) = torch.autograd.grad(gx, x, v.to(dtype))
    (hr,) = torch.autograd.grad(gr, xr, v)
    assert_close("d2loss/dstudent2 . v", hx, hr, **tol)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [5, 100])
def test_triton_half_inputs(dtype, C):
    s, t, y = make_inputs((3, 7, C), dtype=dtype, seed=C)
    x = s.clone().requires_grad_()
    loss = kd_loss(x, t, y, backend="triton")
    assert loss.dtype == torch.float32
    xr = s.double().requires_grad_()
    ref = kd_loss_reference(xr, t.double(), y)
    assert_close("loss", loss, ref, **LOSS_TOL_HALF)  # fp32 accumulation of the exact inputs
    g = torch.rand(3, dtype=torch.float64) + 0.5
    (gx,) = torch.autograd.grad(loss, x, g.float())
    (gr,) = torch.autograd.grad(ref, xr, g)
    assert gx.dtype == dtype
    assert_close("grad", gx, gr, **TOL[dtype])  # rounded once to the half dtype
    assert kd_loss_reference(s, t, y).dtype == torch.float32  # the reference follows the same rule


@needs_interpreter
@pytest.mark.parametrize("chunked", [False, True])
def test_triton_masked_teacher_classes_and_strided_inputs(chunked, request):
    """-inf teacher logits (classes it rules out, also whole chunks) and non-contiguous inputs."""
    if chunked:
        request.getfixturevalue("small_chunks")
    T, N, C = 3, 4, 70
    s, t, y = make_inputs((N, T, C), seed=3)
    masked = (torch.arange(C) < 40) & (torch.arange(C) % 3 != 2)
    t[..., masked] = float("-inf")
    s, t, y = s.transpose(0, 1), t.transpose(0, 1), y.t()
    assert not s.is_contiguous() and not y.is_contiguous()
    x = s.clone().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    xr = s.clone().requires_grad_()
    loss = kd_loss(x, t, y, 2.0, 0.8, "none", backend="triton")
    ref = kd_loss_reference(xr, t, y, 2.0, 0.8, "none")
    assert torch.isfinite(ref).all()
    assert_close("loss", loss, ref, **TOL[torch.float64])
    (gx,) = torch.autograd.grad(loss.sum(), x)
    (gr,) = torch.autograd.grad(ref.sum(), xr)
    assert_close("grad", gx, gr, **TOL[torch.float64])


@needs_interpreter
def test_triton_large_class_count_two_sweeps():
    """A row longer than one chunk at the default chunk size (C = 5000, odd)."""
    s, t, y = make_inputs((1, 2, 5000), dtype=torch.float32, seed=8)
    x = s.clone().requires_grad_()
    xr = s.double().requires_grad_()
    loss = kd_loss(x, t, y, backend="triton")
    ref = kd_loss_reference(xr, t.double(), y)
    assert_close("loss", loss, ref, **TOL[torch.float32])
    assert_close("grad", torch.autograd.grad(loss.sum(), x)[0], torch.autograd.grad(ref.sum(), xr)[0],
                 **TOL[torch.float32])


# ----------------------------------------------------------------------------------------------
# Derivative checks, op registration, use as a MAML inner loss
# ----------------------------------------------------------------------------------------------
def test_reference_gradcheck_gradgradcheck():
    s, t, y = make_inputs((2, 3, 5), seed=11)
    x = s.clone().requires_grad_()
    fn = lambda x: kd_loss_reference(x, t, y, 2.0, 0.6)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@needs_interpreter
@pytest.mark.parametrize("with_target,reduction,fast", [(True, "mean", False), (False, "none", True),
                                                      (True, "sum", True)])
def test_triton_gradcheck_gradgradcheck(with_target, reduction, fast):
    s, t, y = make_inputs((2, 2, 3) if not fast else (2, 3, 5), seed=13, target=with_target)
    x = s.clone().requires_grad_()
    fn = lambda x: kd_loss(x, t, y, 2.0, 0.6, reduction, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=fast)


@needs_interpreter
def test_opcheck():
    s, t, y = make_inputs((2, 3, 5), seed=17)
    x = s.clone().requires_grad_()
    op = torch.ops.metafast.kd_loss.default
    torch.library.opcheck(op, (x, t, y, 4.0, 0.9, "mean", "triton"))
    torch.library.opcheck(op, (x, t, None, 2.0, 1.0, "none", "triton"))


@needs_interpreter
def test_second_order_maml_meta_gradient():
    """Per-task linear students adapted by one inner SGD step on kd_loss (create_graph), then a query
    loss: the meta-gradient through the fused op equals the reference's."""
    T, S, Q, D, C = 3, 5, 4, 6, 7
    g = torch.Generator().manual_seed(23)
    xs, xq = torch.randn(T, S, D, generator=g, dtype=torch.float64), torch.randn(T, Q, D, generator=g, dtype=torch.float64)
    ts = torch.randn(T, S, C, generator=g, dtype=torch.float64)
    ys, yq = torch.randint(0, C, (T, S), generator=g), torch.randint(0, C, (T, Q), generator=g)
    w0 = torch.randn(D, C, generator=g, dtype=torch.float64)

    def meta_grad(**kw):
        w = w0.clone().requires_grad_()
        wt = w.expand(T, D, C)
        inner = kd_loss(torch.bmm(xs, wt), ts, ys, 2.0, 0.7, **kw).sum()
        (gw,) = torch.autograd.grad(inner, wt, create_graph=True)
        outer = F.cross_entropy(torch.bmm(xq, wt - 0.5 * gw).reshape(-1, C), yq.reshape(-1))
        return torch.autograd.grad(outer, w)[0]

    assert_close("meta-gradient", meta_grad(backend="triton"), meta_grad(backend="torch"), **TOL[torch.float64])


@needs_interpreter
def test_batched_maml_with_kd_loss_callable():
    """kd_loss [T, N, C] -> [T] as BatchedMAML's loss callable (the teacher's logits are the targets):
    the second-order meta-gradient through the fused op equals the one through the reference."""
    import metafast

    T, S, D, C = 3, 5, 4, 6
    g = torch.Generator().manual_seed(29)
    x = torch.randn(T, S, D, generator=g, dtype=torch.float64)
    teacher = torch.randn(T, S, C, generator=g, dtype=torch.float64) * 2

    def meta_grads(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, C)).double()
        loss = lambda out, t: kd_loss(out, t, None, 2.0, 1.0, backend=backend)  # noqa: E731
        maml = metafast.BatchedMAML(model, inner_lr=0.3, loss=loss)
        out = maml(x, teacher, x, teacher)
        return torch.autograd.grad(out.loss, list(model.parameters()))

    for i, (a, b) in enumerate(zip(meta_grads("triton"), meta_grads("torch"))):
        assert_close(f"meta-gradient of parameter {i}", a, b, **TOL[torch.float64])


# ----------------------------------------------------------------------------------------------
# Module wrapper, errors and dispatch
# ----------------------------------------------------------------------------------------------
def test_kdloss_module():
    s, t, y = make_inputs((4, 6), seed=5)
    mod = KDLoss(temperature=3.0, alpha=0.5, reduction="sum")
    assert "temperature=3.0" in repr(mod)
    assert_close("KDLoss", mod(s, t, y), kd_loss_reference(s, t, y, 3.0, 0.5, "sum"), **TOL[torch.float64])
    with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
        KDLoss(temperature=0.0)
    with pytest.raises(ValueError, match=r"alpha must be a float in \[0, 1\]"):
        KDLoss(alpha=1.5)


_S, _T, _Y = torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
BAD_INPUTS = [  # (student, teacher, target, kwargs, exception, message)
    (torch.randn(4), torch.randn(4), None, {}, ValueError, r"student_logits must be 2-D \[B, C\] or 3-D"),
    (_S.long(), _T.long(), None, {}, TypeError, "student_logits must be float16, bfloat16, float32 or float64"),
    ([[0.0]], _T, None, {}, TypeError, "student_logits must be a Tensor"),
    (_S, [[0.0]], None, {}, TypeError, "teacher_logits must be a Tensor"),
    (torch.randn(3, 0), torch.randn(3, 0), None, {}, ValueError, "at least one class"),
    (_S, torch.randn(3, 5), None, {}, ValueError, r"teacher_logits must have the shape of student_logits \(3, 4\)"),
    (_S, _T.double(), None, {}, TypeError, "teacher_logits must have the dtype of student_logits"),
    (_S, _T, _Y.int(), {}, TypeError, "target must have dtype torch.int64"),
    (_S, _T, torch.zeros(4, dtype=torch.long), {}, ValueError, r"target must have shape \(3,\)"),
    (_S, _T, torch.tensor([0, 4, 1]), {}, ValueError, r"target must hold class ids in \[0, 4\), got 4"),
    (_S, _T, torch.tensor([0, -1, 1]), {}, ValueError, r"target must hold class ids.*got -1"),
    (_S, _T, None, {"temperature": 0.0}, ValueError, "temperature must be a finite float > 0"),
    (_S, _T, None, {"temperature": -2.0}, ValueError, "temperature must be"),
    (_S, _T, None, {"temperature": float("inf")}, ValueError, "temperature must be"),
    (_S, _T, None, {"alpha": 1.01}, ValueError, r"alpha must be a float in \[0, 1\]"),
    (_S, _T, None, {"alpha": -0.1}, ValueError, "alpha must be"),
    (_S, _T, None, {"reduction": "batchmean"}, ValueError, "reduction must be one of"),
    (_S, _T, None, {"backend": "cuda"}, _backend.BackendUnavailableError, "cuda backend cannot run it"),
    (_S, _T, None, {"backend": "numpy"}, ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_inputs_raise_naming_the_argument(backend, case):
    s, t, y, kwargs, exc, msg = BAD_INPUTS[case]
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(exc, match=msg):
        kd_loss(s, t, y, **kwargs)
    if "backend" not in BAD_INPUTS[case][3]:
        with pytest.raises(exc, match=msg):
            kd_loss_reference(s, t, y, **{k: v for k, v in kwargs.items() if k != "backend"})


@needs_interpreter
def test_kernel_never_reads_a_bad_label():
    """Unchecked out-of-range labels (the CUDA opt-out) give NaN rows, not out-of-bounds reads."""
    from metafast.kernels import kd_loss as k

    s, t, y = make_inputs((2, 3, 5), seed=4)
    y[0, 1] = 5
    y[1, 2] = -7
    row_loss, grad = k.kd_loss_fwd(s, t, y, 0.5, 0.1, 0.2, 0.3)
    bad = torch.zeros(2, 3, dtype=torch.bool)
    bad[0, 1] = bad[1, 2] = True
    assert torch.isnan(row_loss[bad]).all() and torch.isfinite(row_loss[~bad]).all()
    assert torch.isfinite(grad[~bad]).all()


def test_cpu_default_is_the_reference(monkeypatch):
    monkeypatch.delenv(_backend.ENV, raising=False)
    assert _backend.resolve("kd_loss", "cpu") == "torch"
    s, t, y = make_inputs((2, 3, 5), seed=9)
    x = s.clone().requires_grad_()
    loss = kd_loss(x, t, y)  # defaults: temperature 4, alpha 0.9, mean
    assert "metafast" not in type(loss.grad_fn).__name__  # plain autograd, no custom op
    assert torch.equal(loss, kd_loss(s, t, y, backend="torch"))
    # an independent oracle, not the reference the default runs: Hinton's formula with F's ops
    want = []
    for k in range(2):
        log_p, log_r = F.log_softmax(s[k] / 4.0, -1), F.log_softmax(t[k] / 4.0, -1)
        kl = F.kl_div(log_p, log_r, log_target=True, reduction="none").sum(-1)
        want.append((0.9 * 16.0 * kl + 0.1 * F.cross_entropy(s[k], y[k], reduction="none")).mean())
    assert_close("loss", loss, torch.stack(want), **TOL[torch.float64])


def test_empty_batch():
    s = torch.randn(2, 0, 5, dtype=torch.float64)
    y = torch.zeros(2, 0, dtype=torch.long)
    assert torch.equal(kd_loss(s, s, y, backend="torch"), torch.zeros(2, dtype=torch.float64))
    if INTERPRET:
        assert torch.equal(kd_loss(s, s, y, backend="triton"), torch.zeros(2, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# The Triton kernel also compiles for real GPUs (no device needed); a child process, because the
# interpreter, once active, patches triton.language.
# ----------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
from metafast.kernels import kd_loss as k

n = 0
for dtype, single, has_target in [("fp32", False, True), ("bf16", True, False)]:
    acc = "fp64" if dtype == "fp64" else "fp32"
    consts = {"BLOCK_R": 4 if single else 1, "BLOCK_C": 256 if single else 2048, "SINGLE_CHUNK": single,
              "HAS_TARGET": has_target, "ACC_DTYPE": tl.float64 if dtype == "fp64" else tl.float32}
    sig = {"student_ptr": "*" + dtype, "teacher_ptr": "*" + dtype, "labels_ptr": "*i64", "loss_ptr": "*" + acc,
           "grad_ptr": "*" + dtype,
           **{s: "i64" for s in ["stride_st", "stride_sn", "stride_sc", "stride_tt", "stride_tn", "stride_tc",
                                 "stride_yt", "stride_yn"]},
           "R": "i32", "N": "i32", "C": "i32",
           **{s: "fp32" for s in ["inv_t_hi", "inv_t_lo", "c_kl_hi", "c_kl_lo", "c_kd_hi", "c_kd_lo",
                                  "c_ce_hi", "c_ce_lo"]},
           **{name: "constexpr" for name in consts}}
    compile_(k._kd_fwd_kernel, sig, consts)
    n += 1
print("COMPILED", n)
"""


def test_triton_kernel_compiles_for_sm90():
    assert_compiles_for_sm90(_COMPILE_SCRIPT, 2)


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA extension and Triton compiled for the device
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(3, 7, 5), (4, 33, 100), (2, 9, 1000), (2, 5, 3000), (37, 20000), (3, 131072)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_target", [False, True])
def test_gpu_matches_reference(backend, shape, dtype, with_target):
    require_gpu_backend("kd_loss", backend)
    s, t, y = make_inputs(shape, dtype=dtype, seed=shape[-1], target=with_target, device="cuda")
    x = s.clone().requires_grad_()
    xr = s.double().requires_grad_()
    loss = kd_loss(x, t, y, 4.0, 0.9, "none", backend=backend)
    ref = kd_loss_reference(xr, t.double(), y, 4.0, 0.9, "none")
    assert_close("loss", loss, ref, **(LOSS_TOL_HALF if dtype == torch.bfloat16 else TOL[dtype]))
    g = torch.rand(ref.shape, device="cuda", dtype=torch.float64) + 0.5
    (gx,) = torch.autograd.grad(loss, x, g.to(loss.dtype), create_graph=dtype != torch.bfloat16)
    (gr,) = torch.autograd.grad(ref, xr, g, create_graph=True)
    assert_close("grad", gx, gr, **TOL[dtype])
    if dtype == torch.bfloat16:
        return
    v = torch.randn(shape, device="cuda", dtype=torch.float64)
    assert_close("double grad", torch.autograd.grad(gx, x, v.to(dtype))[0], torch.autograd.grad(gr, xr, v)[0],
                 **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_gradcheck_gradgradcheck_opcheck(backend):
    require_gpu_backend("kd_loss", backend)
    s, t, y = make_inputs((3, 4, 7), seed=31, device="cuda")
    x = s.clone().requires_grad_()
    fn = lambda x: kd_loss(x, t, y, 2.0, 0.6, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))
    torch.library.opcheck(torch.ops.metafast.kd_loss.default, (x, t, y, 4.0, 0.9, "mean", backend))
    torch.library.opcheck(torch.ops.metafast.kd_loss.default, (x, t, None, 4.0, 0.9, "none", backend))


@pytest.mark.gpu
def test_gpu_has_a_backend():
    assert_some_gpu_backend("kd_loss")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_bad_label_raises(backend):
    require_gpu_backend("kd_loss", backend)
    s, t, y = make_inputs((2, 3, 5), device="cuda")
    y[0, 0] = 9
    with pytest.raises(ValueError, match="target must hold class ids"):
        kd_loss(s, t, y, backend=backend)
