"""The student network, split into a backbone (trained in stage 1) and an embedding head (stage 2).

Stage 1 trains the backbone to regress the diffusion teacher's encoder features from its feature
maps. Stage 2 freezes the backbone and trains the head against the HR recognizer. Every constructor
argument here is a plain type (str, int, float, list of int) so LightningCLI can set it from YAML.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lvlrfr.models.iresnet import init_iresnet_weights, make_layer
from lvlrfr.models.mobilefacenet import MobileFaceNetBody

TIMM_PREFIX = "timm:"
BACKBONE_ARCHITECTURES = ("iresnet", "mobilefacenet", "timm:<name>")
HEAD_KINDS = ("flatten", "gdc")


class _IResNetBody(nn.Module):
    """iResNet-style stem (conv3x3 stride 1, BN, PReLU) followed by one stride-2 stage per entry of ``widths``."""

    def __init__(self, depths: Sequence[int], widths: Sequence[int]):
        super().__init__()
        if len(depths) != len(widths) or not depths:
            raise ValueError(
                f"iresnet student needs one depth per width, got depths={list(depths)} and widths={list(widths)}"
            )
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-05)
        self.prelu = nn.PReLU(widths[0])
        stages = []
        in_channels = widths[0]
        for depth, channels in zip(depths, widths):
            stages.append(make_layer(in_channels, channels, depth, stride=2))
            in_channels = channels
        self.stages = nn.ModuleList(stages)
        self.feature_channels = list(widths)
        self.feature_strides = [2 ** (i + 1) for i in range(len(widths))]
        init_iresnet_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.prelu(self.bn1(self.conv1(x)))
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


class _TimmBody(nn.Module):
    """A timm model created with ``features_only=True`` and random weights."""

    def __init__(self, name: str, out_indices: Sequence[int] | None):
        super().__init__()
        import timm  # imported here because it takes about a second and only this architecture needs it

        kwargs = {} if out_indices is None else {"out_indices": tuple(out_indices)}
        try:
            self.model = timm.create_model(name, features_only=True, pretrained=False, in_chans=3, **kwargs)
        except RuntimeError as error:
            raise ValueError(
                f"timm cannot build {name!r} with features_only=True ({error}); "
                "choose a model listed by timm.list_models() that supports feature extraction"
            ) from error
        self.feature_channels = list(self.model.feature_info.channels())
        self.feature_strides = list(self.model.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))


class StudentBackbone(nn.Module):
    """Student feature extractor: ``(B, 3, S, S)`` image in [-1, 1] -> list of feature maps.

    Architectures (``arch``):

    - ``"iresnet"``: stem conv3x3 (stride 1), then one iResNet stage of IBasicBlocks per entry
      of ``widths``. Each stage halves the resolution, so the maps have strides 2, 4, 8, ...
      Defaults: ``depths=(2, 2, 2)``, ``widths=(32, 64, 128)``.
    - ``"mobilefacenet"``: MobileFaceNet up to its 1x1 conv before the embedding; four maps at
      strides 2, 4, 8, 16 with ``64, 64, 128, 512`` channels times ``width``. ``depths`` sets the
      residual blocks of its three bottleneck stages (default ``(4, 6, 2)``).
    - ``"timm:<name>"``: ``timm.create_model(name, features_only=True, pretrained=False)``;
      ``out_indices`` selects stages; channels and strides come from timm's ``feature_info``.

    A stride ``s`` map has side ``ceil(S / s)`` for the iResNet and MobileFaceNet stages (timm
    models may round differently). ``feature_shapes`` contains the measured ``(C, H, W)`` of each map
    at ``input_size``.

    Attributes:
        feature_channels: channels of each returned map.
        feature_strides: nominal stride of each returned map in input pixels.
        feature_shapes: ``(C, H, W)`` of each map for an ``input_size`` input.
    """

    def __init__(
        self,
        arch: str = "iresnet",
        input_size: int = 32,
        depths: Sequence[int] | None = None,
        widths: Sequence[int] | None = None,
        width: float = 1.0,
        out_indices: Sequence[int] | None = None,
    ):
        super().__init__()
        self.arch = arch
        self.input_size = input_size
        if arch == "iresnet":
            self.body = _IResNetBody(depths or (2, 2, 2), widths or (32, 64, 128))
        elif arch == "mobilefacenet":
            self.body = MobileFaceNetBody(width=width, depths=depths or (4, 6, 2))
        elif arch.startswith(TIMM_PREFIX):
            self.body = _TimmBody(arch[len(TIMM_PREFIX) :], out_indices)
        else:
            raise ValueError(f"unknown student backbone {arch!r}; choose one of {', '.join(BACKBONE_ARCHITECTURES)}")
        self.feature_channels: list[int] = self.body.feature_channels
        self.feature_strides: list[int] = self.body.feature_strides
        self.feature_shapes = self._measure_feature_shapes(input_size)

    def _measure_feature_shapes(self, input_size: int) -> list[tuple[int, int, int]]:
        # One dummy forward in eval mode, so BatchNorm neither needs two samples nor updates its statistics.
        was_training = self.training
        self.eval()
        with torch.no_grad():
            maps = self.body(torch.zeros(1, 3, input_size, input_size))
        self.train(was_training)
        return [tuple(m.shape[1:]) for m in maps]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the feature map ``(B, C_i, H_i, W_i)`` of each stage for ``x`` of shape ``(B, 3, S, S)``."""
        return self.body(x)


