"""Tests for k-fold verification, ROC/TAR@FAR, flip fusion, VerificationMetric and the ROC plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve
from sklearn.model_selection import KFold
from torch.utils.data import DistributedSampler

from lvlrfr.evaluation import (
    VerificationMetric,
    assign_folds,
    best_threshold,
    cosine_scores,
    fuse_flip,
    kfold_verification,
    plot_roc,
)

# Three folds of four pairs. The expected thresholds and accuracies are derived by hand in the test.
HAND_SCORES = [0.9, 0.2, 0.6, 0.4, 0.8, 0.3, 0.52, 0.7, 0.55, 0.45, 0.35, 0.65]
HAND_SAME = [True, False, True, False, True, False, False, True, True, False, True, False]
HAND_FOLDS = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]


def test_kfold_hand_case_thresholds_and_accuracy():
    result = kfold_verification(np.array(HAND_SCORES), np.array(HAND_SAME), np.array(HAND_FOLDS))

    # Fold 1 is scored with folds 2+3: 0.30F 0.35T 0.45F 0.52F 0.55T 0.65F 0.70T 0.80T.
    # Midpoint 0.535 and midpoint 0.675 both classify 6 of 8 correctly; the smaller one wins.
    # On fold 1 it gets all four right (0.675 would reject the 0.6 positive).
    assert result.thresholds[1] == pytest.approx(0.535)
    assert result.per_fold_accuracy[1] == 1.0
    # Fold 2 is scored with folds 1+3: 0.20F 0.35T 0.40F 0.45F 0.55T 0.60T 0.65F 0.90T.
    # Only 0.5 gets 6 of 8 right. On fold 2 it wrongly accepts the 0.52 negative.
    assert result.thresholds[2] == pytest.approx(0.5)
    assert result.per_fold_accuracy[2] == 0.75
    # Folds 1+2 separate perfectly at 0.56, which on fold 3 gets only the 0.45 negative right.
    assert result.thresholds[3] == pytest.approx(0.56)
    assert result.per_fold_accuracy[3] == 0.25

    assert result.accuracy_mean == pytest.approx(2 / 3)
    population_std = math.sqrt(((1 - 2 / 3) ** 2 + (0.75 - 2 / 3) ** 2 + (0.25 - 2 / 3) ** 2) / 3)
    assert result.accuracy_std == pytest.approx(population_std)
    assert result.num_pairs == 12
    assert "3-fold" in result.protocol


def test_kfold_threshold_from_other_folds():
    # Each fold alone separates perfectly, but at a threshold that fails on the other fold.
    scores = np.array([0.3, 0.2, 0.5, 0.4])
    same = np.array([True, False, True, False])
    folds = np.array([1, 1, 2, 2])

    result = kfold_verification(scores, same, folds)

    assert result.thresholds == pytest.approx({1: 0.45, 2: 0.25})
    assert result.per_fold_accuracy == {1: 0.5, 2: 0.5}
    assert result.accuracy_mean == 0.5
    for fold in (1, 2):
        _, own_accuracy = best_threshold(scores[folds == fold], same[folds == fold])
        assert own_accuracy == 1.0


def test_kfold_fold_subset_uses_present_folds():
    scores, same = np.array(HAND_SCORES), np.array(HAND_SAME)
    renumbered = np.array(HAND_FOLDS) + 5  # folds 6, 7, 8, as when evaluating LFW folds 6-10 only

    subset = kfold_verification(scores, same, renumbered)
    reference = kfold_verification(scores, same, np.array(HAND_FOLDS))

    assert subset.thresholds == {fold + 5: thr for fold, thr in reference.thresholds.items()}
    assert subset.per_fold_accuracy == {fold + 5: acc for fold, acc in reference.per_fold_accuracy.items()}
    assert "folds 6, 7, 8" in subset.protocol


def test_kfold_single_fold_raises():
    with pytest.raises(ValueError, match="at least two folds"):
        kfold_verification(np.array(HAND_SCORES), np.array(HAND_SAME), np.full(12, 4))


def test_best_threshold_ends_and_ties():
    assert best_threshold(np.array([0.2, 0.5]), np.array([True, True])) == (pytest.approx(-0.8), 1.0)
    assert best_threshold(np.array([0.2, 0.5]), np.array([False, False])) == (pytest.approx(1.5), 1.0)
    # Accept-all and the midpoint both get 2 of 3; the smaller threshold wins.
    assert best_threshold(np.array([0.1, 0.3, 0.9]), np.array([True, False, True])) == (pytest.approx(-0.9), 2 / 3)


def test_roc_matches_sklearn_with_ties():
    rng = np.random.default_rng(7)
    same = rng.random(3000) < 0.4
    # Rounding to 0.01 creates many tied scores.
    scores = np.round(rng.normal(size=3000) + 1.2 * same, 2)

    result = kfold_verification(scores, same, assign_folds(3000))
    fpr, tpr, thresholds = sklearn_roc_curve(same, scores, drop_intermediate=False)

    np.testing.assert_allclose(result.roc.fpr, fpr)
    np.testing.assert_allclose(result.roc.tpr, tpr)
    np.testing.assert_array_equal(result.roc.thresholds, thresholds)
    assert result.auc == pytest.approx(roc_auc_score(same, scores), abs=1e-12)


def test_tar_at_far_is_best_admissible_point():
    rng = np.random.default_rng(3)
    same = rng.random(20000) < 0.5
    scores = rng.normal(size=20000) + 2.0 * same
    num_negative = int((~same).sum())

    result = kfold_verification(scores, same, assign_folds(20000), far_targets=(1e-2, 1e-3))

    for far in (1e-2, 1e-3):
        threshold = result.tar_at_far_thresholds[far]
        assert np.mean(scores[~same] >= threshold) <= far
        assert result.tar_at_far[far] == np.mean(scores[same] >= threshold)
        # The next lower distinct score would exceed the FAR target.
        next_threshold = scores[scores < threshold].max()
        assert np.mean(scores[~same] >= next_threshold) > far
    assert num_negative * 1e-3 > 1
    assert result.note == ""


def test_tar_at_far_coarse_note():
    result = kfold_verification(np.array(HAND_SCORES), np.array(HAND_SAME), np.array(HAND_FOLDS))

    # 6 negatives: FAR 1e-3 can only be met with zero false accepts, i.e. above the 0.65 negative.
    assert result.tar_at_far[1e-3] == pytest.approx(3 / 6)
    assert "coarse" in result.note
    assert "6 negative pairs" in result.note


def test_result_to_dict_is_strict_json():
    result = kfold_verification(np.array(HAND_SCORES), np.array(HAND_SAME), np.array(HAND_FOLDS))

    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))

    assert data["per_fold_accuracy"] == {"1": 1.0, "2": 0.75, "3": 0.25}
    assert data["roc"]["thresholds"][0] is None
    assert set(data["tar_at_far"]) == {"0.001", "0.0001"}
    assert result.scalars("val/")["val/acc"] == pytest.approx(2 / 3)


def test_assign_folds_matches_kfold_split():
    folds = assign_folds(6003, 10)

    for fold, (_, test_index) in enumerate(KFold(10, shuffle=False).split(np.zeros(6003)), start=1):
        np.testing.assert_array_equal(np.flatnonzero(folds == fold), test_index)
    assert np.bincount(assign_folds(6000))[1:].tolist() == [600] * 10


def test_cosine_scores_match_torch():
    embeddings = torch.randn(10, 16, generator=torch.Generator().manual_seed(0)) * 3
    pairs = np.array([[0, 1], [2, 9], [5, 5]])

    scores = cosine_scores(embeddings, pairs)

    expected = torch.cosine_similarity(embeddings[pairs[:, 0]], embeddings[pairs[:, 1]], dim=1).double()
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-6)
    assert scores[2] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="only 10 embeddings"):
        cosine_scores(embeddings, np.array([[0, 10]]))


def test_fuse_flip_sum_and_concat():
    generator = torch.Generator().manual_seed(1)
    image, flipped = torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator) * 5
    other_image, other_flipped = torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)

    summed = fuse_flip(image, flipped, "sum")
    concatenated = fuse_flip(image, flipped, "concat")
    other_concatenated = fuse_flip(other_image, other_flipped, "concat")

    torch.testing.assert_close(summed, torch.nn.functional.normalize(image + flipped, dim=1))
    assert concatenated.shape == (4, 16)
    mean_cosine = (
        torch.cosine_similarity(image, other_image) + torch.cosine_similarity(flipped, other_flipped)
    ) / 2
    torch.testing.assert_close((concatenated * other_concatenated).sum(dim=1), mean_cosine)
    with pytest.raises(ValueError, match="'mean'"):
        fuse_flip(image, flipped, "mean")


def _clustered_pair_list(num_images: int = 41, seed: int = 0):
    """Embeddings of identities with two images each, plus pairs, labels and folds over them."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_images // 2 + 1, 32, generator=generator)
    noise = 0.9 * torch.randn(num_images, 32, generator=generator)
    embeddings = centres.repeat_interleave(2, dim=0)[:num_images] + noise
    positives = [[2 * i, 2 * i + 1] for i in range(num_images // 2)]
    negatives = [[2 * i, 2 * i + 3] for i in range(num_images // 2 - 1)]
    pairs = np.array(positives + negatives)
    same = np.array([True] * len(positives) + [False] * len(negatives))
    order = np.random.default_rng(seed).permutation(len(pairs))
    return embeddings, pairs[order], same[order], assign_folds(len(pairs), 5)


def _rank_shard(num_images: int, rank: int) -> torch.Tensor:
    """Indices that DistributedSampler gives to ``rank`` of two, with its padding repeats."""
    return torch.tensor(list(DistributedSampler(range(num_images), num_replicas=2, rank=rank, shuffle=False)))


def test_verification_metric_merged_ranks_match_function():
    embeddings, pairs, same, folds = _clustered_pair_list()
    expected = kfold_verification(cosine_scores(embeddings, pairs), same, folds, flip_fusion="sum")

    ranks = [VerificationMetric(pairs, same, folds) for _ in range(2)]
    for rank, metric in enumerate(ranks):
        shard = _rank_shard(len(embeddings), rank)
        for batch in shard.split(8):
            metric.update(embeddings[batch], batch)
    assert len(_rank_shard(len(embeddings), 1)) == 21  # rank 1 is padded with a repeat of image 0
    ranks[1].merge_state(ranks[0])

    assert ranks[1].compute().to_dict() == expected.to_dict()
    assert expected.accuracy_mean > 0.8


def test_verification_metric_missing_embedding_raises():
    embeddings, pairs, same, folds = _clustered_pair_list()
    metric = VerificationMetric(pairs, same, folds)
    # Image 40 is in no pair, so leaving out images 37-40 leaves 3 of the 40 paired images missing.
    metric.update(embeddings[:37], torch.arange(37))

    with pytest.raises(ValueError, match=r"no embedding for 3 of the 40 images .*\[37, 38, 39\]"):
        metric.compute()


def _ddp_worker(rank: int, rendezvous: str, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    embeddings, pairs, same, folds = _clustered_pair_list()
    metric = VerificationMetric(pairs, same, folds)
    shard = _rank_shard(len(embeddings), rank)
    for batch in shard.split(8):
        metric.update(embeddings[batch], batch)
    results[rank] = metric.compute().to_dict()
    dist.destroy_process_group()


def test_verification_metric_ddp_gloo_matches_function(tmp_path):
    embeddings, pairs, same, folds = _clustered_pair_list()
    expected = kfold_verification(cosine_scores(embeddings, pairs), same, folds, flip_fusion="sum").to_dict()

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(f"file://{tmp_path / 'rendezvous'}", results), nprocs=2)
        gathered = dict(results)

    assert gathered[0] == expected
    assert gathered[1] == expected


def test_plot_roc_writes_png(tmp_path):
    embeddings, pairs, same, folds = _clustered_pair_list()
    scores = cosine_scores(embeddings, pairs)
    results = {
        "student": kfold_verification(scores, same, folds),
        "chance": kfold_verification(np.random.default_rng(0).random(len(scores)), same, folds),
    }

    path = plot_roc(results, tmp_path / "plots" / "roc.png")

    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 100
    assert sorted(p.name for p in path.parent.iterdir()) == ["roc.png"]
