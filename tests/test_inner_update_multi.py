"""inner_update_multi (one task, a list of parameter tensors) against float64 PyTorch references: the
torch._foreach and per-tensor torch paths, the custom ops (opcheck), first and second derivatives, bad
input; the CUDA extension in @gpu tests."""
import importlib

import pytest
import torch

from metafast.ops.inner_update import inner_update_reference
from metafast.ops.inner_update_multi import inner_update_multi, inner_update_multi_reference

# the module (metafast.ops.inner_update_multi the attribute is the function of that name)
ium_mod = importlib.import_module("metafast.ops.inner_update_multi")

# forward tolerances per dtype (outputs are rounded once to the dtype; |values| ~ 1)
FWD_TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 2e-6), torch.bfloat16: (1.6e-2, 1.6e-2)}


def as64(x):
    return x.detach().to(torch.float64).requires_grad_(x.requires_grad) if torch.is_tensor(x) else x


# ----------------------------------------------------------------------------------------------
# the torch paths against the per-tensor and flattened references
# ----------------------------------------------------------------------------------------------
MULTI_SHAPES = [(5, 3), (7,), (), (2, 3, 4), (0, 3), (1001,)]


def make_multi(dtype, lr_kind, requires_grad=False, shapes=MULTI_SHAPES):
    params = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    if lr_kind == "float":
        lr = 0.3
    else:  # per parameter: shaped like it, except every other one a 0-d per-tensor lr
        lr = [(0.1 + torch.rand(s if i % 2 == 0 else (), dtype=torch.float64)).to(dtype)
              for i, s in enumerate(shapes)]
    if requires_grad:
        for x in params + grads + (lr if isinstance(lr, list) else []):
            x.requires_grad_()
    return params, grads, lr


def multi_inputs(params, grads, lr):
    return [x for x in params + grads + (lr if isinstance(lr, list) else []) if x.requires_grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lr_kind", ["float", "list"])
@pytest.mark.parametrize("max_norm", [None, 0.5, 1e6])
def test_multi_matches_per_tensor_reference(dtype, lr_kind, max_norm, assert_close):
    params, grads, lr = make_multi(dtype, lr_kind)
    lrs = lr if isinstance(lr, list) else [lr] * len(params)
    outs = inner_update_multi(params, grads, lr, max_norm)  # no autograd: the torch._foreach path
    total = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
    scale = min(1.0, max_norm / (total.item() + 1e-6)) if max_norm is not None else 1.0
    for i, (o, p, g, l) in enumerate(zip(outs, params, grads, lrs)):
        expected = inner_update_reference(as64(p).reshape(1, -1), as64(g).reshape(1, -1) * scale,
                                          as64(l).reshape(-1) if torch.is_tensor(l) and l.dim() else as64(l))
        assert o.shape == p.shape and o.dtype == dtype
        assert_close(o.reshape(1, -1), expected, *FWD_TOL[dtype], f"out[{i}]")


@pytest.mark.parametrize("lr_kind", ["float", "list"])
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_multi_gradients(lr_kind, max_norm, assert_close):
    params, grads, lr = make_multi(torch.float64, lr_kind, requires_grad=True)
    xs = multi_inputs(params, grads, lr)
    gos = [torch.randn_like(p) for p in params]
    outs = inner_update_multi(params, grads, lr, max_norm)
    got = torch.autograd.grad(outs, xs, gos)
    # the reference: flatten everything into one task row
    flat_p = torch.cat([p.flatten() for p in params])[None]
    flat_g = torch.cat([g.flatten() for g in grads])[None]
    flat_l = lr if not isinstance(lr, list) else torch.cat([l.expand(p.shape).flatten() for l, p in zip(lr, params)])
    ref = inner_update_reference(flat_p, flat_g, flat_l, max_norm)
    expected = torch.autograd.grad(ref, xs, torch.cat([g.flatten() for g in gos])[None])
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, 1e-12, 1e-12, f"input {i}")


