"""Fuzz: seeded random bad (and good) input to BatchedMAML and the ops. Shapes (empty dims included),
dtypes, devices (cpu, and 'meta'), label ranges, NaN and inf, non-contiguous and expanded inputs.

Every case ends in one of two ways: a result equal to the float64 reference (per-task autograd MAML for
BatchedMAML, the op file's reference for the ops, NaN where the reference has NaN), or a clear error:
ValueError / TypeError / FloatingPointError whose message names one of the arguments. Anything else
(another exception type, an error naming no argument, a wrong value, a case running past its time
limit) fails, and the message carries the case so it can be replayed.
"""
import random
import signal

import pytest
import torch
from torch import nn

from maml_reference import per_task_maml
from metafast import BatchedMAML
from metafast.ops.inner_update import inner_update, inner_update_reference
from metafast.ops.kd_loss import kd_loss, kd_loss_reference
from metafast.ops.multitask_heads import multitask_heads_cross_entropy, multitask_heads_cross_entropy_reference
from metafast.ops.task_cross_entropy import task_cross_entropy, task_cross_entropy_reference

CASES = 100  # per target; 5 targets -> 500 cases
CASE_SECONDS = 20  # a hang fails the case instead of CI
CLEAR = (ValueError, TypeError, FloatingPointError)
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 1e-6), torch.float16: (2e-2, 2e-3),
       torch.bfloat16: (5e-2, 2e-2)}


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout(f"the case ran past {CASE_SECONDS} s")


@pytest.fixture(autouse=True)
def _time_limit():
    previous = signal.signal(signal.SIGALRM, _alarm)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- mutations
def _float(rng, shape, dtype, special):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(rng.randrange(2 ** 31)), dtype=torch.float64)
    if special and x.numel():
        flat = x.view(-1)
        flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
    return x.to(dtype)


def _layout(rng, t):
    """The same values as ``t`` in another memory layout: contiguous, non-contiguous or expanded."""
    kind = rng.choice(["contiguous", "contiguous", "strided", "transposed", "expanded"])
    if t.dim() == 0 or t.numel() == 0 or kind == "contiguous":
        return t, kind
    if kind == "strided":  # every other element of a twice-as-long last dim
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2], kind
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2), kind
    if t.shape[0] >= 1:  # expanded: one row repeated with stride 0 (the values change: every row equals row 0)
        return t[:1].expand(t.shape), kind
    return t, "contiguous"


def _labels(rng, shape, classes):
    kind = rng.choice(["ok", "ok", "ok", "ignored", "negative", "too_large", "float", "int32"])
    y = torch.randint(0, max(classes, 1), shape, generator=torch.Generator().manual_seed(rng.randrange(2 ** 31)))
    if y.numel():
        flat = y.view(-1)
        i = rng.randrange(flat.numel())
        if kind == "ignored":
            flat[i] = -100
        elif kind == "negative":
            flat[i] = -1
        elif kind == "too_large":
            flat[i] = classes + rng.choice([0, 5, 2 ** 40])
    if kind == "float":
        y = y.double()
    elif kind == "int32":
        y = y.int()
    return y, kind


