"""BatchedMAML's fused path (the whole meta-step of a Linear/ReLU MLP in one op) against its batched
path, in float64: same losses, meta-gradients, Meta-SGD rates and adapted weights."""
import os

import pytest
import torch
from torch import nn

from metafast import BatchedMAML
from metafast.algorithms.paths import fused as fused_path
from metafast.fallback import FallbackWarning
from metafast.models import MLP


def _plan():
    """fused_path's verdict for a small float64 MLP on CPU under the current backend settings."""
    from metafast.functional.losses import make_loss

    return fused_path.plan(MLP(3, [5], 2).double(), make_loss("mse"), False, None, torch.float64, torch.device("cpu"))


@pytest.fixture(params=["cxx", "triton"])
def fused_backend(request, monkeypatch):
    """Run the fused path with the C++ CPU kernel, or with Triton's interpreter."""
    from metafast import _backend

    if request.param == "triton":
        # Triton reads TRITON_INTERPRET when its kernels are first compiled: set it for the whole run
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton kernels run on CPU only when the run starts with TRITON_INTERPRET=1")
        monkeypatch.setenv(_backend.ENV, "triton")
    else:
        monkeypatch.delenv(_backend.ENV, raising=False)
    _backend.reset()
    dims, why = _plan()
    if dims is None:
        pytest.skip(f"no fused {request.param} kernel here: {why}")
    yield request.param
    _backend.reset()


def _batch(T, n, d_in, d_out, classification, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, n, d_in, generator=g, dtype=torch.float64)
    qx = torch.randn(T, n + 1, d_in, generator=g, dtype=torch.float64)
    if classification:
        sy = torch.randint(0, d_out, (T, n), generator=g)
        qy = torch.randint(0, d_out, (T, n + 1), generator=g)
    else:
        sy = torch.randn(T, n, d_out, generator=g, dtype=torch.float64)
        qy = torch.randn(T, n + 1, d_out, generator=g, dtype=torch.float64)
    return sx, sy, qx, qy


def _run(maml, batch):
    maml.zero_grad(set_to_none=True)
    out = maml(*batch)
    out.loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in maml.parameters()])
    return out, grads


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


CASES = [  # (hidden, loss, steps, first_order, meta_sgd, per-step lrs)
    ([40, 40], "mse", 1, False, False, False),
    ([17, 9], "cross_entropy", 3, False, False, True),
    ([8], "mse", 2, True, False, False),
    ([6, 5, 4], "cross_entropy", 2, False, True, False),
    ([], "cross_entropy", 5, False, False, False),
]


@pytest.mark.parametrize("hidden,loss,steps,first_order,meta_sgd,per_step", CASES)
def test_fused_equals_batched_path(fused_backend, hidden, loss, steps, first_order, meta_sgd, per_step):
    torch.manual_seed(0)
    cls = loss == "cross_entropy"
    d_in, d_out = 3, (4 if cls else 2)
    model = MLP(d_in, hidden, d_out).double()
    lr = [0.1 * (k + 1) for k in range(steps)] if per_step else 0.3
    kw = dict(inner_lr=lr, inner_steps=steps, first_order=first_order, meta_sgd=meta_sgd, loss=loss)
    fused = BatchedMAML(model, fused=True, **kw)
    batched = BatchedMAML(model, fused=False, **kw)
    assert "fused inner loop" in fused.describe() and "fused=False" in batched.describe()
    batch = _batch(6, 5, d_in, d_out, cls)
    out_f, g_f = _run(fused, batch)
    out_b, g_b = _run(batched, batch)
    assert _rel(out_f.task_losses, out_b.task_losses) < 1e-12
    assert _rel(out_f.support_losses, out_b.support_losses) < 1e-12
    if cls:
        assert torch.equal(out_f.task_accuracies, out_b.task_accuracies)
    assert g_f.shape == g_b.shape and _rel(g_f, g_b) < 1e-10, _rel(g_f, g_b)
    # adapted weights and predictions
    sx, sy, qx, _ = batch
    w_f, w_b = fused.adapt(sx, sy), batched.adapt(sx, sy)
    assert _rel(fused.predict(w_f, qx), batched.predict(w_b, qx)) < 1e-12


