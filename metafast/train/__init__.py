"""The former home of the training jobs and their run infrastructure, kept so that existing imports
(``metafast.train.checkpoint``, ``metafast.train.sinusoid``, ...) go on working: each old module name
is the new module itself (not a copy), so patching one patches the other. New code imports
metafast.runtime (run infrastructure) and metafast.jobs (the jobs); the library never imports this."""
import importlib
import sys

_MOVED = {
    "allocator": "metafast.runtime.allocator",
    "arguments": "metafast.runtime.arguments",
    "checkpoint": "metafast.runtime.checkpoint",
    "interrupt": "metafast.runtime.interrupt",
    "progress": "metafast.runtime.progress",
    "run": "metafast.runtime.run",
    "plot": "metafast.jobs.sinusoid_plot",
    "sinusoid": "metafast.jobs.sinusoid",
    "vision": "metafast.jobs.vision",
}
for _old, _new in _MOVED.items():
    globals()[_old] = sys.modules[f"{__name__}.{_old}"] = importlib.import_module(_new)

from metafast.jobs.sinusoid import SinusoidConfig, TrainingInterrupted, train_sinusoid  # noqa: E402
from metafast.runtime.checkpoint import atomic_write, load_checkpoint, save_checkpoint  # noqa: E402

__all__ = ["SinusoidConfig", "TrainingInterrupted", "train_sinusoid", "atomic_write", "save_checkpoint",
           "load_checkpoint"]
