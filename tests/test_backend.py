"""metafast._backend: what is available and why, METAFAST_BACKEND, fallback with one warning, and
importing metafast without triton or the CUDA extension."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from metafast import _backend
from metafast.ops.inner_update import inner_update, inner_update_reference


@pytest.fixture
def fresh(monkeypatch):
    """Clean probe/warning state and no METAFAST_BACKEND; restored afterwards."""
    monkeypatch.delenv(_backend.ENV, raising=False)
    _backend.reset()
    yield monkeypatch
    _backend.reset()


def simulate(monkeypatch, *, ext=True, triton=True, device=True):
    """Pretend the extension / triton / a CUDA device is (not) there."""
    monkeypatch.setattr(_backend, "_probe_cuda_ext",
                        lambda: (True, "metafast._C loaded") if ext else
                        (False, "metafast._C failed to import (ModuleNotFoundError: simulated)"))
    monkeypatch.setattr(_backend, "_probe_triton",
                        lambda: (True, "triton 9.9") if triton else
                        (False, "triton failed to import (ModuleNotFoundError: simulated)"))
    monkeypatch.setattr(_backend, "_probe_cuda_device",
                        lambda: (True, "1 CUDA device(s)") if device else (False, "no CUDA device is visible"))
    monkeypatch.setattr(_backend, "_cuda_has", lambda symbol: True)
    _backend.reset()


def _resolve_recording(n, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [_backend.resolve(*args, **kwargs) for _ in range(n)]
    return results, [w for w in caught if "metafast" in str(w.message)]


def test_extension_missing_falls_back_to_torch_with_exactly_one_warning(fresh):
    simulate(fresh, ext=False, triton=False)
    results, caught = _resolve_recording(3, "inner_update", "cuda")
    assert results == ["torch"] * 3
    assert len(caught) == 1, [str(w.message) for w in caught]
    msg = str(caught[0].message)
    assert "simulated" in msg and "cuda" in msg and "triton" in msg
    # the same fallback for another op does not warn again
    _, again = _resolve_recording(1, "some_other_op", "cuda")
    assert again == []


def test_extension_missing_falls_back_to_triton_on_gpu(fresh):
    simulate(fresh, ext=False, triton=True)
    results, caught = _resolve_recording(2, "inner_update", "cuda")
    assert results == ["triton", "triton"]
    assert len(caught) == 1 and "metafast._C failed to import" in str(caught[0].message)


def test_auto_prefers_the_extension_and_cpu_gets_torch(fresh):
    simulate(fresh)
    results, caught = _resolve_recording(1, "inner_update", "cuda")
    assert results == ["cuda"] and caught == []
    assert _backend.resolve("inner_update", "cpu") == "torch"
    assert _backend.resolve("inner_update", torch.device("cpu")) == "torch"


def test_extension_without_the_op_counts_as_missing(fresh):
    simulate(fresh, triton=False)
    fresh.setattr(_backend, "_cuda_has", lambda symbol: False)
    with pytest.raises(_backend.BackendUnavailableError, match="built without metafast::inner_update_cuda"):
        _backend.resolve("inner_update", "cuda", "cuda")


def test_explicit_cuda_without_extension_is_a_clear_error(fresh):
    simulate(fresh, ext=False)
    fresh.setenv(_backend.ENV, "cuda")
    with pytest.raises(_backend.BackendUnavailableError, match=r"METAFAST_BACKEND=cuda.*simulated"):
        _backend.resolve("inner_update", "cuda")
    with pytest.raises(_backend.BackendUnavailableError, match="METAFAST_BACKEND=cuda"):
        inner_update(torch.randn(4), torch.randn(2, 4), 0.1)


def test_explicit_cuda_on_cpu_tensors_is_a_clear_error(fresh):
    simulate(fresh)
    with pytest.raises(_backend.BackendUnavailableError, match="needs CUDA tensors, got cpu"):
        _backend.resolve("inner_update", "cpu", "cuda")


def test_explicit_triton(fresh):
    simulate(fresh, triton=False)
    with pytest.raises(_backend.BackendUnavailableError, match=r"backend='triton'.*triton failed to import"):
        _backend.resolve("inner_update", "cuda", "triton")
    simulate(fresh, triton=True, device=False)
    fresh.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(_backend.BackendUnavailableError, match="unless TRITON_INTERPRET=1"):
        _backend.resolve("inner_update", "cpu", "triton")
    fresh.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("inner_update", "cpu", "triton") == "triton"


@pytest.mark.parametrize("value", ["bogus", "CUDA-ext", "1"])
def test_bogus_env_value_is_a_clear_error(fresh, value):
    fresh.setenv(_backend.ENV, value)
    with pytest.raises(ValueError, match=r"METAFAST_BACKEND must be one of auto, cuda, triton, torch; got"):
        _backend.resolve("inner_update", "cpu")
    with pytest.raises(ValueError, match="METAFAST_BACKEND must be one of"):
        inner_update(torch.randn(4), torch.randn(2, 4), 0.1)


@pytest.mark.parametrize("value", ["torch", "TORCH", " auto ", ""])
def test_env_values_accepted(fresh, value, assert_close):
    fresh.setenv(_backend.ENV, value)
    assert _backend.resolve("inner_update", "cpu") == "torch"
    theta, grad = torch.randn(5), torch.randn(3, 5)
    assert_close(inner_update(theta, grad, 0.2), inner_update_reference(theta, grad, 0.2), 0, 0, "fast")


def test_torch_is_always_available_and_reasons_are_kept(fresh):
    simulate(fresh, ext=False, triton=False, device=False)
    avail = _backend.available()
    assert set(avail) == {"cuda", "triton", "torch"}
    assert avail["torch"][0] is True
    assert avail["cuda"] == (False, "metafast._C failed to import (ModuleNotFoundError: simulated)")
    assert avail["triton"][0] is False and "simulated" in avail["triton"][1]
    simulate(fresh, ext=True, triton=True, device=False)
    fresh.delenv("TRITON_INTERPRET", raising=False)
    avail = _backend.available()
    assert avail["cuda"][0] is False and "no CUDA device" in avail["cuda"][1]
    assert avail["triton"][0] is False and "no CUDA device" in avail["triton"][1]


def test_register_op_limits_backends(fresh):
    simulate(fresh, ext=False, triton=True)
    _backend.register_op("_test_torch_only_op", backends=("torch",))
    try:
        results, caught = _resolve_recording(1, "_test_torch_only_op", "cuda")
        assert results == ["torch"] and caught == []  # nothing it could have used is missing
        with pytest.raises(_backend.BackendUnavailableError, match="has no triton implementation"):
            _backend.resolve("_test_torch_only_op", "cuda", "triton")
    finally:
        _backend._ops.pop("_test_torch_only_op", None)
    with pytest.raises(ValueError, match="including 'torch'"):
        _backend.register_op("_bad", backends=("cuda",))


def test_describe_reports_versions_and_per_op_choice(fresh):
    report = _backend.describe()
    for key in ("torch", "triton", "metafast._C", "cuda device", "backends", "ops", _backend.ENV):
        assert key in report
    assert report["torch"] == torch.__version__
    assert report["ops"]["inner_update"]["cpu"] == "torch"
    assert set(report["ops"]["inner_update"]) == {"cpu", "cuda"}
    assert "inner_update_multi" in report["ops"]
    simulate(fresh, ext=False, triton=False)
    report = _backend.describe()
    assert report["ops"]["inner_update"]["cuda"] == "torch"
    assert "simulated" in report["metafast._C"]


_NO_NATIVE_SCRIPT = r"""
import importlib.abc, sys, warnings

class Block(importlib.abc.MetaPathFinder):
    # make `import triton` and `import metafast._C` fail as if neither were installed
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton.") or name == "metafast._C":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
        return None

sys.meta_path.insert(0, Block())
import torch
import metafast
from metafast import _backend
from metafast.ops.inner_update import inner_update, inner_update_multi
avail = _backend.available()
assert not avail["cuda"][0] and "blocked" in avail["cuda"][1], avail
assert not avail["triton"][0] and "blocked" in avail["triton"][1], avail
out = inner_update(torch.zeros(3), torch.ones(2, 3), 0.5)
assert torch.equal(out, torch.full((2, 3), -0.5)), out
outs = inner_update_multi([torch.zeros(2)], [torch.ones(2)], 0.5)
assert torch.equal(outs[0], torch.full((2,), -0.5))
report = _backend.describe()
print("OK", report["ops"]["inner_update"])
"""


def test_import_and_cpu_path_work_without_triton_or_extension():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", _backend.ENV)}
    out = subprocess.run([sys.executable, "-c", _NO_NATIVE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.startswith("OK"), out.stdout
