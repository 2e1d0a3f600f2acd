"""The graph executor (metafast/functional/graph) on custom module graphs and each batched layer:
meta-gradients equal the float64 per-task autograd reference (rel. err <= 1e-10) on the exact reverse
and on autograd through the unrolled loop; untraceable modules fall back per task with a named warning."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metafast import BatchedMAML
from metafast.fallback import FallbackError, FallbackWarning
from metafast.functional.graph.model import GraphModel
from test_batched_maml import DT, TOL, flat, image_batch, reference, regression_batch, rel_err


def meta_gradient(model, batch, steps, first_order, meta_sgd, exact_reverse, loss="cross_entropy", lr=0.3):
    maml = BatchedMAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order, meta_sgd=meta_sgd,
                       loss=loss, exact_reverse=exact_reverse)
    if meta_sgd:
        with torch.no_grad():
            maml.lrs.mul_(torch.rand_like(maml.lrs) + 0.5)
    params = list(model.parameters()) + ([maml.lrs] if meta_sgd else [])
    out = maml(*batch)
    return maml, out, flat(torch.autograd.grad(out.loss * 1.7, params)), params


def check(make, batch, steps=2, first_order=False, meta_sgd=False, loss="cross_entropy", lr=0.3,
          expect_exact=True, graph=True):
    """Both meta-gradient paths against the per-task reference; returns the exact-reverse BatchedMAML."""
    result = None
    for exact in (True, False):
        torch.manual_seed(0)
        model = make().to(DT)
        maml, out, g, params = meta_gradient(model, batch, steps, first_order, meta_sgd, exact, loss, lr)
        assert isinstance(maml._engine, GraphModel) == graph
        assert maml.exact_reverse == (exact and expect_exact), maml.describe()
        ref = reference(maml, batch, lr, steps, first_order, loss)
        assert abs(out.loss.item() - ref.item()) <= TOL * abs(ref.item())
        err = rel_err(g, flat(torch.autograd.grad(ref * 1.7, params)))
        assert err <= TOL, f"exact_reverse={exact}: meta-gradient rel. err vs per-task reference {err:.2e}"
        result = result or maml
    return result


class ResidualConcat(nn.Module):
    """Residual sum, channel concat, a scalar factor, a grouped strided conv, a 1x1 conv, functional
    relu and a view-flatten: the graph features beyond a chain."""

    def __init__(self, act=None, pool=None, ways=3):
        super().__init__()
        self.conv_a = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3, track_running_stats=False)
        self.conv_b = nn.Conv2d(2, 3, 1, bias=False)
        self.act = act if act is not None else nn.ReLU()
        self.conv_c = nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2)
        self.pool = pool if pool is not None else nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(4 * 4, ways)

    def forward(self, x):
        a = self.act(self.bn(self.conv_a(x)))
        b = self.conv_b(x)
        h = torch.cat([a + b, a * 0.5], dim=1)
        h = F.relu(self.conv_c(h))
        h = self.pool(h)
        return self.head(h.view(h.size(0), -1))


@pytest.mark.parametrize("meta_sgd", [False, True])
@pytest.mark.parametrize("first_order", [False, True])
def test_residual_concat_graph_matches_reference(first_order, meta_sgd):
    maml = check(ResidualConcat, image_batch(), steps=2, first_order=first_order, meta_sgd=meta_sgd)
    text = maml.describe()
    assert "Add(" in text and "Cat(" in text and "Scale(" in text and "per task" not in text


@pytest.mark.parametrize("steps", [1, 3])
def test_residual_concat_steps(steps):
    check(ResidualConcat, image_batch(), steps=steps)


ACTIVATIONS = {
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "leaky_relu_negative_slope": lambda: nn.LeakyReLU(-0.3),
    "elu": lambda: nn.ELU(0.7),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": lambda: nn.SiLU(),
    "tanh": lambda: nn.Tanh(),
    "sigmoid": lambda: nn.Sigmoid(),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_each_activation_in_a_graph(name):
    maml = check(lambda: ResidualConcat(act=ACTIVATIONS[name]()), image_batch(), steps=2)
    assert "per task" not in maml.describe()


@pytest.mark.parametrize("name", ["avg_pool", "avg_pool_no_pad_count", "adaptive_avg_pool_3", "max_pool"])
def test_each_pooling_in_a_graph(name):
    pools = {
        "avg_pool": (lambda: nn.AvgPool2d(2), 2),
        "avg_pool_no_pad_count": (lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), 3),
        "adaptive_avg_pool_3": (lambda: nn.AdaptiveAvgPool2d(3), 3),
        "max_pool": (lambda: nn.MaxPool2d(2, stride=1), 4),
    }
    make_pool, side = pools[name]

    class Net(ResidualConcat):
        def __init__(self):
            super().__init__(pool=make_pool())
            self.head = nn.Linear(4 * side * side, 3)

    check(Net, image_batch(), steps=2)


@pytest.mark.parametrize("name", ["leaky_relu", "elu", "gelu", "silu"])
def test_new_layers_in_a_chain_take_the_exact_reverse(name):
    # a plain nn.Sequential stays on the chain executor, now with these layers' R-operators
    def make():
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False),
                             ACTIVATIONS[name](), nn.AvgPool2d(2), nn.Conv2d(3, 3, 1), nn.AdaptiveAvgPool2d(2),
                             nn.Flatten(), nn.Linear(12, 3)).to(DT)

    check(make, image_batch(), steps=2, graph=False)


class ResidualMLP(nn.Module):
    """A residual MLP with BatchNorm1d and a difference of branches (MSE regression)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(1, 6)
        self.bn = nn.BatchNorm1d(6, track_running_stats=False)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h - F.silu(self.mid(self.bn(h)))
        return self.out(h)


