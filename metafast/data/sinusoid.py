"""Sinusoid regression tasks of the MAML paper: y = A sin(x - phase).

Amplitude A ~ U[0.1, 5], phase ~ U[0, pi], inputs x ~ U[-5, 5]. A batch of T tasks comes back as
tensors with a leading task dim (support_x [T, K, 1], ...), the layout BatchedMAML consumes.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)


class SinusoidBatch(NamedTuple):
    support_x: torch.Tensor  # [T, K, 1]
    support_y: torch.Tensor  # [T, K, 1]
    query_x: torch.Tensor  # [T, Q, 1]
    query_y: torch.Tensor  # [T, Q, 1]
    amplitudes: torch.Tensor  # [T]
    phases: torch.Tensor  # [T]

    def to(self, device=None, dtype=None) -> "SinusoidBatch":
        return SinusoidBatch(*(t.to(device=device, dtype=dtype) for t in self))


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_range(name: str, rng) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in rng)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of numbers (low, high), got {rng!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must be finite with low < high, got ({lo}, {hi})")
    return lo, hi


class SinusoidTasks:
    """The sinusoid task family; ``sample`` draws a batch of tasks from a ``torch.Generator``."""

    def __init__(self, amplitude_range=AMPLITUDE_RANGE, phase_range=PHASE_RANGE, input_range=INPUT_RANGE):
        self.amplitude_range = _check_range("amplitude_range", amplitude_range)
        self.phase_range = _check_range("phase_range", phase_range)
        self.input_range = _check_range("input_range", input_range)

    @staticmethod
    def function(x: torch.Tensor, amplitudes: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
        """y = A sin(x - phase) for x [T, N, 1] and per-task amplitudes/phases [T]."""
        return amplitudes.view(-1, 1, 1) * torch.sin(x - phases.view(-1, 1, 1))

    def sample(self, num_tasks: int, shots: int, queries: int, generator: Optional[torch.Generator] = None,
               device=None, dtype: torch.dtype = torch.float32) -> SinusoidBatch:
        """Draw ``num_tasks`` tasks with ``shots`` support and ``queries`` query points each.

        Sampling always happens in float64 on the CPU from ``generator`` (the global CPU generator
        when None), so a seed gives the same tasks whatever ``device`` and ``dtype`` are asked for.
        """
        _check_count("num_tasks", num_tasks, 1)
        _check_count("shots", shots, 1)
        _check_count("queries", queries, 0)
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
            if generator.device.type != "cpu":
                raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")

        def uniform(shape, rng):
            lo, hi = rng
            return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=torch.float64)

        amplitudes = uniform((num_tasks,), self.amplitude_range)
        phases = uniform((num_tasks,), self.phase_range)
        x = uniform((num_tasks, shots + queries, 1), self.input_range)
        y = self.function(x, amplitudes, phases)
        batch = SinusoidBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], amplitudes, phases)
        # .contiguous(): the support/query slices of one draw would otherwise share storage.
        return SinusoidBatch(*(t.to(device=device, dtype=dtype).contiguous() for t in batch))


def sample(num_tasks: int, shots: int, queries: int, generator: Optional[torch.Generator] = None,
           device=None, dtype: torch.dtype = torch.float32) -> SinusoidBatch:
    """``SinusoidTasks().sample(...)`` with the paper's ranges."""
    return SinusoidTasks().sample(num_tasks, shots, queries, generator, device=device, dtype=dtype)
