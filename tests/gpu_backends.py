"""The GPU backends (of "cuda", "triton") that can run an op on this machine, for the gpu-marked tests."""
from typing import List

from metafast import _backend


def gpu_backends(op_name: str) -> List[str]:
    out = []
    for backend in ("cuda", "triton"):
        try:
            out.append(_backend.resolve(op_name, "cuda", backend))
        except (_backend.BackendUnavailableError, RuntimeError):
            pass
    return out