@pytest.mark.parametrize("lr_kind", ["float", "list"])
@pytest.mark.parametrize("max_norm", [None, 0.5])
@pytest.mark.parametrize("via_op", [False, True])
def test_multi_gradcheck_and_gradgradcheck(lr_kind, max_norm, via_op):
    """Public function (per-tensor reference on CPU) and the custom op with its fused-backward
    autograd (CPU kernel), differentiated twice."""
    shapes = [(2, 2), (3,), ()]
    params, grads, lr = make_multi(torch.float64, lr_kind, requires_grad=True, shapes=shapes)
    n = len(params)
    xs = tuple(multi_inputs(params, grads, lr))

    def fn(*flat):
        ps, gs, ls = list(flat[:n]), list(flat[n:2 * n]), list(flat[2 * n:])
        if via_op:
            return tuple(ium_mod._multi_op(ps, gs, ls, 0.0 if ls else lr, max_norm, "torch"))
        return tuple(inner_update_multi(ps, gs, ls if ls else lr, max_norm))

    assert torch.autograd.gradcheck(fn, xs)
    assert torch.autograd.gradgradcheck(fn, xs)


@pytest.mark.parametrize("max_norm", [None, 0.5])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_inner_update_multi(max_norm, requires_grad):
    params, grads, lr = make_multi(torch.float64, "list", requires_grad=requires_grad, shapes=[(4, 3), (5,), ()])
    torch.library.opcheck(ium_mod._multi_op, (params, grads, lr, 0.0, max_norm, "torch"))
    gos = [torch.randn_like(p) for p in params]
    torch.library.opcheck(ium_mod._multi_backward_op, (gos, grads, lr, 0.0, max_norm, True, True, "torch"))


def test_multi_empty_and_half(assert_close):
    assert inner_update_multi([], [], 0.1) == []
    params, grads, lr = make_multi(torch.bfloat16, "list")
    outs = inner_update_multi(params, grads, lr, 0.5)
    ref = inner_update_multi_reference([as64(p) for p in params], [as64(g) for g in grads],
                                       [as64(l) for l in lr], 0.5)
    for i, (o, e) in enumerate(zip(outs, ref)):
        assert o.dtype == torch.bfloat16
        assert_close(o, e, *FWD_TOL[torch.bfloat16], f"out[{i}]")


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan"), True, "1"])
def test_multi_bad_max_norm(max_norm):
    with pytest.raises(ValueError, match="max_norm must be None or a float > 0"):
        inner_update_multi([torch.randn(4)], [torch.randn(4)], 0.1, max_norm)


def test_multi_bad_backend_argument():
    with pytest.raises(RuntimeError, match="has no triton implementation"):
        inner_update_multi([torch.randn(4)], [torch.randn(4)], 0.1, backend="triton")


@pytest.mark.parametrize("case", ["count", "shape", "dtype", "lr_count", "lr_shape", "not_list"])
def test_multi_bad_input(case):
    p, g = [torch.randn(3), torch.randn(2, 2)], [torch.randn(3), torch.randn(2, 2)]
    lr = 0.1
    expect = {"count": (ValueError, "grads must have one tensor per parameter"),
              "shape": (ValueError, r"grads\[1\] must have the shape of params\[1\]"),
              "dtype": (TypeError, r"grads\[0\] must have dtype"),
              "lr_count": (ValueError, "lr must be a float or a list of 2 tensors"),
              "lr_shape": (ValueError, r"lr\[1\] must be 0-d or of the shape of params\[1\]"),
              "not_list": (TypeError, "params must be a list of Tensors")}[case]
    if case == "count":
        g = g[:1]
    elif case == "shape":
        g[1] = torch.randn(4)
    elif case == "dtype":
        g[0] = g[0].double()
    elif case == "lr_count":
        lr = [torch.tensor(0.1)]
    elif case == "lr_shape":
        lr = [torch.tensor(0.1), torch.rand(4)]
    elif case == "not_list":
        p = torch.randn(3)
    with pytest.raises(expect[0], match=expect[1]):
        inner_update_multi(p, g, lr)


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA extension against the float64 reference
# ----------------------------------------------------------------------------------------------
def _amax(x: torch.Tensor) -> float:
    return x.abs().max().item() if x.numel() else 0.0


