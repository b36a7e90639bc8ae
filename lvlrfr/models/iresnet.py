"""iResNet face recognizers with the module layout of insightface's arcface_torch.

The modules and their attribute names follow ``recognition/arcface_torch/backbones/iresnet.py`` of
insightface (Duta et al., "Improved Residual Networks", 2020, as used for ArcFace), so a
``backbone.pth`` saved by arcface_torch loads with ``load_state_dict`` without renaming keys:
``conv1``, ``bn1``, ``prelu``, ``layer1.0.bn1`` ... ``layer4.*``, ``bn2``, ``fc``, ``features``.

Two parameters extend the original: ``width`` scales every channel count (small CPU test nets),
and ``input_size`` sets the side of the input, which fixes the input size of ``fc``
(112 -> 7x7 after the four stride-2 stages).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}
"""Residual blocks per stage of each named iResNet depth (arcface_torch's constructors)."""

IRESNET_WIDTHS = (64, 128, 256, 512)
"""Output channels of the four stages at ``width=1``."""


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def downsampled_size(size: int, num_stride2: int) -> int:
    """Return the side of a map after ``num_stride2`` 3x3 convolutions of stride 2 and padding 1.

    Each such convolution maps ``n`` to ``ceil(n / 2)``: 112 -> 56 -> 28 -> 14 -> 7.
    """
    for _ in range(num_stride2):
        size = math.ceil(size / 2)
    return size


class IBasicBlock(nn.Module):
    """Pre-activation residual block BN-conv3x3-BN-PReLU-conv3x3(stride)-BN, plus ``downsample``.

    The stride sits on the second convolution, as in arcface_torch.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        return out + identity


def make_layer(inplanes: int, planes: int, blocks: int, stride: int = 2) -> nn.Sequential:
    """Build one stage of ``blocks`` IBasicBlocks whose first block changes channels and stride.

    The downsample branch is conv1x1(stride) + BN, stored as ``downsample.0`` and ``downsample.1``.
    """
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes, eps=1e-05))
    layers = [IBasicBlock(inplanes, planes, stride, downsample)]
    layers.extend(IBasicBlock(planes, planes) for _ in range(1, blocks))
    return nn.Sequential(*layers)


def init_iresnet_weights(module: nn.Module) -> None:
    """Initialise convolutions with N(0, 0.1) and batch norms with weight 1, bias 0 (arcface_torch's choice)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0, 0.1)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class IResNet(nn.Module):
    """iResNet face recognizer: ``(B, 3, S, S)`` normalised image -> ``(B, num_features)`` embedding.

    Args:
        layers: residual blocks in each of the four stages, e.g. ``(3, 4, 14, 3)`` for iResNet-50.
        num_features: embedding size.
        input_size: side ``S`` of the square input in pixels; the last map is
            ``downsampled_size(S, 4)`` pixels wide (7 for 112).
        width: multiplier of the stage widths 64/128/256/512; 1.0 is the original network.
        dropout: dropout probability before ``fc``.
        zero_init_residual: start every block's ``bn2`` at weight 0, as arcface_torch optionally does.
    """

    def __init__(
        self,
        layers: Sequence[int],
        num_features: int = 512,
        input_size: int = 112,
        width: float = 1.0,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give the block count of 4 stages, got {list(layers)}")
        widths = [max(1, round(w * width)) for w in IRESNET_WIDTHS]
        self.input_size = input_size
        self.last_map_size = downsampled_size(input_size, 4)

        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-05)
        self.prelu = nn.PReLU(widths[0])
        self.layer1 = make_layer(widths[0], widths[0], layers[0], stride=2)
        self.layer2 = make_layer(widths[0], widths[1], layers[1], stride=2)
        self.layer3 = make_layer(widths[1], widths[2], layers[2], stride=2)
        self.layer4 = make_layer(widths[2], widths[3], layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(widths[3] * self.last_map_size**2, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)

        init_iresnet_weights(self)
        # arcface_torch fixes the scale of the embedding BN at 1 and trains only its bias.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed ``x`` of shape ``(B, 3, S, S)`` into ``(B, num_features)``, not L2-normalised."""
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.prelu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.bn2(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        x = self.fc(x)
        return self.features(x)


def describe_iresnet_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """Read depth, width, last map size and embedding size from an arcface_torch iResNet state dict.

    Returns None when the keys are not those of an ``IResNet``. Otherwise returns ``name`` (a key
    of ``IRESNET_LAYERS``, or ``"iresnet(a, b, c, d)"`` for other block counts), ``layers``,
    ``width`` (multiplier of 64/128/256/512), ``last_map_size`` (side of the map before ``fc``)
    and ``num_features`` (embedding size).
    """
    required = ("conv1.weight", "bn2.weight", "fc.weight", "features.weight")
    if any(key not in state_dict for key in required):
        return None
    layers = []
    for stage in range(1, 5):
        prefix = f"layer{stage}."
        blocks = {key[len(prefix) :].split(".", 1)[0] for key in state_dict if key.startswith(prefix)}
        layers.append(len(blocks))
    names = [name for name, counts in IRESNET_LAYERS.items() if list(counts) == layers]
    last_channels = state_dict["bn2.weight"].shape[0]
    fc_inputs = state_dict["fc.weight"].shape[1]
    return {
        "name": names[0] if names else f"iresnet({', '.join(map(str, layers))})",
        "layers": layers,
        "width": state_dict["conv1.weight"].shape[0] / IRESNET_WIDTHS[0],
        "last_map_size": math.isqrt(fc_inputs // last_channels),
        "num_features": state_dict["fc.weight"].shape[0],
    }


def iresnet(name: str, **kwargs) -> IResNet:
    """Build the named iResNet depth (a key of ``IRESNET_LAYERS``) with ``IResNet`` keyword arguments."""
    if name not in IRESNET_LAYERS:
        raise ValueError(f"unknown iResNet depth {name!r}; choose one of {sorted(IRESNET_LAYERS)}")
    return IResNet(IRESNET_LAYERS[name], **kwargs)


def iresnet18(**kwargs) -> IResNet:
    return iresnet("iresnet18", **kwargs)


def iresnet34(**kwargs) -> IResNet:
    return iresnet("iresnet34", **kwargs)


def iresnet50(**kwargs) -> IResNet:
    return iresnet("iresnet50", **kwargs)


def iresnet100(**kwargs) -> IResNet:
    return iresnet("iresnet100", **kwargs)


def iresnet200(**kwargs) -> IResNet:
    return iresnet("iresnet200", **kwargs)
