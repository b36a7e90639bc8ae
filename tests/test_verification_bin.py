"""insightface verification .bin files: safe loading, structure checks and writing."""

from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from lvlrfr.data.image import load_rgb
from lvlrfr.data.sources.errors import DataFormatError
from lvlrfr.data.sources.verification_bin import VerificationBinSource, read_verification_bin, write_verification_bin


@pytest.fixture(scope="module")
def lfw_pairs(shared_data: Path) -> tuple[list[np.ndarray], list[bool]]:
    """The first 12 matched and 12 mismatched pairs of LFW's pairs.txt, as 48 images and 24 same flags."""
    root = shared_data / "lfw-112x112"
    lines = (root / "pairs.txt").read_text().splitlines()
    images, same = [], []
    for line in lines[1:13] + lines[301:313]:
        fields = line.split()
        if len(fields) == 3:
            names = [(fields[0], fields[1]), (fields[0], fields[2])]
        else:
            names = [(fields[0], fields[1]), (fields[2], fields[3])]
        images.extend(load_rgb(root / name / f"{name}_{int(number):04d}.jpg") for name, number in names)
        same.append(len(fields) == 3)
    return images, same


class _CreateFolderOnLoad:
    """Pickles as a call to ``os.mkdir``: unpickling it with plain ``pickle`` creates the folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self):
        return os.mkdir, (str(self.folder),)


def test_round_trip_png_exact(tmp_path, lfw_pairs):
    images, same = lfw_pairs
    write_verification_bin(tmp_path / "lfw.bin", images, same, image_format="png")
    source = VerificationBinSource(tmp_path / "lfw.bin", num_folds=4)

    assert len(source) == 48
    assert source.same.tolist() == same
    assert source.pairs.tolist() == [[2 * k, 2 * k + 1] for k in range(24)]
    assert source.folds.tolist() == [fold for fold in (1, 2, 3, 4) for _ in range(6)]
    for index in (0, 1, 25, 47):
        assert np.array_equal(source.load(index), images[index])


def test_round_trip_jpeg_close(tmp_path, lfw_pairs):
    images, same = lfw_pairs
    write_verification_bin(tmp_path / "lfw.bin", images, same, quality=95)
    source = VerificationBinSource(tmp_path / "lfw.bin")

    assert source.encoded[0][:2] == b"\xff\xd8"  # JPEG start-of-image marker
    for index in (0, 30):
        loaded = source.load(index).astype(np.float64)
        assert loaded.shape == (112, 112, 3)
        assert np.abs(loaded - images[index]).mean() < 2.0


def test_real_insightface_bin_loads(shared_data):
    source = VerificationBinSource(shared_data / "insightface_fixtures" / "small_lfw.bin")

    assert len(source) == 20
    assert len(source.pairs) == 10
    assert source.same.all()
    assert source.folds.tolist() == list(range(1, 11))
    image = source.load(19)
    assert image.dtype == np.uint8
    assert image.shape == (112, 112, 3)
    assert image.std() > 10  # a face, not a blank decode


def test_dict_pickle_raises(tmp_path):
    path = tmp_path / "dict.bin"
    path.write_bytes(pickle.dumps({"images": [], "issame": []}))

    with pytest.raises(DataFormatError, match="found a dict") as error:
        read_verification_bin(path)
    assert "dict.bin" in str(error.value)


def test_class_reference_rejected(tmp_path):
    path = tmp_path / "ordered.bin"
    path.write_bytes(pickle.dumps(collections.OrderedDict(images=[b"x", b"y"], issame=[True])))

    with pytest.raises(DataFormatError, match="collections.OrderedDict"):
        read_verification_bin(path)


def test_code_in_pickle_not_run(tmp_path):
    payload = ([b"x", b"y"], [True], _CreateFolderOnLoad(tmp_path / "created"))
    pickle.loads(pickle.dumps(_CreateFolderOnLoad(tmp_path / "control")))
    assert (tmp_path / "control").is_dir()  # plain pickle does run the call
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(payload))

    with pytest.raises(DataFormatError, match="mkdir"):
        read_verification_bin(path)
    assert not (tmp_path / "created").exists()


def test_image_count_mismatch_raises(tmp_path, lfw_pairs):
    path = tmp_path / "odd.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True])))

    with pytest.raises(DataFormatError, match="3 images for 1 pairs"):
        read_verification_bin(path)
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        write_verification_bin(tmp_path / "never.bin", lfw_pairs[0][:3], [True])
    assert not (tmp_path / "never.bin").exists()


def test_non_bool_issame_raises(tmp_path):
    path = tmp_path / "labels.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], ["yes"])))

    with pytest.raises(DataFormatError, match="list of bools"):
        read_verification_bin(path)


def test_non_pickle_raises(tmp_path):
    path = tmp_path / "text.bin"
    path.write_text("Abel_Pacheco 1 4\n")

    with pytest.raises(DataFormatError, match="not a readable pickle") as error:
        read_verification_bin(path)
    assert "text.bin" in str(error.value)


def test_numpy_array_entries_accepted(tmp_path, lfw_pairs):
    images, same = lfw_pairs
    write_verification_bin(tmp_path / "png.bin", images[:2], same[:1], image_format="png")
    encoded, _ = read_verification_bin(tmp_path / "png.bin")
    path = tmp_path / "arrays.bin"
    for protocol in (2, 5):
        arrays = [np.frombuffer(item, dtype=np.uint8).reshape(-1, 1) for item in encoded]
        path.write_bytes(pickle.dumps((arrays, np.array([True])), protocol=protocol))

        source = VerificationBinSource(path, num_folds=1)
        assert source.same.tolist() == [True]
        assert np.array_equal(source.load(1), images[1])


def test_object_array_rejected(tmp_path):
    path = tmp_path / "objects.bin"
    path.write_bytes(pickle.dumps(([np.array([b"a"], dtype=object)] * 2, [True])))

    with pytest.raises(DataFormatError, match="numpy dtype 'O8'"):
        read_verification_bin(path)
