"""LowResFaceDataModule on the real aligned LFW: person-disjoint folds, batch contract, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvlrfr.data.datamodule import LowResFaceDataModule
from lvlrfr.data.degradation import Degradation


def make_datamodule(lfw_root, **overrides) -> LowResFaceDataModule:
    arguments = dict(
        train_root=str(lfw_root),
        pairs_file=str(lfw_root / "pairs.txt"),
        num_workers=0,
        batch_size=8,
        eval_batch_size=16,
        degradation=Degradation(vlr_size=16, input_size=32),
    )
    arguments.update(overrides)
    return LowResFaceDataModule(**arguments)


@pytest.mark.parametrize("eval_folds", [[6, 7, 8, 9, 10], [1, 2, 3, 4, 5]])
def test_training_people_disjoint_from_evaluated_pairs(lfw_root, eval_folds):
    datamodule = make_datamodule(lfw_root, eval_folds=eval_folds)
    training_people = set(datamodule.train_source.identities)
    evaluated_people = datamodule.full_protocol.people_in_folds(eval_folds)
    assert training_people.isdisjoint(evaluated_people)
    assert len(datamodule.eval_protocol.pairs) == 3000
    assert set(datamodule.eval_protocol.folds.tolist()) == set(eval_folds)
    # Everyone in the other five folds is a training identity.
    other_folds = sorted(set(range(1, 11)) - set(eval_folds))
    assert datamodule.full_protocol.people_in_folds(other_folds) <= training_people


def test_default_split_counts(lfw_root):
    datamodule = make_datamodule(lfw_root)
    assert datamodule.num_classes == 3554
    assert len(datamodule.train_source) == 6922
    assert len(datamodule.eval_protocol) == 3890
    assert int(datamodule.eval_protocol.same.sum()) == 1500


def test_training_batch_contract(lfw_root):
    datamodule = make_datamodule(lfw_root, max_train_images=32)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["hr"].shape == (8, 3, 112, 112)
    assert batch["vlr"].shape == (8, 3, 32, 32)
    assert batch["label"].dtype == torch.long
    assert batch["index"].dtype == torch.long
    for key in ("hr", "vlr"):
        assert batch[key].min() >= -1.0
        assert batch[key].max() <= 1.0
    assert int(batch["label"].max()) < datamodule.num_classes


def test_training_vlr_is_degraded_hr(lfw_root):
    datamodule = make_datamodule(lfw_root, max_train_images=4, flip=False)
    item = datamodule.train_dataset()[0]
    hr_pixels = ((item["hr"].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    expected = datamodule.degradation(hr_pixels, key=2 * 0)
    vlr_pixels = ((item["vlr"].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(vlr_pixels, expected)


def test_eval_loaders_per_size(lfw_root):
    datamodule = make_datamodule(lfw_root, eval_sizes=[16, 8], eval_folds=[9, 10])
    loaders = datamodule.val_dataloader()
    assert len(loaders) == 2
    assert datamodule.eval_names == ["lfw16", "lfw8"]
    sharp = loaders[0].dataset[0]["vlr"]
    coarse = loaders[1].dataset[0]["vlr"]
    assert sharp.shape == coarse.shape == (3, 32, 32)
    # An 8 px face up-sampled to 32 px has less high-frequency energy than a 16 px one.
    assert coarse.diff(dim=2).abs().mean() < sharp.diff(dim=2).abs().mean()


def test_max_train_images_subset(lfw_root):
    datamodule = make_datamodule(lfw_root, max_train_images=100)
    assert len(datamodule.train_dataset()) == 100


def test_missing_train_root_names_path(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match="data.train_root .*no_such_folder"):
        LowResFaceDataModule(train_root=str(missing), pairs_file=None)


def test_missing_pairs_file_names_path(lfw_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.pairs_file .*pairs_missing.txt"):
        LowResFaceDataModule(train_root=str(lfw_root), pairs_file=str(tmp_path / "pairs_missing.txt"))


def test_invalid_eval_fold(lfw_root):
    with pytest.raises(ValueError, match="eval_folds contains \\[11\\]"):
        make_datamodule(lfw_root, eval_folds=[10, 11])
