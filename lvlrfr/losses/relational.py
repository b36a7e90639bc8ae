"""Cross-resolution relational contrastive distillation (L_rcd).

A relation module maps the difference of two embeddings to a unit relation vector. For a
pair (i, j) of distinct samples in a batch, the teacher-teacher relation compares the two
high-resolution (HR) teacher embeddings, and the teacher-student relation compares the HR
teacher embedding of i with the very-low-resolution (VLR) student embedding of j. The student
learns to make each teacher-student relation match the teacher-teacher relation of the same
pair rather than those of the other pairs (InfoNCE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RelationModule", "RelationalContrastiveLoss"]


class RelationModule(nn.Module):
    """Map an embedding difference ``(..., D)`` to an L2-normalised relation vector ``(..., R)``.

    Two linear layers with a ReLU between them: ``D -> hidden_dim -> R``.
    """

    def __init__(self, embedding_dim: int, hidden_dim: int, relation_dim: int) -> None:
        super().__init__()
        if min(embedding_dim, hidden_dim, relation_dim) < 1:
            raise ValueError(
                f"embedding_dim={embedding_dim}, hidden_dim={hidden_dim} and relation_dim={relation_dim} "
                "must all be positive"
            )
        self.layers = nn.Sequential(
            nn.Linear(embedding_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, relation_dim),
        )

    def forward(self, difference: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(difference), dim=-1)


class RelationalContrastiveLoss(nn.Module):
    """L_rcd: InfoNCE between teacher-student and teacher-teacher relations of the same pairs.

    Given teacher embeddings ``t`` (HR faces) and student embeddings ``s`` (VLR faces of the
    same samples), both ``(B, D)``, the loss takes the ordered pairs (i, j) with i != j, which
    are ``B * (B - 1)`` pairs, or a random subset of ``max_pairs`` of them. With one relation
    module R shared by both kinds of relation:

    - teacher-teacher relation ``r_tt(i, j) = R(t_i - t_j)``;
    - teacher-student relation ``r_ts(i, j) = R(t_i - s_j)``, the cross-resolution relation:
      sample i seen by the teacher in HR against sample j seen by the student in VLR.

    For the query ``r_ts(i, j)``, the positive is ``r_tt(i, j)`` and the negatives are
    ``r_tt(k, l)`` of every other selected pair (k, l). The logits are cosine similarities
    divided by the temperature, and the loss is the cross entropy averaged over the selected
    pairs. It is minimal when ``s_j = t_j`` for every j. Teacher embeddings are detached, so the
    gradient reaches the student and the relation module only.

    Args:
        embedding_dim: D. The caller projects the student into the teacher dimension first
            (``EmbeddingDistillationLoss.project``).
        hidden_dim: width of the relation module's hidden layer.
        relation_dim: R, the size of the relation vectors.
        temperature: tau, divides the cosine logits.
        max_pairs: upper bound on the number of pairs per batch. The P x P logit matrix costs
            O(P^2) memory: for B = 128 the 16256 pairs need about 1 GiB of float32 logits, and as
            much again for their gradient. None uses every pair.
        normalize_embeddings: L2-normalise ``t`` and ``s`` before taking differences, so that the
            relations do not depend on the embedding norms, which differ between teacher and student.
    """

    def __init__(
        self,
        embedding_dim: int,
        hidden_dim: int = 256,
        relation_dim: int = 128,
        temperature: float = 0.07,
        max_pairs: int | None = None,
        normalize_embeddings: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive")
        if max_pairs is not None and max_pairs < 2:
            raise ValueError(f"max_pairs={max_pairs} must be at least 2 (one positive and one negative), or None")
        self.embedding_dim = embedding_dim
        self.temperature = float(temperature)
        self.max_pairs = max_pairs
        self.normalize_embeddings = normalize_embeddings
        self.relation = RelationModule(embedding_dim, hidden_dim, relation_dim)

    def pair_indices(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Select the ordered pairs (i, j), i != j, of a batch.

        Args:
            batch_size: B.
            generator: source of randomness for the subset when ``B * (B - 1) > max_pairs``.
                None uses PyTorch's global generator, which ``lightning.seed_everything`` seeds.

        Returns:
            ``(first, second)``: two ``(P,)`` int64 CPU tensors of sample indices, P =
            ``min(B * (B - 1), max_pairs)``. Without subsampling the pairs are in row-major order.
        """
        grid = torch.arange(batch_size)
        first = grid.repeat_interleave(batch_size)
        second = grid.repeat(batch_size)
        distinct = first != second
        first, second = first[distinct], second[distinct]

        if self.max_pairs is not None and first.numel() > self.max_pairs:
            device = generator.device if generator is not None else torch.device("cpu")
            chosen = torch.randperm(first.numel(), generator=generator, device=device)[: self.max_pairs].cpu()
            first, second = first[chosen], second[chosen]
        return first, second

    def forward(
        self, teacher: torch.Tensor, student: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Compute L_rcd.

        Args:
            teacher: ``(B, D)`` teacher embeddings of the HR faces. Detached here.
            student: ``(B, D)`` student embeddings of the VLR faces of the same samples, in the
                same order.
            generator: passed to ``pair_indices`` for the pair subset.

        Returns:
            Scalar float32 loss. It is ``log(P)`` when the relation module maps every
            difference to the same vector, and lower when the positives stand out.
        """
        if teacher.ndim != 2 or teacher.shape[1] != self.embedding_dim:
            raise ValueError(
                f"teacher embeddings have shape {tuple(teacher.shape)}, expected (B, {self.embedding_dim})"
            )
        if student.shape != teacher.shape:
            raise ValueError(
                f"student embeddings have shape {tuple(student.shape)}, expected {tuple(teacher.shape)} like the "
                "teacher's; project the student into the teacher dimension first"
            )
        if teacher.shape[0] < 2:
            raise ValueError(f"batch size {teacher.shape[0]} is too small: relations need at least 2 samples")

        first, second = self.pair_indices(teacher.shape[0], generator)
        first, second = first.to(teacher.device), second.to(teacher.device)

        # Autocast is off because bfloat16 rounds a cosine by up to 0.004, which a temperature of
        # 0.07 turns into logit errors up to about 0.05. The relation module is small.
        with torch.autocast(device_type=teacher.device.type, enabled=False):
            teacher = teacher.detach().float()
            student = student.float()
            if self.normalize_embeddings:
                teacher = F.normalize(teacher, dim=1)
                student = F.normalize(student, dim=1)

            teacher_relations = self.relation(teacher[first] - teacher[second])  # (P, R)
            cross_relations = self.relation(teacher[first] - student[second])  # (P, R)

            # Row p contains the query r_ts of pair p against every r_tt, so the positive is on the diagonal.
            logits = cross_relations @ teacher_relations.T / self.temperature  # (P, P)
            targets = torch.arange(logits.shape[0], device=logits.device)
            return F.cross_entropy(logits, targets)
