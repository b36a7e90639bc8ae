"""Network definitions: iResNet (arcface_torch key layout), MobileFaceNet and the student backbone/head."""

from __future__ import annotations

from torch import nn

from lvlrfr.models.iresnet import IRESNET_LAYERS, IBasicBlock, IResNet, iresnet, iresnet18, iresnet34, iresnet50
from lvlrfr.models.iresnet import iresnet100, iresnet200
from lvlrfr.models.mobilefacenet import MobileFaceNet, MobileFaceNetBody
from lvlrfr.models.student import Student, StudentBackbone, StudentHead, build_student

RECOGNIZER_ARCHITECTURES = (*IRESNET_LAYERS, "mobilefacenet")
"""Names accepted by ``build_recognizer_network``."""


def build_recognizer_network(architecture: str, input_size: int, embedding_size: int, **kwargs) -> nn.Module:
    """Build a randomly initialised recognizer ``(B, 3, S, S)`` -> ``(B, embedding_size)`` by name.

    ``architecture`` is a key of ``IRESNET_LAYERS`` (``"iresnet50"``, ...) or ``"mobilefacenet"``.
    ``kwargs`` go to ``IResNet`` (``width``, ``dropout``) or ``MobileFaceNet`` (``width``, ``depths``).
    """
    if architecture in IRESNET_LAYERS:
        return iresnet(architecture, num_features=embedding_size, input_size=input_size, **kwargs)
    if architecture == "mobilefacenet":
        return MobileFaceNet(embedding_size=embedding_size, input_size=input_size, **kwargs)
    raise ValueError(
        f"unknown recognizer architecture {architecture!r}; choose one of {', '.join(RECOGNIZER_ARCHITECTURES)}"
    )


__all__ = [
    "IRESNET_LAYERS",
    "RECOGNIZER_ARCHITECTURES",
    "IBasicBlock",
    "IResNet",
    "MobileFaceNet",
    "MobileFaceNetBody",
    "Student",
    "StudentBackbone",
    "StudentHead",
    "build_recognizer_network",
    "build_student",
    "iresnet",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "iresnet200",
]