def test_residual_mlp_with_batch_norm_1d_matches_reference():
    from test_batched_maml import regression_batch

    check(lambda: ResidualMLP().to(DT), regression_batch(), steps=2, loss="mse", lr=0.1)


class DataDependent(nn.Module):
    """A block torch.fx cannot trace (control flow on a tensor value)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        if x.sum() > -1e9:
            return torch.tanh(self.lin(x))
        return x


class WithOpaqueBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(1, 6)
        self.block = DataDependent()
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + self.block(h))


def test_untraceable_block_runs_per_task_with_a_named_warning(monkeypatch):
    from test_batched_maml import regression_batch

    monkeypatch.delenv("METAFAST_STRICT", raising=False)
    with pytest.warns(FallbackWarning, match=r"block.*torch.fx cannot trace it.*runs per task"):
        maml = check(lambda: WithOpaqueBlock().to(DT), regression_batch(), steps=2, loss="mse", lr=0.1,
                     expect_exact=False)
    assert "per task: torch.fx cannot trace it" in maml.describe()
    monkeypatch.setenv("METAFAST_STRICT", "1")
    with pytest.raises(FallbackError, match="block"):
        BatchedMAML(WithOpaqueBlock().to(DT), loss="mse")


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, x):
        return self.lin(x) if x.sum() > -1e9 else x


def test_untraceable_model_runs_per_task_and_says_so(monkeypatch):
    from test_batched_maml import regression_batch

    monkeypatch.delenv("METAFAST_STRICT", raising=False)
    with pytest.warns(FallbackWarning, match=r"Untraceable.*cannot trace Untraceable.forward.*whole model runs per task"):
        maml = check(lambda: Untraceable().to(DT), regression_batch(), steps=1, loss="mse", lr=0.1,
                     expect_exact=False)
    assert "per task" in maml.describe()


def test_unknown_function_runs_per_task(monkeypatch):
    class Net(ResidualConcat):
        def forward(self, x):
            return super().forward(torch.square(x))

    monkeypatch.delenv("METAFAST_STRICT", raising=False)  # the fallback is the subject here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        maml = check(lambda: Net(), image_batch(), steps=1, expect_exact=False)
    assert "no batched layer for call_function square" in maml.describe()


def test_shared_parameters_are_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(self.lin(x))

    with pytest.raises(ValueError, match="parameter lin.weight is used by lin and lin"):
        BatchedMAML(Twice(), loss="mse")


class NormMLP(nn.Module):
    """LayerNorm (affine, and without affine weights) in a residual MLP."""

    def __init__(self, affine=True):
        super().__init__()
        self.inp = nn.Linear(1, 6)
        self.ln = nn.LayerNorm(6)
        self.mid = nn.Linear(6, 6)
        self.ln2 = nn.LayerNorm(6, elementwise_affine=affine)
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        h = self.inp(x)
        h = h + F.gelu(self.mid(self.ln(h)))
        return self.out(self.ln2(h))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("meta_sgd", [False, True])
def test_layer_norm_matches_reference(affine, meta_sgd):
    from test_batched_maml import regression_batch

    maml = check(lambda: NormMLP(affine), regression_batch(), steps=2, meta_sgd=meta_sgd, loss="mse", lr=0.1)
    assert "LayerNorm" in maml.describe() and "per task" not in maml.describe()


def test_layer_norm_over_feature_maps_in_a_chain():
    def make():
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.LayerNorm([3, 9, 9]), nn.ReLU(), nn.Flatten(),
                             nn.Linear(243, 3))

    check(make, image_batch(), steps=2, graph=False)


class DropMLP(nn.Module):
    def __init__(self, drop):
        super().__init__()
        self.inp = nn.Linear(1, 8)
        self.drop = drop
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + self.drop(h))


class _MaskMul(nn.Module):
    """The reference's dropout: call c (task c // calls, call c % calls) applies that batched mask."""

    def __init__(self, masks):
        super().__init__()
        self.masks, self.calls = masks, 0

    def forward(self, x):
        k, t = self.calls % len(self.masks), self.calls // len(self.masks)
        self.calls += 1
        return x * self.masks[k][t]


