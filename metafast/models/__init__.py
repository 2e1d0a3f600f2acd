from .conv4 import Conv4
from .mlp import MLP
from .resnet12 import ResNet12
from .wide_resnet import WideResNet

__all__ = ["MLP", "Conv4", "ResNet12", "WideResNet"]
