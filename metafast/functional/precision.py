"""Mixed precision for the batched meta-step: low-precision compute, float32 master and fast weights.

The meta-parameters (θ) and the per-task fast weights stay float32. Each forward/backward of the
inner loop and the query pass runs on a low-precision copy cast from them (differentiably, so
second-order meta-gradients reach θ through the casts); losses and the inner update run in float32,
so an inner step smaller than the low-precision spacing of a weight is not rounded away.

fp16 scales the support loss by ``inner_loss_scale`` S before the low-precision backward of the
inner gradient and divides it out in float32, so small gradients do not flush to zero.
"""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_FP16_SCALE = 2.0 ** 10


@dataclass(frozen=True)
class Precision:
    name: str                      # "fp32", "bf16" or "fp16"
    dtype: Optional[torch.dtype]   # compute dtype, None for fp32 (no casts at all)
    scale: float                   # inner loss scale S (1 except for fp16)

    @property
    def mixed(self) -> bool:
        return self.dtype is not None

    def low(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The compute copy of a floating tensor (differentiable cast); others pass unchanged."""
        if self.dtype is None or t is None or not t.is_floating_point():
            return t
        return t.to(self.dtype)

    def grad_seed(self, dout: torch.Tensor) -> torch.Tensor:
        """S * dloss/dout in the compute dtype: what the low-precision inner backward starts from."""
        return self.low(dout * self.scale if self.scale != 1 else dout)

    def unscale(self, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The inner gradient of that backward back in ``dtype`` (float32), divided by S."""
        g = g.to(dtype)
        return g / self.scale if self.scale != 1 else g

    @staticmethod
    def overflowed(g: Sequence[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """[T] tasks whose loss is finite but whose (scaled) inner gradient (pieces [T, n_i]) is not."""
        finite = torch.stack([torch.isfinite(p.detach()).all(1) for p in g]).all(0)
        return ~finite & torch.isfinite(loss.detach())

    def check_params(self, dtype: torch.dtype) -> None:
        if self.mixed and dtype != torch.float32:
            raise TypeError(f"precision={self.name!r} keeps float32 master weights; the model's parameters are "
                            f"{dtype} (use model.float(), or precision='fp32')")

    def describe(self) -> str:
        if not self.mixed:
            return "precision: fp32"
        s = f", inner loss scale {self.scale:g}" if self.scale != 1 else ""
        return (f"precision: {self.name} compute (inner loop and query pass), float32 master and fast weights, "
                f"float32 losses and inner updates{s}")


FP32 = Precision("fp32", None, 1.0)


def resolve(precision, inner_loss_scale) -> Precision:
    if precision not in _DTYPES:
        raise ValueError(f"precision: expected 'fp32', 'bf16' or 'fp16', got {precision!r}")
    if inner_loss_scale is not None and precision == "fp32":
        raise ValueError("inner_loss_scale: only applies with precision='fp16' or 'bf16'")
    if inner_loss_scale is None:
        scale = DEFAULT_FP16_SCALE if precision == "fp16" else 1.0
    else:
        try:
            scale = float(inner_loss_scale)
        except (TypeError, ValueError):
            raise ValueError(f"inner_loss_scale: expected None or a number > 0, got {inner_loss_scale!r}") from None
        if not (scale > 0 and scale < float("inf")):
            raise ValueError(f"inner_loss_scale: expected None or a finite number > 0, got {inner_loss_scale!r}")
    return Precision(precision, _DTYPES[precision], scale)