class _FunctionalDrop(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, training=self.training)


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("exact,memory", [(True, "fast"), (False, "fast"), (True, "low"), (True, "min")])
@pytest.mark.parametrize("first_order", [False, True])
def test_dropout_masks_per_task_reproducible_from_the_seed(exact, memory, first_order, functional):
    """memory="low": the reverse rebuilds each step with the masks that step's forward drew. F.dropout with
    training=self.training is the same batched layer, following its module's mode."""
    import copy

    from maml_reference import per_task_maml
    from metafast.functional.graph.layers import Dropout

    steps, p = 2, 0.4
    batch = regression_batch()
    torch.manual_seed(0)
    model = DropMLP(_FunctionalDrop(p) if functional else nn.Dropout(p)).to(DT)
    ref_model = copy.deepcopy(model)
    maml = BatchedMAML(model, inner_lr=0.1, inner_steps=steps, first_order=first_order, loss="mse",
                       exact_reverse=exact, memory=memory)
    assert maml.exact_reverse == exact
    layer = next(x for x in maml._engine.layers if isinstance(x, Dropout))
    layer.reseed(1234)
    out = maml(*batch)
    g = flat(torch.autograd.grad(out.loss, list(model.parameters())))
    # the masks the layer drew: the seed's draws, in call order (steps on the support set, then the query)
    gen = torch.Generator().manual_seed(1234)
    shapes = [batch[0].shape[:2]] * steps + [batch[2].shape[:2]]
    masks = [(torch.rand(*s, 8, generator=gen, dtype=DT) >= p).to(DT) / (1 - p) for s in shapes]
    assert all(0 < (m == 0).double().mean() < 1 for m in masks)
    assert not torch.equal(masks[0][0], masks[0][1])  # each task its own mask
    ref_model.drop = _MaskMul(masks)
    ref = per_task_maml(ref_model, *batch, 0.1, steps, first_order)
    assert abs(out.loss.item() - ref.item()) <= TOL * abs(ref.item())
    assert rel_err(g, flat(torch.autograd.grad(ref, list(ref_model.parameters())))) <= TOL
    # the generator ends where the forward left it (the reverse's redraws are put back)
    assert torch.equal(layer.gen.get_state(), gen.get_state())
    # eval mode: the identity
    model.eval()
    sx, sy, qx, qy = batch
    pred = maml.predict(maml.adapt(sx, sy, steps=0), qx)
    assert rel_err(pred[1], model(qx[1])) <= TOL


def test_module_without_r_operators_runs_batched_on_local_autograd(monkeypatch):
    class Net(ResidualConcat):
        def __init__(self):
            super().__init__(act=nn.Softplus())

    monkeypatch.delenv("METAFAST_STRICT", raising=False)  # the fallback is the subject here
    with pytest.warns(FallbackWarning, match="no batched layer for Softplus.*local autograd"):
        maml = check(Net, image_batch(), steps=1, expect_exact=False)
    assert "[local autograd: no batched layer for Softplus]" in maml.describe()


FUNCTIONAL_POOLS = {  # forward tails after conv_c (a [N, 4, 5, 5] map)
    "max_pool2d": lambda h: F.max_pool2d(h, 2, stride=1),
    "max_pool2d_padded": lambda h: F.max_pool2d(h, kernel_size=3, padding=1, ceil_mode=True),
    "avg_pool2d": lambda h: F.avg_pool2d(h, 3, 2, 1, count_include_pad=False),
    "adaptive_avg_pool2d": lambda h: F.adaptive_avg_pool2d(h, 3),
    "mean_keepdim": lambda h: h.mean((2, 3), keepdim=True),
    "torch_mean": lambda h: torch.mean(h, dim=[3, 2]),
}


