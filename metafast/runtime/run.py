"""What every training job shares: the device choice, the Ctrl-C exception, config round trips and the
checks before a run starts or resumes."""
import dataclasses
import os
from typing import Optional, Sequence

import torch

from .checkpoint import CHECKPOINT_NAME, load_checkpoint


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


def config_from_dict(cls, d: dict, what: str):
    """A dataclass config from a checkpoint's dict; unknown keys are an error, not silently dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {what} config keys: {sorted(unknown)}")
    return cls(**d)


def check_fixed(saved, wanted, fields: Sequence[str]) -> None:
    """A resumed run may change only what is not in ``fields`` (e.g. iterations, device)."""
    diffs = [f"{k}: checkpoint has {getattr(saved, k)!r}, asked for {getattr(wanted, k)!r}"
             for k in fields if getattr(saved, k) != getattr(wanted, k)]
    if diffs:
        raise ValueError("cannot resume with a different setup (" + "; ".join(diffs) + ")")


def resume_state(out_dir: str, resume: bool, task: str, config, fixed: Sequence[str]) -> Optional[dict]:
    """The checkpoint state a resumed run continues from, checked against ``config`` (same task, same
    ``fixed`` fields, no fewer iterations than done); None for a fresh run, which refuses to overwrite
    an existing checkpoint."""
    ckpt_path = os.path.join(out_dir, CHECKPOINT_NAME)
    if not resume:
        if os.path.exists(ckpt_path):
            raise ValueError(f"{out_dir} already holds a checkpoint; resume it or pick another output directory")
        return None
    state = load_checkpoint(ckpt_path)
    if state.get("task") != task:
        raise ValueError(f"{ckpt_path} is a checkpoint of task {state.get('task')!r}, not {task!r}")
    check_fixed(type(config).from_dict(state["config"]), config, fixed)
    if config.iterations < state["iteration"]:
        raise ValueError(f"iterations must be >= {state['iteration']} (the checkpoint's iteration), "
                         f"got {config.iterations}")
    return state


def new_run_dir(prefix: str = "") -> str:
    """``runs/<prefix><timestamp>``, suffixed -1, -2, ... when that directory already exists."""
    import datetime as _dt

    base = os.path.join("runs", prefix + _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    out, n = base, 1
    while os.path.exists(out):
        out, n = f"{base}-{n}", n + 1
    return out
