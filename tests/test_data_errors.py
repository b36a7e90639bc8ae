"""Errors on damaged or inconsistent data files name the file; the cases other test files do not cover."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lvlrfr.data.datamodule import LowResFaceDataModule
from lvlrfr.data.image import ImageReadError, encode_rgb, load_rgb
from lvlrfr.data.prepared import read_manifest
from lvlrfr.data.sources.errors import DataFormatError
from lvlrfr.data.sources.folders import IdentityFolderSource
from lvlrfr.data.sources.lfw import read_lfw_pairs
from lvlrfr.data.sources.verification_bin import VerificationBinSource, write_verification_bin
from lvlrfr.utils.errors import ConfigurationError


@pytest.fixture()
def three_people(tmp_path, lfw_root) -> Path:
    """Identity folders of three LFW people with two images each, copied into ``tmp_path / "people"``."""
    root = tmp_path / "people"
    for name in ("Abel_Pacheco", "Akhmed_Zakayev", "Abdullah_Gul"):
        (root / name).mkdir(parents=True)
        for path in sorted((lfw_root / name).glob("*.jpg"))[:2]:
            shutil.copy(path, root / name / path.name)
    return root


def corrupt(path: Path, keep_bytes: int = 400) -> None:
    """Truncate an image file so that its header reads but its pixels do not."""
    path.write_bytes(path.read_bytes()[:keep_bytes])


def test_lfw_pairs_missing_image_names_line(tmp_path, lfw_root):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1 1\nAbel_Pacheco 1 2\nAbel_Pacheco 1 Nobody_Here 1\n")

    with pytest.raises(FileNotFoundError, match="line 3 names Nobody_Here_0001.jpg") as error:
        read_lfw_pairs(pairs, lfw_root)
    assert "pairs.txt" in str(error.value)
    assert str(lfw_root) in str(error.value)


def test_lfw_pairs_bad_line_names_file(tmp_path, lfw_root):
    pairs = tmp_path / "my_pairs.txt"
    pairs.write_text("1 1\nAbel_Pacheco 1\nAbel_Pacheco 1 Abdullah_Gul 1\n")

    with pytest.raises(ValueError, match="line 2") as error:
        read_lfw_pairs(pairs, lfw_root)
    assert "my_pairs.txt" in str(error.value)


def test_lfw_pairs_word_image_number_named(tmp_path, lfw_root):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1 1\nAbel_Pacheco one 2\nAbel_Pacheco 1 Abdullah_Gul 1\n")

    with pytest.raises(ValueError) as error:
        read_lfw_pairs(pairs, lfw_root)
    assert str(error.value) == (
        f"{pairs} line 2 is 'Abel_Pacheco one 2'; expected a matched 'name i j' pair with integer image numbers i and j"
    )


def test_lfw_pairs_word_in_mismatched_pair(tmp_path, lfw_root):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1 1\nAbel_Pacheco 1 2\nAbel_Pacheco 1 Abdullah_Gul x\n")

    with pytest.raises(ValueError, match="line 3 is 'Abel_Pacheco 1 Abdullah_Gul x'; expected a mismatched"):
        read_lfw_pairs(pairs, lfw_root)


@pytest.mark.parametrize("eval_folds", [[10], [10, 10], []])
def test_fewer_than_two_eval_folds_rejected(lfw_root, eval_folds):
    with pytest.raises(ConfigurationError) as error:
        LowResFaceDataModule(train_root=str(lfw_root), pairs_file=str(lfw_root / "pairs.txt"), eval_folds=eval_folds)
    message = str(error.value)
    assert message.startswith(f"data.eval_folds is {eval_folds}, but k-fold verification needs at least two")
    assert "give at least two folds, e.g. [9, 10]" in message
    assert "set data.pairs_file to null to train without evaluation" in message


def test_single_eval_fold_without_pairs_file(lfw_root):
    datamodule = LowResFaceDataModule(train_root=str(lfw_root), pairs_file=None, eval_folds=[10])

    assert datamodule.eval_protocol is None


def test_empty_identity_folder_named(three_people):
    (three_people / "Zz_Empty").mkdir()

    with pytest.raises(ValueError, match="contains no images") as error:
        IdentityFolderSource(three_people)
    assert str(three_people / "Zz_Empty") in str(error.value)


def test_unreadable_jpeg_names_file(three_people):
    broken = sorted((three_people / "Akhmed_Zakayev").glob("*.jpg"))[0]
    corrupt(broken)
    source = IdentityFolderSource(three_people)
    index = [str(path) for path in source.paths].index(str(broken))

    with pytest.raises(ImageReadError) as error:
        source[index]
    assert str(broken) in str(error.value)
    assert error.value.path == str(broken)


def test_skip_unreadable_counts_corrupt_jpeg(three_people):
    broken = sorted((three_people / "Akhmed_Zakayev").glob("*.jpg"))[0]
    corrupt(broken)
    source = IdentityFolderSource(three_people, skip_unreadable=True)
    index = [str(path) for path in source.paths].index(str(broken))

    image, label = source[index]
    assert source.unreadable == {str(broken)}
    # The replacement is the next image of the list, read whole.
    assert np.array_equal(image, load_rgb(source.paths[index + 1]))
    assert label == int(source.labels[index + 1])
    source[index]
    assert len(source.unreadable) == 1  # a second read of the same file is not counted twice
    for other in range(len(source)):
        if other != index:
            source[other]
    assert len(source.unreadable) == 1


def test_bin_unreadable_image_names_index(tmp_path, lfw_root):
    faces = [load_rgb(path) for path in sorted((lfw_root / "Abel_Pacheco").glob("*.jpg"))[:2]]
    path = tmp_path / "damaged.bin"
    write_verification_bin(path, [encode_rgb(faces[0]), encode_rgb(faces[1]), encode_rgb(faces[0]), b"\xff\xd8 cut"],
                           [True, False])
    source = VerificationBinSource(path, num_folds=2)

    assert source.load(2).shape == (112, 112, 3)
    with pytest.raises(ImageReadError, match="image 3") as error:
        source.load(3)
    assert "damaged.bin" in str(error.value)


def test_manifest_invalid_json_named(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")

    with pytest.raises(DataFormatError, match="not valid JSON") as error:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(error.value)


def test_manifest_other_format_named(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else", "version": 1}))

    with pytest.raises(DataFormatError, match="lvlrfr-prepared-set") as error:
        read_manifest(tmp_path / "manifest.json")
    assert str(tmp_path / "manifest.json") in str(error.value)


def test_manifest_missing_folder_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="lvlrfr prepare") as error:
        read_manifest(tmp_path / "never_prepared")
    assert str(tmp_path / "never_prepared" / "manifest.json") in str(error.value)