@pytest.mark.parametrize("name", list(FUNCTIONAL_POOLS))
def test_functional_pooling_takes_the_exact_reverse(name):
    # F.avg_pool2d(out, 4) and out.mean((2, 3)) are how many residual networks end (learn2learn's WRN28)
    tail = FUNCTIONAL_POOLS[name]

    class Net(ResidualConcat):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(tail(torch.zeros(1, 4, 5, 5)).numel(), 3)

        def forward(self, x):
            h = F.relu(self.conv_c(torch.cat([self.conv_b(x), self.act(self.bn(self.conv_a(x)))], dim=1)))
            h = tail(h)
            return self.head(h.view(h.size(0), -1))

    maml = check(Net, image_batch(), steps=2)
    assert "per task" not in maml.describe()


def test_a_mean_over_other_dims_runs_per_task(monkeypatch):
    class Net(ResidualConcat):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4 * 5, 3)

        def forward(self, x):
            h = F.relu(self.conv_c(torch.cat([self.conv_b(x), self.act(self.bn(self.conv_a(x)))], dim=1)))
            return self.head(h.mean(-1).flatten(1))  # not a spatial mean: no batched layer claims it

    monkeypatch.delenv("METAFAST_STRICT", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        maml = check(Net, image_batch(), steps=1, expect_exact=False)
    assert "no batched layer for call_method mean" in maml.describe()


def test_exact_modules_all_have_r_operators():
    from metafast.functional.executor import EXACT_MODULES, make_layer

    examples = {nn.Linear: (2, 3), nn.Conv2d: (2, 3, 1), nn.BatchNorm1d: (3,), nn.BatchNorm2d: (3,),
                nn.LayerNorm: (3,), nn.MaxPool2d: (2,), nn.AvgPool2d: (2,), nn.AdaptiveAvgPool2d: (1,),
                nn.Dropout: (0.5,)}
    for cls in EXACT_MODULES:
        m = cls(*examples.get(cls, ()))
        layer = make_layer(m, [])
        assert hasattr(layer, "rforward") and hasattr(layer, "rbackward"), cls.__name__


def test_functional_dropout_without_the_mode_flag_drops_in_eval_too():
    # F.dropout(x, p) defaults to training=True: eager PyTorch drops in eval mode as well, and so does the graph
    from metafast.functional.graph.layers import Dropout

    class Net(DropMLP):
        def forward(self, x):
            h = torch.tanh(self.inp(x))
            return self.out(F.dropout(h, 0.5) + F.dropout(h, 0.5, training=False))

    model = Net(nn.Identity()).to(DT)
    maml = BatchedMAML(model, inner_lr=0.1, inner_steps=1, loss="mse")
    drops = [x for x in maml._engine.layers if isinstance(x, Dropout)]
    assert len(drops) == 1 and "per task" not in maml.describe()  # training=False: the identity, no layer
    model.eval()
    assert drops[0].module.training
    sx, sy, qx, qy = regression_batch()
    pred = maml.predict(maml.adapt(sx, sy, steps=0), qx)
    assert rel_err(pred[1], model.out(torch.tanh(model.inp(qx[1])))) > 1e-3  # it dropped


def test_torch_dropout_is_refused_by_the_tracer(monkeypatch):
    class Net(DropMLP):
        def forward(self, x):
            return self.out(torch.dropout(torch.tanh(self.inp(x)), 0.5, True))

    monkeypatch.delenv("METAFAST_STRICT", raising=False)
    with pytest.warns(FallbackWarning, match="torch.dropout"):
        maml = BatchedMAML(Net(nn.Identity()).to(DT), inner_lr=0.1, inner_steps=1, loss="mse")
    assert "per task" in maml.describe()


def test_functional_dropout_follows_the_module_that_calls_it():
    from metafast.functional.graph.layers import Dropout

    model = DropMLP(_FunctionalDrop(0.3)).to(DT)
    maml = BatchedMAML(model, inner_lr=0.1, inner_steps=1, loss="mse")
    (drop,) = [x for x in maml._engine.layers if isinstance(x, Dropout)]
    assert drop.module.training
    model.drop.eval()  # the calling module alone: its flag, not the root's, decides
    assert model.training and not drop.module.training
    model.drop.train()
    assert drop.module.training