@pytest.mark.gpu
def test_gpu_backend_available():
    from metafast import _backend

    assert _backend.resolve("inner_update_multi", "cuda") == "cuda", _backend.explain("inner_update_multi", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("lr_kind", ["float", "list"])
@pytest.mark.parametrize("max_norm", [None, 0.5])
@pytest.mark.parametrize("n_tensors", [6, 150])  # 150 > one launch table
def test_gpu_multi(dtype, lr_kind, max_norm, n_tensors, assert_close):
    shapes = (MULTI_SHAPES * (n_tensors // len(MULTI_SHAPES) + 1))[:n_tensors]
    shapes = [s if i % 7 else (70001,) for i, s in enumerate(shapes)]  # a few multi-chunk tensors
    params, grads, lr = make_multi(dtype, lr_kind, shapes=shapes)
    params = [p.cuda().requires_grad_() for p in params]
    grads = [g.cuda().requires_grad_() for g in grads]
    if isinstance(lr, list):
        lr = [l.cuda().requires_grad_() for l in lr]
    outs = inner_update_multi(params, grads, lr, max_norm)
    p64 = [as64(p) for p in params]
    g64 = [as64(g) for g in grads]
    l64 = [as64(l) for l in lr] if isinstance(lr, list) else lr
    refs = inner_update_multi_reference(p64, g64, l64, max_norm)
    tol = FWD_TOL[dtype] if dtype != torch.float32 else (1e-5, 1e-5)
    for i, (o, e) in enumerate(zip(outs, refs)):
        assert_close(o, e, *tol, f"out[{i}]")
    gos = [torch.randn_like(e) for e in refs]
    xs = multi_inputs(params, grads, lr)
    got = torch.autograd.grad(outs, xs, [g.to(dtype) for g in gos])
    expected = torch.autograd.grad(refs, multi_inputs(p64, g64, l64), gos)
    btol = {torch.bfloat16: 5e-2, torch.float32: 1e-4, torch.float64: 1e-11}[dtype]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, btol * max(1.0, _amax(e)), btol, f"d input {i}")


@pytest.mark.gpu
@pytest.mark.parametrize("lr_kind", ["float", "list"])
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_gpu_multi_gradgradcheck(lr_kind, max_norm):
    shapes = [(2, 3), (5,), ()]
    params, grads, lr = make_multi(torch.float64, lr_kind, shapes=shapes)
    params = [p.cuda().requires_grad_() for p in params]
    grads = [g.cuda().requires_grad_() for g in grads]
    if isinstance(lr, list):
        lr = [l.cuda().requires_grad_() for l in lr]
    n = len(params)
    xs = tuple(multi_inputs(params, grads, lr))

    def fn(*flat):
        ls = list(flat[2 * n:])
        return tuple(inner_update_multi(list(flat[:n]), list(flat[n:2 * n]), ls if ls else lr, max_norm))

    assert torch.autograd.gradcheck(fn, xs)
    assert torch.autograd.gradgradcheck(fn, xs)


@pytest.mark.gpu
def test_gpu_opcheck():
    params, grads, lrs = make_multi(torch.float32, "list", shapes=[(4, 3), (5,), ()])
    params, grads, lrs = [p.cuda() for p in params], [g.cuda() for g in grads], [l.cuda() for l in lrs]
    torch.library.opcheck(ium_mod._multi_op, (params, grads, lrs, 0.0, 0.5, "cuda"))
    torch.library.opcheck(ium_mod._multi_backward_op,
                          ([torch.randn_like(p) for p in params], grads, lrs, 0.0, 0.5, True, True, "cuda"))