class StudentHead(nn.Module):
    """Embedding head: last backbone map ``(B, C, H, W)`` -> ``(B, embedding_size)``, not L2-normalised.

    Kinds:

    - ``"flatten"`` (arcface_torch's iResNet output): BatchNorm2d, dropout, flatten, linear,
      BatchNorm1d. Its linear layer has ``C * H * W`` inputs, so the map size is fixed.
    - ``"gdc"`` (MobileFaceNet's output): a linear depthwise conv with an ``H x W`` kernel (global
      depthwise conv), BatchNorm2d, dropout, flatten, linear without bias, BatchNorm1d.

    Args:
        in_channels: channels ``C`` of the last backbone map.
        in_height: height ``H`` of the last backbone map.
        in_width: width ``W`` of the last backbone map.
        embedding_size: size of the output embedding.
        kind: ``"flatten"`` or ``"gdc"``.
        dropout: dropout probability before the linear layer.
    """

    def __init__(
        self,
        in_channels: int,
        in_height: int,
        in_width: int,
        embedding_size: int = 512,
        kind: str = "flatten",
        dropout: float = 0.0,
    ):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown student head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
        self.kind = kind
        self.in_shape = (in_channels, in_height, in_width)
        if kind == "flatten":
            self.bn2 = nn.BatchNorm2d(in_channels, eps=1e-05)
            self.dropout = nn.Dropout(p=dropout)
            self.fc = nn.Linear(in_channels * in_height * in_width, embedding_size)
        else:
            self.gdc = nn.Conv2d(in_channels, in_channels, (in_height, in_width), groups=in_channels, bias=False)
            self.bn2 = nn.BatchNorm2d(in_channels, eps=1e-05)
            self.dropout = nn.Dropout(p=dropout)
            self.fc = nn.Linear(in_channels, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-05)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Embed the last backbone map ``(B, C, H, W)`` into ``(B, embedding_size)``."""
        if tuple(feature_map.shape[1:]) != self.in_shape:
            raise ValueError(
                f"student head was built for maps of shape {self.in_shape} (C, H, W) "
                f"but received {tuple(feature_map.shape[1:])}; build the head for the backbone's input_size"
            )
        x = feature_map
        if self.kind == "gdc":
            x = self.gdc(x)
        x = self.bn2(x)
        x = self.dropout(torch.flatten(x, 1))
        return self.features(self.fc(x))


class Student(nn.Module):
    """Backbone and head as one recognizer: ``(B, 3, S, S)`` in [-1, 1] -> ``(B, embedding_size)``."""

    def __init__(self, backbone: StudentBackbone, head: StudentHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[-1])


def build_student(
    arch: str,
    input_size: int,
    embedding_size: int,
    depths: Sequence[int] | None = None,
    widths: Sequence[int] | None = None,
    width: float = 1.0,
    out_indices: Sequence[int] | None = None,
    head: str = "flatten",
    dropout: float = 0.0,
) -> tuple[StudentBackbone, StudentHead]:
    """Build a student backbone for ``input_size`` inputs and a head sized to its last map.

    ``arch``, ``depths``, ``widths``, ``width`` and ``out_indices`` go to ``StudentBackbone``;
    ``head`` (the kind) and ``dropout`` to ``StudentHead``.
    """
    backbone = StudentBackbone(arch, input_size, depths=depths, widths=widths, width=width, out_indices=out_indices)
    channels, height, map_width = backbone.feature_shapes[-1]
    student_head = StudentHead(channels, height, map_width, embedding_size, kind=head, dropout=dropout)
    return backbone, student_head
