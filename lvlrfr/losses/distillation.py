"""Feature regression (L_gen) and embedding alignment (L_kd) between a student and its teachers.

``FeatureRegressionLoss`` is the stage 1 loss: the student backbone's stage outputs regress,
through 1x1 convolution adapters, the encoder feature maps (taps) of the diffusion
super-resolution teacher. ``EmbeddingDistillationLoss`` is the stage 2 alignment of the student
embedding on the very-low-resolution face with the recognizer's embedding on the
high-resolution face. Teacher tensors never receive gradients from these losses.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EmbeddingDistillationLoss", "FeatureRegressionLoss", "pair_taps_by_stride"]

logger = logging.getLogger(__name__)


def pair_taps_by_stride(
    student_strides: Sequence[float],
    teacher_shapes: Mapping[str, tuple[int, int, int]],
    teacher_input_size: int,
) -> dict[str, int]:
    """Pair each teacher tap with the student stage of the closest spatial stride.

    A tap of height H on a teacher input of ``teacher_input_size`` pixels has stride
    ``teacher_input_size / H``. Strides are compared on a log2 scale, so a stride of 4 is as far
    from 2 as from 8. On a tie the earlier (higher-resolution) student stage wins. Several taps
    may share one student stage, and a student stage may be left unpaired.

    Args:
        student_strides: down-sampling factor of each student stage relative to the student
            input, in stage order (timm's ``feature_info.reduction()``).
        teacher_shapes: ``{tap name: (C, H, W)}`` of the teacher feature maps.
        teacher_input_size: side of the teacher's input image, in pixels.

    Returns:
        ``{tap name: student stage index}``.
    """
    if not student_strides:
        raise ValueError("student_strides is empty; give one stride per student stage")
    if any(stride <= 0 for stride in student_strides):
        raise ValueError(f"student_strides={list(student_strides)} must all be positive")
    if teacher_input_size < 1:
        raise ValueError(f"teacher_input_size={teacher_input_size} must be a positive number of pixels")

    student_log_strides = [math.log2(stride) for stride in student_strides]
    pairing = {}
    for name, (_, height, _) in teacher_shapes.items():
        teacher_log_stride = math.log2(teacher_input_size / height)
        distances = [abs(log_stride - teacher_log_stride) for log_stride in student_log_strides]
        # min() returns the first of equal distances, which is the earlier stage.
        pairing[name] = min(range(len(distances)), key=distances.__getitem__)
    return pairing


class FeatureRegressionLoss(nn.Module):
    """L_gen: mean over teacher taps of the MSE between an adapted student map and the tap.

    For each tap, the paired student stage output ``(B, C_s, H_s, W_s)`` goes through its own
    1x1 convolution (``C_s -> C_t``, with bias). When ``(H_s, W_s)`` differs from the tap's
    ``(H_t, W_t)``, the adapted map is resized to the tap's size by bilinear interpolation
    (``align_corners=False``, no antialiasing). The loss of a tap is the MSE averaged over
    ``B * C_t * H_t * W_t`` elements, and L_gen is the unweighted mean of the tap losses.

    The pairing of taps with student stages is either given as ``pairing`` or derived by
    ``pair_taps_by_stride`` from ``student_strides`` and ``teacher_input_size``. Every tap in
    ``teacher_shapes`` must be paired. Extra entries in the teacher's output at forward time are
    ignored.

    Args:
        student_channels: channels of each student stage output, in stage order.
        teacher_shapes: ``{tap name: (C, H, W)}`` of the teacher taps to regress.
        pairing: ``{tap name: student stage index}``. Overrides the automatic pairing.
        student_strides: stride of each student stage, for the automatic pairing.
        teacher_input_size: side of the teacher input in pixels, for the automatic pairing.
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_shapes: Mapping[str, tuple[int, int, int]],
        pairing: Mapping[str, int] | None = None,
        student_strides: Sequence[float] | None = None,
        teacher_input_size: int | None = None,
    ) -> None:
        super().__init__()
        if not student_channels:
            raise ValueError("student_channels is empty; give the channel count of each student stage")
        if not teacher_shapes:
            raise ValueError("teacher_shapes is empty; give the (C, H, W) of at least one teacher tap")
        for name, shape in teacher_shapes.items():
            if len(shape) != 3:
                raise ValueError(f"teacher tap {name!r} has shape {tuple(shape)}, expected (C, H, W)")

        if pairing is None:
            if student_strides is None or teacher_input_size is None:
                raise ValueError(
                    "FeatureRegressionLoss needs either pairing={tap name: student stage index} or both "
                    "student_strides and teacher_input_size to pair taps by stride"
                )
            if len(student_strides) != len(student_channels):
                raise ValueError(
                    f"student_strides has {len(student_strides)} entries but student_channels has "
                    f"{len(student_channels)}; give one stride per student stage"
                )
            pairing = pair_taps_by_stride(student_strides, teacher_shapes, teacher_input_size)
        self._validate_pairing(pairing, teacher_shapes, len(student_channels))

        self.student_channels = [int(channels) for channels in student_channels]
        self.teacher_shapes = {name: tuple(int(size) for size in shape) for name, shape in teacher_shapes.items()}
        self.tap_names = list(teacher_shapes)
        self.pairing = {name: int(pairing[name]) for name in self.tap_names}
        # A ModuleList in tap order, not a ModuleDict, because tap names may contain dots.
        self.adapters = nn.ModuleList(
            nn.Conv2d(self.student_channels[self.pairing[name]], self.teacher_shapes[name][0], kernel_size=1)
            for name in self.tap_names
        )
        for name in self.tap_names:
            logger.info(
                "Feature regression: teacher tap %s %s <- student stage %d (%d channels)",
                name,
                self.teacher_shapes[name],
                self.pairing[name],
                self.student_channels[self.pairing[name]],
            )

    @staticmethod
    def _validate_pairing(
        pairing: Mapping[str, int], teacher_shapes: Mapping[str, tuple[int, int, int]], num_stages: int
    ) -> None:
        missing = [name for name in teacher_shapes if name not in pairing]
        unknown = [name for name in pairing if name not in teacher_shapes]
        if missing or unknown:
            raise ValueError(
                f"the pairing of teacher taps with student stages is invalid: taps without a student stage: "
                f"{missing}; pairing names that are not teacher taps: {unknown}. Teacher taps are "
                f"{list(teacher_shapes)}; map each of them to a student stage index in [0, {num_stages})"
            )
        out_of_range = {name: stage for name, stage in pairing.items() if not 0 <= stage < num_stages}
        if out_of_range:
            raise ValueError(
                f"the pairing maps taps to student stages {out_of_range}, but the student has {num_stages} "
                f"stages; use stage indices in [0, {num_stages})"
            )

    def forward(
        self, student_features: Sequence[torch.Tensor], teacher_taps: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute L_gen.

        Args:
            student_features: one ``(B, C_s, H_s, W_s)`` map per student stage, in stage order.
            teacher_taps: ``{tap name: (B, C_t, H_t, W_t)}``. It must contain every tap this loss
                was built for.

        Returns:
            ``(loss, per_tap)``: the scalar float32 L_gen and ``{tap name: scalar MSE}``, both
            attached to the graph.
        """
        if len(student_features) != len(self.student_channels):
            raise ValueError(
                f"got {len(student_features)} student feature maps, expected {len(self.student_channels)} "
                f"(one per stage, channels {self.student_channels})"
            )
        missing = [name for name in self.tap_names if name not in teacher_taps]
        if missing:
            raise ValueError(
                f"teacher output lacks taps {missing}; it contains {list(teacher_taps)}. Build the teacher "
                "with the same tap names as this loss"
            )

        per_tap = {}
        for name, adapter in zip(self.tap_names, self.adapters):
            student = student_features[self.pairing[name]]
            teacher = teacher_taps[name]
            self._check_shapes(name, student, teacher)

            adapted = adapter(student)
            if adapted.shape[-2:] != teacher.shape[-2:]:
                adapted = F.interpolate(adapted, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
            per_tap[name] = F.mse_loss(adapted.float(), teacher.detach().float())

        loss = torch.stack(list(per_tap.values())).mean()
        return loss, per_tap

    def _check_shapes(self, name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
        stage = self.pairing[name]
        expected_channels = self.student_channels[stage]
        if student.ndim != 4 or student.shape[1] != expected_channels:
            raise ValueError(
                f"student stage {stage} output has shape {tuple(student.shape)}, expected "
                f"(B, {expected_channels}, H, W); check student_channels against the backbone"
            )
        if tuple(teacher.shape[1:]) != self.teacher_shapes[name]:
            raise ValueError(
                f"teacher tap {name!r} has shape {tuple(teacher.shape)}, but this loss was built for "
                f"(B, *{self.teacher_shapes[name]}); build the loss from the teacher's tap shapes at its input size"
            )
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(
                f"student stage {stage} has batch size {student.shape[0]} but teacher tap {name!r} has "
                f"{teacher.shape[0]}; feed both models the same batch"
            )


class EmbeddingDistillationLoss(nn.Module):
    """L_kd: mean over the batch of ``1 - cos(P s, t)``.

    ``s`` is the student embedding on the very-low-resolution face and ``t`` the teacher
    embedding on the high-resolution face. ``P`` is a bias-free linear projection from the
    student dimension to the teacher dimension, and the identity when the dimensions are equal.
    The loss is in [0, 2]: 0 for parallel, 1 for orthogonal and 2 for opposite embeddings.

    Args:
        student_dim: D_s.
        teacher_dim: D_t.

    Attributes:
        projection: ``nn.Linear(D_s, D_t, bias=False)`` or ``nn.Identity``. Stage 2 also uses it to
            bring the student into the teacher space for ``RelationalContrastiveLoss``.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        if student_dim < 1 or teacher_dim < 1:
            raise ValueError(f"student_dim={student_dim} and teacher_dim={teacher_dim} must both be positive")
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        if student_dim == teacher_dim:
            self.projection: nn.Module = nn.Identity()
        else:
            self.projection = nn.Linear(student_dim, teacher_dim, bias=False)

    def project(self, student: torch.Tensor) -> torch.Tensor:
        """Map student embeddings ``(B, D_s)`` to the teacher dimension ``(B, D_t)``."""
        if student.ndim != 2 or student.shape[1] != self.student_dim:
            raise ValueError(
                f"student embeddings have shape {tuple(student.shape)}, expected (B, {self.student_dim})"
            )
        return self.projection(student)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Compute L_kd from student ``(B, D_s)`` and teacher ``(B, D_t)`` embeddings: a float32 scalar."""
        projected = self.project(student)
        if teacher.ndim != 2 or teacher.shape != projected.shape:
            raise ValueError(
                f"teacher embeddings have shape {tuple(teacher.shape)}, expected "
                f"({projected.shape[0]}, {self.teacher_dim}) to match the student batch"
            )
        cosine = F.cosine_similarity(projected.float(), teacher.detach().float(), dim=1)
        return (1.0 - cosine).mean()
