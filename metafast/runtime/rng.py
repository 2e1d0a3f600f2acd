"""Random state of a run: the global torch generators and a job's own ones, captured into a checkpoint
and restored on resume, so a resumed run draws exactly what an uninterrupted one would have drawn."""
from typing import Dict

import torch


def rng_state(device: torch.device, generators: Dict[str, torch.Generator]) -> dict:
    """{"torch_cpu": ..., <name>: generator state for each of ``generators``, "torch_cuda": ... on CUDA}."""
    state = {"torch_cpu": torch.get_rng_state(), **{name: g.get_state() for name, g in generators.items()}}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, device: torch.device, generators: Dict[str, torch.Generator]) -> None:
    """Restore what :func:`rng_state` captured (the CUDA state only where it was captured and is used)."""
    torch.set_rng_state(state["torch_cpu"])
    for name, g in generators.items():
        g.set_state(state[name])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state_all(state["torch_cuda"])
