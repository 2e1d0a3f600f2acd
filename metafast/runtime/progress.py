"""Progress display for training loops: a tqdm bar and a running (exponentially averaged) loss."""
import sys
from typing import Optional

import torch
from tqdm.auto import tqdm


class RunningLoss:
    """Bias-corrected exponential moving average of the loss, kept on the loss's device.

    Updating it never synchronises with the GPU; only ``value()`` does. ``state()``/``from_state``
    round-trip exactly, so a resumed run shows the same numbers as an uninterrupted one.
    """

    def __init__(self, decay: float = 0.98):
        self.decay = decay
        self.raw: Optional[torch.Tensor] = None  # EMA started at 0, corrected by 1 - decay**count
        self.count = 0

    def update(self, loss: torch.Tensor) -> None:
        loss = loss.detach().to(torch.float64)
        self.raw = (1 - self.decay) * loss if self.raw is None else self.decay * self.raw + (1 - self.decay) * loss
        self.count += 1

    def value(self) -> float:
        if self.raw is None:
            return float("nan")
        return self.raw.item() / (1 - self.decay ** self.count)

    def state(self) -> dict:
        return {"raw": None if self.raw is None else self.raw.item(), "count": self.count, "decay": self.decay}

    @classmethod
    def from_state(cls, state: dict, device=None) -> "RunningLoss":
        out = cls(state["decay"])
        out.count = state["count"]
        if state["raw"] is not None:
            out.raw = torch.tensor(state["raw"], dtype=torch.float64, device=device)
        return out


def progress_bar(total: int, initial: int = 0, desc: str = "meta-train", enabled: bool = True) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit="it", disable=not enabled,
                dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
