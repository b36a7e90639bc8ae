"""Tests of the margin heads, the distillation losses and the relational contrastive loss."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lvlrfr.losses import (
    ArcFaceHead,
    CosFaceHead,
    EmbeddingDistillationLoss,
    FeatureRegressionLoss,
    MarginLoss,
    RelationalContrastiveLoss,
    RelationModule,
    pair_taps_by_stride,
)

SCALE = 64.0


def unit_vectors(angles: list[float], norm: float = 1.0) -> torch.Tensor:
    """Return ``(N, 2)`` vectors of the given norm at the given angles (radians)."""
    return torch.tensor([[norm * math.cos(a), norm * math.sin(a)] for a in angles], dtype=torch.float32)


def head_with_class_angles(head: nn.Module, class_angles: list[float]) -> nn.Module:
    with torch.no_grad():
        # Norm 5 checks that the head normalises its weights.
        head.weight.copy_(unit_vectors(class_angles, norm=5.0))
    return head


# Class centres at 0, pi/2 and pi in the plane.
CLASS_ANGLES = [0.0, math.pi / 2, math.pi]


def expected_logits(
    sample_angles: list[float], labels: list[int], target_fn, scale: float = SCALE
) -> torch.Tensor:
    """Compute logits with ``math``: ``scale * target_fn(theta)`` at the label, ``scale * cos(theta)`` elsewhere."""
    rows = []
    for angle, label in zip(sample_angles, labels):
        row = []
        for index, class_angle in enumerate(CLASS_ANGLES):
            theta = abs(angle - class_angle)
            theta = min(theta, 2 * math.pi - theta)
            row.append(scale * (target_fn(theta) if index == label else math.cos(theta)))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def test_arcface_logits_hand_case():
    head = head_with_class_angles(ArcFaceHead(2, 3, scale=SCALE, margin=0.5), CLASS_ANGLES)
    angles = [0.3, 1.2, 2.0]
    labels = [0, 1, 2]
    embeddings = unit_vectors(angles, norm=3.0)

    logits = head(embeddings, torch.tensor(labels))

    expected = expected_logits(angles, labels, lambda theta: math.cos(theta + 0.5))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    # The target of sample 0 is cos(0.8), not cos(0.3) or cos(0.3) - 0.5.
    assert logits[0, 0].item() == pytest.approx(SCALE * math.cos(0.8), abs=1e-4)


def test_arcface_fallback_branch():
    head = head_with_class_angles(ArcFaceHead(2, 3, scale=SCALE, margin=0.5), CLASS_ANGLES)
    # theta = 2.9 > pi - 0.5 takes the fallback, theta = 2.6 < pi - 0.5 keeps cos(theta + m).
    embeddings = unit_vectors([2.9, 2.6])
    labels = torch.tensor([0, 0])

    logits = head(embeddings, labels)

    fallback = SCALE * (math.cos(2.9) - 0.5 * math.sin(0.5))
    assert logits[0, 0].item() == pytest.approx(fallback, abs=1e-4)
    assert logits[0, 0].item() != pytest.approx(SCALE * math.cos(2.9 + 0.5), abs=1.0)
    assert logits[1, 0].item() == pytest.approx(SCALE * math.cos(2.6 + 0.5), abs=1e-4)


def test_arcface_easy_margin():
    head = head_with_class_angles(ArcFaceHead(2, 3, scale=SCALE, margin=0.5, easy_margin=True), CLASS_ANGLES)
    embeddings = unit_vectors([0.3, 2.0])
    labels = torch.tensor([0, 0])

    logits = head(embeddings, labels)

    assert logits[0, 0].item() == pytest.approx(SCALE * math.cos(0.8), abs=1e-4)
    # cos(2.0) < 0, so easy margin leaves the target as it is.
    assert logits[1, 0].item() == pytest.approx(SCALE * math.cos(2.0), abs=1e-4)


def test_arcface_gradient_finite_at_zero_angle():
    head = head_with_class_angles(ArcFaceHead(2, 3), CLASS_ANGLES)
    embeddings = unit_vectors([0.0, math.pi]).requires_grad_(True)

    MarginLoss(head)(embeddings, torch.tensor([0, 2])).backward()

    assert torch.isfinite(embeddings.grad).all()
    assert torch.isfinite(head.weight.grad).all()


def test_cosface_logits_hand_case():
    head = head_with_class_angles(CosFaceHead(2, 3, scale=SCALE, margin=0.35), CLASS_ANGLES)
    angles = [0.3, 1.2, 2.9]
    labels = [0, 1, 0]

    logits = head(unit_vectors(angles, norm=0.2), torch.tensor(labels))

    expected = expected_logits(angles, labels, lambda theta: math.cos(theta) - 0.35)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_margin_loss_matches_softmax_of_hand_logits():
    head = head_with_class_angles(ArcFaceHead(2, 3, scale=8.0, margin=0.5), CLASS_ANGLES)
    angles = [0.3, 1.2, 2.9]
    labels = [0, 1, 2]

    loss = MarginLoss(head)(unit_vectors(angles), torch.tensor(labels))

    logits = expected_logits(angles, labels, lambda theta: math.cos(theta + 0.5), scale=8.0).tolist()
    hand_losses = []
    for row, label in zip(logits, labels):
        log_partition = math.log(sum(math.exp(value) for value in row))
        hand_losses.append(log_partition - row[label])
    assert loss.item() == pytest.approx(sum(hand_losses) / len(hand_losses), abs=1e-5)


def test_margin_head_rejects_invalid_labels():
    head = ArcFaceHead(4, 3)
    embeddings = torch.randn(3, 4)

    with pytest.raises(ValueError, match=r"-1 \(unknown identity\) at batch positions \[1\]"):
        head(embeddings, torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match=r"labels \[3\] .* outside \[0, 3\)"):
        head(embeddings, torch.tensor([0, 3, 2]))
    with pytest.raises(ValueError, match="integer dtype"):
        head(embeddings, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"expected \(B, 4\)"):
        head(torch.randn(3, 5), torch.tensor([0, 1, 2]))


def identity_adapters(loss: FeatureRegressionLoss) -> None:
    with torch.no_grad():
        for adapter in loss.adapters:
            out_channels, in_channels = adapter.weight.shape[:2]
            assert out_channels == in_channels
            adapter.weight.copy_(torch.eye(out_channels).view(out_channels, in_channels, 1, 1))
            adapter.bias.zero_()


TAP_SHAPES = {"down_blocks.0": (4, 8, 8), "mid_block": (6, 4, 4)}


def test_feature_regression_zero_for_matching_features():
    loss_fn = FeatureRegressionLoss([4, 6], TAP_SHAPES, pairing={"down_blocks.0": 0, "mid_block": 1})
    identity_adapters(loss_fn)
    generator = torch.Generator().manual_seed(0)
    stage0 = torch.randn(2, 4, 16, 16, generator=generator)
    stage1 = torch.randn(2, 6, 4, 4, generator=generator)
    # The student map is resized to the tap's size, so the teacher is the bilinear 8x8 version.
    teacher = {
        "down_blocks.0": F.interpolate(stage0, size=(8, 8), mode="bilinear", align_corners=False),
        "mid_block": stage1.clone(),
        "unused_tap": torch.randn(2, 3, 2, 2),
    }

    loss, per_tap = loss_fn([stage0, stage1], teacher)

    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    assert set(per_tap) == {"down_blocks.0", "mid_block"}

    teacher["mid_block"] = stage1 + 0.5
    loss, per_tap = loss_fn([stage0, stage1], teacher)

    assert per_tap["mid_block"].item() == pytest.approx(0.25, abs=1e-6)
    assert per_tap["down_blocks.0"].item() == pytest.approx(0.0, abs=1e-10)
    assert loss.item() == pytest.approx(0.125, abs=1e-6)


def test_feature_regression_gradients():
    loss_fn = FeatureRegressionLoss([4, 6], TAP_SHAPES, pairing={"down_blocks.0": 0, "mid_block": 0})
    stage0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    stage1 = torch.randn(2, 6, 4, 4, requires_grad=True)
    teacher = {name: torch.randn(2, *shape, requires_grad=True) for name, shape in TAP_SHAPES.items()}

    loss, _ = loss_fn([stage0, stage1], teacher)
    loss.backward()

    assert loss.item() > 0
    assert stage0.grad.abs().sum() > 0
    # Stage 1 is paired with no tap.
    assert stage1.grad is None
    for adapter in loss_fn.adapters:
        assert adapter.weight.grad.abs().sum() > 0
    for tap in teacher.values():
        assert tap.grad is None


def test_feature_regression_pairing_errors():
    with pytest.raises(ValueError, match=r"taps without a student stage: \['mid_block'\]") as error:
        FeatureRegressionLoss([4, 6], TAP_SHAPES, pairing={"down_blocks.0": 0})
    assert "Teacher taps are ['down_blocks.0', 'mid_block']" in str(error.value)

    with pytest.raises(ValueError, match=r"not teacher taps: \['down_blocks.1'\]"):
        FeatureRegressionLoss([4, 6], TAP_SHAPES, pairing={"down_blocks.0": 0, "mid_block": 1, "down_blocks.1": 1})
    with pytest.raises(ValueError, match=r"\{'mid_block': 2\}.*2 stages"):
        FeatureRegressionLoss([4, 6], TAP_SHAPES, pairing={"down_blocks.0": 0, "mid_block": 2})
    with pytest.raises(ValueError, match="student_strides and teacher_input_size"):
        FeatureRegressionLoss([4, 6], TAP_SHAPES)


def test_feature_regression_forward_errors():
    loss_fn = FeatureRegressionLoss([4, 6], TAP_SHAPES, pairing={"down_blocks.0": 0, "mid_block": 1})
    stages = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]

    with pytest.raises(ValueError, match=r"lacks taps \['mid_block'\]"):
        loss_fn(stages, {"down_blocks.0": torch.randn(2, 4, 8, 8)})
    with pytest.raises(ValueError, match=r"'mid_block' has shape \(2, 6, 8, 8\)"):
        loss_fn(stages, {"down_blocks.0": torch.randn(2, 4, 8, 8), "mid_block": torch.randn(2, 6, 8, 8)})
    with pytest.raises(ValueError, match=r"student stage 1 output has shape \(2, 5, 4, 4\)"):
        loss_fn([stages[0], torch.randn(2, 5, 4, 4)], {name: torch.randn(2, *s) for name, s in TAP_SHAPES.items()})
    with pytest.raises(ValueError, match="got 1 student feature maps, expected 2"):
        loss_fn(stages[:1], {name: torch.randn(2, *s) for name, s in TAP_SHAPES.items()})


def test_pair_taps_by_stride():
    # A 64-pixel UNet encoder: down blocks at strides 2, 4, 8, 8 (the last one does not
    # down-sample) and the middle block at 8, against an iResNet on 112 pixels.
    taps = {
        "down_blocks.0": (64, 32, 32),
        "down_blocks.1": (128, 16, 16),
        "down_blocks.2": (256, 8, 8),
        "down_blocks.3": (256, 8, 8),
        "mid_block": (256, 8, 8),
    }
    pairing = pair_taps_by_stride([2, 4, 8, 16], taps, teacher_input_size=64)

    assert pairing == {"down_blocks.0": 0, "down_blocks.1": 1, "down_blocks.2": 2, "down_blocks.3": 2, "mid_block": 2}
    # Stride 4 is equally far from 2 and 8 on a log2 scale, and the earlier stage wins.
    assert pair_taps_by_stride([2, 8], {"tap": (1, 16, 16)}, teacher_input_size=64) == {"tap": 0}
    # Stride 3 is closer to 4 than to 2 on a log2 scale (0.42 against 0.58).
    assert pair_taps_by_stride([2, 4], {"tap": (1, 32, 32)}, teacher_input_size=96) == {"tap": 1}


def test_feature_regression_automatic_pairing():
    loss_fn = FeatureRegressionLoss(
        [8, 16, 32, 64], TAP_SHAPES, student_strides=[2, 4, 8, 16], teacher_input_size=32
    )

    # Tap strides: 32 / 8 = 4 and 32 / 4 = 8.
    assert loss_fn.pairing == {"down_blocks.0": 1, "mid_block": 2}
    assert loss_fn.adapters[0].weight.shape == (4, 16, 1, 1)
    assert loss_fn.adapters[1].weight.shape == (6, 32, 1, 1)


def test_embedding_distillation_same_dimension():
    loss_fn = EmbeddingDistillationLoss(3, 3)
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])

    assert isinstance(loss_fn.projection, nn.Identity)
    assert list(loss_fn.parameters()) == []
    assert loss_fn(teacher * 3.0, teacher).item() == pytest.approx(0.0, abs=1e-6)
    orthogonal = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 1.0]])
    assert loss_fn(orthogonal, teacher).item() == pytest.approx(1.0, abs=1e-6)
    assert loss_fn(-teacher, teacher).item() == pytest.approx(2.0, abs=1e-6)


def test_embedding_distillation_projection():
    loss_fn = EmbeddingDistillationLoss(4, 3)
    student = torch.randn(5, 4)
    teacher = torch.randn(5, 3, requires_grad=True)

    assert isinstance(loss_fn.projection, nn.Linear)
    assert loss_fn.projection.weight.shape == (3, 4)
    assert loss_fn.projection.bias is None

    loss = loss_fn(student, teacher)
    loss.backward()

    projected = student @ loss_fn.projection.weight.detach().T
    hand = [1.0 - F.cosine_similarity(p, t, dim=0).item() for p, t in zip(projected, teacher.detach())]
    assert loss.item() == pytest.approx(sum(hand) / len(hand), abs=1e-6)
    assert loss_fn.projection.weight.grad.abs().sum() > 0
    assert teacher.grad is None
    with pytest.raises(ValueError, match=r"expected \(5, 3\)"):
        loss_fn(student, torch.randn(5, 4))


def test_relation_module_unit_vectors():
    module = RelationModule(16, 32, 8)

    relations = module(torch.randn(3, 5, 16))

    assert relations.shape == (3, 5, 8)
    torch.testing.assert_close(relations.norm(dim=-1), torch.ones(3, 5))


def test_relational_gradients_reach_student_and_relation():
    torch.manual_seed(0)
    teacher_net = nn.Linear(10, 16)
    student_head = nn.Linear(10, 16)
    loss_fn = RelationalContrastiveLoss(16, hidden_dim=32, relation_dim=8)
    inputs = torch.randn(6, 10)

    loss = loss_fn(teacher_net(inputs), student_head(inputs))
    loss.backward()

    assert loss.item() > 0
    assert student_head.weight.grad.abs().sum() > 0
    for name, parameter in loss_fn.relation.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name
    assert teacher_net.weight.grad is None
    assert teacher_net.bias.grad is None


def test_relational_matches_pairwise_definition():
    torch.manual_seed(0)
    loss_fn = RelationalContrastiveLoss(4, hidden_dim=8, relation_dim=3, temperature=0.2, normalize_embeddings=False)
    teacher = torch.randn(3, 4)
    student = torch.randn(3, 4)
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]

    with torch.no_grad():
        loss = loss_fn(teacher, student).item()
        hand_losses = []
        for i, j in pairs:
            query = loss_fn.relation(teacher[i] - student[j])
            logits = [torch.dot(query, loss_fn.relation(teacher[k] - teacher[l])).item() / 0.2 for k, l in pairs]
            positive = logits[pairs.index((i, j))]
            hand_losses.append(math.log(sum(math.exp(value) for value in logits)) - positive)

    assert loss == pytest.approx(sum(hand_losses) / len(hand_losses), abs=1e-5)


def derangement(size: int, generator: torch.Generator) -> torch.Tensor:
    """Return a random permutation of ``range(size)`` with no fixed point."""
    while True:
        permutation = torch.randperm(size, generator=generator)
        if (permutation != torch.arange(size)).all():
            return permutation


def test_relational_aligned_lower_than_shuffled():
    torch.manual_seed(0)
    loss_fn = RelationalContrastiveLoss(32, hidden_dim=64, relation_dim=16)
    aligned, shuffled = [], []
    with torch.no_grad():
        for seed in range(5):
            generator = torch.Generator().manual_seed(seed)
            teacher = torch.randn(8, 32, generator=generator)
            student = teacher + 0.05 * torch.randn(8, 32, generator=generator)
            aligned.append(loss_fn(teacher, student).item())
            shuffled.append(loss_fn(teacher, student[derangement(8, generator)]).item())

    assert sum(aligned) / 5 < sum(shuffled) / 5
    # A pair count of 56 makes log(56) = 4.03 the loss of relations that are all the same vector.
    assert sum(aligned) / 5 < math.log(56)


def test_relational_temperature():
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(6, 16, generator=generator)
    shuffled = teacher[derangement(6, generator)]
    torch.manual_seed(0)
    reference = RelationalContrastiveLoss(16, hidden_dim=32, relation_dim=8, temperature=0.5)

    aligned_losses, shuffled_losses = [], []
    with torch.no_grad():
        for temperature in [0.5, 0.1, 0.05, 0.02, 0.01]:
            loss_fn = RelationalContrastiveLoss(16, hidden_dim=32, relation_dim=8, temperature=temperature)
            loss_fn.load_state_dict(reference.state_dict())
            aligned_losses.append(loss_fn(teacher, teacher).item())
            shuffled_losses.append(loss_fn(teacher, shuffled).item())

    # Aligned: every positive has cosine 1, the maximum, so a lower temperature sharpens it.
    for higher, lower in zip(aligned_losses, aligned_losses[1:]):
        assert higher > lower
    assert aligned_losses[-1] < 0.1
    # Shuffled: most queries equal a negative, so once the temperature is small the loss grows
    # like (1 - cos(query, positive)) / temperature.
    assert shuffled_losses[2] < shuffled_losses[3] < shuffled_losses[4]
    assert shuffled_losses[4] > math.log(30)


def test_relational_pair_subsampling():
    loss_fn = RelationalContrastiveLoss(8, hidden_dim=16, relation_dim=4, max_pairs=10)
    teacher = torch.randn(6, 8)
    student = torch.randn(6, 8)

    first, second = loss_fn.pair_indices(6, torch.Generator().manual_seed(3))
    first_again, second_again = loss_fn.pair_indices(6, torch.Generator().manual_seed(3))
    first_other, second_other = loss_fn.pair_indices(6, torch.Generator().manual_seed(4))

    assert first.shape == second.shape == (10,)
    assert (first != second).all()
    assert len(set(zip(first.tolist(), second.tolist()))) == 10
    assert torch.equal(first, first_again)
    assert torch.equal(second, second_again)
    assert not (torch.equal(first, first_other) and torch.equal(second, second_other))

    loss = loss_fn(teacher, student, torch.Generator().manual_seed(3))
    loss_again = loss_fn(teacher, student, torch.Generator().manual_seed(3))
    assert loss.item() == loss_again.item()

    loss_fn.max_pairs = None
    first_all, second_all = loss_fn.pair_indices(6)
    assert first_all.numel() == 30
    assert first_all[:5].tolist() == [0, 0, 0, 0, 0]
    assert second_all[:5].tolist() == [1, 2, 3, 4, 5]


def test_relational_rejects_invalid_inputs():
    loss_fn = RelationalContrastiveLoss(8)

    with pytest.raises(ValueError, match="project the student into the teacher dimension"):
        loss_fn(torch.randn(4, 8), torch.randn(4, 6))
    with pytest.raises(ValueError, match="batch size 1 is too small"):
        loss_fn(torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"expected \(B, 8\)"):
        loss_fn(torch.randn(4, 6), torch.randn(4, 6))
    with pytest.raises(ValueError, match="max_pairs=1"):
        RelationalContrastiveLoss(8, max_pairs=1)


def test_losses_float32_under_autocast():
    torch.manual_seed(0)
    head = ArcFaceHead(16, 5)
    relational = RelationalContrastiveLoss(16, hidden_dim=32, relation_dim=8)
    embeddings = torch.randn(6, 16)
    teacher = torch.randn(6, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])

    reference_logits = head(embeddings, labels)
    reference_loss = relational(teacher, embeddings)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = head(embeddings, labels)
        loss = relational(teacher, embeddings)

    assert logits.dtype == torch.float32
    # With autocast active inside the losses these differ by about 0.2 and 1e-3.
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=0)
    assert loss.item() == pytest.approx(reference_loss.item(), abs=1e-6)


def load_faces(lfw_root: Path, count: int, vlr_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Load ``count`` aligned LFW faces of different people as HR and VLR uint8 ``(N, 112, 112, 3)`` arrays.

    The VLR copy is bicubic down to ``vlr_size`` pixels and bicubic back up to 112.
    """
    paths = sorted(lfw_root.glob("*/*_0001.jpg"))[:count]
    high, low = [], []
    for path in paths:
        image = Image.open(path).convert("RGB")
        small = image.resize((vlr_size, vlr_size), Image.Resampling.BICUBIC)
        high.append(np.asarray(image))
        low.append(np.asarray(small.resize((112, 112), Image.Resampling.BICUBIC)))
    return np.stack(high), np.stack(low)


