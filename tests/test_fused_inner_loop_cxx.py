"""The C++/CUDA fused MLP inner loop (metafast::fused_inner_loop_cxx and its backward) against a naive
per-task autograd inner loop in float64 (rel. err <= 1e-10), and the CUDA kernel against the CPU.

The CPU launcher runs the very per-task code that the CUDA kernel runs (one thread instead of a
block), so these CPU tests check the GPU algorithm too; the @gpu tests check the launch itself.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

from cxx_ext import skip_reason  # noqa: E402

_why = skip_reason("fused_inner_loop_cxx", "fused_inner_loop_backward_cxx")
if _why is not None:
    pytest.skip(_why, allow_module_level=True)

from maml_reference import per_task_maml  # noqa: E402
from metafast.models import MLP  # noqa: E402
from metafast.ops import fused_inner_loop as fil  # noqa: E402

DT = torch.float64
TOL = 1e-10
MSE, CE = 0, 1

# (dims, loss_kind): odd widths, 1 to 4 layers, a linear head alone (ANIL)
CASES = [
    ((1, 40, 40, 1), MSE),
    ((3, 17, 9, 5), MSE),
    ((3, 17, 9, 5), CE),
    ((64, 5), CE),
    ((64, 5), MSE),
    ((5, 23, 3), CE),
    ((6, 11, 2), MSE),
    ((7, 33, 20, 12, 4), CE),
    ((7, 33, 20, 12, 4), MSE),
]


def ids(case):
    dims, kind = case
    return "-".join(map(str, dims)) + ("-mse" if kind == MSE else "-ce")


def num_params(dims):
    return sum(dims[i + 1] * (dims[i] + 1) for i in range(len(dims) - 1))


def unflatten(theta, dims):
    out, off = [], 0
    for i in range(len(dims) - 1):
        n = dims[i + 1] * dims[i]
        w = theta[off:off + n].view(dims[i + 1], dims[i])
        off += n
        b = theta[off:off + dims[i + 1]]
        off += dims[i + 1]
        out.append((w, b))
    return out


def mlp(theta, dims, x):
    layers = unflatten(theta, dims)
    for i, (w, b) in enumerate(layers):
        x = x @ w.t() + b
        if i < len(layers) - 1:
            x = torch.relu(x)
    return x


def task_loss(out, y, kind):
    return F.mse_loss(out, y) if kind == MSE else F.cross_entropy(out, y)


def make_problem(dims, kind, T=3, Ns=7, Nq=5, steps=1, per_param=False, dtype=DT, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = num_params(dims)
    # Kaiming-like scale keeps the activations O(1) at every depth
    theta = torch.cat([
        torch.cat([torch.randn(dims[i + 1] * dims[i], generator=g, dtype=DT) / dims[i] ** 0.5,
                   0.1 * torch.randn(dims[i + 1], generator=g, dtype=DT)])
        for i in range(len(dims) - 1)])
    assert theta.numel() == P
    sx = torch.randn(T, Ns, dims[0], generator=g, dtype=DT)
    qx = torch.randn(T, Nq, dims[0], generator=g, dtype=DT)
    if kind == MSE:
        sy = torch.randn(T, Ns, dims[-1], generator=g, dtype=DT)
        qy = torch.randn(T, Nq, dims[-1], generator=g, dtype=DT)
    else:
        sy = torch.randint(0, dims[-1], (T, Ns), generator=g)
        qy = torch.randint(0, dims[-1], (T, Nq), generator=g)
    if per_param:
        lr = 0.05 + 0.1 * torch.rand(P, generator=g, dtype=DT)
    else:
        lr = 0.05 + 0.1 * torch.rand(steps, generator=g, dtype=DT)
    gq = torch.randn(T, generator=g, dtype=DT)
    cast = (lambda t: t.to(dtype) if t.is_floating_point() else t)
    return [cast(t) for t in (theta, lr, sx, sy, qx, qy, gq)]


def reference(theta, lr, sx, sy, qx, qy, gq, dims, steps, kind, per_param, first_order):
    """Per-task autograd: (query_loss, support_loss, fast, query_out, grad_theta, grad_lr)."""
    theta = theta.detach().clone().requires_grad_(True)
    lr = lr.detach().clone().requires_grad_(per_param)
    qls, sls, fasts, outs = [], [], [], []
    for t in range(sx.shape[0]):
        w = theta
        for k in range(steps):
            ls = task_loss(mlp(w, dims, sx[t]), sy[t], kind)
            (g,) = torch.autograd.grad(ls, w, create_graph=not first_order)
            w = w - (lr if per_param else lr[k]) * g
        out = mlp(w, dims, qx[t])
        qls.append(task_loss(out, qy[t], kind))
        sls.append(ls.detach())
        fasts.append(w)
        outs.append(out)
    ql = torch.stack(qls)
    wrt = [theta] + ([lr] if per_param else [])
    grads = torch.autograd.grad((gq * ql).sum(), wrt)
    grad_lr = grads[1] if per_param else None
    return ql.detach(), torch.stack(sls), torch.stack(fasts).detach(), torch.stack(outs).detach(), grads[0], grad_lr


def fused(theta, lr, sx, sy, qx, qy, gq, dims, steps, kind, per_param, first_order, save=True):
    ql, sl, fast, qout, saved = torch.ops.metafast.fused_inner_loop_cxx(
        theta, lr, sx, sy, qx, qy, list(dims), steps, kind, per_param, save)
    gt, glr = torch.ops.metafast.fused_inner_loop_backward_cxx(
        gq, theta, lr, sx, sy, qx, qy, saved, list(dims), steps, kind, per_param, first_order)
    return ql, sl, fast, qout, gt, (glr if per_param else None), saved


def rel_err(a, b):
    a, b = a.to(torch.float64), b.to(torch.float64)
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


NAMES = ("query_loss", "support_loss", "fast", "query_out", "grad_theta", "grad_lr")


def check_all(got, want, tol):
    for name, a, b in zip(NAMES, got, want):
        if b is None:
            continue
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        err = rel_err(a.cpu(), b.cpu())
        assert err <= tol, f"{name}: rel. err {err:.3g} > {tol:g}"


@pytest.mark.parametrize("case", CASES, ids=ids)
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("per_param", [False, True], ids=["lr", "metasgd"])
def test_float64_matches_autograd(case, steps, first_order, per_param):
    dims, kind = case
    args = make_problem(dims, kind, steps=steps, per_param=per_param)
    got = fused(*args, dims, steps, kind, per_param, first_order)
    want = reference(*args, dims, steps, kind, per_param, first_order)
    check_all(got[:6], want, TOL)
    saved = got[6]  # opaque: what the backward reads, for the shapes the fake implementation gives
    assert saved.shape == (fil._cxx_saved_numel(dims, *args[2].shape[:2], steps, kind, per_param, args[0]),)
    # the gradient really differs between orders (the second-order term is exercised)
    if not first_order:
        fo = reference(*args, dims, steps, kind, per_param, True)
        assert rel_err(fo[4], want[4]) > 1e3 * TOL



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_input_reaches_the_losses(dtype):
    # ReLU keeps a NaN as torch.relu does (a NaN input must not vanish into a finite loss that a
    # NaN check would pass)
    dims = (3, 17, 9, 5)
    args = make_problem(dims, MSE, dtype=dtype)
    args[2] = args[2].clone()
    args[2][1].fill_(float("nan"))  # task 1's support inputs
    ql, sl = fused(*args, dims, 1, MSE, False, False)[:2]
    assert torch.isnan(sl[1]) and torch.isnan(ql[1])
    assert torch.isfinite(ql[[0, 2]]).all() and torch.isfinite(sl[[0, 2]]).all()


def test_grad_query_loss_of_one_value_is_spread_over_the_tasks():
    dims = (3, 17, 9, 5)
    args = make_problem(dims, CE, steps=2)
    gq = args[6]
    one = torch.full((1,), 0.37, dtype=DT)
    ql, sl, fast, qout, saved = torch.ops.metafast.fused_inner_loop_cxx(*args[:6], list(dims), 2, CE, False, True)
    got = torch.ops.metafast.fused_inner_loop_backward_cxx(one, *args[:6], saved, list(dims), 2, CE, False, False)[0]
    want = torch.ops.metafast.fused_inner_loop_backward_cxx(one.expand_as(gq).contiguous(), *args[:6], saved,
                                                            list(dims), 2, CE, False, False)[0]
    assert rel_err(got, want) < 1e-14
    with pytest.raises(RuntimeError, match=r"grad_query_loss must be \[T\] = \[3\], or \[1\]"):
        torch.ops.metafast.fused_inner_loop_backward_cxx(torch.ones(2, dtype=DT), *args[:6], saved, list(dims), 2,
                                                         CE, False, False)


# metafast::fused_inner_loop_autograd: the eager op as one C++ autograd node over a flat buffer and its
# parameter views (what BatchedMAML passes).
def on(dev, args):
    return [a.to(dev) for a in args]


def _views(theta, dims):
    """A flat leaf buffer's worth of parameters: (buffer, [W_1, b_1, ...] leaves viewing it)."""
    buf = theta.detach().clone()
    params = [torch.nn.Parameter(t) for pair in unflatten(buf, dims) for t in pair]
    return buf, params


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[7]], ids=ids)
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("per_param", [False, True], ids=["lr", "metasgd"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_autograd_op_gives_each_parameter_its_gradient(case, first_order, per_param, device):
    dims, kind = case
    theta, lr, sx, sy, qx, qy, gq = make_problem(dims, kind, steps=2, per_param=per_param)
    T = sx.shape[0]
    buf, params = _views(theta.to(device), dims)
    lr_in = lr.to(device).requires_grad_(per_param) if per_param else lr.tolist()
    loss = "mse" if kind == MSE else "cross_entropy"
    mean, r = fil.fused_meta_loss(buf, params, lr_in, *on(device, (sx, sy, qx, qy)), dims, 2, loss,
                                  first_order=first_order)
    # a loss using both differentiable outputs: the mean and the per-task losses
    (0.5 * mean + (gq.to(device) * r.query_loss).sum()).backward()
    want = reference(theta, lr, sx, sy, qx, qy, gq + 0.5 / T, dims, 2, kind, per_param, first_order)
    check_all([t.detach().cpu() for t in (r.query_loss, r.support_loss, r.fast, r.query_out)], want[:4], TOL)
    assert abs(mean.item() - want[0].mean().item()) <= TOL * abs(want[0].mean().item())
    got_g = torch.cat([p.grad.reshape(-1) for p in params]).cpu()
    assert rel_err(got_g, want[4]) <= TOL
    assert all(p.grad.shape == p.shape and p.grad.device == p.device for p in params)
    if per_param:
        assert rel_err(lr_in.grad.cpu(), want[5]) <= TOL


def test_autograd_op_gradcheck_and_no_double_backward():
    dims, kind = (2, 5, 3), CE
    theta, lr, sx, sy, qx, qy, _ = make_problem(dims, kind, T=2, Ns=3, Nq=2, steps=2, per_param=True)
    th = theta.clone().requires_grad_(True)
    lr = lr.clone().requires_grad_(True)

    def f(th, lr):
        mean, r = fil.fused_meta_loss(th, [th], lr, sx, sy, qx, qy, dims, 2, "cross_entropy")
        return mean, r.query_loss

    assert torch.autograd.gradcheck(f, (th, lr))
    # the public op on the extension takes the same node (theta as its own parameter)
    ql = fil.fused_inner_loop(th, lr, sx, sy, qx, qy, dims, 2, "cross_entropy", backend="cpp").query_loss
    (g,) = torch.autograd.grad(ql.sum(), th, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(g.sum(), th)


def test_autograd_op_errors_and_no_grad():
    dims, kind = CASES[1]
    theta, lr, sx, sy, qx, qy, _ = make_problem(dims, kind)
    buf, params = _views(theta, dims)
    with pytest.raises(RuntimeError, match="params must hold theta's"):
        fil.fused_meta_loss(buf, params[:-1], lr.tolist(), sx, sy, qx, qy, dims, 1, "mse")
    with torch.no_grad():
        mean, r = fil.fused_meta_loss(buf, params, lr.tolist(), sx, sy, qx, qy, dims, 1, "mse")
    assert not mean.requires_grad and not r.query_loss.requires_grad


@pytest.mark.parametrize("case", [CASES[0], CASES[7]], ids=ids)
def test_recompute_without_saved(case):
    dims, kind = case
    args = make_problem(dims, kind, steps=3, per_param=True)
    ql, sl, fast, qout, saved = torch.ops.metafast.fused_inner_loop_cxx(*args[:6], list(dims), 3, kind, True, False)
    assert saved.numel() == 0
    gt, glr = torch.ops.metafast.fused_inner_loop_backward_cxx(args[6], *args[:6], saved, list(dims), 3, kind, True,
                                                               False)
    want = reference(*args, dims, 3, kind, True, False)
    check_all((ql, sl, fast, qout, gt, glr), want, TOL)


def test_matches_per_task_maml_on_mlp_module():
    """theta is nn.Sequential's parameter order: the mean query loss and its gradient equal the
    repository's reference on metafast.models.MLP."""
    dims = (3, 17, 9, 5)
    model = MLP(3, [17, 9], 5).to(DT)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    _, lr, sx, sy, qx, qy, _ = make_problem(dims, CE, T=4, steps=2)
    T = sx.shape[0]
    loss = per_task_maml(model, sx, sy, qx, qy, lr.tolist(), 2, loss="cross_entropy")
    want_g = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    gq = torch.full((T,), 1.0 / T, dtype=DT)
    ql, *_ = fused(theta, lr, sx, sy, qx, qy, gq, dims, 2, CE, False, False)
    gt = fused(theta, lr, sx, sy, qx, qy, gq, dims, 2, CE, False, False)[4]
    assert abs(ql.mean().item() - loss.item()) <= TOL * abs(loss.item())
    assert rel_err(gt, want_g) <= TOL


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[7]], ids=ids)
@pytest.mark.parametrize("per_param", [False, True], ids=["lr", "metasgd"])
def test_float32(case, per_param):
    dims, kind = case
    steps = 5
    args64 = make_problem(dims, kind, steps=steps, per_param=per_param)
    args32 = [a.float() if a.is_floating_point() else a for a in args64]
    got = fused(*args32, dims, steps, kind, per_param, False)
    for t in got[:6]:
        assert t is None or t.dtype == torch.float32
    want = reference(*args64, dims, steps, kind, per_param, False)
    check_all(got[:6], want, 2e-4)


@pytest.mark.parametrize("dtype, T", [(torch.float64, 9), (torch.float32, 19)], ids=["f64-9", "f32-19"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=ids)
def test_task_groups_and_threads(dtype, T, case):
    """The CPU kernel runs tasks in SIMD groups (4 float64 / 8 float32 lanes): several groups, a
    partly filled last one and two threads (OpenMP chunks of groups) give every task its own result,
    the same bits as one thread."""
    dims, kind = case
    args = make_problem(dims, kind, T=T, steps=2, per_param=True)
    cast = [a.to(dtype) if a.is_floating_point() else a for a in args]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = fused(*cast, dims, 2, kind, True, False)
        torch.set_num_threads(1)
        one = fused(*cast, dims, 2, kind, True, False)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(got, one):
        assert (a is None and b is None) or torch.equal(a, b)
    want = reference(*args, dims, 2, kind, True, False)
    check_all(got[:6], want, TOL if dtype == torch.float64 else 2e-4)
    # per task, not only in the sum: each task's fast weights
    for t in range(T):
        assert rel_err(got[2][t], want[2][t]) <= (TOL if dtype == torch.float64 else 2e-4), f"task {t}"


def test_single_task_and_single_row():
    dims = (2, 3, 1)
    args = make_problem(dims, MSE, T=1, Ns=1, Nq=1, steps=2)
    check_all(fused(*args, dims, 2, MSE, False, False)[:6], reference(*args, dims, 2, MSE, False, False), TOL)


def test_empty_batch():
    dims = (3, 4, 2)
    args = make_problem(dims, CE, T=0, steps=1)
    ql, sl, fast, qout, saved = torch.ops.metafast.fused_inner_loop_cxx(*args[:6], list(dims), 1, CE, False, True)
    assert ql.shape == (0,) and fast.shape == (0, num_params(dims)) and qout.shape == (0, 5, 2)
    gt, glr = torch.ops.metafast.fused_inner_loop_backward_cxx(args[6], *args[:6], saved, list(dims), 1, CE, False,
                                                               False)
    assert torch.equal(gt, torch.zeros(num_params(dims), dtype=DT)) and glr.numel() == 0


@pytest.mark.parametrize("kind", [MSE, CE], ids=["mse", "ce"])
def test_task_sliced_inputs_read_in_place(kind):
    # support and query sliced from one [T, Ns + Nq, ...] tensor (task slices contiguous, a task
    # stride of Ns + Nq rows): the CPU launcher reads them as they are, with the same results
    dims, Ns, Nq = (3, 17, 9, 5), 7, 5
    theta, lr, _, _, _, _, gq = make_problem(dims, kind, steps=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, Ns + Nq, dims[0], generator=g, dtype=DT)
    y = (torch.randn(3, Ns + Nq, dims[-1], generator=g, dtype=DT) if kind == MSE
         else torch.randint(0, dims[-1], (3, Ns + Nq), generator=g))
    sliced = [x[:, :Ns], y[:, :Ns], x[:, Ns:], y[:, Ns:]]
    assert not any(t.is_contiguous() for t in sliced)
    got = fused(theta, lr, *sliced, gq, dims, 2, kind, False, False)
    want = fused(theta, lr, *[t.contiguous() for t in sliced], gq, dims, 2, kind, False, False)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)
    # the autograd node takes them as they are too
    loss = "mse" if kind == MSE else "cross_entropy"
    grads = []
    for batch in (sliced, [t.contiguous() for t in sliced]):
        buf, params = _views(theta, dims)
        fil.fused_meta_loss(buf, params, lr.tolist(), *batch, dims, 2, loss)[0].backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
    assert torch.equal(grads[0], grads[1])


def test_without_fast_weights():
    dims = (3, 17, 9, 5)
    args = make_problem(dims, CE, steps=2)
    full = torch.ops.metafast.fused_inner_loop_cxx(*args[:6], list(dims), 2, CE, False, True)
    lean = torch.ops.metafast.fused_inner_loop_cxx(*args[:6], list(dims), 2, CE, False, True, False)
    assert lean[2].shape == (0, num_params(dims))
    for i in (0, 1, 3, 4):
        assert torch.equal(lean[i], full[i])
    buf, params = _views(args[0], dims)
    c = fil.check_args(buf, args[1].tolist(), *args[2:6], dims, 2, "cross_entropy")
    mean, r = fil.eager_meta_loss(buf, params, c, *args[2:6], False, need_fast=False)
    assert r.fast.shape == (0, num_params(dims)) and torch.equal(r.query_loss, full[0])


def test_argument_errors():
    dims = (3, 4, 2)
    theta, lr, sx, sy, qx, qy, gq = make_problem(dims, MSE, steps=1)
    op = torch.ops.metafast.fused_inner_loop_cxx
    with pytest.raises(RuntimeError, match="theta must have P = 26"):
        op(theta[:-1].contiguous(), lr, sx, sy, qx, qy, list(dims), 1, MSE, False, True)
    with pytest.raises(RuntimeError, match=r"lr must be \[steps\]"):
        op(theta, lr, sx, sy, qx, qy, list(dims), 2, MSE, False, True)
    with pytest.raises(RuntimeError, match="dims: every width"):
        op(theta, lr, sx, sy, qx, qy, [3, 300, 2], 1, MSE, False, True)
    with pytest.raises(RuntimeError, match="dims must list"):
        op(theta, lr, sx, sy, qx, qy, [3, 4, 4, 4, 4, 2], 1, MSE, False, True)
    with pytest.raises(RuntimeError, match="sy must have dtype"):
        op(theta, lr, sx, sy, qx, qy, list(dims), 1, CE, False, True)
    with pytest.raises(RuntimeError, match="sx must have dtype"):
        op(theta, lr, sx.float(), sy, qx, qy, list(dims), 1, MSE, False, True)
    with pytest.raises(RuntimeError, match="qx must be contiguous"):
        op(theta, lr, sx, sy, qx.transpose(0, 1).contiguous().transpose(0, 1), qy, list(dims), 1, MSE, False, True)
    with pytest.raises(RuntimeError, match="loss_kind"):
        op(theta, lr, sx, sy, qx, qy, list(dims), 1, 2, False, True)
    with pytest.raises(RuntimeError, match=r"saved must be empty or the forward's saved output"):
        torch.ops.metafast.fused_inner_loop_backward_cxx(gq, theta, lr, sx, sy, qx, qy, torch.zeros(3, 2, 26, dtype=DT),
                                                         list(dims), 1, MSE, False, False)


# ---------------------------------------------------------------------------------------------
# CUDA: the kernel against the CPU launcher in float64, and float32 against the float64 result.

GPU_CASES = CASES + [
    # workspace over the shared-memory limit: runs on the global per-task scratch
    ((32, 256, 256, 256, 10), CE),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=ids)
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("per_param", [False, True], ids=["lr", "metasgd"])
def test_cuda_matches_cpu(case, steps, first_order, per_param):
    dims, kind = case
    big = dims[1] == 256
    args = make_problem(dims, kind, T=5 if big else 9, Ns=40 if big else 11, Nq=33 if big else 6, steps=steps,
                        per_param=per_param)
    want = fused(*args, dims, steps, kind, per_param, first_order)
    got = fused(*on("cuda", args), dims, steps, kind, per_param, first_order)
    check_all(got[:6], want[:6], TOL)
    args32 = [a.float() if a.is_floating_point() else a for a in args]
    got32 = fused(*on("cuda", args32), dims, steps, kind, per_param, first_order)
    check_all(got32[:6], want[:6], 1e-3)


@pytest.mark.gpu
def test_cuda_recompute_without_saved():
    dims, kind = CASES[7]
    args = on("cuda", make_problem(dims, kind, steps=3, per_param=True))
    _, _, _, _, saved = torch.ops.metafast.fused_inner_loop_cxx(*args[:6], list(dims), 3, kind, True, False)
    gt, glr = torch.ops.metafast.fused_inner_loop_backward_cxx(args[6], *args[:6], saved, list(dims), 3, kind, True,
                                                               False)
    want = fused(*[a.cpu() for a in args], dims, 3, kind, True, False)
    assert rel_err(gt.cpu(), want[4]) <= TOL and rel_err(glr.cpu(), want[5]) <= TOL
