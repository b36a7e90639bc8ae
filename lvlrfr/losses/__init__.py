"""Losses of the three training stages, as plain ``nn.Module``s.

- ``MarginLoss`` with ``ArcFaceHead`` or ``CosFaceHead``: L_cls over training identities.
- ``FeatureRegressionLoss``: L_gen, student backbone stages regress diffusion encoder taps.
- ``EmbeddingDistillationLoss``: L_kd, 1 - cos between student (VLR) and teacher (HR) embeddings.
- ``RelationalContrastiveLoss``: L_rcd, cross-resolution relational contrastive distillation.
"""

from lvlrfr.losses.distillation import EmbeddingDistillationLoss, FeatureRegressionLoss, pair_taps_by_stride
from lvlrfr.losses.margin import ArcFaceHead, CosFaceHead, MarginHead, MarginLoss
from lvlrfr.losses.relational import RelationalContrastiveLoss, RelationModule

__all__ = [
    "ArcFaceHead",
    "CosFaceHead",
    "EmbeddingDistillationLoss",
    "FeatureRegressionLoss",
    "MarginHead",
    "MarginLoss",
    "RelationModule",
    "RelationalContrastiveLoss",
    "pair_taps_by_stride",
]
