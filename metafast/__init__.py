"""metafast: meta-learning for PyTorch on fused GPU kernels."""
__version__ = "0.1.0"

from .algorithms import (MAML, BatchedMAML, FastWeights, MetaOutput, MetaSGD, clone_module, detach_module,
                         update_module)
from .algorithms import ProtoNet, ProtoOutput
from .algorithms import MAMLpp
from .fallback import FallbackError, FallbackWarning
from .distill import Distiller, KDLoss, kd_loss
from .multitask import (EqualWeighting, GradNorm, MultiTask, MultiTaskTrainer, UncertaintyWeighting,
                        make_weighting, per_task_accuracy)

__all__ = ["BatchedMAML", "FastWeights", "MetaOutput", "MAML", "MetaSGD", "clone_module", "detach_module",
           "update_module", "FallbackWarning", "FallbackError", "kd_loss", "KDLoss", "Distiller", "MultiTask", "MultiTaskTrainer", "EqualWeighting", "UncertaintyWeighting", "GradNorm",
           "make_weighting", "per_task_accuracy", "__version__"]
__all__ += ["ProtoNet", "ProtoOutput"]
__all__ += ["MAMLpp"]
