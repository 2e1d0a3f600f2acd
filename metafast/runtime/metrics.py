"""The metrics file every job writes at the end (metrics.json in the run directory), and the
description of the machine it records."""
import os
import platform
import sys

import torch

from .checkpoint import write_json

METRICS_NAME = "metrics.json"


def write_metrics(out_dir: str, metrics: dict) -> str:
    """Write ``metrics`` atomically to ``<out_dir>/metrics.json``; returns the path."""
    path = os.path.join(out_dir, METRICS_NAME)
    write_json(path, metrics)
    return path


def device_label(device: torch.device) -> str:
    """"cuda (<GPU name>)" or "cpu (<n> threads)"."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "metafast": getattr(sys.modules.get("metafast"), "__version__", None)}
