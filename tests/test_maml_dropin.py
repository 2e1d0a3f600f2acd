"""metafast.MAML / MetaSGD and the module utilities: against hand derivations and against learn2learn.

The hand references are float64 functional derivations (torch.func.functional_call + autograd) and a
central finite difference of the whole meta-objective. learn2learn 0.2.0 is the oracle for drop-in
equality (float32, L2 difference <= 1e-8); those tests skip when it is not importable.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metafast.algorithms import maml as maml_mod
from metafast.algorithms.maml import MAML, inner_sgd_step, maml_update
from metafast.algorithms.meta_sgd import MetaSGD, meta_sgd_update
from metafast.algorithms.module_utils import clone_module, detach_module, update_module

try:
    import learn2learn as l2l
except Exception:  # not installed, or one of its many optional dependencies is missing
    l2l = None

needs_l2l = pytest.mark.skipif(l2l is None, reason="learn2learn is not importable")

F64 = torch.float64
RTOL64 = 1e-10      # float64 hand derivations
L2_DROPIN = 1e-8    # float32 drop-in equality with learn2learn
GRAD_OUT = 0.7      # outer grad_output != 1


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------- helpers

def assert_close(actual, expected, rtol, name, atol=0.0):
    """Element-wise |a - e| <= atol + rtol * max|e|; prints the first mismatches on failure."""
    assert actual is not None, f"{name}: got None, expected a tensor"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().to(F64).flatten(), expected.detach().to(F64).flatten()
    tol = atol + rtol * e.abs().max().item()
    bad = ((a - e).abs() > tol).nonzero().flatten()
    if len(bad):
        rows = "\n".join(f"  [{i}] got {a[i].item():.17g} expected {e[i].item():.17g}" for i in bad[:5].tolist())
        pytest.fail(f"{name}: {len(bad)}/{a.numel()} elements off by more than {tol:.3g}:\n{rows}")


def assert_all_close(actuals, expecteds, rtol, name):
    assert len(actuals) == len(expecteds), f"{name}: {len(actuals)} tensors vs {len(expecteds)}"
    for i, (a, e) in enumerate(zip(actuals, expecteds)):
        assert_close(a, e, rtol, f"{name}[{i}]")


def l2_diff(xs, ys):
    assert len(xs) == len(ys)
    total = torch.zeros((), dtype=F64)
    for x, y in zip(xs, ys):
        total += ((x.detach().double() - y.detach().double()) ** 2).sum()
    return total.sqrt().item()


def mse(out, y):
    return F.mse_loss(out, y)


def mlp(dtype=F64):
    return nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)


def mlp_tasks(n_tasks=2, dtype=F64):
    return [(torch.randn(5, 3, dtype=dtype), torch.randn(5, 2, dtype=dtype),
             torch.randn(7, 3, dtype=dtype), torch.randn(7, 2, dtype=dtype), mse) for _ in range(n_tasks)]


def cnn(dtype=F64, bn=False):
    layers = [nn.Conv2d(2, 3, 3, padding=1)] + ([nn.BatchNorm2d(3)] if bn else []) + [
        nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).to(dtype)


def cnn_tasks(n_tasks=2, dtype=F64):
    return [(torch.randn(4, 2, 5, 5, dtype=dtype), torch.randint(0, 3, (4,)),
             torch.randn(6, 2, 5, 5, dtype=dtype), torch.randint(0, 3, (6,)), F.cross_entropy)
            for _ in range(n_tasks)]


def reference_meta_grads(model, tasks, lr, steps, first_order=False, lrs=None, adapted=None):
    """Meta-gradients (w.r.t. the parameters, then lrs if given) of the summed query losses.

    Functional MAML: fast weights p_{k+1} = p_k - lr * dL_s/dp_k, differentiated (or, first order,
    with dL_s/dp_k treated as a constant). ``adapted``: names of the parameters the inner loop
    updates (default all).
    """
    names, params = zip(*model.named_parameters())
    adapted = set(names if adapted is None else adapted)
    total = 0.0
    for xs, ys, xq, yq, loss_fn in tasks:
        fast = dict(zip(names, params))
        for _ in range(steps):
            keys = [n for n in names if n in adapted]
            loss = loss_fn(functional_call(model, fast, (xs,)), ys)
            grads = torch.autograd.grad(loss, [fast[n] for n in keys], create_graph=not first_order)
            for n, g in zip(keys, grads):
                step = lr if lrs is None else lrs[names.index(n)]
                fast[n] = fast[n] - step * g
        total = total + loss_fn(functional_call(model, fast, (xq,)), yq)
    wrt = list(params) + (list(lrs) if lrs is not None else [])
    live = [t for t in wrt if t.requires_grad]
    grads = dict(zip(map(id, live), torch.autograd.grad(total * GRAD_OUT, live, allow_unused=True)))
    return [grads.get(id(t)) for t in wrt]


def run_learner(learner, tasks, steps, backward=True, **adapt_kwargs):
    """Clone per task, adapt ``steps`` times, sum the query losses, backward with grad_output GRAD_OUT."""
    total = 0.0
    for xs, ys, xq, yq, loss_fn in tasks:
        clone = learner.clone()
        for _ in range(steps):
            clone.adapt(loss_fn(clone(xs), ys), **adapt_kwargs)
        total = total + loss_fn(clone(xq), yq)
    if backward:
        total.backward(torch.tensor(GRAD_OUT, dtype=total.dtype))
    return total


def grads_of(module):
    return [p.grad for p in module.parameters()]


# ------------------------------------------------------------------------- MAML vs hand derivations (f64)

@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_maml_two_steps_matches_functional_derivation(arch, first_order):
    model, tasks = (mlp(), mlp_tasks()) if arch == "mlp" else (cnn(), cnn_tasks())
    expected = reference_meta_grads(model, tasks, lr=0.3, steps=2, first_order=first_order)
    run_learner(MAML(model, lr=0.3, first_order=first_order), tasks, steps=2)
    assert_all_close(grads_of(model), expected, RTOL64, f"{arch} meta-grad")


def test_first_order_differs_from_second_order():
    # Guards the two tests above against a first_order flag that does nothing.
    model, tasks = mlp(), mlp_tasks()
    second = reference_meta_grads(model, tasks, lr=0.3, steps=2, first_order=False)
    first = reference_meta_grads(model, tasks, lr=0.3, steps=2, first_order=True)
    assert l2_diff(first, second) > 1e-3 * l2_diff(second, [torch.zeros_like(g) for g in second])


def test_second_order_meta_grad_matches_finite_difference():
    """Directional derivative of the whole meta-objective (central difference) equals <grad, v>."""
    model, tasks = mlp(), mlp_tasks(n_tasks=1)
    run_learner(MAML(model, lr=0.4), tasks, steps=2)
    grad_dot_v = 0.0
    direction = [torch.randn_like(p) for p in model.parameters()]
    for g, v in zip(grads_of(model), direction):
        grad_dot_v += (g * v).sum().item() / GRAD_OUT

    def meta_loss(sign, eps=1e-5):
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            for p, v in zip(shifted.parameters(), direction):
                p.add_(sign * eps * v)
        return run_learner(MAML(shifted, lr=0.4), tasks, steps=2, backward=False).item()

    fd = (meta_loss(+1) - meta_loss(-1)) / 2e-5
    assert abs(fd - grad_dot_v) <= 1e-7 * abs(fd), f"finite difference {fd!r} vs autograd {grad_dot_v!r}"

    # The first-order gradient is measurably off the true derivative: the check above can fail.
    fo_model = copy.deepcopy(model)
    for p in fo_model.parameters():
        p.grad = None
    run_learner(MAML(fo_model, lr=0.4, first_order=True), tasks, steps=2)
    fo_dot_v = sum((g * v).sum().item() for g, v in zip(grads_of(fo_model), direction)) / GRAD_OUT
    assert abs(fd - fo_dot_v) > 1e-4 * abs(fd)


def test_adapt_step_is_plain_sgd_on_the_clone():
    model, (xs, ys, *_rest) = mlp(), mlp_tasks(1)[0]
    learner = MAML(model, lr=0.25).clone()
    before = [p.detach().clone() for p in learner.parameters()]
    grads = torch.autograd.grad(mse(learner(xs), ys), list(learner.parameters()))
    learner.adapt(mse(learner(xs), ys))
    after = list(learner.parameters())
    assert_all_close(after, [b - 0.25 * g for b, g in zip(before, grads)], 1e-15, "adapted params")
    # Original untouched, adapted tensors are non-leaf (in the graph of the original).
    assert all(p.is_leaf for p in model.parameters())
    assert all(not p.is_leaf and p.grad_fn is not None for p in after)


def test_clone_flags_and_lr_tensor():
    model, tasks = mlp(), mlp_tasks(1)
    maml = MAML(model, lr=torch.tensor(0.3, dtype=F64), first_order=True)
    c = maml.clone(first_order=False)
    assert (c.first_order, c.allow_unused, c.allow_nograd) == (False, False, False)
    assert maml.clone().first_order is True
    c = maml.clone(first_order=False)
    xs, ys, xq, yq, _ = tasks[0]
    c.adapt(mse(c(xs), ys))
    (mse(c(xq), yq) * GRAD_OUT).backward()
    assert_all_close(grads_of(model), reference_meta_grads(model, tasks, 0.3, 1), RTOL64, "tensor-lr meta-grad")


# ----------------------------------------------------------------------------------- shared parameters

class Tied(nn.Module):
    """``c`` reuses ``a``'s weight: one parameter used twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.c = nn.Linear(4, 4, bias=False)
        self.c.weight = self.a.weight
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.c(torch.tanh(self.a(x)))))


