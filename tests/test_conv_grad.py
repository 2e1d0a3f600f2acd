"""conv_grad.input_grad: the channels_last transposed-convolution route for strided input gradients on
CPU equals convolution_backward (float64 reference), and is the route actually taken."""
import pytest
import torch
import torch.nn.functional as F

from metafast import BatchedMAML
from metafast.functional import conv_grad
from metafast.models import Conv4
from meta_paths import assert_path

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (the route's reason)")

# (N, Cin, H, W, Cout, kernel, stride, padding, dilation, groups)
CASES = [
    (3, 8, 14, 14, 6, 3, 2, 1, 1, 1),  # Conv4's shape, small
    (2, 4, 13, 15, 5, 3, 2, 1, 1, 1),  # odd, non-square map: the stride skips a row and a column
    (2, 6, 16, 16, 3, 4, 3, 1, 1, 1),  # stride 3, 4x4 kernel
    (2, 4, 17, 17, 4, 3, 2, 2, 2, 1),  # dilated
    (2, 8, 12, 12, 8, 3, (2, 1), 1, 1, 4),  # grouped, stride only along H
]


def _ref(gy, x, w, stride, padding, dilation, groups):
    return torch.ops.aten.convolution_backward(gy.double(), x.double(), w.double(), None, stride, padding, dilation,
                                               False, [0, 0], groups, [True, False, False])[0]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_input_grad_matches_convolution_backward(case, monkeypatch):
    n, cin, h, w_, cout, k, s, p, d, g = case
    stride, padding, dilation = [s, s] if isinstance(s, int) else list(s), [p, p], [d, d]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, w_, generator=gen)
    w = torch.randn(cout, cin // g, k, k, generator=gen)
    gy = torch.randn_like(F.conv2d(x, w, None, stride, padding, dilation, g))
    monkeypatch.setattr(conv_grad, "MIN_PIXELS", 1)
    calls = []
    real = F.conv_transpose2d
    monkeypatch.setattr(conv_grad.F, "conv_transpose2d", lambda *a: calls.append(1) or real(*a))
    gx = conv_grad.input_grad(gy, x, w, stride, padding, dilation, g)
    assert calls, "the channels_last route was not taken"
    assert gx.shape == x.shape and gx.is_contiguous() and gx.dtype == torch.float32
    ref = _ref(gy, x, w, stride, padding, dilation, g)
    assert ((gx.double() - ref).norm() / ref.norm()).item() < 1e-6


def test_small_maps_and_other_dtypes_keep_convolution_backward(monkeypatch):
    calls = []
    real = F.conv_transpose2d
    monkeypatch.setattr(conv_grad.F, "conv_transpose2d", lambda *a: calls.append(1) or real(*a))
    w = torch.randn(4, 4, 3, 3)
    for x in (torch.randn(2, 4, 6, 8), torch.randn(2, 4, 14, 14, dtype=torch.float64)):  # 48 pixels; float64
        gy = torch.randn_like(F.conv2d(x, w.to(x.dtype), None, 2, 1))
        gx = conv_grad.input_grad(gy, x, w.to(x.dtype), [2, 2], [1, 1], [1, 1], 1)
        ref = _ref(gy, x, w, [2, 2], [1, 1], [1, 1], 1)
        assert ((gx.double() - ref).norm() / ref.norm()).item() < 1e-6
    assert not calls
    x = torch.randn(2, 4, 7, 7)  # 49 pixels: Conv4's 7x7 layer takes the route
    assert conv_grad._channels_last_route(x, x.shape, [2, 2]) and not conv_grad._channels_last_route(x, x.shape, [1, 1])


@pytest.mark.parametrize("exact_reverse", [True, False], ids=["exact-reverse", "autograd"])
def test_conv4_meta_gradient_same_with_and_without_the_route(exact_reverse, monkeypatch):
    """Both second-order paths (the exact reverse, and autograd's double backward through the route's
    transposed convolution) give the same float32 meta-gradient with the route as without."""
    torch.manual_seed(0)
    model = Conv4.omniglot(5)
    maml = BatchedMAML(model, inner_lr=0.4, inner_steps=1, loss="cross_entropy", exact_reverse=exact_reverse,
                       fused=False)
    assert_path(maml, fused=False, exact_reverse=exact_reverse)
    sx, qx = torch.rand(4, 5, 1, 28, 28), torch.rand(4, 5, 1, 28, 28)
    sy = qy = torch.arange(5).repeat(4, 1)

    def grads():
        return torch.cat([g.flatten() for g in torch.autograd.grad(maml(sx, sy, qx, qy).loss, model.parameters())])

    calls = []
    real = F.conv_transpose2d
    monkeypatch.setattr(conv_grad.F, "conv_transpose2d", lambda *a: calls.append(1) or real(*a))
    on = grads()
    assert calls  # Conv4's 14x14 layer takes the route
    monkeypatch.setattr(conv_grad, "MIN_PIXELS", 10 ** 9)
    off = grads()
    assert ((on - off).norm() / off.norm()).item() < 1e-5


# -- per-task weights over "g" maps: the loop over tasks and the grouped call --------------------------
# (N, T, Cin, Cout, H, W, kernel, stride, padding, dilation, groups, bias)
TASK_CASES = [
    (3, 4, 5, 6, 4, 4, 3, 1, 1, 1, 1, False),  # ResNet-12's 4x4 stage, small
    (2, 3, 4, 6, 7, 5, 3, 2, 1, 1, 2, True),  # odd map, strided, grouped within each task, bias
    (2, 2, 3, 5, 6, 6, 1, 1, 0, 1, 1, True),  # 1x1 shortcut
    (2, 3, 4, 4, 9, 9, 3, 1, 2, 2, 1, False),  # dilated
]


def _per_task_ref(x, w, b, T, stride, padding, dilation, groups):
    """The per-task convolutions written out (float64 oracle), "g" maps in and out."""
    xs = x.view(x.shape[0], T, -1, *x.shape[2:])
    ys = [F.conv2d(xs[:, t], w[t], None if b is None else b[t], stride, padding, dilation, groups) for t in range(T)]
    return torch.stack(ys, 1).flatten(1, 2)


@pytest.mark.parametrize("loop", [True, False], ids=["loop", "grouped"])
@pytest.mark.parametrize("case", TASK_CASES, ids=[str(i) for i in range(len(TASK_CASES))])
def test_task_convolutions_match_per_task_reference(case, loop, monkeypatch):
    """task_conv, task_conv_backward (per-task and shared weights) and task_conv_weight_grad2 equal the
    float64 per-task autograd reference in both forms, and the form asked for runs."""
    n, T, cin, cout, h, w_, k, s, p, d, g, bias = case
    stride, padding, dilation = [s, s], [p, p], [d, d]
    gen = torch.Generator().manual_seed(1)
    dt = torch.float64
    x = torch.randn(n, T * cin, h, w_, generator=gen, dtype=dt, requires_grad=True)
    w = torch.randn(T, cout, cin // g, k, k, generator=gen, dtype=dt, requires_grad=True)
    b = torch.randn(T, cout, generator=gen, dtype=dt) if bias else None
    monkeypatch.setattr(conv_grad, "TASK_LOOP", loop)
    calls = []
    real = conv_grad.tasks_of
    monkeypatch.setattr(conv_grad, "tasks_of", lambda *a: calls.append(1) or real(*a))

    y = conv_grad.task_conv(x, w, b, T, stride, padding, dilation, g)
    ref = _per_task_ref(x, w, b, T, stride, padding, dilation, g)
    assert (y - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()
    gy = torch.randn(ref.shape, generator=gen, dtype=dt)
    rgx, rgw = torch.autograd.grad(ref, [x, w], gy)
    gx, gw = conv_grad.task_conv_backward(gy, x.detach(), w.detach(), T, stride, padding, dilation, g, True)
    assert gw.shape == w.shape and gx.shape == x.shape
    assert rel(gx, rgx) <= 1e-12 and rel(gw, rgw) <= 1e-12
    # weights shared by every task: per-task weight gradients, the input gradient over N*T images
    w0 = w.detach()[0].clone().requires_grad_(True)
    ref0 = _per_task_ref(x, w0.expand(T, *w0.shape), None, T, stride, padding, dilation, g)
    gx0_ref = torch.autograd.grad(ref0, x, gy)[0]
    gw0_ref = torch.stack([torch.autograd.grad(_per_task_ref(x, torch.stack([w0 if u == t else w0.detach()
                                                                            for u in range(T)]), None, T, stride,
                                                             padding, dilation, g), w0, gy)[0] for t in range(T)])
    gx0, gw0 = conv_grad.task_conv_backward(gy, x.detach(), w0.detach(), T, stride, padding, dilation, g, True)
    assert rel(gx0, gx0_ref) <= 1e-12 and rel(gw0, gw0_ref) <= 1e-12
    # the paired weight gradient (the R-operator's two terms in one call)
    x2 = torch.randn(x.shape, generator=gen, dtype=dt)
    gy2 = torch.randn(gy.shape, generator=gen, dtype=dt)
    gw2 = conv_grad.task_conv_weight_grad2(gy, x.detach(), gy2, x2, w.detach(), T, stride, padding, dilation, g)
    gw2_ref = rgw + torch.autograd.grad(_per_task_ref(x2, w, None, T, stride, padding, dilation, g), w, gy2)[0]
    assert rel(gw2, gw2_ref) <= 1e-12
    assert bool(calls) == loop


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_loop_rule_takes_small_maps_with_large_weights_only():
    """The loop runs where it was measured faster (CPU float32, <= 16 pixels, >= 2^18 weights per task:
    ResNet-12's 4x4 stage), and not for Conv4's small weights, 8x8 maps or float64."""
    T = 4
    big = torch.empty(T, 512, 512, 3, 3)
    assert conv_grad.per_task_loop(torch.empty(5, T * 512, 4, 4), big, T) == torch.backends.mkldnn.enabled
    assert conv_grad.per_task_loop(torch.empty(5, T * 512, 4, 4), big[0], T) == torch.backends.mkldnn.enabled
    assert not conv_grad.per_task_loop(torch.empty(5, T * 256, 8, 8), torch.empty(T, 256, 256, 3, 3), T)
    assert not conv_grad.per_task_loop(torch.empty(5, 32 * 64, 4, 4), torch.empty(32, 64, 64, 3, 3), 32)
    assert not conv_grad.per_task_loop(torch.empty(5, T * 512, 4, 4, dtype=torch.float64), big.double(), T)


@pytest.mark.parametrize("loop", [True, False], ids=["loop", "grouped"])
def test_resnet12_meta_gradient_in_both_forms(loop, monkeypatch):
    """Tiny ResNet-12, second order, exact reverse and autograd: the float64 per-task reference at 1e-10
    with every per-task convolution looping over the tasks, and with every one grouped."""
    from test_resnet12 import check, tiny
    from test_batched_maml import image_batch

    monkeypatch.setattr(conv_grad, "TASK_LOOP", loop)
    calls = []
    real = conv_grad.tasks_of
    monkeypatch.setattr(conv_grad, "tasks_of", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    batch = image_batch(T=3, S=4, Q=3, C=2, H=16)
    for exact_reverse in (True, False):
        check(tiny(), batch, 1, False, False, exact_reverse=exact_reverse)
    assert bool(calls) == loop