def test_ineligible_configurations_say_why():
    bn = MLP(3, [5], 2, batch_norm=True)
    assert "not fused because the model is not a chain" in BatchedMAML(bn, 0.1).describe()
    with pytest.raises(ValueError, match="fused=True.*not a chain of Linear"):
        BatchedMAML(bn, 0.1, fused=True)
    with pytest.raises(ValueError, match="fused=True.*anil"):
        BatchedMAML(MLP(3, [5], 2), 0.1, anil=True, fused=True)
    with pytest.raises(ValueError, match="fused=True.*clip_grad_norm"):
        BatchedMAML(MLP(3, [5], 2), 0.1, clip_grad_norm=1.0, fused=True)
    with pytest.raises(ValueError, match="fused=True.*custom"):
        BatchedMAML(MLP(3, [5], 2), 0.1, loss=lambda out, y: (out - y).abs().flatten(1).mean(1), fused=True)
    with pytest.raises(ValueError, match="fused: expected None, True or False"):
        BatchedMAML(MLP(3, [5], 2), 0.1, fused="yes")
    wide = nn.Sequential(nn.Linear(3, 300), nn.ReLU(), nn.Linear(300, 2))
    assert "not fused" in BatchedMAML(wide, 0.1).describe()


def test_mlp_dims():
    assert fused_path.mlp_dims(MLP(1, [40, 40], 1)) == [1, 40, 40, 1]
    assert fused_path.mlp_dims(MLP(64, [], 5)) == [64, 5]
    assert fused_path.mlp_dims(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))) is None
    assert fused_path.mlp_dims(nn.Sequential(nn.Linear(2, 3), nn.ReLU())) is None
    assert fused_path.mlp_dims(nn.Sequential(nn.Linear(2, 3, bias=False))) is None
    assert fused_path.mlp_dims(nn.Linear(2, 3)) is None


def test_fused_target_errors_name_the_argument(fused_backend):
    model = MLP(3, [5], 4).double()
    maml = BatchedMAML(model, 0.1, loss="cross_entropy", fused=True)
    sx, sy, qx, qy = _batch(2, 3, 3, 4, True)
    bad = qy.clone()
    bad[0, 0] = 7
    with pytest.raises(ValueError, match="query_y: labels must lie in"):
        maml(sx, sy, qx, bad)
    with pytest.raises(TypeError, match="support_y: cross_entropy needs int64"):
        maml(sx, sy.double(), qx, qy)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_self_check_passes_for_a_working_kernel(fused_backend, monkeypatch, loss):
    from metafast.functional.losses import make_loss

    monkeypatch.setattr(fused_path, "_self_checks", {})
    dims, why = fused_path.plan(MLP(3, [7, 5], 4), make_loss(loss), False, None, torch.float32,
                                torch.device("cpu"), verify=True)
    assert dims == [3, 7, 5, 4], why
    assert list(fused_path._self_checks.values()) == [(True, "ok")]


def test_a_kernel_failing_its_self_check_falls_back_with_a_warning(fused_backend, monkeypatch):
    from metafast.functional.losses import make_loss
    from metafast.ops import fused_inner_loop as op

    real = op.fused_inner_loop

    def broken(*args, backend=None, **kwargs):
        out = real(*args, backend=backend, **kwargs)
        if backend != "torch":  # a kernel that gets the query loss slightly wrong
            out = out._replace(query_loss=out.query_loss + 1e-2)
        return out

    monkeypatch.setattr(op, "fused_inner_loop", broken)
    monkeypatch.setattr(fused_path, "_self_checks", {})
    monkeypatch.delenv("METAFAST_STRICT", raising=False)  # a fallback: an error under METAFAST_STRICT=1
    with pytest.warns(FallbackWarning, match="failed its self-check.*query loss rel. err"):
        dims, why = fused_path.plan(MLP(3, [5], 2), make_loss("mse"), False, None, torch.float32,
                                    torch.device("cpu"), verify=True)
    assert dims is None and "self-check" in why


