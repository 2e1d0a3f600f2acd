"""ANIL (anil=True) on the exact reverse: the body is meta-learned through its features' gradients, the head
adapted by MetaStep. Meta-gradients (body, head init, Meta-SGD rates; LSLR and the multi-step loss in test_mamlpp.py) equal the float64 per-task
autograd reference (rel. err <= 1e-10) and the autograd path, first and second order, 1 and 3 steps, both
memory modes and task chunks, on chains (MLP, Conv4 with BatchNorm) and module graphs (ResNet-12)."""
import pytest
import torch
from torch import nn

from meta_paths import path_taken
from metafast import BatchedMAML
from metafast.models import ResNet12
from metafast.models.resnet12 import NARROW
from test_batched_maml import DT, TOL, flat, image_batch, make, reference, rel_err
from test_batched_maml_exact_reverse import meta_gradient as exact_reverse_meta_gradient


class ResidualHead(nn.Module):
    """A graph whose last node after the head reads the body's features again: out = head(h) + h."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3, track_running_stats=False),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(75, 3))
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h) + h


class TwoInputHead(nn.Module):
    """The nodes from the head on read two values of the body: out = head(b) + a."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        a = self.a(x)
        return self.head(torch.tanh(self.b(a))) + a


def build(kind):
    if kind == "resnet12":
        return ResNet12(3, in_channels=2, widths=(3, 4, 5, 6), image_size=16).to(DT), image_batch(H=16), "cross_entropy"
    if kind == "resnet12_narrow":
        model = ResNet12(3, in_channels=3, widths=NARROW, image_size=16).to(DT)
        return model, image_batch(T=2, S=3, Q=2, C=3, H=16), "cross_entropy"
    if kind == "residual_head":
        return ResidualHead().to(DT), image_batch(), "cross_entropy"
    return make(kind)


def meta_gradient(kind, steps, first_order, meta_sgd, exact_reverse=True, **kw):
    """(maml, (batch, lr, loss), output, meta-gradient x 1.7, parameters) of an ANIL step on the path asked for."""
    result = exact_reverse_meta_gradient(kind, exact_reverse, steps, first_order, meta_sgd, anil=True, make_model=build,
                                         **kw)
    assert path_taken(result[0]) == ("exact_reverse" if exact_reverse else "autograd")
    return result


def check(kind, steps, first_order, meta_sgd, against_autograd=True, **kw):
    maml, (batch, lr, loss), out, g, params = meta_gradient(kind, steps, first_order, meta_sgd, **kw)
    ref = reference(maml, batch, lr, steps, first_order, loss)
    assert abs(out.loss.item() - ref.item()) <= TOL * abs(ref.item())
    ref_g = flat(torch.autograd.grad(ref * 1.7, params))
    err = rel_err(g, ref_g)
    assert err <= TOL, f"meta-gradient rel. err vs per-task reference {err:.2e}"
    body = maml._engine.adapt_offset  # the body's meta-gradient alone, so a small one cannot hide in the total
    err = rel_err(g[:body], ref_g[:body])
    assert err <= TOL and g[:body].abs().sum() > 0, f"body meta-gradient rel. err {err:.2e}"
    if against_autograd:
        g_autograd = meta_gradient(kind, steps, first_order, meta_sgd, exact_reverse=False)[3]
        err = rel_err(g, g_autograd)
        assert err <= TOL, f"meta-gradient rel. err vs the autograd path {err:.2e}"
    return maml, g


