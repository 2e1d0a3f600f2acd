"""``MultiTask``: a shared trunk and one head per task.

Homogeneous heads (all ``nn.Linear`` with the same in/out features and the same bias setting) are
stacked into one weight ``head_weight [H, O, I]`` and one ``head_bias [H, O]``; all heads then run as
ONE batched matmul (and, for cross-entropy, one fused heads+loss op) instead of a loop.
Stacked layout: ``head_weight[h]`` / ``head_bias[h]`` are exactly head h's ``nn.Linear.weight`` /
``.bias`` (views, so in-place edits of a head's view change the model); ``head(h)`` returns them,
``unstacked_heads()`` returns independent ``nn.Linear`` copies. Any other heads are kept in
``heads`` (an ``nn.ModuleList``) and run one after the other.

Inputs: one tensor ``x`` is shared by every task (the trunk runs once, features [N, I]); a list or
tuple of H tensors gives each task its own inputs (stacked into one trunk call when their shapes
agree). Targets: a tensor [H, N, ...] or a list of H tensors.
"""
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.multitask_heads import heads_logits, multitask_heads_cross_entropy

Inputs = Union[Tensor, Sequence[Tensor]]
LossSpec = Union[str, Callable[[Tensor, Tensor], Tensor]]
LOSSES = ("cross_entropy", "mse")


def _stackable(heads: Sequence[nn.Module]) -> bool:
    if not heads or not all(type(h) is nn.Linear for h in heads):
        return False
    first = heads[0]
    return all(h.weight.shape == first.weight.shape and (h.bias is None) == (first.bias is None)
               and h.weight.dtype == first.weight.dtype and h.weight.device == first.weight.device
               for h in heads)


