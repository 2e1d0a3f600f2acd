"""Meta-learning algorithms."""
from .batched_maml import BatchedMAML, FastWeights, MetaOutput
from .maml import MAML
from .meta_sgd import MetaSGD
from .module_utils import clone_module, detach_module, update_module
from .protonet import ProtoNet, ProtoOutput

__all__ = ["BatchedMAML", "FastWeights", "MetaOutput", "MAML", "MetaSGD", "clone_module", "detach_module",
           "update_module", "ProtoNet", "ProtoOutput"]
