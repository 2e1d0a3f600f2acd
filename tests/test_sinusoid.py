"""Sinusoid task family: shapes, ranges, statistics, determinism, argument checks; held-out evaluation."""
import math

import pytest
import torch

from metafast.data import SinusoidBatch, SinusoidTasks
from metafast.data import sinusoid as sinusoid_data
from metafast.jobs import sinusoid as job

TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=0, atol=0)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_close(actual, expected, **tol):
    if not torch.allclose(actual, expected, **tol):
        diff = (actual.double() - expected.double()).abs()
        idx = torch.nonzero(diff > tol.get("atol", 0) + tol.get("rtol", 0) * expected.double().abs())[:5]
        rows = [f"{tuple(i.tolist())}: {actual[tuple(i)].item()!r} vs {expected[tuple(i)].item()!r}" for i in idx]
        raise AssertionError("first mismatches:\n" + "\n".join(rows))


@pytest.mark.parametrize("tasks,shots,queries", [(1, 1, 0), (3, 7, 13), (25, 10, 10), (6, 5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_values(tasks, shots, queries, dtype):
    b = sinusoid_data.sample(tasks, shots, queries, _gen(1), dtype=dtype)
    assert isinstance(b, SinusoidBatch)
    assert b.support_x.shape == b.support_y.shape == (tasks, shots, 1)
    assert b.query_x.shape == b.query_y.shape == (tasks, queries, 1)
    assert b.amplitudes.shape == b.phases.shape == (tasks,)
    for t in b:
        assert t.dtype == dtype and t.is_contiguous()
    # y = A sin(x - phase), checked against a float64 reference computed from the returned x/A/phase
    for x, y in ((b.support_x, b.support_y), (b.query_x, b.query_y)):
        ref = b.amplitudes.double()[:, None, None] * torch.sin(x.double() - b.phases.double()[:, None, None])
        _assert_close(y.double(), ref, **TOL[dtype])
    # support and query of one task are distinct draws that do not share memory
    if queries:
        assert b.support_x.data_ptr() != b.query_x.data_ptr()


def test_ranges_and_statistics():
    t, k, q = 4000, 3, 2
    b = sinusoid_data.sample(t, k, q, _gen(123), dtype=torch.float64)
    a, p = b.amplitudes, b.phases
    x = torch.cat([b.support_x, b.query_x], dim=1).flatten()
    assert 0.1 <= a.min() and a.max() <= 5.0
    assert 0.0 <= p.min() and p.max() <= math.pi
    assert -5.0 <= x.min() and x.max() <= 5.0
    # the ranges are covered nearly to both ends
    assert a.min() < 0.2 and a.max() > 4.9 and p.min() < 0.05 and p.max() > math.pi - 0.05
    assert x.min() < -4.98 and x.max() > 4.98
    # uniform moments: mean (lo+hi)/2, variance (hi-lo)^2/12, within 5 standard errors
    for name, v, lo, hi in (("amplitude", a, 0.1, 5.0), ("phase", p, 0.0, math.pi), ("x", x, -5.0, 5.0)):
        n = v.numel()
        mean, var = (lo + hi) / 2, (hi - lo) ** 2 / 12
        assert abs(v.mean().item() - mean) < 5 * math.sqrt(var / n), name
        # Var of the sample variance of a uniform: (mu4 - var^2) / n with mu4 = (hi-lo)^4 / 80
        se_var = math.sqrt(((hi - lo) ** 4 / 80 - var ** 2) / n)
        assert abs(v.var().item() - var) < 5 * se_var, name
    # amplitude and phase are drawn independently
    assert abs(torch.corrcoef(torch.stack([a, p]))[0, 1].item()) < 5 / math.sqrt(t)


def test_determinism():
    b1 = sinusoid_data.sample(5, 4, 3, _gen(7))
    b2 = sinusoid_data.sample(5, 4, 3, _gen(7))
    for u, v in zip(b1, b2):
        assert torch.equal(u, v)
    b3 = sinusoid_data.sample(5, 4, 3, _gen(8))
    assert not torch.equal(b1.amplitudes, b3.amplitudes)
    # successive draws from one generator differ, and the generator alone decides the tasks
    g = _gen(7)
    first, second = sinusoid_data.sample(5, 4, 3, g), sinusoid_data.sample(5, 4, 3, g)
    assert torch.equal(first.support_x, b1.support_x) and not torch.equal(second.support_x, first.support_x)
    torch.manual_seed(999)  # the global RNG plays no part when a generator is given
    assert torch.equal(sinusoid_data.sample(5, 4, 3, _gen(7)).query_y, b1.query_y)
    # the dtype only rounds: float32 tasks are the float64 tasks rounded
    b64 = sinusoid_data.sample(5, 4, 3, _gen(7), dtype=torch.float64)
    for u, v in zip(b1, b64):
        assert torch.equal(u, v.float())


def test_custom_ranges_and_to():
    tasks = SinusoidTasks(amplitude_range=(1.0, 2.0), phase_range=(0.5, 0.6), input_range=(0.0, 1.0))
    b = tasks.sample(200, 3, 3, _gen(0))
    assert 1.0 <= b.amplitudes.min() and b.amplitudes.max() <= 2.0
    assert 0.5 <= b.phases.min() and b.phases.max() <= 0.6
    assert 0.0 <= b.support_x.min() and b.support_x.max() <= 1.0
    b64 = b.to(dtype=torch.float64)
    assert isinstance(b64, SinusoidBatch) and b64.support_y.dtype == torch.float64


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((0, 5, 5), {}, ValueError, "num_tasks must be >= 1"),
    ((4, 0, 5), {}, ValueError, "shots must be >= 1"),
    ((4, 5, -1), {}, ValueError, "queries must be >= 0"),
    ((4, 2.5, 5), {}, TypeError, "shots must be an int"),
    ((True, 5, 5), {}, TypeError, "num_tasks must be an int"),
    ((4, 5, 5), {"generator": 3}, TypeError, "generator must be a torch.Generator"),
    ((4, 5, 5), {"dtype": torch.int64}, TypeError, "dtype must be a floating-point"),
])
def test_bad_sample_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sinusoid_data.sample(*args, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"amplitude_range": (5.0, 0.1)}, "amplitude_range must be finite with low < high"),
    ({"phase_range": (0.0, float("inf"))}, "phase_range must be finite"),
    ({"input_range": 3.0}, "input_range must be a pair"),
])
def test_bad_ranges(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SinusoidTasks(**kwargs)


@pytest.mark.gpu
def test_cuda_generator_rejected():
    with pytest.raises(ValueError, match="generator must be a CPU"):
        sinusoid_data.sample(2, 2, 2, torch.Generator(device="cuda"))


# ----------------------------------------------------------------------------- held-out evaluation
def test_eval_tasks_fixed_and_independent_of_global_seed():
    torch.manual_seed(1)
    a = job.eval_tasks()
    torch.manual_seed(2)
    b = job.eval_tasks()
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert a.support_x.shape == (job.EVAL_TASKS, max(job.EVAL_SHOTS), 1)
    assert a.query_x.shape == (job.EVAL_TASKS, job.EVAL_QUERIES, 1)


class _ConstantPredictor:
    """Stands in for BatchedMAML: 'adapting' on K points predicts the mean of the support targets."""

    def __init__(self):
        self.calls = []

    def adapt(self, support_x, support_y, steps):
        self.calls.append((support_x.shape[1], steps))
        return support_y.mean(dim=1, keepdim=True) * steps  # depends on K and steps

    def predict(self, fast, x):
        return fast.expand(-1, x.shape[1], -1)


def test_evaluate_mse_and_ci_against_float64_reference():
    batch = sinusoid_data.sample(37, 10, 11, _gen(5))
    fake = _ConstantPredictor()
    mse, ci95, diverged = job.evaluate(fake, batch, shots=(5, 10), steps=(1, 5, 10))
    assert diverged == {"5": {"1": 0, "5": 0, "10": 0}, "10": {"1": 0, "5": 0, "10": 0}}
    assert fake.calls == [(5, 1), (5, 5), (5, 10), (10, 1), (10, 5), (10, 10)]
    assert list(mse) == list(ci95) == ["5", "10"]
    for k in (5, 10):
        assert list(mse[str(k)]) == ["1", "5", "10"]
        for s in (1, 5, 10):
            pred = batch.support_y[:, :k].double().mean(dim=1, keepdim=True) * s
            per_task = ((pred - batch.query_y.double()) ** 2).mean(dim=(1, 2))
            assert mse[str(k)][str(s)] == pytest.approx(per_task.mean().item(), rel=1e-6)
            expected_ci = 1.96 * per_task.std(unbiased=True).item() / math.sqrt(37)
            assert ci95[str(k)][str(s)] == pytest.approx(expected_ci, rel=1e-6)
    text = job.format_results(mse, ci95, diverged, tasks=37)
    assert "37 tasks" in text and "K=5" in text and "K=10" in text and "10 steps" in text
    assert "diverged" not in text


def test_evaluate_reports_diverged_tasks():
    # a task whose adaptation blows up (non-finite MSE) is counted, and its cell has no mean or CI
    batch = sinusoid_data.sample(9, 10, 4, _gen(6))

    class Diverging(_ConstantPredictor):
        def adapt(self, support_x, support_y, steps):
            fast = super().adapt(support_x, support_y, steps).clone()
            if steps == 10:
                fast[[2, 7]] = float("inf")
            return fast

    mse, ci95, diverged = job.evaluate(Diverging(), batch, shots=(5,), steps=(1, 10))
    assert diverged == {"5": {"1": 0, "10": 2}}
    assert mse["5"]["10"] is None and ci95["5"]["10"] is None and math.isfinite(mse["5"]["1"])
    text = job.format_results(mse, ci95, diverged, tasks=9)
    assert "diverged (2/9)" in text and "K=5, 10 steps" in text
