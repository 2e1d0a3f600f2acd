"""fused_inner_loop: the batched reference against per-task autograd MAML (float64, rel. err <= 1e-10),
the Triton kernels (interpreted on CPU) and the C++ op against the reference, the custom op's
registration (opcheck), bad input, and the same on CUDA devices (``gpu`` marker)."""
import importlib
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from maml_reference import per_task_maml
from metafast import _backend
from metafast.models import MLP
from metafast.ops import fused_inner_loop as fil
from metafast.ops.fused_inner_loop import (eligible, fused_inner_loop, fused_inner_loop_backward_reference,
                                           fused_inner_loop_reference)
from triton_compile import assert_compiles_for_sm90

DT = torch.float64
TOL = 1e-10
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_interpreter = pytest.mark.skipif(not (INTERPRET and HAVE_TRITON),
                                       reason="the Triton kernels run on CPU only with TRITON_INTERPRET=1")


def _has_cxx() -> bool:
    try:
        importlib.import_module("metafast._C")  # loading it registers the torch.ops.metafast ops
    except Exception:  # noqa: BLE001
        return False
    return hasattr(torch.ops.metafast, "fused_inner_loop_cxx")


# name -> (dims, loss): odd widths, L = 1..4
CASES = {
    "sinusoid": ([1, 40, 40, 1], "mse"),
    "odd": ([3, 17, 9, 5], "cross_entropy"),
    "head": ([64, 5], "cross_entropy"),
    "deep_ce": ([7, 33, 20, 12, 4], "cross_entropy"),
    "deep_mse": ([7, 33, 20, 12, 4], "mse"),
    "wide_head": ([9, 20], "cross_entropy"),
}
# (lr_per_param, first_order)
MODES = {"second": (False, False), "first": (False, True), "metasgd": (True, False), "metasgd_first": (True, True)}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def make_problem(dims, loss, steps, per_param, T=3, Ns=6, Nq=5, dtype=DT, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = MLP(dims[0], dims[1:-1], dims[-1]).to(torch.float64)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    sx = torch.randn(T, Ns, dims[0], generator=g, dtype=torch.float64)
    qx = torch.randn(T, Nq, dims[0], generator=g, dtype=torch.float64)
    if loss == "mse":
        sy = torch.randn(T, Ns, dims[-1], generator=g, dtype=torch.float64)
        qy = torch.randn(T, Nq, dims[-1], generator=g, dtype=torch.float64)
    else:
        sy = torch.randint(0, dims[-1], (T, Ns), generator=g)
        qy = torch.randint(0, dims[-1], (T, Nq), generator=g)
    base = 0.1 if loss == "mse" else 0.4
    if per_param:  # distinct rates per element, so a mix-up would show
        lr = base * (0.5 + torch.rand(theta.numel(), generator=g, dtype=torch.float64))
    else:
        lr = [base * (1.0 + 0.25 * k) for k in range(steps)]
    gq = 0.5 + torch.rand(T, generator=g, dtype=torch.float64)  # grad_output != 1
    cast = (lambda x: x.to(dtype) if x.is_floating_point() else x)
    lr = cast(lr) if isinstance(lr, torch.Tensor) else lr
    return model, cast(theta), lr, [cast(x) for x in (sx, sy, qx, qy)], cast(gq)


def oracle(model, lr, batch, steps, loss, first_order, gq):
    """Per-task autograd MAML: (query_loss, support_loss, fast, query_out, grad_theta, grad_lr)."""
    sx, sy, qx, qy = batch
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    lrs = lr_t = None
    if isinstance(lr, torch.Tensor):
        lr_t = lr.detach().clone().requires_grad_(True)
        lrs, off = {}, 0
        for n, p in zip(names, params):
            lrs[n] = lr_t[off:off + p.numel()].view(p.shape)
            off += p.numel()
    lr_list = lr if isinstance(lr, list) else 0.0
    lname = "mse" if loss == "mse" else "cross_entropy"
    lfn = (lambda o, y: F.mse_loss(o, y)) if loss == "mse" else (lambda o, y: F.cross_entropy(o, y))
    qls, sls, fasts, outs = [], [], [], []
    total = 0.0
    for t in range(sx.shape[0]):
        b = [x[t:t + 1] for x in batch]
        ql, adapted = per_task_maml(model, *b, lr_list, steps, first_order, lname, lrs=lrs, return_params=True)
        total = total + gq[t] * ql
        qls.append(ql.detach())
        p = adapted[0]
        fasts.append(torch.cat([p[n].detach().reshape(-1) for n in names]))
        outs.append(functional_call(model, p, (qx[t],)).detach())
        lr_prev = lr_list[:steps - 1] if isinstance(lr_list, list) else lr_list
        _, prev = per_task_maml(model, *b, lr_prev, steps - 1, True, lname, lrs=lrs, return_params=True)
        sls.append(lfn(functional_call(model, prev[0], (sx[t],)), sy[t]).detach())
    wrt = params + ([lr_t] if lr_t is not None else [])
    grads = torch.autograd.grad(total, wrt)
    g_theta = torch.cat([g.reshape(-1) for g in grads[:len(params)]])
    g_lr = grads[-1] if lr_t is not None else torch.empty(0, dtype=DT)
    return torch.stack(qls), torch.stack(sls), torch.stack(fasts), torch.stack(outs), g_theta, g_lr


def contract_args(theta, lr, batch, dims, steps, loss):
    per_param = isinstance(lr, torch.Tensor)
    lr_t = lr if per_param else torch.tensor(lr, dtype=theta.dtype)
    return (theta, lr_t, *batch, dims, steps, fil.LOSS_KINDS[loss], per_param)


# ----------------------------------------------------------------------------------------------
# the reference (through the public op, backend "torch") against per-task autograd MAML
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("mode", list(MODES))
def test_reference_matches_per_task_autograd(case, steps, mode):
    dims, loss = CASES[case]
    per_param, first_order = MODES[mode]
    model, theta, lr, batch, gq = make_problem(dims, loss, steps, per_param)
    expect = oracle(model, lr, batch, steps, loss, first_order, gq)
    theta_in = theta.clone().requires_grad_(True)
    lr_in = lr.clone().requires_grad_(True) if per_param else lr
    out = fused_inner_loop(theta_in, lr_in, *batch, dims, steps, loss, first_order=first_order, backend="torch")
    wrt = [theta_in] + ([lr_in] if per_param else [])
    grads = torch.autograd.grad(out.query_loss, wrt, grad_outputs=gq)
    got = list(out) + [grads[0], grads[1] if per_param else torch.empty(0, dtype=DT)]
    for name, a, e in zip(["query_loss", "support_loss", "fast", "query_out", "grad_theta", "grad_lr"], got, expect):
        assert a.shape == e.shape, name
        if e.numel():
            assert rel_err(a, e) <= TOL, f"{name}: rel. err {rel_err(a, e):.3g}"


def test_reference_recomputes_without_saved():
    dims, loss = CASES["odd"]
    model, theta, lr, batch, gq = make_problem(dims, loss, 3, True)
    args = contract_args(theta, lr, batch, dims, 3, loss)
    saved = fused_inner_loop_reference(*args, True)[4]
    assert saved.shape == (3, 3, theta.numel())
    a = fused_inner_loop_backward_reference(gq, *args[:6], saved, *args[6:], False)
    b = fused_inner_loop_backward_reference(gq, *args[:6], theta.new_empty(0), *args[6:], False)
    for x, y in zip(a, b):
        assert rel_err(x, y) <= 1e-14


# ----------------------------------------------------------------------------------------------
# the Triton kernels (interpreted) against the reference
# ----------------------------------------------------------------------------------------------
# (case, steps, mode, dtype): small on purpose, the interpreter runs every tile op in numpy
TRITON_CASES = [
    ("odd", 2, "metasgd", torch.float64),
    ("deep_mse", 1, "second", torch.float64),
    ("deep_ce", 2, "metasgd_first", torch.float64),
    ("head", 5, "second", torch.float64),
    ("sinusoid", 2, "metasgd_first", torch.float32),
    ("odd", 2, "second", torch.float32),
]
# float32: inner steps compound rounding; values ~1, gradients are sums over tasks
FP32_TOL = 2e-5


def _compare_backend(backend_fwd, backend_bwd, case, steps, mode, dtype, device="cpu", T=2, Ns=5, Nq=4):
    dims, loss = CASES[case]
    per_param, first_order = MODES[mode]
    _, theta, lr, batch, gq = make_problem(dims, loss, steps, per_param, T=T, Ns=Ns, Nq=Nq, dtype=torch.float64)
    args64 = contract_args(theta, lr, batch, dims, steps, loss)
    expect = list(fused_inner_loop_reference(*args64, True))
    expect += list(fused_inner_loop_backward_reference(gq, *args64[:6], expect[4], *args64[6:], first_order))
    to = (lambda x: x.to(device, dtype) if x.is_floating_point() else x.to(device))
    args = tuple(to(a) if isinstance(a, torch.Tensor) else a for a in args64)
    got = list(backend_fwd(*args, True))
    got += list(backend_bwd(to(gq), *args[:6], got[4], *args[6:], first_order))
    tol = TOL if dtype == torch.float64 else FP32_TOL
    names = ["query_loss", "support_loss", "fast", "query_out", "saved", "grad_theta", "grad_lr"]
    for name, a, e in zip(names, got, expect):
        assert a.dtype == dtype and a.device.type == torch.device(device).type, name
        if name == "saved" and a.dim() == 1:  # the C++ op's own opaque layout (its tests cover it)
            continue
        assert a.shape == e.shape, f"{name}: {tuple(a.shape)} != {tuple(e.shape)}"
        if e.numel():
            assert rel_err(a.cpu(), e) <= tol, f"{name}: rel. err {rel_err(a.cpu(), e):.3g}"


@needs_interpreter
@pytest.mark.parametrize("case,steps,mode,dtype", TRITON_CASES)
def test_triton_matches_reference(case, steps, mode, dtype):
    from metafast.kernels import fused_inner_loop as k

    _compare_backend(k.fused_inner_loop_fwd, k.fused_inner_loop_bwd, case, steps, mode, dtype)


@needs_interpreter
@pytest.mark.parametrize("case", ["wide_head", "odd"])
def test_triton_more_rows_than_a_tile(case):
    """Ns, Nq > BLOCK and Nq > Ns (row tiles, reductions over samples, 20 classes in a 32-wide tile)."""
    from metafast.kernels import fused_inner_loop as k

    _compare_backend(k.fused_inner_loop_fwd, k.fused_inner_loop_bwd, case, 1, "metasgd", torch.float64,
                     T=1, Ns=18, Nq=35)


@needs_interpreter
def test_triton_through_the_op_recomputes_without_saved():
    """backend="triton" via autograd; the kernel backward also rebuilds an empty trajectory."""
    from metafast.kernels import fused_inner_loop as k

    dims, loss = [5, 3], "cross_entropy"
    _, theta, lr, batch, gq = make_problem(dims, loss, 2, False, T=2, Ns=4, Nq=3)
    ref_theta = theta.clone().requires_grad_(True)
    out_ref = fused_inner_loop(ref_theta, lr, *batch, dims, 2, loss, backend="torch")
    (g_ref,) = torch.autograd.grad(out_ref.query_loss, ref_theta, grad_outputs=gq)
    tri_theta = theta.clone().requires_grad_(True)
    out = fused_inner_loop(tri_theta, lr, *batch, dims, 2, loss, backend="triton")
    (g,) = torch.autograd.grad(out.query_loss, tri_theta, grad_outputs=gq)
    assert rel_err(out.query_loss, out_ref.query_loss) <= TOL
    assert rel_err(g, g_ref) <= TOL
    args = contract_args(theta, lr, batch, dims, 2, loss)
    g2, _ = k.fused_inner_loop_bwd(gq, *args[:6], theta.new_empty(0), *args[6:], False)
    assert rel_err(g2, g_ref) <= TOL


_COMPILE_SCRIPT = r"""
from metafast.kernels import fused_inner_loop as k

n = 0
ints = ["SCRATCH", "AS", "P", "Ns", "Nq", "NMAX", "K", "D0", "D1", "D2", "D3", "D4"]
# (kernel, dtype, L, loss, Meta-SGD, SAVE / FIRST_ORDER): the fp32 tl.dot path (the whole reverse) and the
# fp64 broadcast-sum path; deeper L only unrolls the same code further (and takes minutes to compile here)
for kern, dtype, L, loss, per, flag in [("bwd", "fp32", 2, 1, True, False), ("fwd", "fp64", 1, 0, False, True)]:
    ACC = tl.float64 if dtype == "fp64" else tl.float32
    consts = {"L": L, "LOSS": loss, "LR_PER_PARAM": per, "BLOCK": 32 if dtype == "fp32" else 16, "VBLOCK": 256,
              "DLP": 16, "USE_DOT": dtype == "fp32", "ACC": ACC}
    if kern == "fwd":
        fn, consts["SAVE"] = k._fused_inner_loop_fwd_kernel, flag
        ptrs = ["theta_ptr", "lr_ptr", "sx_ptr", "sy_ptr", "qx_ptr", "qy_ptr", "qloss_ptr", "sloss_ptr", "fast_ptr",
                "qout_ptr", "saved_ptr", "scratch_ptr"]
    else:
        fn, consts["FIRST_ORDER"] = k._fused_inner_loop_bwd_kernel, flag
        ptrs = ["gq_ptr", "lr_ptr", "sx_ptr", "sy_ptr", "qx_ptr", "qy_ptr", "saved_ptr", "glr_ptr", "wk_ptr",
                "scratch_ptr"]
    sig = {p: ("*i64" if p in ("sy_ptr", "qy_ptr") and loss == 1 else "*" + dtype) for p in ptrs}
    sig.update({i: "i32" for i in ints})
    sig.update({c: "constexpr" for c in consts})
    compile_(fn, sig, consts)
    n += 1
print("COMPILED", n)
"""


def test_triton_kernels_compile_for_sm90():
    assert_compiles_for_sm90(_COMPILE_SCRIPT, 2)


# ----------------------------------------------------------------------------------------------
# the C++ op (the "cpp" backend: its CPU kernel on CPU tensors)
# ----------------------------------------------------------------------------------------------
needs_cxx = pytest.mark.skipif(not _has_cxx(), reason="metafast._C is not built with fused_inner_loop_cxx")


@needs_cxx
@pytest.mark.parametrize("case,steps,mode", [("odd", 5, "metasgd"), ("deep_mse", 5, "second"),
                                             ("head", 1, "first"), ("sinusoid", 5, "metasgd_first")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cxx_on_cpu_matches_reference(case, steps, mode, dtype):
    _compare_backend(torch.ops.metafast.fused_inner_loop_cxx, torch.ops.metafast.fused_inner_loop_backward_cxx,
                     case, steps, mode, dtype, T=3, Ns=6, Nq=5)


@needs_cxx
def test_cxx_on_cpu_through_the_op():
    """backend="cpp" on CPU tensors: the C++ autograd node and the C++ CPU kernels."""
    dims, loss = CASES["deep_ce"]
    _, theta, lr, batch, gq = make_problem(dims, loss, 3, True)
    grads = {}
    for backend in ("torch", "cpp"):
        th, lr_in = theta.clone().requires_grad_(True), lr.clone().requires_grad_(True)
        out = fused_inner_loop(th, lr_in, *batch, dims, 3, loss, backend=backend)
        grads[backend] = list(out) + list(torch.autograd.grad(out.query_loss, [th, lr_in], grad_outputs=gq))
    for a, e in zip(grads["cpp"], grads["torch"]):
        assert rel_err(a, e) <= TOL


@needs_cxx
def test_auto_backend_on_cpu(monkeypatch):
    """CPU tensors take metafast._C's C++ kernels (the cpp backend); the cuda backend needs CUDA tensors."""
    monkeypatch.delenv(_backend.ENV, raising=False)
    assert _backend.resolve("fused_inner_loop", "cpu") == "cpp"
    with pytest.raises(_backend.BackendUnavailableError, match="the cpp backend"):
        _backend.resolve("fused_inner_loop", "cpu", "cuda")


# ----------------------------------------------------------------------------------------------
# registration, autograd rules, eligibility, errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_param", [False, True])
def test_opcheck(per_param):
    dims, loss = CASES["odd"]
    _, theta, lr, batch, gq = make_problem(dims, loss, 2, per_param, T=2, Ns=4, Nq=3)
    args = contract_args(theta, lr, batch, dims, 2, loss)
    theta = theta.clone().requires_grad_(True)
    lr_t = args[1].clone().requires_grad_(per_param)
    torch.library.opcheck(fil._fwd_op, (theta, lr_t, *args[2:], True, False, "torch"))
    saved = fused_inner_loop_reference(*args, True)[4]
    torch.library.opcheck(fil._bwd_op, (gq, *args[:6], saved, *args[6:], False, "torch"))


def test_non_query_outputs_are_not_differentiable_and_no_double_backward():
    dims, loss = CASES["head"]
    _, theta, lr, batch, gq = make_problem(dims, loss, 2, False, T=2, Ns=4, Nq=3)
    theta = theta.clone().requires_grad_(True)
    out = fused_inner_loop(theta, lr, *batch, dims, 2, loss, backend="torch")
    assert out.query_loss.requires_grad
    assert not any(x.requires_grad for x in (out.support_loss, out.fast, out.query_out))
    (g,) = torch.autograd.grad(out.query_loss.sum(), theta, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(g.sum(), theta)


def test_no_grad_saves_nothing_and_scalar_lr_matches_list():
    dims, loss = CASES["odd"]
    _, theta, _, batch, _ = make_problem(dims, loss, 3, False)
    with torch.no_grad():
        a = fused_inner_loop(theta, 0.3, *batch, dims, 3, loss, backend="torch")
    b = fused_inner_loop(theta, [0.3, 0.3, 0.3], *batch, dims, 3, loss, backend="torch")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_torch_compile_fullgraph():
    dims, loss = CASES["odd"]
    _, theta, lr, batch, gq = make_problem(dims, loss, 2, False, T=2, Ns=4, Nq=3)

    def f(th):
        return fused_inner_loop(th, lr, *batch, dims, 2, loss, backend="torch").query_loss

    res = {}
    for name, fn in (("eager", f), ("compiled", torch.compile(f, fullgraph=True))):
        th = theta.clone().requires_grad_(True)
        out = fn(th)
        res[name] = (out,) + torch.autograd.grad(out, th, grad_outputs=gq)
    for a, e in zip(res["compiled"], res["eager"]):
        assert rel_err(a, e) <= 1e-14


def test_eligible():
    assert eligible([1, 40, 40, 1])[0] and eligible([64, 5])[0] and eligible([256] * 5)[0]
    ok, why = eligible([1, 2, 3, 4, 5, 6])
    assert not ok and "at most 4" in why
    ok, why = eligible([1, 300, 1])
    assert not ok and "256" in why
    assert not eligible([5])[0]


def _bad_inputs(case):
    dims, loss = [3, 4, 2], "cross_entropy"
    _, theta, lr, (sx, sy, qx, qy), _ = make_problem(dims, loss, 2, False, T=2, Ns=4, Nq=3)
    kw = dict(theta=theta, lr=lr, support_x=sx, support_y=sy, query_x=qx, query_y=qy, dims=dims, steps=2, loss=loss)
    if case == "dims_long":
        kw["dims"] = [3, 4, 4, 4, 4, 2]
    elif case == "dims_wide":
        kw["dims"] = [3, 257, 2]
    elif case == "dims_type":
        kw["dims"] = "3-4-2"
    elif case == "P":
        kw["theta"] = theta[:-1]
    elif case == "steps":
        kw["steps"] = 0
    elif case == "loss":
        kw["loss"] = "hinge"
    elif case == "dtype":
        kw["support_x"] = sx.float()
    elif case == "theta_dtype":
        kw["theta"] = theta.half()
    elif case == "sx_shape":
        kw["support_x"] = sx[:, :, :2]
    elif case == "qx_tasks":
        kw["query_x"] = qx[:1]
    elif case == "labels_range":
        kw["support_y"] = sy.clone().fill_(2)
    elif case == "labels_dtype":
        kw["query_y"] = qy.int()
    elif case == "labels_shape":
        kw["query_y"] = qy[:, :2]
    elif case == "mse_target":
        kw["loss"] = "mse"
    elif case == "lr_list":
        kw["lr"] = [0.1]
    elif case == "lr_tensor":
        kw["lr"] = torch.tensor([0.1, 0.1], dtype=DT)
    elif case == "lr_type":
        kw["lr"] = "0.1"
    return kw


BAD = {
    "dims_long": (ValueError, "dims: 5 linear layers"),
    "dims_wide": (ValueError, "dims: width 257"),
    "dims_type": (TypeError, "dims must be a list of ints"),
    "P": (ValueError, r"theta must have shape \[P\] = \(26,\)"),
    "steps": (ValueError, "steps must be an int >= 1"),
    "loss": (ValueError, "loss must be one of"),
    "dtype": (TypeError, "support_x must have theta's dtype"),
    "theta_dtype": (TypeError, "theta must be float32 or float64"),
    "sx_shape": (ValueError, r"support_x must have shape \[T, Ns, d0\]"),
    "qx_tasks": (ValueError, r"query_x must have shape \[T, Nq, d0\] = \(2, Nq, 3\)"),
    "labels_range": (ValueError, r"support_y: labels must lie in \[0, 2\)"),
    "labels_dtype": (TypeError, "query_y must hold int64 class labels"),
    "labels_shape": (ValueError, r"query_y must have shape \[T, N\] = \(2, 3\)"),
    "mse_target": (TypeError, "support_y must have theta's dtype"),
    "lr_list": (ValueError, "lr as a list must hold 2 floats"),
    "lr_tensor": (ValueError, r"a tensor lr must have shape \[P\] = \(26,\)"),
    "lr_type": (TypeError, "lr must be a float"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    kw = _bad_inputs(case)
    err, msg = BAD[case]
    with pytest.raises(err, match=msg):
        fused_inner_loop(**kw, backend="torch")


# ----------------------------------------------------------------------------------------------
# GPU: the compiled Triton kernels and the CUDA extension against the float64 reference
# ----------------------------------------------------------------------------------------------
GPU_CASES = [("odd", 5, "metasgd"), ("deep_ce", 5, "second"), ("deep_mse", 5, "metasgd_first"), ("head", 5, "first"),
             ("sinusoid", 5, "second")]


@pytest.mark.gpu
@pytest.mark.parametrize("case,steps,mode", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gpu_triton_matches_reference(case, steps, mode, dtype):
    from metafast.kernels import fused_inner_loop as k

    _compare_backend(k.fused_inner_loop_fwd, k.fused_inner_loop_bwd, case, steps, mode, dtype, device="cuda",
                     T=4, Ns=10, Nq=15)


@pytest.mark.gpu
@needs_cxx
@pytest.mark.parametrize("case,steps,mode", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gpu_cuda_matches_reference(case, steps, mode, dtype):
    _compare_backend(torch.ops.metafast.fused_inner_loop_cxx, torch.ops.metafast.fused_inner_loop_backward_cxx,
                     case, steps, mode, dtype, device="cuda", T=4, Ns=10, Nq=15)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_op_autograd(backend):
    if backend == "cuda" and not _has_cxx():
        pytest.skip("metafast._C is not built with fused_inner_loop_cxx")
    dims, loss = CASES["odd"]
    _, theta, lr, batch, gq = make_problem(dims, loss, 3, True, T=4, Ns=10, Nq=15)
    ref_theta, ref_lr = theta.clone().requires_grad_(True), lr.clone().requires_grad_(True)
    ref = fused_inner_loop(ref_theta, ref_lr, *batch, dims, 3, loss, backend="torch")
    g_ref = torch.autograd.grad(ref.query_loss, [ref_theta, ref_lr], grad_outputs=gq)
    th, lr_c = theta.cuda().requires_grad_(True), lr.cuda().requires_grad_(True)
    out = fused_inner_loop(th, lr_c, *[x.cuda() for x in batch], dims, 3, loss, backend=backend)
    g = torch.autograd.grad(out.query_loss, [th, lr_c], grad_outputs=gq.cuda())
    assert rel_err(out.query_loss.cpu(), ref.query_loss) <= TOL
    for a, e in zip(g, g_ref):
        assert rel_err(a.cpu(), e) <= TOL
