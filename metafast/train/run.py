"""What every training job shares: the device choice and the Ctrl-C exception."""
from typing import Optional

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