def _check(run, reference, names, case, dtype):
    """run() -> result, or a clear error naming one of ``names``; a result equals reference()."""
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        got = run()
    except CLEAR as e:
        msg = str(e)
        assert any(n in msg for n in names), f"{case}: {type(e).__name__} names none of {names}: {msg}"
        return "error"
    except CaseTimeout as e:
        raise AssertionError(f"{case}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any other failure is the defect this test looks for
        raise AssertionError(f"{case}: unclear {type(e).__name__}: {e}") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if got.device.type == "meta":  # shape from the reference; dtype as the op gives it for CPU tensors
        want, on_cpu = reference(meta=True), run("cpu")
        assert got.shape == want.shape and got.dtype == on_cpu.dtype, \
            f"{case}: meta result {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} {on_cpu.dtype}"
        return "meta"
    try:
        want = reference(meta=False)
    except CLEAR as e:
        raise AssertionError(f"{case}: accepted input the reference rejects ({type(e).__name__}: {e})") from None
    assert got.shape == want.shape, f"{case}: shape {tuple(got.shape)}, reference {tuple(want.shape)}"
    rtol, atol = TOL.get(dtype, TOL[torch.float32])  # the inputs' precision
    a, e = got.detach().double(), want.detach().to(got.dtype).double()  # the reference in the output's dtype
    same_nan = torch.equal(torch.isnan(a), torch.isnan(e))
    fin = torch.isfinite(e)
    close = torch.equal(a[~fin & ~torch.isnan(e)], e[~fin & ~torch.isnan(e)]) and \
        bool(((a[fin] - e[fin]).abs() <= atol + rtol * e[fin].abs()).all())
    assert same_nan and close, f"{case}: wrong answer\n got {a.flatten()[:6].tolist()}\nwant {e.flatten()[:6].tolist()}"
    return "value"


def _device(rng):
    return "meta" if rng.random() < 0.1 else "cpu"


# ----------------------------------------------------------------------------- the ops
def _task_ce_case(rng):
    T, N, C = rng.choice([0, 1, 3, 3]), rng.choice([0, 1, 4, 7]), rng.choice([1, 2, 5, 33])
    dtype = rng.choice([torch.float64, torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64])
    logits = _float(rng, (T, N, C), torch.float64, rng.random() < 0.2).to(dtype) if dtype != torch.int64 \
        else torch.ones(T, N, C, dtype=torch.int64)
    if rng.random() < 0.05:  # a wrong rank
        logits = logits.reshape(-1, C)
    logits, layout = _layout(rng, logits)
    labels, lk = _labels(rng, (T, N) if rng.random() > 0.05 else (T, N + 1), C)
    smoothing = rng.choice([0.0, 0.1] * 4 + [-0.5, 1.5, float("nan")])
    reduction = rng.choice(["mean", "sum", "none"] * 3 + ["avg"])
    device = _device(rng)
    case = dict(op="task_cross_entropy", shape=tuple(logits.shape), dtype=dtype, layout=layout, labels=lk,
                label_shape=tuple(labels.shape), smoothing=smoothing, reduction=reduction, device=device)

    def run(device=device):
        return task_cross_entropy(logits.to(device), labels.to(device), smoothing, reduction=reduction)

    def reference(meta):
        x = logits.double() if logits.is_floating_point() else logits
        out = task_cross_entropy_reference(x.to("meta") if meta else x, labels.to("meta") if meta else labels,
                                           smoothing, reduction=reduction)
        return out.to(logits.dtype) if logits.is_floating_point() else out

    return run, reference, ("logits", "labels", "label_smoothing", "reduction"), case


def _kd_case(rng):
    shape = rng.choice([(3, 4, 5), (2, 0, 3), (4, 7), (0, 3), (2, 3, 1), (5,)])
    dtype = rng.choice([torch.float64, torch.float32, torch.bfloat16])
    s = _float(rng, shape, dtype, rng.random() < 0.2)
    t_shape = shape if rng.random() > 0.1 else tuple(shape[:-1]) + (shape[-1] + 1,)
    t = _float(rng, t_shape, rng.choice([dtype, dtype, torch.float64]), rng.random() < 0.1)
    s, layout = _layout(rng, s)
    target, lk = (None, "none") if rng.random() < 0.3 else _labels(rng, shape[:-1], shape[-1])
    temperature = rng.choice([4.0, 1.0] * 4 + [0.0, -1.0, float("inf")])
    alpha = rng.choice([0.9, 0.0, 1.0] * 3 + [1.5, float("nan")])
    reduction = rng.choice(["mean", "sum", "none"] * 3 + ["batchmean"])
    device = _device(rng)
    case = dict(op="kd_loss", shape=shape, t_shape=t_shape, dtype=dtype, layout=layout, target=lk, T=temperature,
                alpha=alpha, reduction=reduction, device=device)

    def run(device=device):
        return kd_loss(s.to(device), t.to(device), None if target is None else target.to(device), temperature, alpha,
                       reduction)

    def reference(meta):
        dev = "meta" if meta else "cpu"
        out = kd_loss_reference(s.double().to(dev), t.double().to(dev), None if target is None else target.to(dev),
                                temperature, alpha, reduction)
        return out.to(s.dtype)

    return run, reference, ("student_logits", "teacher_logits", "target", "temperature", "alpha", "reduction"), case


def _inner_update_case(rng):
    T, P = rng.choice([0, 1, 3]), rng.choice([0, 1, 5, 130])
    dtype = rng.choice([torch.float64, torch.float32, torch.bfloat16])
    theta = _float(rng, (P,) if rng.random() < 0.5 else (T, P), dtype, rng.random() < 0.1)
    grad = _float(rng, (T, P) if rng.random() > 0.1 else (T, P + 1), rng.choice([dtype, dtype, torch.float64]),
                  rng.random() < 0.15)
    grad, layout = _layout(rng, grad)
    lr = rng.choice([0.1, 0.0, "tensor", "per_element"] * 3 + [-0.1, float("nan"), "wrong_length"])
    if lr == "tensor":
        lr = torch.tensor(0.3, dtype=dtype)
    elif lr == "per_element":
        lr = torch.rand(P, dtype=dtype, generator=torch.Generator().manual_seed(rng.randrange(2 ** 31)))
    elif lr == "wrong_length":
        lr = torch.rand(P + 2, dtype=dtype)
    max_norm = rng.choice([None, None, 0.5] * 3 + [0.0, -1.0])
    device = _device(rng)
    case = dict(op="inner_update", theta=tuple(theta.shape), grad=tuple(grad.shape), dtype=dtype, layout=layout,
                lr=lr if not torch.is_tensor(lr) else f"tensor{tuple(lr.shape)}", max_norm=max_norm, device=device)

    def run(device=device):
        return inner_update(theta.to(device), grad.to(device), lr.to(device) if torch.is_tensor(lr) else lr, max_norm)

    def reference(meta):
        dev = "meta" if meta else "cpu"
        lr_ = lr.double().to(dev) if torch.is_tensor(lr) else lr
        return inner_update_reference(theta.double().to(dev), grad.double().to(dev), lr_, max_norm).to(theta.dtype)

    return run, reference, ("theta", "grad", "lr", "max_norm"), case


def _heads_case(rng):
    H, N, I, O = rng.choice([1, 3]), rng.choice([0, 1, 6]), rng.choice([1, 4]), rng.choice([1, 2, 5])
    dtype = rng.choice([torch.float64, torch.float32])
    shared = rng.random() < 0.3
    x = _float(rng, (N, I) if shared else (H, N, I), dtype, rng.random() < 0.1)
    w = _float(rng, (H, O, I) if rng.random() > 0.1 else (H, O, I + 1), dtype, rng.random() < 0.1)
    b = None if rng.random() < 0.3 else _float(rng, (H, O), rng.choice([dtype, dtype, torch.float16]), False)
    x, layout = _layout(rng, x)
    y, lk = _labels(rng, (H, N), O)
    reduction = rng.choice(["mean", "sum", "none"] * 3 + ["max"])
    device = _device(rng)
    case = dict(op="multitask_heads_cross_entropy", x=tuple(x.shape), w=tuple(w.shape), bias=b is not None,
                dtype=dtype, layout=layout, labels=lk, reduction=reduction, device=device)

    def run(device=device):
        return multitask_heads_cross_entropy(x.to(device), w.to(device), None if b is None else b.to(device),
                                             y.to(device), reduction)

    def reference(meta):
        dev = "meta" if meta else "cpu"
        out = multitask_heads_cross_entropy_reference(x.double().to(dev), w.double().to(dev),
                                                      None if b is None else b.double().to(dev), y.to(dev), reduction)
        return out.to(dtype)

    return run, reference, ("features", "weight", "bias", "labels", "reduction"), case


OPS = {"task_cross_entropy": _task_ce_case, "kd_loss": _kd_case, "inner_update": _inner_update_case,
       "multitask_heads_cross_entropy": _heads_case}


@pytest.mark.parametrize("op", list(OPS))
def test_ops_on_fuzzed_input(op):
    rng = random.Random(f"fuzz-{op}")
    seen = {}
    for i in range(CASES):
        run, reference, names, case = OPS[op](rng)
        outcome = _check(run, reference, names, dict(case, index=i), case["dtype"])
        seen[outcome] = seen.get(outcome, 0) + 1
    assert seen.get("value", 0) >= CASES // 10 and seen.get("error", 0) >= CASES // 10, seen  # both kinds covered


# ----------------------------------------------------------------------------- BatchedMAML
def _maml_case(rng):
    loss = rng.choice(["mse", "cross_entropy"])
    T, S, Q, D, O = rng.choice([0] + [1, 3] * 4), rng.choice([0] + [1, 4] * 4), rng.choice([0] + [1, 5] * 4), \
        rng.choice([1, 3]), rng.choice([1, 3])
    dtype = torch.float64
    torch.manual_seed(rng.randrange(2 ** 31))
    model = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, O)).to(dtype)
    fields = {}
    special = rng.random() < 0.15
    for name, n in (("support_x", S), ("query_x", Q)):
        shape = (T, n, D) if rng.random() > 0.08 else rng.choice([(T, n), (T, n, D + 1), (n, D)])
        fields[name] = _float(rng, shape, rng.choice([dtype] * 12 + [torch.float32]), special and name == "support_x")
    for name, n in (("support_y", S), ("query_y", Q)):
        if loss == "mse":
            shape = (T, n, O) if rng.random() > 0.08 else rng.choice([(T, n), (T, n + 1, O)])
            fields[name] = _float(rng, shape, dtype, special and name == "query_y" and rng.random() < 0.5)
        else:
            fields[name], _ = _labels(rng, (T, n) if rng.random() > 0.08 else (T, n + 1), O)
    layouts = {}
    for name in fields:
        fields[name], layouts[name] = _layout(rng, fields[name])
    steps = rng.choice([0, 1, 2])
    first_order = rng.random() < 0.3
    device = "meta" if rng.random() < 0.05 else "cpu"
    case = dict(loss=loss, T=T, S=S, Q=Q, shapes={k: tuple(v.shape) for k, v in fields.items()},
                dtypes={k: v.dtype for k, v in fields.items()}, layouts=layouts, steps=steps, first_order=first_order,
                special=special, device=device)
    maml = BatchedMAML(model, inner_lr=0.1, inner_steps=steps, first_order=first_order, loss=loss, fused=False)
    batch = [fields[k] for k in ("support_x", "support_y", "query_x", "query_y")]

    def run(device=device):
        return maml(*[t.to(device) for t in batch]).task_losses

    def reference(meta):
        per_task = [per_task_maml(model, *(t[i:i + 1] for t in batch), 0.1, steps, first_order, loss)
                    for i in range(batch[0].shape[0])]
        return torch.stack(per_task).detach()

    return run, reference, ("support_x", "support_y", "query_x", "query_y", "support loss", "query loss"), case


def test_batched_maml_on_fuzzed_input():
    rng = random.Random("fuzz-batched-maml")
    seen = {}
    for i in range(CASES):
        run, reference, names, case = _maml_case(rng)
        outcome = _check(run, reference, names, dict(case, index=i), torch.float64)
        seen[outcome] = seen.get(outcome, 0) + 1
    assert seen.get("value", 0) >= CASES // 10 and seen.get("error", 0) >= CASES // 10, seen