@pytest.mark.parametrize("kind", ["mlp", "mlp_bn", "conv4_bn", "conv4_pool", "resnet12", "residual_head"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("meta_sgd", [False, True])
def test_anil_exact_reverse_matches_reference_and_autograd_path(kind, steps, first_order, meta_sgd):
    check(kind, steps, first_order, meta_sgd)


@pytest.mark.parametrize("kind", ["conv4_bn", "resnet12"])
@pytest.mark.parametrize("memory,task_chunk", [("low", None), ("low", 2), ("fast", 2), ("min", 2)])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_memory_modes_match_reference(kind, memory, task_chunk, steps, first_order):
    check(kind, steps, first_order, False, against_autograd=False, memory=memory, task_chunk=task_chunk)


@pytest.mark.parametrize("steps,first_order,memory", [(1, False, "fast"), (3, False, "low"), (3, True, "fast")])
def test_anil_full_width_resnet12_narrow_matches_reference(steps, first_order, memory):
    check("resnet12_narrow", steps, first_order, False, against_autograd=False, memory=memory)


def test_first_order_body_gradient_is_the_query_path_alone():
    # second order adds the support features' cross terms to the body's meta-gradient, first order has none
    g2 = meta_gradient("conv4_bn", 2, False, False)[3]
    maml, _, _, g1, _ = meta_gradient("conv4_bn", 2, True, False)
    body = maml._engine.adapt_offset
    assert rel_err(g1[:body], g2[:body]) > 1e-3


def test_what_the_exact_reverse_leaves_to_autograd_says_why():
    # a head reading two values of the body: the autograd path, with the reason, and the same gradients
    torch.manual_seed(0)
    model = TwoInputHead().to(DT)
    g = torch.Generator().manual_seed(3)
    batch = [torch.randn(2, n, 4, generator=g, dtype=DT) for n in (5, 5)]
    batch = [batch[0], torch.randint(0, 3, (2, 5), generator=g), batch[1], torch.randint(0, 3, (2, 5), generator=g)]
    maml = BatchedMAML(model, inner_lr=0.3, inner_steps=2, anil=True, loss="cross_entropy")
    assert not maml.exact_reverse
    assert "anil=True and the adapted nodes read 2 values of the body" in maml.describe()
    out = maml(*batch)
    assert path_taken(maml) == "autograd"
    params = list(model.parameters())
    ref = reference(maml, batch, 0.3, 2, False, "cross_entropy")
    assert rel_err(flat(torch.autograd.grad(out.loss, params)), flat(torch.autograd.grad(ref, params))) <= TOL
    # bf16/fp16 ANIL: the autograd path
    bf16 = BatchedMAML(make("conv4_bn")[0].float(), inner_lr=0.3, anil=True, loss="cross_entropy", precision="bf16")
    assert not bf16.exact_reverse
    assert "anil=True with precision='bf16'" in bf16.describe()


def test_low_mode_recomputes_the_body_per_chunk(monkeypatch):
    from metafast.functional import head

    calls = []
    real = head.body_features
    monkeypatch.setattr(head, "body_features", lambda *a: calls.append(1) or real(*a))
    maml, *_ = meta_gradient("conv4_bn", 2, False, False, memory="low", task_chunk=2)  # 3 tasks: 2 chunks
    assert len(calls) == 8  # support and query body per chunk, forward and its recomputation in the backward


def test_low_mode_body_dropout_draws_the_forward_masks_again():
    # the checkpointed body is recomputed with its Dropout generators rewound: the same masks, the same gradient
    def grads(**kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 6), nn.Tanh(),
                              nn.Linear(6, 1)).to(DT)
        maml = BatchedMAML(model, inner_lr=0.1, inner_steps=2, anil=True, fused=False, **kw)
        for layer in maml._engine.layers:
            if hasattr(layer, "reseed"):
                layer.reseed(7)
        g = flat(torch.autograd.grad(maml(*make("mlp")[1]).loss, list(model.parameters())))
        return g, path_taken(maml)

    low, path = grads(memory="low")
    assert path == "exact_reverse"
    auto, path = grads(exact_reverse=False)
    assert path == "autograd"
    assert rel_err(low, auto) <= TOL
    low_chunked, fast_chunked = grads(memory="low", task_chunk=2)[0], grads(task_chunk=2)[0]
    assert rel_err(low_chunked, fast_chunked) <= TOL
    assert rel_err(low_chunked, low) > 1e-6  # chunks draw other masks: the comparisons above could fail


def test_describe_names_the_head_reverse_and_the_checkpointed_body():
    maml = BatchedMAML(make("conv4_bn")[0], inner_lr=0.3, anil=True, loss="cross_entropy", memory="low")
    text = maml.describe()
    assert "> exact_reverse: yes, exact reverse of the head (anil=True" in text
    assert "anil: the body checkpointed too" in maml.memory_plan(4)
