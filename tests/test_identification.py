"""Tests for rank-k identification, the CMC curve, IdentificationMetric and the CMC plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lvlrfr.evaluation import IdentificationMetric, plot_cmc, rank_k_identification


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# Gallery on the unit circle: identity 0 at 0 and 95 degrees, 1 at 30, 2 at 60, 3 at 90 and
# 9 at 180. No probe has identity 2, 3 or 9, so those three are distractors.
GALLERY_ANGLES = [0, 95, 30, 60, 90, 180]
GALLERY_LABELS = [0, 0, 1, 2, 3, 9]
# Probe ranks by angular distance to the nearest image of each identity:
#   10 deg, label 0: identity 0 is nearest (10)                                 -> rank 1
#   40 deg, label 0: identities 1 (10), 2 (20) are nearer than 0 (40)           -> rank 3
#   80 deg, label 1: identities 3 (10), 0 (15), 2 (20) are nearer than 1 (50)   -> rank 4
#  100 deg, label 0: the 95-degree image of identity 0 is nearest (5)           -> rank 1
PROBE_ANGLES = [10, 40, 80, 100]
PROBE_LABELS = [0, 0, 1, 0]


def _hand_case():
    gallery = torch.tensor([_unit(a) for a in GALLERY_ANGLES])
    probes = torch.tensor([_unit(a) for a in PROBE_ANGLES])
    return gallery, np.array(GALLERY_LABELS), probes, np.array(PROBE_LABELS)


def test_rank_k_hand_case():
    result = rank_k_identification(*_hand_case(), ks=(1, 5))

    assert result.rank_k == {1: 0.5, 5: 1.0}
    np.testing.assert_allclose(result.cmc, [0.5, 0.5, 0.75, 1.0, 1.0])
    assert result.num_gallery_identities == 5
    assert result.num_distractor_identities == 3
    assert result.num_gallery_images == 6


def test_rank_k_beyond_identities_is_one():
    result = rank_k_identification(*_hand_case(), ks=(1, 10))

    assert result.rank_k[10] == 1.0
    assert json.loads(json.dumps(result.to_dict()))["rank_k"] == {"1": 0.5, "10": 1.0}


def test_rank_k_tie_counts_as_miss():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    probe = torch.tensor([[1.0, 1.0]])  # exactly as similar to both identities

    result = rank_k_identification(gallery, np.array([0, 1]), probe, np.array([0]), ks=(1, 2))

    assert result.rank_k == {1: 0.0, 2: 1.0}


def test_rank_k_missing_probe_identity_raises():
    gallery, gallery_labels, probes, _ = _hand_case()

    with pytest.raises(ValueError, match=r"1 are missing: \[7\]"):
        rank_k_identification(gallery, gallery_labels, probes, np.array([0, 0, 7, 3]))


def test_rank_k_att_faces_pixels(shared_data):
    # Mean-centred 23x28 pixels of the AT&T faces, images 1-5 of each subject as gallery and
    # 6-10 as probes. Nearest-neighbour matching on these pixels reaches 91.5% rank-1.
    embeddings, labels, is_gallery = [], [], []
    for subject in range(1, 41):
        for image_number in range(1, 11):
            path = shared_data / "att_faces" / f"s{subject}" / f"{image_number}.pgm"
            with Image.open(path) as image:
                small = image.resize((23, 28), Image.Resampling.BILINEAR)
            embeddings.append(np.asarray(small, dtype=np.float32).ravel())
            labels.append(subject)
            is_gallery.append(image_number <= 5)
    embeddings = np.stack(embeddings)
    embeddings -= embeddings.mean(axis=0)
    labels, is_gallery = np.array(labels), np.array(is_gallery)

    result = rank_k_identification(
        embeddings[is_gallery], labels[is_gallery], embeddings[~is_gallery], labels[~is_gallery]
    )
    shuffled = rank_k_identification(
        embeddings[is_gallery],
        np.random.default_rng(0).permutation(labels[is_gallery]),
        embeddings[~is_gallery],
        labels[~is_gallery],
    )

    assert result.rank_k[1] > 0.85
    assert result.rank_k[1] > 3 * shuffled.rank_k[1]
    assert np.all(np.diff(result.cmc) >= 0)
    assert result.cmc[-1] == 1.0
    assert len(result.cmc) == 40

    # Rank 1 must equal the plain nearest-neighbour hit rate.
    gallery = embeddings[is_gallery] / np.linalg.norm(embeddings[is_gallery], axis=1, keepdims=True)
    probes = embeddings[~is_gallery] / np.linalg.norm(embeddings[~is_gallery], axis=1, keepdims=True)
    nearest = np.argmax(probes @ gallery.T, axis=1)
    assert result.rank_k[1] == pytest.approx(np.mean(labels[is_gallery][nearest] == labels[~is_gallery]))


def test_identification_metric_padded_shards_match_function():
    gallery, gallery_labels, probes, probe_labels = _hand_case()
    # Image index order interleaves gallery and probe images.
    embeddings = torch.cat([gallery, probes])[torch.tensor([0, 6, 1, 2, 7, 3, 8, 4, 9, 5])]
    labels = np.concatenate([gallery_labels, probe_labels])[[0, 6, 1, 2, 7, 3, 8, 4, 9, 5]]
    is_gallery = np.array([True, False, True, True, False, True, False, True, False, True])

    ranks = [IdentificationMetric(labels, is_gallery, ks=(1, 5)) for _ in range(2)]
    ranks[0].update(embeddings[0::2], torch.arange(0, 10, 2))
    ranks[1].update(embeddings[1::2], torch.arange(1, 10, 2))
    ranks[1].update(embeddings[:1], torch.tensor([0]))  # padding repeat, as DistributedSampler adds
    ranks[0].merge_state(ranks[1])

    result = ranks[0].compute()
    expected = rank_k_identification(gallery, gallery_labels, probes, probe_labels, ks=(1, 5))
    assert result.to_dict() == expected.to_dict()


def test_identification_metric_missing_image_raises():
    gallery, gallery_labels, probes, probe_labels = _hand_case()
    metric = IdentificationMetric(np.concatenate([gallery_labels, probe_labels]), np.arange(10) < 6)
    metric.update(gallery, torch.arange(6))

    with pytest.raises(ValueError, match=r"no embedding for 4 of the 10 images .*\[6, 7, 8, 9\]"):
        metric.compute()


def test_plot_cmc_writes_png(tmp_path):
    results = {"hand case": rank_k_identification(*_hand_case())}

    path = plot_cmc(results, tmp_path / "cmc.png")

    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmc.png"]
    with pytest.raises(ValueError, match="empty dict"):
        plot_cmc({}, tmp_path / "empty.png")
