"""MobileFaceNet (Chen et al., "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face
Verification on Mobile Devices", 2018).

Layout for a 112x112 input (``t`` expansion factor, ``n`` blocks, ``s`` stride of the first block):

| module | operator | t | channels | n | s | output |
|---|---|---|---|---|---|---|
| ``body.stem`` | conv3x3, then depthwise conv3x3 | - | 64 | 1 | 2 | 56x56 |
| ``body.stage1`` | bottleneck | 2 | 64 | 5 | 2 | 28x28 |
| ``body.stage2`` | bottleneck | 4, then 2 | 128 | 7 | 2 | 14x14 |
| ``body.stage3`` | bottleneck | 4, then 2 | 128 | 3 | 2 | 7x7 |
| ``body.conv_sep`` | conv1x1 | - | 512 | 1 | 1 | 7x7 |
| ``gdc`` | linear global depthwise conv (7x7) | - | 512 | 1 | - | 1x1 |
| ``linear``, ``features`` | linear, BatchNorm1d | - | embedding | - | - | - |

The first block of each stage changes channels and stride; the others are residual. The paper's
table splits ``stage2`` and ``stage3`` into a t=4 block and t=2 blocks; they are merged here so
that each stage ends at one stride. The paper's embedding is 128-d; face recognition code based
on it (insightface's ``mbf``) commonly uses 512.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lvlrfr.models.iresnet import downsampled_size

MOBILEFACENET_WIDTHS = (64, 64, 128, 128, 512)
"""Output channels of stem, stage1, stage2, stage3 and conv_sep at ``width=1``."""

MOBILEFACENET_STRIDES = (2, 4, 8, 16)
"""Strides of the maps returned by ``MobileFaceNetBody.forward``."""


class ConvBNPReLU(nn.Sequential):
    """Convolution, BatchNorm2d and, unless ``linear``, PReLU. Padding defaults to ``kernel_size // 2``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        linear: bool = False,
        padding: int | None = None,
    ):
        padding = kernel_size // 2 if padding is None else padding
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if not linear:
            layers.append(nn.PReLU(out_channels))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise (stride), 1x1 linear projection.

    A shortcut is added when the block keeps the resolution and the channel count.
    """

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int = 1):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.block = nn.Sequential(
            ConvBNPReLU(in_channels, hidden, 1),
            ConvBNPReLU(hidden, hidden, 3, stride=stride, groups=hidden),
            ConvBNPReLU(hidden, out_channels, 1, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


def _stage(in_channels: int, out_channels: int, first_expansion: int, blocks: int) -> nn.Sequential:
    """Build a stage: one stride-2 bottleneck, then ``blocks`` residual bottlenecks with expansion 2."""
    layers = [Bottleneck(in_channels, out_channels, first_expansion, stride=2)]
    layers.extend(Bottleneck(out_channels, out_channels, 2) for _ in range(blocks))
    return nn.Sequential(*layers)


class MobileFaceNetBody(nn.Module):
    """MobileFaceNet without its embedding head: ``(B, 3, S, S)`` -> 4 maps at strides 2, 4, 8, 16.

    Args:
        width: multiplier of all channel counts; 1.0 is the paper's network.
        depths: residual blocks after the stride-2 block of stage1, stage2 and stage3 (paper: 4, 6, 2).
    """

    def __init__(self, width: float = 1.0, depths: Sequence[int] = (4, 6, 2)):
        super().__init__()
        if len(depths) != 3:
            raise ValueError(f"depths must give the residual block count of 3 stages, got {list(depths)}")
        c = [max(1, round(w * width)) for w in MOBILEFACENET_WIDTHS]
        self.feature_channels = [c[0], c[1], c[2], c[4]]
        self.feature_strides = list(MOBILEFACENET_STRIDES)

        self.stem = nn.Sequential(
            ConvBNPReLU(3, c[0], 3, stride=2),
            ConvBNPReLU(c[0], c[0], 3, groups=c[0]),
        )
        self.stage1 = _stage(c[0], c[1], 2, depths[0])
        self.stage2 = _stage(c[1], c[2], 4, depths[1])
        self.stage3 = _stage(c[2], c[3], 4, depths[2])
        self.conv_sep = ConvBNPReLU(c[3], c[4], 1)
        init_mobilefacenet_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the maps after stem, stage1, stage2 and conv_sep, at strides 2, 4, 8 and 16."""
        f1 = self.stem(x)
        f2 = self.stage1(f1)
        f3 = self.stage2(f2)
        f4 = self.conv_sep(self.stage3(f3))
        return [f1, f2, f3, f4]


def init_mobilefacenet_weights(module: nn.Module) -> None:
    """Initialise convolutions with Kaiming normal (fan-out) and batch norms with weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MobileFaceNet(nn.Module):
    """MobileFaceNet recognizer: ``(B, 3, S, S)`` normalised image -> ``(B, embedding_size)`` embedding.

    Args:
        embedding_size: size of the output embedding.
        input_size: side ``S`` of the square input in pixels; the last map is
            ``downsampled_size(S, 4)`` wide and sets the kernel of the global depthwise conv.
        width: multiplier of all channel counts; 1.0 is the paper's network.
        depths: residual blocks after the stride-2 block of stage1, stage2 and stage3 (paper: 4, 6, 2).
    """

    def __init__(
        self,
        embedding_size: int = 512,
        input_size: int = 112,
        width: float = 1.0,
        depths: Sequence[int] = (4, 6, 2),
    ):
        super().__init__()
        self.input_size = input_size
        self.last_map_size = downsampled_size(input_size, 4)
        self.body = MobileFaceNetBody(width, depths)
        channels = self.body.feature_channels[-1]
        # The GDC kernel equals the last map size (7 for 112), so its output is 1x1.
        self.gdc = ConvBNPReLU(channels, channels, self.last_map_size, groups=channels, linear=True, padding=0)
        self.linear = nn.Linear(channels, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        init_mobilefacenet_weights(self.gdc)
        init_mobilefacenet_weights(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed ``x`` of shape ``(B, 3, S, S)`` into ``(B, embedding_size)``, not L2-normalised."""
        x = self.body(x)[-1]
        x = torch.flatten(self.gdc(x), 1)
        return self.features(self.linear(x))