def test_inference_mode_then_training(fused_backend):
    # a first call in inference mode must not leave inference tensors (e.g. cached rates) that a
    # later training step would have to save for its backward
    torch.manual_seed(0)
    batch = _batch(3, 4, 3, 2, False, seed=7)
    maml = BatchedMAML(MLP(3, [5], 2).double(), inner_lr=0.0371, inner_steps=2, loss="mse")
    with torch.inference_mode():
        first = maml(*batch).loss.item()
        maml.adapt(*batch[:2])
    out, grads = _run(maml, batch)
    assert abs(out.loss.item() - first) <= 1e-12 * abs(first)
    ref = BatchedMAML(MLP(3, [5], 2).double(), inner_lr=0.0371, inner_steps=2, loss="mse", fused=False)
    ref.module.load_state_dict(maml.module.state_dict())
    _, want = _run(ref, batch)
    assert ((grads - want).norm() / want.norm()).item() <= 1e-10


def test_repeated_calls_check_once_per_signature(fused_backend, monkeypatch):
    # BatchedMAML checks a batch signature (shapes, dtypes, devices, configuration) once; later calls
    # with it go straight to the kernel, yet every per-call check and every change still counts
    if fused_backend != "cxx":
        pytest.skip("only the C++ autograd node path memoises its checks")
    torch.manual_seed(0)
    model = MLP(3, [6], 4).double()
    maml = BatchedMAML(model, inner_lr=0.3, inner_steps=2, loss="cross_entropy")
    ref = BatchedMAML(MLP(3, [6], 4).double(), inner_lr=0.3, inner_steps=2, loss="cross_entropy", fused=False)
    ref.module.load_state_dict(model.state_dict())
    batch = _batch(5, 4, 3, 4, True)
    out1, g1 = _run(maml, batch)
    calls = []
    real = maml._check_batch
    monkeypatch.setattr(maml, "_check_batch", lambda *a: calls.append(1) or real(*a))
    out2, g2 = _run(maml, batch)
    assert calls == [] and torch.equal(g1, g2) and torch.equal(out1.task_accuracies, out2.task_accuracies)
    assert _rel(g2, _run(ref, batch)[1]) < 1e-10
    # label values are checked on every call
    sx, sy, qx, qy = batch
    bad = qy.clone()
    bad[1, 2] = 4
    with pytest.raises(ValueError, match="query_y: labels must lie in"):
        maml(sx, sy, qx, bad)
    # so is the loss being finite
    with pytest.raises(FloatingPointError, match="is NaN/inf"):
        maml(sx.clone().fill_(float("nan")), sy, qx, qy)
    # a new signature is checked again: other task count, wrong shapes
    with pytest.raises(ValueError, match="query_x: expected 5 tasks"):
        maml(sx, sy, qx[:3], qy)
    assert len(calls) == 1  # the label and NaN calls above were checked on the short path
    # a changed configuration is checked again and takes effect
    for m in (maml, ref):
        m.first_order = True
    _, g_fo = _run(maml, batch)
    assert len(calls) == 2 and _rel(g_fo, _run(ref, batch)[1]) < 1e-10 and _rel(g_fo, g2) > 1e-6
    out3 = maml(*batch, inner_steps=3)
    assert len(calls) == 3 and _rel(out3.loss.detach(), ref(*batch, inner_steps=3).loss.detach()) < 1e-12
    # parameters moved to new storage (module.float() here) are rebound and checked again
    for m in (maml, ref):
        m.module.float()
        m.first_order = False
    batch32 = tuple(t.float() if t.is_floating_point() else t for t in batch)
    _, g32 = _run(maml, batch32)
    assert len(calls) == 4 and _rel(g32.double(), _run(ref, batch32)[1].double()) < 1e-5