def tied_tasks(n=2, dtype=F64):
    return [(torch.randn(5, 4, dtype=dtype), torch.randn(5, 3, dtype=dtype),
             torch.randn(6, 4, dtype=dtype), torch.randn(6, 3, dtype=dtype), mse) for _ in range(n)]


def test_shared_parameters_stay_shared():
    model = Tied().double()
    tasks = tied_tasks()
    learner = MAML(model, lr=0.2).clone()
    assert learner.module.a.weight is learner.module.c.weight
    assert learner.module.a.weight is not model.a.weight
    assert len(list(learner.parameters())) == len(list(model.parameters())) == 4
    xs, ys, *_ = tasks[0]
    learner.adapt(mse(learner(xs), ys))
    learner.adapt(mse(learner(xs), ys))
    assert learner.module.a.weight is learner.module.c.weight

    # The tied weight takes one step with the sum of both uses' gradients (functional_call ties too).
    for p in model.parameters():
        p.grad = None
    run_learner(MAML(model, lr=0.2), tasks, steps=2)
    assert_all_close(grads_of(model), reference_meta_grads(model, tasks, 0.2, 2), RTOL64, "tied meta-grad")


# --------------------------------------------------------------------------------------------- buffers

class ScaledLinear(nn.Module):
    """A buffer that requires grad (cloned, differentiable) next to one that does not (shared)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale", torch.tensor([1.5, -0.5], requires_grad=True))
        self.register_buffer("offset", torch.tensor([0.25, 0.0]))

    def forward(self, x):
        return self.lin(x) * self.scale + self.offset


def test_buffers_grad_buffer_cloned_plain_buffer_shared():
    model = ScaledLinear().double()
    model.scale.detach_().requires_grad_()
    clone = clone_module(model)
    assert clone.scale is not model.scale and not clone.scale.is_leaf
    assert clone.offset is model.offset            # learn2learn shares buffers without grad
    assert torch.equal(clone.scale, model.scale)
    x = torch.randn(4, 3, dtype=F64)
    (clone(x).sum() * GRAD_OUT).backward()
    expected = (model.lin(x).detach() * GRAD_OUT).sum(0)
    assert_close(model.scale.grad, expected, 1e-15, "grad reaching the original buffer")

    # .update on a buffer is applied by update_module and reset.
    old = clone.scale
    old.update = torch.tensor([0.5, 0.5], dtype=F64)
    update_module(clone)
    assert_close(clone.scale, model.scale + 0.5, 0, "updated buffer")
    assert old.update is None and clone.scale is not old


def test_batchnorm_running_stats_shared_with_original():
    model = cnn(bn=True)
    bn = model[1]
    learner = MAML(model, lr=0.1).clone()
    assert learner.module[1].running_mean is bn.running_mean
    xs, ys, xq, yq, _ = cnn_tasks(1)[0]
    learner.adapt(F.cross_entropy(learner(xs), ys))
    assert int(bn.num_batches_tracked) == 1 and bn.running_mean.abs().sum() > 0
    # Meta-gradient through train-mode BN (batch statistics) against the functional derivation.
    for p in model.parameters():
        p.grad = None
    tasks = cnn_tasks(1)
    ref_model = copy.deepcopy(model)
    run_learner(MAML(model, lr=0.1), tasks, steps=2)
    assert_all_close(grads_of(model), reference_meta_grads(ref_model, tasks, 0.1, 2), RTOL64, "BN meta-grad")


# ------------------------------------------------------------------------------- allow_unused / nograd

class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 2)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.used(x)


def test_unused_parameters_raise_naming_them():
    model = WithUnused().double()
    xs, ys, *_ = mlp_tasks(1)[0]
    learner = MAML(model, lr=0.1).clone()
    with pytest.raises(RuntimeError, match=r"unused\.weight.*unused\.bias.*allow_unused=True"):
        learner.adapt(mse(learner(xs), ys))


@pytest.mark.parametrize("where", ["constructor", "adapt"])
def test_allow_unused_leaves_unused_parameters(where):
    model = WithUnused().double()
    tasks = mlp_tasks(2)
    maml = MAML(model, lr=0.3, allow_unused=(where == "constructor"))
    kwargs = {"allow_unused": True} if where == "adapt" else {}
    learner = maml.clone()
    before = learner.module.unused.weight
    xs, ys, *_ = tasks[0]
    learner.adapt(mse(learner(xs), ys), **kwargs)
    assert learner.module.unused.weight is before
    assert learner.module.used.weight is not model.used.weight
    run_learner(maml, tasks, steps=2, **kwargs)
    expected = reference_meta_grads(model, tasks, 0.3, 2, adapted=["used.weight", "used.bias"])
    assert_all_close(grads_of(model)[:2], expected[:2], RTOL64, "used meta-grad")
    assert model.unused.weight.grad is None and model.unused.bias.grad is None


def test_nograd_parameters_raise_naming_them():
    model = mlp()
    model[0].weight.requires_grad_(False)
    xs, ys, *_ = mlp_tasks(1)[0]
    learner = MAML(model, lr=0.1).clone()
    with pytest.raises(RuntimeError, match=r"\['0\.weight'\].*allow_nograd=True"):
        learner.adapt(mse(learner(xs), ys))


def test_allow_nograd_skips_frozen_parameters():
    model = mlp()
    model[0].weight.requires_grad_(False)
    tasks = mlp_tasks(2)
    maml = MAML(model, lr=0.3, allow_nograd=True)
    assert maml.allow_unused is True                # defaults to allow_nograd, as learn2learn
    learner = maml.clone()
    xs, ys, *_ = tasks[0]
    learner.adapt(mse(learner(xs), ys))
    assert torch.equal(learner.module[0].weight, model[0].weight)
    assert not learner.module[0].weight.requires_grad
    run_learner(maml, tasks, steps=2)
    names = [n for n, _ in model.named_parameters()]
    adapted = [n for n in names if n != "0.weight"]
    expected = reference_meta_grads(model, tasks, 0.3, 2, adapted=adapted)
    assert model[0].weight.grad is None
    assert_all_close(grads_of(model)[1:], expected[1:], RTOL64, "meta-grad with a frozen layer")


# ------------------------------------------------------------------------------------------------- RNN

class RNNHead(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(3, 5, batch_first=True)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_rnn_clone_and_adapt(cell):
    model = RNNHead(cell).double()
    tasks = [(torch.randn(3, 4, 3, dtype=F64), torch.randn(3, 2, dtype=F64),
              torch.randn(5, 4, 3, dtype=F64), torch.randn(5, 2, dtype=F64), mse) for _ in range(2)]
    learner = MAML(model, lr=0.5).clone()
    rnn = learner.module.rnn
    xs, ys, *_ = tasks[0]
    for _ in range(2):
        learner.adapt(mse(learner(xs), ys))
        # The RNN must run on the adapted tensors, not on a stale cached copy.
        assert all(w is rnn._parameters[n] for w, n in zip(rnn._flat_weights, rnn._flat_weights_names))
    assert model.rnn._flat_weights[0] is model.rnn.weight_ih_l0
    run_learner(MAML(model, lr=0.5), tasks, steps=2)
    assert_all_close(grads_of(model), reference_meta_grads(model, tasks, 0.5, 2), RTOL64, f"{cell.__name__}")


# ------------------------------------------------------------------------------------------------ MetaSGD

def test_meta_sgd_lrs_are_trainable_parameters():
    model = mlp()
    msgd = MetaSGD(model, lr=0.05)
    assert isinstance(msgd.lrs, nn.ParameterList)
    ids = {id(p) for p in msgd.parameters()}
    assert all(id(lr) in ids for lr in msgd.lrs) and all(id(p) in ids for p in model.parameters())
    for lr, p in zip(msgd.lrs, model.parameters()):
        assert lr.shape == p.shape and torch.all(lr == 0.05)
    clone = msgd.clone()
    assert all(not lr.is_leaf for lr in clone.lrs)
    assert_all_close(list(clone.lrs), list(msgd.lrs), 0, "cloned lrs")


def test_meta_sgd_one_step_lr_gradient_closed_form():
    """p' = p - lr * g  =>  dL_q/dlr = -g * dL_q/dp' (element-wise), g = dL_s/dp at p."""
    model, ((xs, ys, xq, yq, _),) = mlp(), mlp_tasks(1)
    msgd = MetaSGD(model, lr=0.1)
    with torch.no_grad():
        for lr in msgd.lrs:
            lr.uniform_(0.05, 0.2)                  # distinct per-element rates
    g_s = torch.autograd.grad(mse(model(xs), ys), list(model.parameters()))
    adapted = {n: p - lr * g for (n, p), lr, g in zip(model.named_parameters(), msgd.lrs, g_s)}
    g_q = torch.autograd.grad(mse(functional_call(model, adapted, (xq,)), yq), list(adapted.values()))
    learner = msgd.clone()
    learner.adapt(mse(learner(xs), ys))
    (mse(learner(xq), yq) * GRAD_OUT).backward()
    assert_all_close([lr.grad for lr in msgd.lrs], [-GRAD_OUT * a * b for a, b in zip(g_s, g_q)],
                     RTOL64, "lr grad")


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_meta_sgd_two_steps_matches_functional_derivation(arch, first_order):
    model, tasks = (mlp(), mlp_tasks()) if arch == "mlp" else (cnn(), cnn_tasks())
    msgd = MetaSGD(model, lr=0.1, first_order=first_order)
    with torch.no_grad():
        for lr in msgd.lrs:
            lr.uniform_(0.05, 0.3)
    expected = reference_meta_grads(model, tasks, None, 2, first_order=first_order, lrs=list(msgd.lrs))
    run_learner(msgd, tasks, steps=2)
    actual = grads_of(model) + [lr.grad for lr in msgd.lrs]
    assert_all_close(actual, expected, RTOL64, f"{arch} Meta-SGD grads (params then lrs)")
    assert all(lr.grad.abs().sum() > 0 for lr in msgd.lrs)


def test_meta_sgd_custom_lrs():
    model = mlp()
    lrs = [nn.Parameter(torch.full_like(p, 0.1)) for p in model.parameters()]
    lrs[0] = nn.Parameter(torch.tensor(0.2, dtype=F64))       # 0-dim: one rate for a whole tensor
    msgd = MetaSGD(model, lrs=lrs)
    assert isinstance(msgd.lrs, nn.ParameterList) and msgd.lrs[0] is lrs[0]
    tasks = mlp_tasks(1)
    run_learner(msgd, tasks, steps=1)
    expected = reference_meta_grads(model, tasks, None, 1, lrs=list(msgd.lrs))
    assert_all_close(grads_of(model) + [lr.grad for lr in msgd.lrs], expected, RTOL64, "0-dim lr")


def test_meta_sgd_keeps_tied_weights_tied():
    model = Tied().double()
    msgd = MetaSGD(model, lr=0.2)
    assert len(msgd.lrs) == 4
    tasks = tied_tasks(1)
    learner = msgd.clone()
    learner.adapt(mse(learner(tasks[0][0]), tasks[0][1]))
    assert learner.module.a.weight is learner.module.c.weight
    for p in msgd.parameters():
        p.grad = None
    run_learner(msgd, tasks, steps=2)
    expected = reference_meta_grads(model, tasks, None, 2, lrs=list(msgd.lrs))
    assert_all_close(grads_of(model) + [lr.grad for lr in msgd.lrs], expected, RTOL64, "tied Meta-SGD")


# --------------------------------------------------------------------------------------- module utilities

def test_update_module_with_updates_list_and_attributes():
    model = Tied().double()
    params = list(model.parameters())
    updates = [torch.randn_like(p) for p in params]
    updates[3] = None                                          # leave b.bias as it is
    clone = clone_module(model)
    update_module(clone, updates=updates)
    assert clone.a.weight is clone.c.weight                    # tied: updated once, still shared
    new = list(clone.parameters())
    for i, (p, u, n) in enumerate(zip(params, updates, new)):
        assert_close(n, p if u is None else p + u, 0, f"updated param {i}")
    assert clone.b.bias is not model.b.bias and not clone.b.bias.is_leaf   # the clone's own tensor

    # Through .update attributes, reset once applied.
    for p in clone.parameters():
        p.update = torch.ones_like(p)
    before = list(clone.parameters())
    update_module(clone)
    for b, n in zip(before, clone.parameters()):
        assert_close(n, b + 1, 0, "update attribute")
        assert b.update is None


def test_update_module_rejects_bad_updates():
    model = mlp()
    with pytest.raises(ValueError, match="updates: expected one entry per parameter of the module \\(6\\), got 5"):
        update_module(model, updates=[torch.zeros(1)] * 5)
    bad = [torch.zeros_like(p) for p in model.parameters()]
    bad[2] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"updates\[2\]: expected shape \(5, 7\)"):
        update_module(model, updates=bad)


def test_maml_update_function():
    model = mlp()
    clone = clone_module(model)
    grads = [torch.randn_like(p) for p in model.parameters()]
    grads[1] = None
    maml_update(clone, 0.5, grads)
    for p, g, n in zip(model.parameters(), grads, clone.parameters()):
        assert_close(n, p if g is None else p - 0.5 * g, 1e-15, "maml_update")
    with pytest.raises(ValueError, match="grads: expected one entry per parameter"):
        maml_update(clone, 0.5, grads[:2])


def test_meta_sgd_update_function():
    model = mlp()
    clone = clone_module(model)
    grads = [torch.randn_like(p) for p in model.parameters()]
    lrs = [torch.rand_like(p) for p in model.parameters()]
    meta_sgd_update(clone, lrs, grads)
    for p, lr, g, n in zip(model.parameters(), lrs, grads, clone.parameters()):
        assert_close(n, p - lr * g, 1e-15, "meta_sgd_update")


@pytest.mark.parametrize("keep_requires_grad", [False, True])
def test_detach_module(keep_requires_grad):
    model = ScaledLinear().double()
    model.scale.detach_().requires_grad_()
    model.lin.bias.requires_grad_(False)
    learner = MAML(model, lr=0.1, allow_nograd=True).clone()
    x = torch.randn(4, 3, dtype=F64)
    learner.adapt(learner(x).pow(2).sum())
    ret = detach_module(learner.module, keep_requires_grad=keep_requires_grad)
    assert ret is None
    for p in learner.parameters():
        assert p.is_leaf and p.grad_fn is None
    assert learner.module.lin.weight.requires_grad is keep_requires_grad
    assert learner.module.lin.bias.requires_grad is False
    assert learner.module.scale.requires_grad is keep_requires_grad and learner.module.scale.grad_fn is None
    if keep_requires_grad:
        learner(x).sum().backward()
        assert learner.module.lin.weight.grad is not None and model.lin.weight.grad is None


def test_clone_module_passes_non_modules_through():
    obj = object()
    assert clone_module(obj) is obj and detach_module(obj) is None


# ------------------------------------------------------------------------------------ API and bad input

def test_forward_and_attribute_passthrough():
    net = nn.Linear(3, 2).double()
    net.custom_tag = "tag"
    maml = MAML(net, lr=0.1)
    x = torch.randn(4, 3, dtype=F64)
    assert torch.equal(maml(x), net(x))
    assert maml.weight is net.weight and maml.in_features == 3 and maml.custom_tag == "tag"
    assert maml.lr == 0.1 and maml.module is net
    clone = maml.clone()
    assert clone.in_features == 3 and clone.weight is not net.weight
    with pytest.raises(AttributeError):
        maml.no_such_attribute
    msgd = MetaSGD(net, lr=0.1)
    assert msgd.out_features == 2 and torch.equal(msgd(x), net(x))
    # Checkpoints keep learn2learn's key layout; copies are independent.
    assert list(maml.state_dict()) == ["module.weight", "module.bias"]
    assert list(msgd.state_dict()) == ["module.weight", "module.bias", "lrs.0", "lrs.1"]
    twin = copy.deepcopy(maml)
    assert twin.weight is not net.weight and torch.equal(twin.weight, net.weight) and twin.lr == 0.1


def test_bad_input_errors():
    net = mlp()
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got str"):
        MAML("net", lr=0.1)
    with pytest.raises(TypeError, match="lr: expected a float or a scalar tensor, got str"):
        MAML(net, lr="0.1")
    with pytest.raises(ValueError, match=r"lr: expected a scalar tensor, got shape \(2,\)"):
        MAML(net, lr=torch.ones(2))
    learner = MAML(net, lr=0.1).clone()
    x = torch.randn(2, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"loss: expected a scalar \(one element\), got shape \(2, 2\)"):
        learner.adapt(learner(x))
    with pytest.raises(ValueError, match="loss: does not require grad"):
        learner.adapt(torch.tensor(1.0))
    with pytest.raises(TypeError, match="loss: expected a scalar torch.Tensor, got float"):
        learner.adapt(1.0)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        MetaSGD([1, 2])
    with pytest.raises(ValueError, match=r"lrs: expected one learning-rate tensor per parameter \(6\), got 2"):
        MetaSGD(net, lrs=[torch.ones(1), torch.ones(1)])
    lrs = [torch.ones_like(p) for p in net.parameters()]
    lrs[4] = torch.ones(3, 5)
    with pytest.raises(ValueError, match=r"lrs\[4\]: expected shape \(2, 5\) \(its parameter's\) or a 0-dim"):
        MetaSGD(net, lrs=lrs)
    with pytest.raises(ValueError, match=r"lr: expected one learning rate per parameter \(2\), got 1"):
        inner_sgd_step([torch.ones(1), torch.ones(1)], [torch.ones(1), torch.ones(1)], [0.1])


# --------------------------------------------------------------------------------- fused update dispatch

def test_cpu_update_is_learn2learn_arithmetic(monkeypatch):
    calls = []
    monkeypatch.setattr(maml_mod, "inner_update_multi", lambda *a: calls.append(a))
    p, g = torch.randn(7, 3), torch.randn(7, 3)
    (new,) = inner_sgd_step([p], [g], 0.37)
    assert not calls, "the fused op is for CUDA tensors only"
    assert torch.equal(new, p + (-0.37 * g))


def test_cuda_update_goes_through_fused_op(monkeypatch):
    calls = []

    def fake_fused(params, grads, lr):
        calls.append((params, grads, lr))
        return [p - lr * g for p, g in zip(params, grads)]

    monkeypatch.setattr(maml_mod, "inner_update_multi", fake_fused)
    monkeypatch.setattr(maml_mod, "_wants_fused", lambda params, lr: isinstance(lr, float))
    model, tasks = mlp(), mlp_tasks(1)
    run_learner(MAML(model, lr=0.3), tasks, steps=2)
    assert len(calls) == 2 and calls[0][2] == 0.3 and len(calls[0][0]) == 6
    assert_all_close(grads_of(model), reference_meta_grads(model, tasks, 0.3, 2), RTOL64, "fused-path grads")


@pytest.mark.parametrize("algo", ["maml", "meta_sgd"])
def test_through_the_real_fused_op(monkeypatch, algo):
    """Forced onto ``inner_update_multi`` (its CPU path here), meta-gradients stay exact to second order."""
    fused = maml_mod.inner_update_multi
    calls = []

    def counting(params, grads, lr):
        calls.append(lr)
        return fused(params, grads, lr)

    monkeypatch.setattr(maml_mod, "inner_update_multi", counting)
    monkeypatch.setattr(maml_mod, "_wants_fused", lambda params, lr: True)
    model, tasks = cnn(), cnn_tasks(2)
    if algo == "maml":
        run_learner(MAML(model, lr=0.3), tasks, steps=2)
        expected, actual = reference_meta_grads(model, tasks, 0.3, 2), grads_of(model)
    else:
        msgd = MetaSGD(model, lr=0.1)
        with torch.no_grad():
            for lr in msgd.lrs:
                lr.uniform_(0.05, 0.3)
        run_learner(msgd, tasks, steps=2)
        expected = reference_meta_grads(model, tasks, None, 2, lrs=list(msgd.lrs))
        actual = grads_of(model) + [lr.grad for lr in msgd.lrs]
    assert len(calls) == 4 and (calls[0] == 0.3 if algo == "maml" else len(calls[0]) == 6)
    assert_all_close(actual, expected, RTOL64, f"{algo} through inner_update_multi")


def test_wants_fused_only_for_cuda_tensors():
    assert not maml_mod._wants_fused([torch.zeros(2)], 0.1)
    assert not maml_mod._wants_fused([torch.empty(2, device="meta")], 0.1)
    assert not maml_mod._wants_fused([], 0.1)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_vs_cpu64(make_model, tasks, learner_fn, lrs_init=None):
    """Meta-gradients of a float32 CUDA run and of the float64 CPU functional derivation."""
    model = make_model()
    ref_model = copy.deepcopy(model).double()
    learner = learner_fn(model.cuda())
    lrs = None
    if isinstance(learner, MetaSGD):
        with torch.no_grad():
            for lr in learner.lrs:
                lr.uniform_(0.05, 0.3)
        lrs = [lr.detach().cpu().double().requires_grad_() for lr in learner.lrs]
    as64 = [tuple(t.double() if t.is_floating_point() else t for t in task[:4]) + task[4:] for task in tasks]
    expected = reference_meta_grads(ref_model, as64, learner.lr if lrs is None else None, 2,
                                    first_order=learner.first_order, lrs=lrs)
    run_learner(learner, [tuple(t.cuda() for t in task[:4]) + task[4:] for task in tasks], steps=2)
    actual = [p.grad for p in learner.parameters()]
    for i, (g, e) in enumerate(zip(actual, expected)):
        assert_close(g.cpu(), e, 2e-4, f"cuda meta-grad[{i}]", atol=1e-6)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("algo", ["maml", "meta_sgd"])
@pytest.mark.parametrize("arch", ["cnn", "gru"])
def test_on_cuda_matches_float64_cpu_reference(arch, algo, first_order):
    if arch == "cnn":
        make, tasks = (lambda: cnn(torch.float32)), cnn_tasks(2, torch.float32)
    else:   # cuDNN RNN: flat weights rebuilt from non-leaf tensors
        make = lambda: RNNHead(nn.GRU)
        tasks = [(torch.randn(3, 4, 3), torch.randn(3, 2), torch.randn(5, 4, 3), torch.randn(5, 2), mse)
                 for _ in range(2)]
    if algo == "maml":
        _cuda_vs_cpu64(make, tasks, lambda m: MAML(m, lr=0.3, first_order=first_order))
    else:
        _cuda_vs_cpu64(make, tasks, lambda m: MetaSGD(m, first_order=first_order))


@pytest.mark.gpu
@needs_cuda
def test_cuda_maml_uses_the_fused_update_when_built(monkeypatch):
    fused = maml_mod.inner_update_multi
    calls = []

    def counting(params, grads, lr):
        calls.append(len(params))
        return fused(params, grads, lr)

    monkeypatch.setattr(maml_mod, "inner_update_multi", counting)
    _cuda_vs_cpu64(lambda: cnn(torch.float32), cnn_tasks(2, torch.float32), lambda m: MAML(m, lr=0.3))
    assert calls == [6, 6, 6, 6]


# ------------------------------------------------------------------------------- learn2learn as the oracle

def _pair(make_model):
    """The same initial model twice (independent copies)."""
    model = make_model()
    return model, copy.deepcopy(model)


@needs_l2l
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("arch", ["mlp", "cnn_bn"])
def test_maml_equals_learn2learn(arch, first_order):
    if arch == "mlp":
        ours, theirs = _pair(lambda: mlp(torch.float32))
        tasks = mlp_tasks(2, torch.float32)
    else:
        ours, theirs = _pair(lambda: cnn(torch.float32, bn=True))
        tasks = cnn_tasks(2, torch.float32)
    loss_ours = run_learner(MAML(ours, lr=0.4, first_order=first_order), tasks, steps=2)
    loss_theirs = run_learner(l2l.algorithms.MAML(theirs, lr=0.4, first_order=first_order), tasks, steps=2)
    assert abs(loss_ours.item() - loss_theirs.item()) <= L2_DROPIN
    assert l2_diff(grads_of(ours), grads_of(theirs)) <= L2_DROPIN
    assert l2_diff(list(ours.buffers()), list(theirs.buffers())) <= L2_DROPIN   # BN running stats


@needs_l2l
@pytest.mark.parametrize("arch", ["mlp", "cnn_bn"])
def test_meta_sgd_equals_learn2learn(arch):
    make = (lambda: mlp(torch.float32)) if arch == "mlp" else (lambda: cnn(torch.float32, bn=True))
    tasks = mlp_tasks(2, torch.float32) if arch == "mlp" else cnn_tasks(2, torch.float32)
    ours, theirs = _pair(make)
    m_ours, m_theirs = MetaSGD(ours, lr=0.2), l2l.algorithms.MetaSGD(theirs, lr=0.2)
    with torch.no_grad():
        for a, b in zip(m_ours.lrs, m_theirs.lrs):
            a.uniform_(0.05, 0.3)
            b.copy_(a)
    run_learner(m_ours, tasks, steps=2)
    run_learner(m_theirs, tasks, steps=2)
    assert l2_diff(list(m_ours.parameters()), list(m_theirs.parameters())) == 0
    assert l2_diff([p.grad for p in m_ours.parameters()], [p.grad for p in m_theirs.parameters()]) <= L2_DROPIN


@needs_l2l
def test_rnn_and_nograd_equal_learn2learn():
    ours, theirs = _pair(lambda: RNNHead(nn.GRU))
    tasks = [(torch.randn(3, 4, 3), torch.randn(3, 2), torch.randn(5, 4, 3), torch.randn(5, 2), mse)
             for _ in range(2)]
    run_learner(MAML(ours, lr=0.5), tasks, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # learn2learn reads .grad of non-leaf tensors
        run_learner(l2l.algorithms.MAML(theirs, lr=0.5), tasks, steps=2)
    assert l2_diff(grads_of(ours), grads_of(theirs)) <= L2_DROPIN

    ours, theirs = _pair(lambda: mlp(torch.float32))
    for m in (ours, theirs):
        m[2].weight.requires_grad_(False)
    tasks = mlp_tasks(2, torch.float32)
    run_learner(MAML(ours, lr=0.3, allow_nograd=True), tasks, steps=2)
    run_learner(l2l.algorithms.MAML(theirs, lr=0.3, allow_nograd=True), tasks, steps=2)
    frozen = 2
    g_ours, g_theirs = grads_of(ours), grads_of(theirs)
    assert g_ours[frozen] is None and g_theirs[frozen] is None
    del g_ours[frozen], g_theirs[frozen]
    assert l2_diff(g_ours, g_theirs) <= L2_DROPIN


@needs_l2l
def test_module_utils_equal_learn2learn():
    ours = Tied()
    ours.register_buffer("extra", torch.randn(3, requires_grad=True))
    theirs = copy.deepcopy(ours)
    c_ours, c_theirs = clone_module(ours), l2l.clone_module(theirs)
    assert c_theirs.a.weight is c_theirs.c.weight and c_ours.a.weight is c_ours.c.weight
    updates = [torch.randn_like(p) for p in ours.parameters()]
    update_module(c_ours, updates=updates)
    l2l.update_module(c_theirs, updates=[u.clone() for u in updates])
    named_o, named_t = dict(c_ours.named_parameters()), dict(c_theirs.named_parameters())
    assert named_o.keys() == named_t.keys()
    assert l2_diff(list(named_o.values()), list(named_t.values())) <= L2_DROPIN
    x = torch.randn(5, 4)
    (c_ours(x).sum() + c_ours.extra.sum() * 2).backward()
    (c_theirs(x).sum() + c_theirs.extra.sum() * 2).backward()
    assert l2_diff([p.grad for p in ours.parameters()] + [ours.extra.grad],
                   [p.grad for p in theirs.parameters()] + [theirs.extra.grad]) <= L2_DROPIN
    detach_module(c_ours, keep_requires_grad=True)
    l2l.detach_module(c_theirs, keep_requires_grad=True)
    for (n, a), b in zip(c_ours.named_parameters(), c_theirs.parameters()):
        assert (a.is_leaf, a.requires_grad) == (b.is_leaf, b.requires_grad), n
