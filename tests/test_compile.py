"""torch.compile over metafast's public ops and a first-order MAML step, on CPU tensors.

Every op traced by ``torch.compile(fullgraph=True)`` must give the eager values and gradients, with
the torch backend and with backend="triton" (Triton's interpreter: run with TRITON_INTERPRET=1, else
those cases skip). The custom ops' fake (meta) implementations and autograd registrations are
checked by ``torch.library.opcheck``.

Every op and a first-order BatchedMAML step trace as one graph: host-synchronising checks (label
ranges, the finite check, FlatParams' storage check) turn into device-side asserts while compiling.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from metafast.ops.inner_update import inner_update
from metafast.ops.inner_update_multi import inner_update_multi
from metafast.ops.kd_loss import kd_loss
from metafast.ops.multitask_heads import multitask_heads_cross_entropy
from metafast.ops.task_cross_entropy import task_cross_entropy

# Triton's interpreter computes masked-off lanes too (inf - inf there is discarded, but numpy warns)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

DT = torch.float64
RTOL, ATOL = 1e-10, 1e-12
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_FUSED = os.path.exists(os.path.join(os.path.dirname(__file__), os.pardir, "metafast", "ops", "fused_inner_loop.py"))


@pytest.fixture(autouse=True)
def _slow_only_when_asked(request):
    # The project's default run selects no markers; the inductor cases (a C++ build each, 100 s in all
    # on 2 cores) run when a -m expression names "slow", e.g. -m slow.
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("inductor case: run with -m slow")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _r(g, *shape):
    return torch.randn(*shape, generator=g, dtype=DT)


# name -> (fn(*tensors, backend), inputs(), backends); every op traces as one graph (fullgraph=True)
def _inner_update_case():
    g = _gen(1)
    return [_r(g, 6).requires_grad_(), _r(g, 3, 6).requires_grad_(), (_r(g, 6).abs() + 0.1).requires_grad_()]


def _inner_update_multi_case():
    g = _gen(2)
    return [_r(g, 3, 4).requires_grad_(), _r(g, 4).requires_grad_(), _r(g, 3, 4).requires_grad_(),
            _r(g, 4).requires_grad_()]


def _task_ce_case():
    g = _gen(3)
    return [_r(g, 2, 5, 7).requires_grad_(), torch.randint(0, 7, (2, 5), generator=g)]


def _kd_case():
    g = _gen(4)
    return [_r(g, 5, 7).requires_grad_(), _r(g, 5, 7), torch.randint(0, 7, (5,), generator=g)]


def _heads_case():
    g = _gen(5)
    return [_r(g, 5, 4).requires_grad_(), _r(g, 3, 6, 4).requires_grad_(), _r(g, 3, 6).requires_grad_(),
            torch.randint(0, 6, (3, 5), generator=g)]


OPS = {
    "inner_update": (lambda th, gr, lr, b: inner_update(th, gr, lr, 1.0, backend=b), _inner_update_case,
                     ("torch", "triton")),
    # inner_update_multi has no Triton implementation (cuda and torch only)
    "inner_update_multi": (lambda a, b_, c, d, b: inner_update_multi([a, b_], [c, d], 0.1, 0.5, backend=b),
                           _inner_update_multi_case, ("torch",)),
    "task_cross_entropy": (lambda lg, y, b: task_cross_entropy(lg, y, label_smoothing=0.1, backend=b), _task_ce_case,
                           ("torch", "triton")),
    "kd_loss": (lambda s, t, y, b: kd_loss(s, t, y, 2.0, 0.7, backend=b), _kd_case, ("torch", "triton")),
    "multitask_heads_cross_entropy": (lambda f, w, bb, y, b: multitask_heads_cross_entropy(f, w, bb, y, backend=b),
                                      _heads_case, ("torch", "triton")),
}


FUSED_DIMS = [2, 8, 3]


def _fused_case(loss):
    def make():
        g = _gen(6)
        P = sum(FUSED_DIMS[i + 1] * (FUSED_DIMS[i] + 1) for i in range(len(FUSED_DIMS) - 1))
        if loss == "mse":
            ys = _r(g, 4, 5, 3), _r(g, 4, 6, 3)
        else:
            ys = torch.randint(0, 3, (4, 5), generator=g), torch.randint(0, 3, (4, 6), generator=g)
        return [(_r(g, P) * 0.5).requires_grad_(), (_r(g, P).abs() * 0.2 + 0.05).requires_grad_(), _r(g, 4, 5, 2),
                ys[0], _r(g, 4, 6, 2), ys[1]]
    return make


def _fused(loss):
    def fn(theta, lr, sx, sy, qx, qy, b):
        from metafast.ops.fused_inner_loop import fused_inner_loop

        return fused_inner_loop(theta, lr, sx, sy, qx, qy, FUSED_DIMS, 2, loss, backend=b).query_loss
    return fn


if HAS_FUSED:
    FUSED_BACKENDS = ("torch", "triton", "cpp")  # "cpp": the C++ extension's CPU kernels
    OPS["fused_inner_loop_mse"] = (_fused("mse"), _fused_case("mse"), FUSED_BACKENDS)
    OPS["fused_inner_loop_cross_entropy"] = (_fused("cross_entropy"), _fused_case("cross_entropy"),
                                             FUSED_BACKENDS)


def _values_and_grads(fn, args):
    """Outputs and the gradients of a fixed random projection of them w.r.t. every input that requires grad."""
    out = fn(*args)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    g = _gen(99)
    total = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return [o.detach() for o in outs], list(torch.autograd.grad(total, leaves))


def _assert_close(got, want, what):
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, (what, i, a.shape, b.shape)
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} [{i}]: {m}")


def _skip_unavailable(backend, name):
    if backend == "triton" and not INTERPRET:
        pytest.skip("the Triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
    if backend != "torch":
        from metafast import _backend

        try:
            op = "fused_inner_loop" if name.startswith("fused_inner_loop") else name
            _backend.resolve(op, torch.device("cpu"), backend)
        except Exception as e:  # noqa: BLE001 - e.g. an extension built without this op
            pytest.skip(f"{backend} backend unavailable for {name} on CPU: {e}")


def _check_op(name, backend, compiler):
    fn, make, backends = OPS[name]
    _skip_unavailable(backend, name)
    torch._dynamo.reset()

    def f(*a):
        return fn(*a, backend)

    eager = _values_and_grads(f, make())
    compiled = _values_and_grads(torch.compile(f, fullgraph=True, backend=compiler), make())
    _assert_close(compiled[0], eager[0], f"{name}[{backend}] {compiler} values")
    _assert_close(compiled[1], eager[1], f"{name}[{backend}] {compiler} gradients")


def _params(compilers):
    out = []
    for name, (_, _, backends) in OPS.items():
        for backend in backends:
            for compiler in compilers:
                marks = []
                if compiler == "inductor" and not (name == "inner_update" and backend == "torch"):
                    marks.append(pytest.mark.slow)  # a C++ compile per case: 5-10 s each on 2 cores
                out.append(pytest.param(name, backend, compiler, marks=marks, id=f"{name}-{backend}-{compiler}"))
    return out


@pytest.mark.parametrize("name,backend,compiler", _params(("aot_eager", "inductor")))
def test_op_fullgraph_matches_eager(name, backend, compiler):
    _check_op(name, backend, compiler)


# ----------------------------------------------------------------------------- fake impls
def _opcheck_cases():
    g = _gen(7)
    t = _r(g, 3, 6).requires_grad_()
    cases = {
        "inner_update": (torch.ops.metafast.inner_update.default,
                         (_r(g, 6).requires_grad_(), t, (_r(g, 6).abs() + 0.1).requires_grad_(), 0.0, 1.0, "triton")),
        "kd_loss": (torch.ops.metafast.kd_loss.default,
                    (_r(g, 2, 5, 7).requires_grad_(), _r(g, 2, 5, 7), torch.randint(0, 7, (2, 5), generator=g),
                     2.0, 0.7, "mean", "triton")),
        "task_cross_entropy": (torch.ops.metafast.task_cross_entropy.default,
                               (_r(g, 2, 5, 7).requires_grad_(), torch.randint(0, 7, (2, 5), generator=g),
                                0.1, -100, "mean", "triton")),
        "multitask_heads_cross_entropy": (torch.ops.metafast.multitask_heads_cross_entropy.default,
                                          (_r(g, 5, 4).requires_grad_(), _r(g, 3, 6, 4).requires_grad_(),
                                           _r(g, 3, 6).requires_grad_(), torch.randint(0, 6, (3, 5), generator=g),
                                           "mean", "triton")),
    }
    return cases


@pytest.mark.skipif(not INTERPRET, reason="the custom ops run on CPU tensors only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_custom_op_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


# ----------------------------------------------------------------------------- first-order MAML
DIMS = [1, 8, 8, 1]
T, K, Q, STEPS, LR = 4, 5, 6, 2, 0.1


def _maml_batch():
    g = _gen(11)
    return [_r(g, T, K, 1), _r(g, T, K, 1), _r(g, T, Q, 1), _r(g, T, Q, 1)]


def _batched_maml(**kw):
    from metafast import BatchedMAML
    from metafast.models import MLP

    torch.manual_seed(0)
    return BatchedMAML(MLP(DIMS[0], DIMS[1:-1], DIMS[-1]).to(DT), inner_lr=LR, inner_steps=STEPS, first_order=True,
                       loss="mse", **kw)


def _mlp(w, x):
    """The MLP of flat parameters w [P] (nn.Sequential order: W1, b1, W2, b2, ...) on x [N, d0]."""
    off, h = 0, x
    for i, (din, dout) in enumerate(zip(DIMS[:-1], DIMS[1:])):
        W = w[off:off + dout * din].view(dout, din)
        b = w[off + dout * din:off + dout * din + dout]
        off += dout * (din + 1)
        h = F.linear(h, W, b)
        if i < len(DIMS) - 2:
            h = torch.relu(h)
    return h


def _task_loss(w, x, y):
    return F.mse_loss(_mlp(w, x), y)


def fomaml_step(theta, sx, sy, qx, qy):
    """A first-order MAML step from metafast's pieces: per-task inner gradients by torch.func (no graph
    to the meta-parameters: first order), the inner update of all tasks at once with the inner_update
    op, and the mean query loss, differentiable w.r.t. theta through the last update only."""
    fast = None
    for _ in range(STEPS):
        w = theta.detach().expand(T, -1) if fast is None else fast.detach()
        g = torch.vmap(torch.func.grad(_task_loss))(w, sx, sy)
        fast = inner_update(theta if fast is None else fast, g, LR)
    return torch.vmap(_task_loss)(fast, qx, qy).mean()


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_functional_fomaml_step_fullgraph_matches_batched_maml(compiler):
    maml = _batched_maml(fused=False)
    theta = torch.cat([p.detach().reshape(-1) for p in maml.module.parameters()]).requires_grad_()
    batch = _maml_batch()
    out = maml(*batch)
    out.loss.backward()
    want_grad = torch.cat([p.grad.reshape(-1) for p in maml.module.parameters()])
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fomaml_step)(theta, *batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    loss = torch.compile(fomaml_step, fullgraph=True, backend=compiler)(theta, *batch)
    loss.backward()
    torch.testing.assert_close(loss.detach(), out.loss.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(theta.grad, want_grad, rtol=RTOL, atol=ATOL)


def _maml_loss_and_grads(maml, fn):
    for p in maml.parameters():
        p.grad = None
    loss = fn(*_maml_batch())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in maml.parameters()]


@pytest.mark.parametrize("exact_reverse", [True, False])
def test_batched_maml_first_order_compiles_with_graph_breaks(exact_reverse):
    """BatchedMAML(first_order=True) under torch.compile (graph breaks allowed) equals eager."""
    maml = _batched_maml(fused=False, exact_reverse=exact_reverse)
    eager = _maml_loss_and_grads(maml, lambda *b: maml(*b).loss)
    torch._dynamo.reset()
    step = torch.compile(lambda *b: maml(*b).loss, backend="aot_eager")
    compiled = _maml_loss_and_grads(maml, step)
    _assert_close([compiled[0]], [eager[0]], "BatchedMAML loss")
    _assert_close(compiled[1], eager[1], "BatchedMAML gradients")


@pytest.mark.parametrize("options", [dict(fused=False, exact_reverse=True), dict(fused=False, exact_reverse=False),
                                     dict()], ids=["exact_reverse", "autograd", "default"])
def test_batched_maml_first_order_fullgraph(options):
    """The whole first-order meta-step (finite check included) is one graph and equals eager."""
    maml = _batched_maml(**options)
    eager = _maml_loss_and_grads(maml, lambda *b: maml(*b).loss)
    torch._dynamo.reset()
    step = torch.compile(lambda *b: maml(*b).loss, fullgraph=True, backend="aot_eager")
    compiled = _maml_loss_and_grads(maml, step)
    _assert_close([compiled[0]], [eager[0]], "BatchedMAML loss")
    _assert_close(compiled[1], eager[1], "BatchedMAML gradients")