class MultiTask(nn.Module):
    """Shared ``trunk`` followed by ``heads[t]`` for task t.

    ``stack=False`` keeps homogeneous linear heads as separate modules (the loop; useful as a
    baseline). ``forward`` returns the list of per-task outputs; ``losses`` the per-task losses [H].
    """

    def __init__(self, trunk: nn.Module, heads: Sequence[nn.Module], stack: bool = True):
        super().__init__()
        if not isinstance(trunk, nn.Module):
            raise TypeError(f"MultiTask: trunk must be an nn.Module, got {type(trunk).__name__}")
        heads = list(heads)
        if not heads or not all(isinstance(h, nn.Module) for h in heads):
            raise TypeError("MultiTask: heads must be a non-empty sequence of nn.Module (one per task)")
        self.trunk = trunk
        self.num_tasks = len(heads)
        self.stacked = bool(stack) and _stackable(heads)
        if self.stacked:
            self.head_weight = nn.Parameter(torch.stack([h.weight.detach() for h in heads]).clone())
            if heads[0].bias is not None:
                self.head_bias = nn.Parameter(torch.stack([h.bias.detach() for h in heads]).clone())
            else:
                self.register_parameter("head_bias", None)
            self.heads = None
        else:
            self.heads = nn.ModuleList(heads)

    # ------------------------------------------------------------------ per-head access
    def head(self, h: int) -> Tuple[Tensor, Optional[Tensor]]:
        """(weight [O, I], bias [O] or None) of stacked head h: views into the stacked parameters."""
        if not self.stacked:
            raise RuntimeError("MultiTask.head: the heads are not stacked; use model.heads[h]")
        return self.head_weight[h], None if self.head_bias is None else self.head_bias[h]

    def unstacked_heads(self) -> List[nn.Module]:
        """The heads as independent modules (copies of the stacked parameters when stacked)."""
        if not self.stacked:
            return list(self.heads)
        H, O, I = self.head_weight.shape
        out = []
        for h in range(H):
            lin = nn.Linear(I, O, bias=self.head_bias is not None, device=self.head_weight.device,
                            dtype=self.head_weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(self.head_weight[h])
                if self.head_bias is not None:
                    lin.bias.copy_(self.head_bias[h])
            out.append(lin)
        return out

    def last_shared_parameters(self) -> List[nn.Parameter]:
        """The weight of the trunk's last layer with parameters (GradNorm measures gradient norms
        there); all of that layer's parameters if it has no ``weight``."""
        last = None
        for module in self.trunk.modules():
            if any(True for _ in module.parameters(recurse=False)):
                last = module
        if last is None:
            raise ValueError("MultiTask: the trunk has no parameters, so there is no last shared layer")
        w = getattr(last, "weight", None)
        return [w] if isinstance(w, nn.Parameter) else list(last.parameters(recurse=False))

    # ------------------------------------------------------------------ forward
    def features(self, x: Inputs) -> Union[Tensor, List[Tensor]]:
        """Trunk output: [N, I] for a shared input, [H, N, I] for per-task inputs of one shape,
        else a list of H tensors."""
        if isinstance(x, Tensor):
            return self.trunk(x)
        xs = list(x)
        if len(xs) != self.num_tasks or not all(isinstance(t, Tensor) for t in xs):
            raise ValueError(f"MultiTask: per-task inputs must be a list of {self.num_tasks} tensors (one per task), "
                             f"got {len(xs)} items")
        if all(t.shape == xs[0].shape for t in xs):
            f = self.trunk(torch.cat(xs))
            return f.view(self.num_tasks, xs[0].shape[0], *f.shape[1:])
        return [self.trunk(t) for t in xs]

    def _head_out(self, h: int, f: Tensor) -> Tensor:
        if self.stacked:
            w, b = self.head(h)
            return F.linear(f, w, b)
        return self.heads[h](f)

    def _batched(self, x: Inputs, f) -> bool:
        """Can the stacked heads run as one batched op on these features ([N, I] shared by every
        task, or [H, N, I])?"""
        return self.stacked and isinstance(f, Tensor) and f.dim() == (2 if isinstance(x, Tensor) else 3)

    def forward(self, x: Inputs) -> List[Tensor]:
        f = self.features(x)
        if self._batched(x, f):
            return list(heads_logits(f, self.head_weight, self.head_bias).unbind(0))
        shared = isinstance(f, Tensor) and isinstance(x, Tensor)
        return [self._head_out(h, f if shared else f[h]) for h in range(self.num_tasks)]

    def losses(self, x: Inputs, targets: Union[Tensor, Sequence[Tensor]], loss: LossSpec = "cross_entropy",
               backend: Optional[str] = None) -> Tensor:
        """Per-task losses [H] (mean over each task's rows). ``loss``: "cross_entropy" (class ids),
        "mse", or fn(output, target) -> scalar. Stacked heads with cross-entropy run the fused
        heads+loss op (``backend`` as in multitask_heads_cross_entropy)."""
        if not (callable(loss) or loss in LOSSES):
            raise ValueError(f"MultiTask.losses: loss must be one of {LOSSES} or a callable, got {loss!r}")
        n_targets = targets.shape[0] if isinstance(targets, Tensor) else len(targets)
        if n_targets != self.num_tasks:
            raise ValueError(f"MultiTask.losses: targets must hold {self.num_tasks} tasks (leading dim / list "
                             f"length), got {n_targets}")
        f = self.features(x)
        if loss == "cross_entropy" and self._batched(x, f):
            labels = targets if isinstance(targets, Tensor) else _stack_targets(targets)
            if labels is not None:
                return multitask_heads_cross_entropy(f, self.head_weight, self.head_bias, labels, backend=backend)
        fn = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}.get(loss, loss) if isinstance(loss, str) else loss
        shared = isinstance(f, Tensor) and isinstance(x, Tensor)
        out = [fn(self._head_out(h, f if shared else f[h]), targets[h]) for h in range(self.num_tasks)]
        return torch.stack(out)


def _stack_targets(targets: Sequence[Tensor]) -> Optional[Tensor]:
    ts = list(targets)
    if all(isinstance(t, Tensor) and t.shape == ts[0].shape for t in ts):
        return torch.stack(ts)
    return None
