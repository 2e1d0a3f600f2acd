"""What every training job shares: the device choice, the Ctrl-C exception, the run directory and the
checks before a run starts or resumes."""
import os
from typing import Optional, Sequence

import torch


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C; ``checkpoint`` is the saved checkpoint (None if none could be saved)."""

    def __init__(self, message: str, out_dir: str, checkpoint: Optional[str], iteration: Optional[int] = None):
        super().__init__(message)
        self.out_dir, self.checkpoint, self.iteration = out_dir, checkpoint, iteration


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda" without a GPU is an error that says why."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False "
                         "(no GPU or a CPU-only torch build); use --device cpu or auto")
    return torch.device(name)



def check_fixed(saved, wanted, fields: Sequence[str]) -> None:
    """A resumed run may change only what is not in ``fields`` (e.g. iterations, device)."""
    diffs = [f"{k}: checkpoint has {getattr(saved, k)!r}, asked for {getattr(wanted, k)!r}"
             for k in fields if getattr(saved, k) != getattr(wanted, k)]
    if diffs:
        raise ValueError("cannot resume with a different setup (" + "; ".join(diffs) + ")")



def new_run_dir(prefix: str = "") -> str:
    """``runs/<prefix><timestamp>``, suffixed -1, -2, ... when that directory already exists."""
    import datetime as _dt

    base = os.path.join("runs", prefix + _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    out, n = base, 1
    while os.path.exists(out):
        out, n = f"{base}-{n}", n + 1
    return out
