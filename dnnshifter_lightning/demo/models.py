"""Plain ``nn.Module`` architectures used by the demo, the paper's workloads, tests and benchmarks.

They are ordinary torchvision-style modules with no cleverness in ``forward``:

* :class:`DigitsCNN` is the embedded default, a VGG-style CNN for 8x8 digits.
* :func:`cifar_vgg16` is the CIFAR VGG-16 (with BN) that OpenLTH and DNNShifter use.
* :func:`cifar_resnet` builds the CIFAR ResNet-20/32/44/56 of He et al. (option-B shortcuts where
  the shape changes, so every residual add couples channels the way real models do).

Example::

    >>> import torch
    >>> from dnnshifter_lightning.demo.models import DigitsCNN
    >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["DigitsCNN", "CifarVGG", "cifar_vgg16", "CifarResNet", "cifar_resnet", "BasicBlock"]


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """VGG-style CNN for 1x8x8 digits: 6 conv layers (3 stages), global pooling, a linear classifier.

    Sized so its compute dominates per-request serving overhead: a few ms for a batch of 8 on one
    CPU core at the default width.

    Example::

        >>> import torch
        >>> net = DigitsCNN(width=4)                  # 4, 8 and 16 channels in the three stages
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> net.classifier
        Linear(in_features=16, out_features=10, bias=True)
        >>> sum(p.numel() for p in DigitsCNN().parameters())   # the default width 64
        1147722
    """

    def __init__(self, width: int = 64, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, w),
            *_conv_bn_relu(w, w),
            nn.MaxPool2d(2),  # 8 -> 4
            *_conv_bn_relu(w, 2 * w),
            *_conv_bn_relu(2 * w, 2 * w),
            nn.MaxPool2d(2),  # 4 -> 2
            *_conv_bn_relu(2 * w, 4 * w),
            *_conv_bn_relu(4 * w, 4 * w),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


VGG16_CFG: Sequence[int | str] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class CifarVGG(nn.Module):
    """CIFAR VGG with BN, as in OpenLTH (``cifar_vgg_16``): conv stages, global pool, one linear.

    ``cfg`` lists conv widths, with ``"M"`` for a 2x2 max pool.

    Example::

        >>> import torch
        >>> net = CifarVGG([8, "M", 16], num_classes=10)    # conv-bn-relu, pool, conv-bn-relu
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> net.classifier
        Linear(in_features=16, out_features=10, bias=True)
    """

    def __init__(self, cfg: Sequence[int | str] = VGG16_CFG, num_classes: int = 10, in_channels: int = 3,
                 width_mult: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = max(1, int(round(int(item) * width_mult)))
                layers += _conv_bn_relu(cin, cout)
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


def cifar_vgg16(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> CifarVGG:
    """CIFAR VGG-16 with BN (about 14.7M parameters at ``width_mult=1``).

    Example::

        >>> import torch
        >>> sum(p.numel() for p in cifar_vgg16().parameters())
        14724042
        >>> small = cifar_vgg16(width_mult=0.25)          # 16 ... 128 channels
        >>> small(torch.zeros(1, 3, 32, 32)).shape, small.classifier.in_features
        (torch.Size([1, 10]), 128)
    """
    return CifarVGG(VGG16_CFG, num_classes=num_classes, in_channels=in_channels, width_mult=width_mult)


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv + BN shortcut where the shape changes.

    Example::

        >>> import torch
        >>> block = BasicBlock(4, 8, stride=2)
        >>> block(torch.zeros(1, 4, 8, 8)).shape
        torch.Size([1, 8, 4, 4])
        >>> type(block.shortcut).__name__, type(BasicBlock(4, 4).shortcut).__name__
        ('Sequential', 'Identity')
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet (depth 6n+2) with three stages of width 16/32/64 times ``width_mult``.

    Example::

        >>> import torch
        >>> net = CifarResNet(depth=8)                    # n = 1 block per stage
        >>> len(net.layers), net.fc
        (3, Linear(in_features=64, out_features=10, bias=True))
        >>> net(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
        >>> CifarResNet(depth=21)
        Traceback (most recent call last):
            ...
        ValueError: CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got 21
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        widths = [max(1, int(round(w * width_mult))) for w in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for stage, w in enumerate(widths):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(cin, w, stride))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def cifar_resnet(depth: int = 20, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-``depth`` (20 and 56 are the paper's).

    Example::

        >>> import torch
        >>> sum(p.numel() for p in cifar_resnet(20).parameters())
        272474
        >>> half = cifar_resnet(20, width_mult=0.5)       # 8/16/32 channels, 9 blocks
        >>> len(half.layers), half(torch.zeros(1, 3, 32, 32)).shape
        (9, torch.Size([1, 10]))
    """
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, width_mult=width_mult)
