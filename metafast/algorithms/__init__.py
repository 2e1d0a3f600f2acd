"""Meta-learning algorithms: MAML and MetaSGD (learn2learn drop-ins, one task at a time) and
BatchedMAML (MAML, Meta-SGD and ANIL over T tasks at once).

BatchedMAML's meta-step runs on one of several paths (cuda_graph, fused, exact_reverse, autograd):
paths/__init__.py lists them with the conditions under which each runs.
"""
from .batched_maml import BatchedMAML, FastWeights, MetaOutput
from .maml import MAML
from .mamlpp import MAMLpp
from .meta_sgd import MetaSGD
from .module_utils import clone_module, detach_module, update_module
from .protonet import ProtoNet, ProtoOutput

__all__ = ["BatchedMAML", "FastWeights", "MetaOutput", "MAML", "MetaSGD", "clone_module", "detach_module",
           "update_module", "ProtoNet", "ProtoOutput", "MAMLpp"]
