"""Knowledge distillation: the fused ``kd_loss`` op, its ``KDLoss`` module, and ``Distiller``."""
from ..ops.kd_loss import KDLoss, kd_loss, kd_loss_reference
from .distiller import Distiller, DistillInterrupted, accuracy

__all__ = ["kd_loss", "kd_loss_reference", "KDLoss", "Distiller", "DistillInterrupted", "accuracy"]
