"""A model zoo: public architectures written the way vision and NLP libraries write them.

Each entry of :data:`ZOO` is an architecture from its published structure -- ResNet, MobileNet
V2/V3, MnasNet, EfficientNet, RegNetY, GoogLeNet, Inception v3, ShuffleNet V2, DenseNet and a
transformer encoder -- in qalgebra's own code, with the habits of the libraries users take them
from: ``inplace=True`` activations (export keeps ``aten.relu_``), ``x += y`` residuals
(``aten.add_``), ``nn.Dropout`` heads, shared modules (one ``self.relu`` called three times),
squeeze-excitation (``adaptive_avg_pool2d -> conv -> act -> conv -> gate -> mul``), inception
branches with ``cat`` and pools, grouped and depthwise convs, channel shuffle
(``view -> transpose -> contiguous -> view``, ``chunk``), dense concatenation and
``torch.nn.TransformerEncoderLayer``.

Every entry builds at two sizes with the same structure: ``"full"`` (the published widths,
depths and input size, for ``bench/bench_models.py``) and ``"ci"`` (a few channels, one or two
blocks per stage, tiny inputs: quantized in about a second, for tests). Weights are seeded and
batch norms get seeded running statistics (so folding them changes the numbers); models are in
eval mode. Nothing is downloaded and nothing is cached on disk.

>>> sorted(ZOO)[:3]
['densenet121', 'efficientnet_b0', 'googlenet']
>>> model, (x,) = build("mnasnet1_0", size="ci", batch=2)
>>> tuple(x.shape), tuple(model(x).shape)
((2, 3, 32, 32), (2, 10))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SIZES", "ZOO", "Size", "ZooEntry", "build"]

Size = Literal["full", "ci"]
SIZES: tuple[Size, ...] = ("full", "ci")


@dataclass(frozen=True, slots=True)
class _Scale:
    """How a size shrinks an architecture: widths divided, depths capped, classes, input."""

    width: float
    max_depth: int
    classes: int
    image: int

    def c(self, channels: int, divisor: int = 1) -> int:
        """``channels`` scaled, at least 4 and a multiple of ``divisor``."""
        scaled = max(4, round(channels * self.width))
        return max(divisor, scaled // divisor * divisor)

    def n(self, depth: int) -> int:
        return max(1, min(depth, self.max_depth))


# --------------------------------------------------------------------------------------------
# Shared building blocks
# --------------------------------------------------------------------------------------------


def _conv_bn_act(
    cin: int,
    cout: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    act: Callable[..., nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """conv (no bias) -> batch norm -> activation(inplace=True), padding keeping the size."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor``, never more than 10% down."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class SqueezeExcitation(nn.Module):
    """``x * gate(fc2(act(fc1(avgpool(x)))))`` with 1x1 convs as the two fully connected layers."""

    def __init__(
        self,
        channels: int,
        squeezed: int,
        act: Callable[[], nn.Module] = nn.ReLU,
        gate: Callable[[], nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.act = act()
        self.gate = gate()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.gate(self.fc2(self.act(self.fc1(self.avgpool(x)))))
        return cast(Tensor, scale * x)


class StochasticDepth(nn.Module):
    """Drops a residual branch per sample in training; the identity in eval."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class _Classifier(nn.Module):
    """Global average pool, flatten, dropout, linear: the common head."""

    def __init__(self, channels: int, classes: int, dropout: float, inplace: bool = False):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout, inplace=inplace)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.fc(self.dropout(torch.flatten(self.avgpool(x), 1))))


# --------------------------------------------------------------------------------------------
# ResNet / ResNeXt
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convs, ``out += identity``, inplace ReLUs.

    torchvision calls one ``self.relu`` module twice per block; torchao 0.18's
    X86InductorQuantizer on torch 2.13 cannot quantize that (it groups nodes into partitions by
    module, and a conv -> relu partition with two relu outputs raises "Input partition has more
    than one output node"), so each call has its own module here, as in the other blocks.
    """

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return cast(Tensor, self.relu2(out))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (grouped for ResNeXt) -> 1x1, ``out += identity``, inplace ReLUs (one module
    per call: see :class:`BasicBlock`)."""

    def __init__(
        self,
        cin: int,
        inner: int,
        cout: int,
        stride: int,
        downsample: nn.Module | None,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return cast(Tensor, self.relu3(out))


class ResNet(nn.Module):
    """ResNet (basic blocks or bottlenecks) and ResNeXt (grouped bottlenecks)."""

    def __init__(
        self,
        depths: Sequence[int],
        s: _Scale,
        *,
        bottleneck: bool,
        groups: int = 1,
        width_per_group: int = 64,
    ) -> None:
        super().__init__()
        base = s.c(64)
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        expansion = 4 if bottleneck else 1
        cin, stages = base, []
        for i, depth in enumerate(depths):
            planes = base * 2**i
            cout = planes * expansion
            blocks: list[nn.Module] = []
            for j in range(s.n(depth)):
                stride = 2 if i > 0 and j == 0 else 1
                down = None
                if stride != 1 or cin != cout:
                    down = nn.Sequential(
                        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                    )
                if bottleneck:
                    inner = groups * max(1, planes * width_per_group // 64)
                    blocks.append(Bottleneck(cin, inner, cout, stride, down, groups))
                else:
                    blocks.append(BasicBlock(cin, planes, stride, down))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, s.classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return cast(Tensor, self.fc(torch.flatten(self.avgpool(x), 1)))


# --------------------------------------------------------------------------------------------
# MobileNet V2 / V3, MnasNet, EfficientNet
# --------------------------------------------------------------------------------------------


class InvertedResidualV2(nn.Module):
    """expand 1x1 -> depthwise 3x3 -> project 1x1 (ReLU6), ``x + block(x)`` when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_act(cin, hidden, 1, act=nn.ReLU6))
        layers += [
            _conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, x + self.conv(x) if self.use_residual else self.conv(x))


class MobileNetV2(nn.Module):
    #: (expansion, channels, repeats, stride) per stage.
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip

    def __init__(self, s: _Scale) -> None:
        super().__init__()
        cin = s.c(32, 8)
        last = s.c(1280, 8)
        layers: list[nn.Module] = [_conv_bn_act(3, cin, 3, 2, act=nn.ReLU6)]
        for t, c, n, stride in self.SETTINGS:
            cout = s.c(c, 8)
            for i in range(s.n(n)):
                layers.append(InvertedResidualV2(cin, cout, stride if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn_act(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, s.classes))

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return cast(Tensor, self.classifier(torch.flatten(x, 1)))


class InvertedResidualV3(nn.Module):
    """MobileNet V3 block: expand, depthwise, optional SE (hardsigmoid gate), project; ``+=``."""

    def __init__(
        self, cin: int, kernel: int, hidden: int, cout: int, se: bool, act: str, stride: int
    ) -> None:
        super().__init__()
        activation = nn.Hardswish if act == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(_conv_bn_act(cin, hidden, 1, act=activation))
        layers.append(_conv_bn_act(hidden, hidden, kernel, stride, groups=hidden, act=activation))
        if se:
            layers.append(
                SqueezeExcitation(hidden, _make_divisible(hidden // 4), gate=nn.Hardsigmoid)
            )
        layers.append(_conv_bn_act(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_residual:
            result += x
        return cast(Tensor, result)


class MobileNetV3Large(nn.Module):
    #: (kernel, expanded, out, squeeze-excitation, activation, stride) per block.
    SETTINGS = (
        (3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
        (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
        (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
        (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
        (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1),
    )  # fmt: skip

    def __init__(self, s: _Scale) -> None:
        super().__init__()
        cin = s.c(16, 8)
        layers: list[nn.Module] = [_conv_bn_act(3, cin, 3, 2, act=nn.Hardswish)]
        settings = self.SETTINGS if s.max_depth > 2 else self.SETTINGS[::2]
        for kernel, hidden, cout, se, act, stride in settings:
            cout, hidden = s.c(cout, 8), s.c(hidden, 8)
            layers.append(InvertedResidualV3(cin, kernel, hidden, cout, se, act, stride))
            cin = cout
        last = 6 * cin
        layers.append(_conv_bn_act(cin, last, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        head = s.c(1280, 8)
        self.classifier = nn.Sequential(
            nn.Linear(last, head),
            nn.Hardswish(inplace=True),
            nn.Dropout(0.2, inplace=True),
            nn.Linear(head, s.classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return cast(Tensor, self.classifier(torch.flatten(x, 1)))


class MnasBlock(nn.Module):
    """expand 1x1 -> depthwise k x k -> project 1x1 (ReLU), ``block(x) + x`` when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.layers = nn.Sequential(
            _conv_bn_act(cin, hidden, 1),
            _conv_bn_act(hidden, hidden, kernel, stride, groups=hidden),
            _conv_bn_act(hidden, cout, 1, act=None),
        )
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.layers(x) + x if self.use_residual else self.layers(x))


class MnasNet(nn.Module):
    #: (out, kernel, stride, expansion, repeats) per stack (MnasNet-B1, depth multiplier 1.0).
    STACKS = ((24, 3, 2, 3, 3), (40, 5, 2, 3, 3), (80, 5, 2, 6, 3), (96, 3, 1, 6, 2),
              (192, 5, 2, 6, 4), (320, 3, 1, 6, 1))  # fmt: skip

    def __init__(self, s: _Scale) -> None:
        super().__init__()
        c32, c16 = s.c(32, 8), s.c(16, 8)
        layers: list[nn.Module] = [
            _conv_bn_act(3, c32, 3, 2),
            _conv_bn_act(c32, c32, 3, groups=c32),
            _conv_bn_act(c32, c16, 1, act=None),
        ]
        cin = c16
        for out, kernel, stride, expand, repeats in self.STACKS:
            cout = s.c(out, 8)
            for i in range(s.n(repeats)):
                layers.append(MnasBlock(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        last = s.c(1280, 8)
        layers.append(_conv_bn_act(cin, last, 1))
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(last, s.classes))

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.classifier(self.layers(x).mean([2, 3])))


class MBConv(nn.Module):
    """EfficientNet block: expand, depthwise, SE (SiLU, sigmoid gate), project; ``+=``."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop: float
    ) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_act(cin, hidden, 1, act=nn.SiLU))
        layers += [
            _conv_bn_act(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU),
            SqueezeExcitation(hidden, max(1, cin // 4), act=lambda: nn.SiLU(inplace=True)),
            _conv_bn_act(hidden, cout, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(drop)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_residual:
            result = self.stochastic_depth(result)
            result += x
        return cast(Tensor, result)


class EfficientNetB0(nn.Module):
    #: (expansion, kernel, stride, out, layers) per stage.
    STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
              (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))  # fmt: skip

    def __init__(self, s: _Scale) -> None:
        super().__init__()
        cin = s.c(32, 8)
        layers: list[nn.Module] = [_conv_bn_act(3, cin, 3, 2, act=nn.SiLU)]
        total = sum(s.n(n) for *_, n in self.STAGES)
        k = 0
        for expand, kernel, stride, out, n in self.STAGES:
            cout = s.c(out, 8)
            for i in range(s.n(n)):
                drop = 0.2 * k / total
                layers.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand, drop))
                cin, k = cout, k + 1
        last = 4 * cin
        layers.append(_conv_bn_act(cin, last, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.head = _Classifier(last, s.classes, 0.2, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.head(self.features(x)))


# --------------------------------------------------------------------------------------------
# RegNetY
# --------------------------------------------------------------------------------------------


class RegNetBlock(nn.Module):
    """1x1 -> grouped 3x3 -> SE -> 1x1, ``shortcut(x) + f(x)``, then ReLU(inplace)."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int, se_ratio: float):
        super().__init__()
        groups = max(1, cout // group_width)
        self.proj = None
        if cin != cout or stride != 1:
            self.proj = _conv_bn_act(cin, cout, 1, stride, act=None)
        self.f = nn.Sequential(
            _conv_bn_act(cin, cout, 1),
            _conv_bn_act(cout, cout, 3, stride, groups=groups),
            SqueezeExcitation(cout, max(1, round(se_ratio * cin))),
            _conv_bn_act(cout, cout, 1, act=None),
        )
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return cast(Tensor, self.activation(shortcut + self.f(x)))


class RegNetY400MF(nn.Module):
    DEPTHS = (1, 3, 6, 6)
    WIDTHS = (48, 104, 208, 440)
    GROUP_WIDTH = 8

    def __init__(self, s: _Scale) -> None:
        super().__init__()
        cin = s.c(32, 8)
        self.stem = _conv_bn_act(3, cin, 3, 2)
        stages: list[nn.Module] = []
        for depth, width in zip(self.DEPTHS, self.WIDTHS, strict=True):
            cout = s.c(width, self.GROUP_WIDTH)
            blocks = []
            for i in range(s.n(depth)):
                blocks.append(RegNetBlock(cin, cout, 2 if i == 0 else 1, self.GROUP_WIDTH, 0.25))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.trunk = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, s.classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.trunk(self.stem(x))
        return cast(Tensor, self.fc(self.avgpool(x).flatten(start_dim=1)))


# --------------------------------------------------------------------------------------------
# GoogLeNet, Inception v3
# --------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ``F.relu(x, inplace=True)``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class GoogLeNetInception(nn.Module):
    """1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | maxpool(3, 1, ceil) -> 1x1, concatenated."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int):
        super().__init__()
        self.branch1 = BasicConv2d(cin, c1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, c3r, 1), BasicConv2d(c3r, c3, 3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, c5r, 1), BasicConv2d(c5r, c5, 3, padding=1))
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), BasicConv2d(cin, pool, 1)
        )
        self.out_channels = c1 + c3 + c5 + pool

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(branches, 1)


class GoogLeNet(nn.Module):
    #: (1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5" (a 3x3), pool projection) per module;
    #: an int is the kernel of a stride-2 max pool between groups.
    MODULES = (
        (64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), 3,
        (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64),
        (112, 144, 288, 32, 64, 64), (256, 160, 320, 32, 128, 128), 2,
        (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128),
    )  # fmt: skip

    def __init__(self, s: _Scale) -> None:
        super().__init__()
        c64, c192 = s.c(64), s.c(192)
        self.stem = nn.Sequential(
            BasicConv2d(3, c64, 7, 2, 3),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            BasicConv2d(c64, c64, 1),
            BasicConv2d(c64, c192, 3, padding=1),
            nn.MaxPool2d(3, 2, ceil_mode=True),
        )
        cin, blocks = c192, list[nn.Module]()
        for spec in self.MODULES:
            if isinstance(spec, int):
                blocks.append(nn.MaxPool2d(spec, 2, ceil_mode=True))
                continue
            module = GoogLeNetInception(cin, *(s.c(c) for c in spec))
            blocks.append(module)
            cin = module.out_channels
        self.inception = nn.Sequential(*blocks)
        self.head = _Classifier(cin, s.classes, 0.2)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.head(self.inception(self.stem(x))))


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool: int, s: _Scale) -> None:
        super().__init__()
        c48, c64, c96 = s.c(48), s.c(64), s.c(96)
        self.branch1x1 = BasicConv2d(cin, c64, 1)
        self.branch5x5 = nn.Sequential(
            BasicConv2d(cin, c48, 1), BasicConv2d(c48, c64, 5, padding=2)
        )
        self.branch3x3dbl = nn.Sequential(
            BasicConv2d(cin, c64, 1),
            BasicConv2d(c64, c96, 3, padding=1),
            BasicConv2d(c96, c96, 3, padding=1),
        )
        self.branch_pool = BasicConv2d(cin, pool, 1)
        self.out_channels = 2 * c64 + c96 + pool

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        outputs = [self.branch1x1(x), self.branch5x5(x), self.branch3x3dbl(x)]
        return torch.cat([*outputs, self.branch_pool(pooled)], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int, s: _Scale) -> None:
        super().__init__()
        c64, c96, c384 = s.c(64), s.c(96), s.c(384)
        self.branch3x3 = BasicConv2d(cin, c384, 3, stride=2)
        self.branch3x3dbl = nn.Sequential(
            BasicConv2d(cin, c64, 1),
            BasicConv2d(c64, c96, 3, padding=1),
            BasicConv2d(c96, c96, 3, stride=2),
        )
        self.out_channels = c384 + c96 + cin

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), self.branch3x3dbl(x), pooled], 1)


def _seven(cin: int, cout: int, horizontal: bool) -> BasicConv2d:
    """A 1x7 (``horizontal``) or 7x1 convolution keeping the spatial size."""
    if horizontal:
        return BasicConv2d(cin, cout, (1, 7), padding=(0, 3))
    return BasicConv2d(cin, cout, (7, 1), padding=(3, 0))


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int, s: _Scale) -> None:
        super().__init__()
        c192 = s.c(192)
        self.branch1x1 = BasicConv2d(cin, c192, 1)
        self.branch7x7 = nn.Sequential(
            BasicConv2d(cin, c7, 1), _seven(c7, c7, True), _seven(c7, c192, False)
        )
        self.branch7x7dbl = nn.Sequential(
            BasicConv2d(cin, c7, 1),
            _seven(c7, c7, False),
            _seven(c7, c7, True),
            _seven(c7, c7, False),
            _seven(c7, c192, True),
        )
        self.branch_pool = BasicConv2d(cin, c192, 1)
        self.out_channels = 4 * c192

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        outputs = [self.branch1x1(x), self.branch7x7(x), self.branch7x7dbl(x)]
        return torch.cat([*outputs, self.branch_pool(pooled)], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int, s: _Scale) -> None:
        super().__init__()
        c192, c320 = s.c(192), s.c(320)
        self.branch3x3 = nn.Sequential(BasicConv2d(cin, c192, 1), BasicConv2d(c192, c320, 3, 2))
        self.branch7x7x3 = nn.Sequential(
            BasicConv2d(cin, c192, 1),
            _seven(c192, c192, True),
            _seven(c192, c192, False),
            BasicConv2d(c192, c192, 3, 2),
        )
        self.out_channels = c320 + c192 + cin

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), self.branch7x7x3(x), pooled], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, s: _Scale) -> None:
        super().__init__()
        c192, c320, c384, c448 = s.c(192), s.c(320), s.c(384), s.c(448)
        self.branch1x1 = BasicConv2d(cin, c320, 1)
        self.branch3x3_1 = BasicConv2d(cin, c384, 1)
        self.branch3x3_2a = BasicConv2d(c384, c384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(c384, c384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, c448, 1)
        self.branch3x3dbl_2 = BasicConv2d(c448, c384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(c384, c384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(c384, c384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, c192, 1)
        self.out_channels = c320 + 4 * c384 + c192

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        dbl = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), b3, dbl, pooled], 1)


class InceptionV3(nn.Module):
    def __init__(self, s: _Scale) -> None:
        super().__init__()
        c32, c64, c80, c192 = s.c(32), s.c(64), s.c(80), s.c(192)
        self.stem = nn.Sequential(
            BasicConv2d(3, c32, 3, stride=2),
            BasicConv2d(c32, c32, 3),
            BasicConv2d(c32, c64, 3, padding=1),
            nn.MaxPool2d(3, 2),
            BasicConv2d(c64, c80, 1),
            BasicConv2d(c80, c192, 3),
            nn.MaxPool2d(3, 2),
        )
        blocks: list[nn.Module] = []
        cin = c192
        for make in (
            lambda c: InceptionA(c, s.c(32), s),
            lambda c: InceptionA(c, s.c(64), s),
            lambda c: InceptionA(c, s.c(64), s),
            lambda c: InceptionB(c, s),
            lambda c: InceptionC(c, s.c(128), s),
            lambda c: InceptionC(c, s.c(160), s),
            lambda c: InceptionC(c, s.c(160), s),
            lambda c: InceptionC(c, s.c(192), s),
            lambda c: InceptionD(c, s),
            lambda c: InceptionE(c, s),
            lambda c: InceptionE(c, s),
        ):
            block = make(cin)
            blocks.append(block)
            cin = block.out_channels
        self.mixed = nn.Sequential(*blocks)
        self.head = _Classifier(cin, s.classes, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.head(self.mixed(self.stem(x))))


# --------------------------------------------------------------------------------------------
# ShuffleNet V2, DenseNet
# --------------------------------------------------------------------------------------------


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` groups: view, transpose, contiguous, view."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch, -1, height, width)


class ShuffleUnit(nn.Module):
    """Split (stride 1) or duplicate (stride 2) the input, convolve a half, cat, shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        half = cout // 2
        self.stride = stride
        self.branch1 = nn.Sequential()
        if stride > 1:
            self.branch1 = nn.Sequential(
                _conv_bn_act(cin, cin, 3, stride, groups=cin, act=None),
                _conv_bn_act(cin, half, 1),
            )
        self.branch2 = nn.Sequential(
            _conv_bn_act(cin if stride > 1 else half, half, 1),
            _conv_bn_act(half, half, 3, stride, groups=half, act=None),
            _conv_bn_act(half, half, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    REPEATS = (4, 8, 4)
    CHANNELS = (24, 116, 232, 464, 1024)

    def __init__(self, s: _Scale) -> None:
        super().__init__()
        widths = [s.c(c, 4) for c in self.CHANNELS]
        self.conv1 = _conv_bn_act(3, widths[0], 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = widths[0], []
        for repeats, cout in zip(self.REPEATS, widths[1:4], strict=True):
            units = [ShuffleUnit(cin, cout, 2)]
            units += [ShuffleUnit(cout, cout, 1) for _ in range(s.n(repeats) - 1)]
            stages.append(nn.Sequential(*units))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.conv5 = _conv_bn_act(cin, widths[4], 1)
        self.fc = nn.Linear(widths[4], s.classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return cast(Tensor, self.fc(x.mean([2, 3])))


class DenseLayer(nn.Module):
    """Pre-activation bottleneck over the concatenation of every earlier feature map."""

    def __init__(self, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[Tensor]) -> Tensor:
        concatenated = torch.cat(features, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concatenated)))
        return cast(Tensor, self.conv2(self.relu2(self.norm2(bottleneck))))


class DenseBlock(nn.ModuleList):
    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(
        self, s: _Scale, blocks: Sequence[int] = (6, 12, 24, 16), growth: int = 32
    ) -> None:
        super().__init__()
        growth = s.c(growth)
        cin = 2 * growth
        layers: list[nn.Module] = [
            nn.Conv2d(3, cin, 7, 2, 3, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]
        for i, depth in enumerate(blocks):
            block = DenseBlock(DenseLayer(cin + j * growth, growth, 4) for j in range(s.n(depth)))
            layers.append(block)
            cin += s.n(depth) * growth
            if i != len(blocks) - 1:
                layers += [
                    nn.BatchNorm2d(cin),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(cin, cin // 2, 1, bias=False),
                    nn.AvgPool2d(2, 2),
                ]
                cin //= 2
        layers.append(nn.BatchNorm2d(cin))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, s.classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return cast(Tensor, self.classifier(out))


# --------------------------------------------------------------------------------------------
# Transformer encoder
# --------------------------------------------------------------------------------------------


class TransformerEncoder(nn.Module):
    """A BERT-style encoder over embeddings: ``nn.TransformerEncoderLayer`` (post-norm, GELU,
    dropout) stacked, then a pooled linear classifier."""

    def __init__(self, s: _Scale, layers: int = 6, width: int = 768, heads: int = 12) -> None:
        super().__init__()
        d = s.c(width, heads)
        layer = nn.TransformerEncoderLayer(
            d, heads, 4 * d, dropout=0.1, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, s.n(layers), enable_nested_tensor=False)
        self.pooler = nn.Linear(d, d)
        self.classifier = nn.Linear(d, s.classes)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.encoder(x)
        pooled = torch.tanh(self.pooler(hidden[:, 0]))
        return cast(Tensor, self.classifier(pooled))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_FULL = _Scale(width=1.0, max_depth=1000, classes=1000, image=224)
_CI = _Scale(width=1 / 8, max_depth=2, classes=10, image=32)


@dataclass(frozen=True, slots=True)
class ZooEntry:
    """One architecture: how to build it at a scale, and what structures it exercises."""

    name: str
    make: Callable[[_Scale], nn.Module]
    structures: str
    #: Input size at full scale, and at CI scale (None: the CI default).
    image: int = 224
    ci_image: int | None = None
    #: Transformer: (sequence length, width) of the embedding input at full scale.
    tokens: tuple[int, int] | None = None

    def scale(self, size: Size) -> _Scale:
        if size == "full":
            return _Scale(_FULL.width, _FULL.max_depth, _FULL.classes, self.image)
        return _Scale(_CI.width, _CI.max_depth, _CI.classes, self.ci_image or _CI.image)

    def inputs(self, size: Size, batch: int) -> tuple[Tensor, ...]:
        s = self.scale(size)
        gen = torch.Generator().manual_seed(1)
        if self.tokens is not None:
            seq, width = self.tokens
            shape = (batch, seq if size == "full" else 8, s.c(width, 12))
            return (torch.randn(shape, generator=gen),)
        return (torch.randn((batch, 3, s.image, s.image), generator=gen),)


def _seed_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Seeded, non-trivial batch-norm statistics and affine parameters (folding must matter)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            assert m.running_mean is not None and m.running_var is not None
            with torch.no_grad():
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))


def build(name: str, *, size: Size = "ci", batch: int = 1) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """A fresh, seeded, eval-mode ``(model, example inputs)`` of zoo entry ``name``."""
    entry = ZOO[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = entry.make(entry.scale(size))
        _seed_norms(model, torch.Generator().manual_seed(0))
    return model.eval(), entry.inputs(size, batch)


def _entries() -> dict[str, ZooEntry]:
    entries = [
        ZooEntry("resnet18", lambda s: ResNet((2, 2, 2, 2), s, bottleneck=False),
                 "shared inplace ReLU, `out += identity`, max_pool stem"),
        ZooEntry("resnet50", lambda s: ResNet((3, 4, 6, 3), s, bottleneck=True),
                 "bottlenecks, shared inplace ReLU, `+=` residuals"),
        ZooEntry("resnext50_32x4d",
                 lambda s: ResNet((3, 4, 6, 3), s, bottleneck=True, groups=round(32 * s.width),
                                  width_per_group=round(4 / s.width)),
                 "grouped 3x3 convs (32 groups of 4), `+=` residuals"),
        ZooEntry("mobilenet_v2", MobileNetV2,
                 "depthwise convs, inplace ReLU6 (hardtanh_), `x + conv(x)`, dropout head"),
        ZooEntry("mobilenet_v3_large", MobileNetV3Large,
                 "inplace hardswish_/relu_, SE with hardsigmoid, `+=`, inplace dropout"),
        ZooEntry("mnasnet1_0", MnasNet,
                 "inplace relu_ after every conv, depthwise, `mean([2, 3])` head"),
        ZooEntry("efficientnet_b0", EfficientNetB0,
                 "inplace silu_, SE with sigmoid, stochastic depth, `+=`, depthwise 5x5"),
        ZooEntry("regnet_y_400mf", RegNetY400MF,
                 "grouped convs (width 8), SE, `shortcut + f(x)` then inplace ReLU"),
        ZooEntry("googlenet", GoogLeNet,
                 "inception branches, cat, max_pool (ceil_mode), F.relu(inplace=True)"),
        ZooEntry("inception_v3", InceptionV3,
                 "branches with avg_pool / max_pool, 1x7 / 7x1 convs, nested cat",
                 image=299, ci_image=75),
        ZooEntry("shufflenet_v2_x1_0", ShuffleNetV2,
                 "channel shuffle (view / transpose / contiguous), chunk, cat, depthwise"),
        ZooEntry("densenet121", DenseNet,
                 "dense concatenation, pre-activation BN -> inplace ReLU -> conv, avg_pool"),
        ZooEntry("transformer_encoder", TransformerEncoder,
                 "nn.TransformerEncoderLayer x6 (768 wide, GELU, dropout), tanh pooler",
                 tokens=(128, 768)),
    ]  # fmt: skip
    return {e.name: e for e in entries}


#: Every architecture by name.
ZOO: Mapping[str, ZooEntry] = MappingProxyType(_entries())
