"""Conv4, the four-block CNN of the MAML paper in its two variants."""
from torch import nn


def _block(cin: int, cout: int, stride: int, pool: bool) -> list:
    layers = [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
        # Transductive batch statistics, as MAML uses BN: no running stats.
        nn.BatchNorm2d(cout, track_running_stats=False),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return layers


class Conv4(nn.Sequential):
    """4 x (conv3x3 -> BN -> ReLU [-> maxpool 2]) -> flatten -> linear.

    ``Conv4.omniglot(ways)``: 64 channels, stride 2, no pooling, 28x28x1 input.
    ``Conv4.miniimagenet(ways)``: 32 channels, 2x2 max-pool, 84x84x3 input.
    """

    def __init__(self, ways: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28,
                 stride: int = 2, pool: bool = False):
        if ways < 2:
            raise ValueError(f"Conv4: ways must be >= 2, got {ways}")
        layers = []
        cin, size = in_channels, image_size
        for _ in range(4):
            layers += _block(cin, hidden, stride, pool)
            cin = hidden
            size = (size + 2 - 3) // stride + 1
            if pool:
                size //= 2
        if size < 1:
            raise ValueError(f"Conv4: image_size={image_size} is too small for four blocks")
        layers += [nn.Flatten(), nn.Linear(hidden * size * size, ways)]
        super().__init__(*layers)
        self.ways = ways

    @classmethod
    def omniglot(cls, ways: int = 5) -> "Conv4":
        return cls(ways, in_channels=1, hidden=64, image_size=28, stride=2, pool=False)

    @classmethod
    def miniimagenet(cls, ways: int = 5) -> "Conv4":
        return cls(ways, in_channels=3, hidden=32, image_size=84, stride=1, pool=True)
