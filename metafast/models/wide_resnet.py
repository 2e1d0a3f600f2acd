"""WRN-d-k (Zagoruyko & Komodakis 2016), the wide residual network of few-shot work (WRN-28-10).

(d - 4) / 6 pre-activation blocks per group, three groups of widths 16k, 32k, 64k (strides 1, 2, 2),
then BN, ReLU, global average pooling and a linear head. Each block: BN -> ReLU -> conv3x3 ->
BN -> ReLU [-> dropout] -> conv3x3, plus the input (a 1x1 conv of the pre-activated input where the
width or stride changes). BatchNorm keeps no running statistics (batch statistics, as MAML uses it).
BatchedMAML's graph executor runs it on batched layers with the exact reverse.
"""
from torch import nn


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, track_running_stats=False)


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = _bn(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        o = self.act(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.drop(self.act(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` with a ``ways``-way head. ``WideResNet(5)`` is WRN-28-10."""

    def __init__(self, ways: int, depth: int = 28, widen: int = 10, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        if ways < 2:
            raise ValueError(f"WideResNet: ways must be >= 2, got {ways}")
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet: depth must be 6n + 4 with n >= 1, got {depth}")
        if widen < 1:
            raise ValueError(f"WideResNet: widen must be >= 1, got {widen}")
        if not 0 <= dropout < 1:
            raise ValueError(f"WideResNet: dropout must lie in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks, cin = [], widths[0]
        for g, stride in zip(range(3), (1, 2, 2)):
            for i in range(n):
                blocks.append(WideBlock(cin, widths[g + 1], stride if i == 0 else 1, dropout))
                cin = widths[g + 1]
        self.blocks = nn.Sequential(*blocks)
        self.bn = _bn(cin)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(cin, ways)
        self.ways = ways
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.flatten(self.pool(self.act(self.bn(self.blocks(self.conv(x)))))))
