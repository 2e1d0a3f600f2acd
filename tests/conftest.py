"""Shared test set-up: every test starts from the same seeds; ``@pytest.mark.gpu`` tests are skipped
without a CUDA device; ``assert_close`` compares against float64 references and prints the first
mismatches. The suite runs strict (METAFAST_STRICT=1): every fallback is an error, so a test that means
to exercise one unsets it with monkeypatch."""
import os
import random

import numpy as np
import pytest
import torch

SEED = 0

os.environ["METAFAST_STRICT"] = "1"  # before metafast is imported; subprocesses of tests inherit it

# float32 tests compare against float64 references: TF32 (cuDNN's default for convolutions and RNNs
# on Ampere and later) rounds inputs to 10 mantissa bits, which no fp32 tolerance here allows.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)  # all devices
    yield


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "value",
                  show: int = 5) -> None:
    """|actual - expected| <= atol + rtol * |expected| elementwise, compared in float64; on failure
    the message lists the first ``show`` mismatching indices with both values."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    bad |= torch.isnan(a) != torch.isnan(e)
    if bad.any():
        idx = bad.nonzero()[:show].tolist()
        rows = [f"  [{', '.join(map(str, i))}] got {a[tuple(i)].item():.10g} expected {e[tuple(i)].item():.10g}"
                for i in idx]
        worst = (a - e).abs()[bad].max().item()
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} elements differ (max abs err {worst:.3g}, "
                             f"atol={atol:g}, rtol={rtol:g}); first mismatches:\n" + "\n".join(rows))


@pytest.fixture
def assert_close():
    return _assert_close


@pytest.fixture
def float64_default():
    """Run the test with float64 as the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