@pytest.fixture(scope="module")
def real_embeddings(lfw_root: Path, shared_models: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed 12 LFW faces at 112 pixels and at 16 pixels with the pretrained MobileFaceNet."""
    onnxruntime = pytest.importorskip("onnxruntime")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(shared_models / "mobilefacenet" / "mobilefacenet_arcface.onnx"), options, providers=["CPUExecutionProvider"]
    )
    high, low = load_faces(lfw_root, count=12, vlr_size=16)
    input_name = session.get_inputs()[0].name

    def embed(faces: np.ndarray) -> torch.Tensor:
        # This model takes NHWC RGB with (pixel - 127.5) / 128.
        normalized = (faces.astype(np.float32) - 127.5) / 128
        return torch.from_numpy(session.run(None, {input_name: normalized})[0])

    return embed(high), embed(low)


def test_distillation_losses_on_real_faces(real_embeddings):
    teacher, student = real_embeddings
    shift = torch.roll(torch.arange(teacher.shape[0]), 1)

    kd = EmbeddingDistillationLoss(192, 192)
    assert kd(student, teacher).item() < kd(student[shift], teacher).item()

    torch.manual_seed(0)
    rcd = RelationalContrastiveLoss(192, hidden_dim=64, relation_dim=32)
    with torch.no_grad():
        assert rcd(teacher, student).item() < rcd(teacher, student[shift]).item()
