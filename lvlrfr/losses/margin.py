"""Margin-based softmax heads for face recognition: ArcFace and CosFace.

A head stores one weight vector per training identity and turns embeddings into scaled
cosine logits in which the target class is penalised by a margin. Cross entropy over these
logits is L_cls. Both heads follow insightface ``recognition/arcface_torch/losses.py``: the
ArcFace fallback past ``theta + m > pi`` is the one used there.

Usage::

    head = ArcFaceHead(embedding_size=512, num_classes=10_572)
    criterion = MarginLoss(head)
    loss = criterion(embeddings, labels)          # embeddings (B, 512), labels (B,) int64
    predicted = head.cosine(embeddings).argmax(1)  # accuracy is measured without the margin
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ArcFaceHead", "CosFaceHead", "MarginHead", "MarginLoss"]

# Cosines are clamped to [-1 + eps, 1 - eps] so that sqrt(1 - cos^2) and its gradient stay finite.
# 1 - 1e-7 still rounds to a float32 value below 1, because float32 spacing just below 1 is 6e-8.
_COSINE_EPS = 1e-7


class MarginHead(nn.Module):
    """Base class of the margin heads: class weights, cosine logits and label checks.

    Args:
        embedding_size: D, the size of the embeddings fed to the head.
        num_classes: C, the number of training identities.
        scale: s, the factor applied to every cosine logit (the radius of the hypersphere).

    Attributes:
        weight: ``(C, D)`` class centres. Rows are L2-normalised on use, not in place.
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: float) -> None:
        super().__init__()
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(
                f"embedding_size={embedding_size} and num_classes={num_classes} must both be "
                "positive; set them from the backbone's embedding size and the training set's "
                "identity count"
            )
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.scale = float(scale)
        # Same initialisation as arcface_torch (normal, std 0.01).
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, embedding_size)))

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Compute cos(theta) between each embedding and each class centre, without margin.

        Args:
            embeddings: ``(B, D)`` embeddings of any norm.

        Returns:
            ``(B, C)`` float32 cosines in [-1, 1].
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings have shape {tuple(embeddings.shape)}, expected (B, {self.embedding_size}); "
                "check that the head's embedding_size matches the backbone's output"
            )
        # Autocast would run F.linear in half precision, which rounds cosines near +-1 and so
        # distorts the margin. The cosines are computed in float32 with autocast off.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def validate_labels(self, labels: torch.Tensor, batch_size: int) -> None:
        """Raise ValueError unless ``labels`` is a ``(B,)`` integer tensor with values in [0, C)."""
        if labels.shape != (batch_size,):
            raise ValueError(
                f"labels have shape {tuple(labels.shape)}, expected ({batch_size},) to match the embeddings"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels have dtype {labels.dtype}, expected an integer dtype (int64 class indices)")
        # The check costs one device-to-host synchronisation, because positions are looked up only on failure.
        out_of_range = (labels < 0) | (labels >= self.num_classes)
        if not bool(out_of_range.any()):
            return
        unknown = (labels == -1).nonzero().flatten()
        if unknown.numel() > 0:
            raise ValueError(
                f"labels contain -1 (unknown identity) at batch positions {unknown.tolist()}; a margin head "
                "needs a class index for every sample, so drop unlabelled samples before the head"
            )
        invalid = out_of_range.nonzero().flatten()
        raise ValueError(
            f"labels {labels[invalid].tolist()} at batch positions {invalid.tolist()} are outside "
            f"[0, {self.num_classes}); set num_classes to the training set's identity count"
        )

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        """Apply the margin to the target-class cosines: ``(N,)`` -> ``(N,)``, before scaling."""
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Compute margin logits.

        Args:
            embeddings: ``(B, D)`` embeddings of any norm.
            labels: ``(B,)`` int64 class indices in [0, C). -1 (unknown identity) raises ValueError.

        Returns:
            ``(B, C)`` float32 logits: ``s * target_logit(cos)`` at the label, ``s * cos`` elsewhere.
        """
        cosine = self.cosine(embeddings)
        self.validate_labels(labels, cosine.shape[0])
        cosine = cosine.clamp(-1.0 + _COSINE_EPS, 1.0 - _COSINE_EPS)

        rows = torch.arange(cosine.shape[0], device=cosine.device)
        target = self.target_logit(cosine[rows, labels])
        # index_put is out of place, so the cosine tensor that autograd saved is not modified.
        logits = cosine.index_put((rows, labels), target)
        return logits * self.scale


class ArcFaceHead(MarginHead):
    """ArcFace head: additive angular margin, target logit ``s * cos(theta + m)``.

    Args:
        embedding_size: D.
        num_classes: C.
        scale: s (64 in ArcFace).
        margin: m in radians (0.5 in ArcFace).
        easy_margin: apply the margin only where cos(theta) > 0 and keep cos(theta) elsewhere,
            in place of the fallback described in ``target_logit``.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float = 0.5,
        easy_margin: bool = False,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale)
        if not 0.0 <= margin < math.pi / 2:
            raise ValueError(f"ArcFace margin={margin} rad is outside [0, pi/2); ArcFace uses 0.5")
        self.margin = float(margin)
        self.easy_margin = easy_margin
        self.cos_m = math.cos(margin)
        self.sin_m = math.sin(margin)
        # theta + m <= pi exactly when cos(theta) >= cos(pi - m).
        self.threshold = math.cos(math.pi - margin)
        self.fallback_penalty = margin * math.sin(margin)

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        # cosine in [-1 + eps, 1 - eps], theta in (0, pi), so sin(theta) = sqrt(1 - cos^2) in (0, 1].
        sine = torch.sqrt(1.0 - cosine * cosine)
        # cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m), in [-1, cos(m)] for theta + m in [m, pi].
        cos_theta_m = cosine * self.cos_m - sine * self.sin_m
        if self.easy_margin:
            # For theta in [0, pi/2) the margin applies. For theta >= pi/2 the target is the plain cosine.
            return torch.where(cosine > 0, cos_theta_m, cosine)
        # theta in [0, pi - m]: cos(theta + m), which decreases from cos(m) to -1 as theta grows.
        # theta in (pi - m, pi): cos(theta + m) would rise again and reward a worse angle, so the
        # target gets the CosFace-style penalty cos(theta) - m sin(m), which keeps decreasing with
        # theta. It is not continuous at theta = pi - m: the logit jumps from -1 to -cos(m) - m sin(m).
        return torch.where(cosine > self.threshold, cos_theta_m, cosine - self.fallback_penalty)


class CosFaceHead(MarginHead):
    """CosFace head: additive cosine margin, target logit ``s * (cos(theta) - m)``.

    Args:
        embedding_size: D.
        num_classes: C.
        scale: s (64 as in arcface_torch's CosFace).
        margin: m, subtracted from the target cosine (0.35 in CosFace).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float = 0.35,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale)
        if margin < 0.0:
            raise ValueError(f"CosFace margin={margin} is negative; CosFace uses 0.35")
        self.margin = float(margin)

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine - self.margin


class MarginLoss(nn.Module):
    """Cross entropy over the margin logits of a head (L_cls).

    Args:
        head: an ``ArcFaceHead`` or ``CosFaceHead``. Its weights are this module's parameters.
        label_smoothing: passed to ``torch.nn.functional.cross_entropy``.
    """

    def __init__(self, head: MarginHead, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.head = head
        self.label_smoothing = label_smoothing

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Compute the mean cross entropy: embeddings ``(B, D)``, labels ``(B,)`` -> scalar."""
        logits = self.head(embeddings, labels)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
