"""The GPU backends (of "cuda", "triton") that can run an op on this machine, for the gpu-marked tests."""
from typing import List

import pytest

from metafast import _backend

GPU_BACKENDS = ("cuda", "triton")


def gpu_backends(op_name: str) -> List[str]:
    out = []
    for backend in GPU_BACKENDS:
        try:
            out.append(_backend.resolve(op_name, "cuda", backend))
        except (_backend.BackendUnavailableError, RuntimeError):
            pass
    return out


def require_gpu_backend(op_name: str, backend: str) -> None:
    """Skip (naming why) when ``backend`` cannot run ``op_name`` on this GPU machine. A test looping over
    ``gpu_backends`` instead would pass with none; ``assert_some_gpu_backend`` is the test that fails then."""
    try:
        _backend.resolve(op_name, "cuda", backend)
    except (_backend.BackendUnavailableError, RuntimeError) as e:
        pytest.skip(f"{backend} backend not available for {op_name} on this machine: {e}")


def assert_some_gpu_backend(op_name: str) -> None:
    """On a GPU machine at least one fused backend runs ``op_name``: otherwise every backend test skips."""
    found = gpu_backends(op_name)
    assert found, f"no GPU backend runs {op_name}: " + "; ".join(
        f"{b}: {_backend.available().get(b, (False, '?'))[1]}" for b in GPU_BACKENDS)
