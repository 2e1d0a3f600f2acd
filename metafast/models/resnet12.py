"""ResNet-12, the standard few-shot backbone (TADAM, MetaOptNet, learn2learn).

Four residual blocks, each: 3 x (conv3x3 -> BN -> LeakyReLU 0.1) with the last activation after the
residual sum, a 1x1 conv + BN shortcut, then 2x2 max-pool. Widths 64-160-320-640 (MetaOptNet,
``wide=True``) or 64-128-256-512 (TADAM). Then global average pooling (or a flatten, as with
learn2learn's ``avg_pool=False``) and a linear head.

BatchNorm uses batch statistics only (no running stats), as MAML uses it. DropBlock, which
MetaOptNet uses as a regulariser when pre-training the embedding, is left out: inner-loop adaptation
on a handful of images gains nothing from it, and dropping units would make adaptation random.

BatchedMAML's graph executor traces the model (torch.fx) into batched layers: every convolution,
batch norm, residual sum and pooling runs over all tasks at once, with the exact reverse.
"""
from typing import Sequence

from torch import nn

WIDE = (64, 160, 320, 640)
NARROW = (64, 128, 256, 512)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, negative_slope: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, track_running_stats=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, track_running_stats=False)
        self.conv3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, track_running_stats=False)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                      nn.BatchNorm2d(cout, track_running_stats=False))
        self.act = nn.LeakyReLU(negative_slope)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


class ResNet12(nn.Sequential):
    """ResNet-12 with a ``ways``-way linear head.

    Args:
        ways: output classes.
        in_channels: 3 for RGB (miniImageNet, CIFAR-FS), 1 for Omniglot.
        widths: the four block widths (WIDE = 64-160-320-640, NARROW = 64-128-256-512).
        image_size: input side, to size the head (84 for miniImageNet, 32 for CIFAR).
        avg_pool: global average pooling before the head (else flatten the last feature map).
    """

    def __init__(self, ways: int, in_channels: int = 3, widths: Sequence[int] = WIDE, image_size: int = 84,
                 avg_pool: bool = True):
        widths = [int(w) for w in widths]
        if ways < 2:
            raise ValueError(f"ResNet12: ways must be >= 2, got {ways}")
        if len(widths) != 4 or any(w < 1 for w in widths):
            raise ValueError(f"ResNet12: widths must be four positive ints, got {widths}")
        size = image_size
        for _ in range(4):
            size //= 2
        if size < 1:
            raise ValueError(f"ResNet12: image_size={image_size} is too small for four 2x2 max-pools (needs >= 16)")
        blocks, cin = [], in_channels
        for w in widths:
            blocks.append(ResidualBlock(cin, w))
            cin = w
        head_in = cin if avg_pool else cin * size * size
        tail = [nn.AdaptiveAvgPool2d(1)] if avg_pool else []
        super().__init__(*blocks, *tail, nn.Flatten(), nn.Linear(head_in, ways))
        self.ways = ways
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    @classmethod
    def narrow(cls, ways: int = 5, in_channels: int = 3, image_size: int = 84) -> "ResNet12":
        """64-128-256-512 (TADAM, learn2learn's benchmarks)."""
        return cls(ways, in_channels, NARROW, image_size=image_size)

    @classmethod
    def wide(cls, ways: int = 5, in_channels: int = 3, image_size: int = 84) -> "ResNet12":
        """64-160-320-640 (MetaOptNet)."""
        return cls(ways, in_channels, WIDE, image_size=image_size)

    @classmethod
    def miniimagenet(cls, ways: int = 5, wide: bool = True) -> "ResNet12":
        return cls(ways, 3, WIDE if wide else NARROW, image_size=84)

    @classmethod
    def cifar(cls, ways: int = 5, wide: bool = True) -> "ResNet12":
        return cls(ways, 3, WIDE if wide else NARROW, image_size=32)
