"""Meta-parameters in one flat contiguous buffer.

Every nn.Parameter of the module becomes a view into one buffer of P elements, so the whole
parameter vector θ is available as a [P] tensor without a copy (``FlatParams.theta()``), fast weights
for T tasks are one [T, P] tensor, and the inner update of everything is one op.
"""
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..ops.theta_view import ThetaView


@dataclass(frozen=True)
class ParamSlot:
    name: str
    offset: int
    numel: int
    shape: Tuple[int, ...]


class FlatParams:
    """Owns the flat buffer behind a module's parameters (in ``module.parameters()`` order)."""

    def __init__(self, module: nn.Module):
        self.module = module
        named = list(module.named_parameters())
        if not named:
            raise ValueError("model: has no parameters to meta-learn")
        dtypes = {p.dtype for _, p in named}
        devices = {p.device for _, p in named}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"model: all parameters must share one dtype and device, got dtypes={sorted(map(str, dtypes))}, "
                             f"devices={sorted(map(str, devices))}")
        frozen = [n for n, p in named if not p.requires_grad]
        if frozen:
            raise ValueError(f"model: parameters {frozen} have requires_grad=False; BatchedMAML meta-learns every "
                             "parameter (use anil=True to adapt only the head, or metafast.MAML with allow_nograd=True)")
        self.slots: List[ParamSlot] = []
        self.params: List[nn.Parameter] = []
        offset = 0
        for name, p in named:
            self.slots.append(ParamSlot(name, offset, p.numel(), tuple(p.shape)))
            self.params.append(p)
            offset += p.numel()
        self.numel = offset
        self.buffer = None
        self.rebind()

    def rebind(self) -> None:
        """(Re)create the buffer and make every parameter a view into it.

        Needed again after ``module.to(...)``/``.double()``, which give parameters fresh storage.
        """
        p0 = self.params[0]
        buffer = torch.empty(self.numel, dtype=p0.dtype, device=p0.device)
        with torch.no_grad():
            for slot, p in zip(self.slots, self.params):
                buffer[slot.offset:slot.offset + slot.numel].copy_(p.reshape(-1))
                p.data = buffer[slot.offset:slot.offset + slot.numel].view(slot.shape)
        self.buffer = buffer
        self._ptrs = [p.data_ptr() for p in self.params]

    def is_bound(self) -> bool:
        # module.to(), .double() or an assignment to .data give a parameter fresh storage, so every
        # parameter must still start where rebind() put it (checked once per meta-step: keep it cheap)
        return (self.buffer is not None and [p.data_ptr() for p in self.params] == self._ptrs
                and all(p.is_contiguous() for p in self.params))

    def ensure_bound(self) -> torch.Tensor:
        """The buffer, rebuilt first if the parameters moved to new storage."""
        if torch.compiler.is_compiling():  # data_ptr() checks do not trace; a compiled graph's storage is fixed
            return self.buffer
        if not self.is_bound():
            self.rebind()
        return self.buffer

    def theta(self) -> torch.Tensor:
        """θ as a differentiable [P] tensor aliasing the parameters' storage."""
        self.ensure_bound()
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.params):
            return ThetaView.apply(self.buffer, *self.params)
        return self.buffer.view(-1)

    def offsets(self) -> Dict[int, ParamSlot]:
        """id(parameter) -> slot."""
        return {id(p): s for s, p in zip(self.slots, self.params)}
