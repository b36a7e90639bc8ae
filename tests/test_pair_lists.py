"""Generic verification pair lists and contiguous folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import KFold

from lvlrfr.data.image import load_rgb
from lvlrfr.data.sources.errors import DataFormatError
from lvlrfr.data.sources.pairs import PairListSource, contiguous_folds


@pytest.fixture(scope="module")
def lfw_pair_lines(shared_data: Path) -> list[tuple[str, str, bool]]:
    """LFW pairs.txt lines 2-13 (matched) and 302-313 (mismatched) as relative paths and same flags."""
    lines = (shared_data / "lfw-112x112" / "pairs.txt").read_text().splitlines()
    pairs = []
    for line in lines[1:13] + lines[301:313]:
        fields = line.split()
        if len(fields) == 3:
            left, right = (fields[0], fields[1]), (fields[0], fields[2])
        else:
            left, right = (fields[0], fields[1]), (fields[2], fields[3])
        left_path, right_path = (f"{name}/{name}_{int(number):04d}.jpg" for name, number in (left, right))
        pairs.append((left_path, right_path, len(fields) == 3))
    return pairs


def test_whitespace_list_with_comments(tmp_path, shared_data, lfw_pair_lines):
    root = shared_data / "lfw-112x112"
    lines = [f"{left}\t{right} {int(same)}  # pair\n" for left, right, same in lfw_pair_lines]
    text = "# LFW subset\n\n" + "".join(lines)
    (tmp_path / "pairs.txt").write_text(text)
    source = PairListSource(tmp_path / "pairs.txt", root, num_folds=4)

    unique = sorted({path for left, right, _ in lfw_pair_lines for path in (left, right)})
    assert len(source) == len(unique)
    assert sorted(str(path.relative_to(root)) for path in source.paths) == unique
    assert source.same.tolist() == [same for _, _, same in lfw_pair_lines]
    assert source.pairs.shape == (24, 2)
    assert source.pairs.dtype == np.int64
    for (left, right, _), (i, j) in zip(lfw_pair_lines, source.pairs):
        assert source.paths[i] == root / left
        assert source.paths[j] == root / right
    assert np.array_equal(source.load(int(source.pairs[5, 1])), load_rgb(root / lfw_pair_lines[5][1]))
    assert source.folds.tolist() == [fold for fold in (1, 2, 3, 4) for _ in range(6)]


def test_repeated_image_loaded_once(tmp_path, shared_data, lfw_pair_lines):
    left, right, _ = lfw_pair_lines[1]
    (tmp_path / "pairs.csv").write_text(f"{left},{right},1\n{right},{left},true\n{left},{left},TRUE\n")
    source = PairListSource(tmp_path / "pairs.csv", shared_data / "lfw-112x112", num_folds=1)

    assert len(source) == 2
    assert source.pairs.tolist() == [[0, 1], [1, 0], [0, 0]]
    assert source.same.tolist() == [True, True, True]


def test_csv_header_skipped(tmp_path, shared_data, lfw_pair_lines):
    rows = "".join(f"{left},{right},{'true' if same else 'false'}\n" for left, right, same in lfw_pair_lines[10:14])
    (tmp_path / "pairs.csv").write_text("left,right,same\n" + rows)
    source = PairListSource(tmp_path / "pairs.csv", shared_data / "lfw-112x112", num_folds=2)

    assert source.same.tolist() == [True, True, False, False]
    assert source.folds.tolist() == [1, 1, 2, 2]


def test_missing_image_names_line(tmp_path, shared_data, lfw_pair_lines):
    root = shared_data / "lfw-112x112"
    left, right, _ = lfw_pair_lines[0]
    (tmp_path / "pairs.txt").write_text(f"# header comment\n{left} {right} 1\n{left} Nobody/Nobody_0001.jpg 0\n")

    with pytest.raises(DataFormatError, match="line 3 names Nobody/Nobody_0001.jpg") as error:
        PairListSource(tmp_path / "pairs.txt", root, num_folds=1)
    assert str(root) in str(error.value)
    assert "pairs.txt" in str(error.value)


def test_bad_same_value_raises(tmp_path, shared_data, lfw_pair_lines):
    left, right, _ = lfw_pair_lines[0]
    (tmp_path / "pairs.txt").write_text(f"{left} {right} 1\n{left} {right} 2\n")

    with pytest.raises(DataFormatError, match="line 2"):
        PairListSource(tmp_path / "pairs.txt", shared_data / "lfw-112x112", num_folds=1)


def test_numeric_first_line_not_header(tmp_path, shared_data, lfw_pair_lines):
    left, right, _ = lfw_pair_lines[0]
    (tmp_path / "pairs.txt").write_text(f"{left} {right} 2\n")

    with pytest.raises(DataFormatError, match="line 1"):
        PairListSource(tmp_path / "pairs.txt", shared_data / "lfw-112x112", num_folds=1)


def test_empty_list_raises(tmp_path, shared_data):
    (tmp_path / "pairs.txt").write_text("# nothing here\n")

    with pytest.raises(DataFormatError, match="no pairs"):
        PairListSource(tmp_path / "pairs.txt", shared_data / "lfw-112x112")


@pytest.mark.parametrize("num_pairs,num_folds", [(6000, 10), (10, 3), (7, 7), (23, 4)])
def test_contiguous_folds_match_kfold(num_pairs, num_folds):
    folds = contiguous_folds(num_pairs, num_folds)

    expected = np.zeros(num_pairs, dtype=np.int64)
    for fold, (_, test_indices) in enumerate(KFold(n_splits=num_folds, shuffle=False).split(np.arange(num_pairs)), 1):
        expected[test_indices] = fold
    assert np.array_equal(folds, expected)


def test_contiguous_folds_too_many():
    with pytest.raises(ValueError, match="num_folds=11"):
        contiguous_folds(10, 11)


def test_manifest_tracks_content(tmp_path, shared_data, lfw_pair_lines):
    root = shared_data / "lfw-112x112"
    left, right, _ = lfw_pair_lines[0]
    (tmp_path / "pairs.txt").write_text(f"{left} {right} 1\n")
    first = PairListSource(tmp_path / "pairs.txt", root, num_folds=1).manifest()
    (tmp_path / "pairs.txt").write_text(f"{left} {right} 0\n")
    second = PairListSource(tmp_path / "pairs.txt", root, num_folds=1).manifest()

    assert first["pairs_sha256"] != second["pairs_sha256"]
    assert first["same"] == 1
    assert second["same"] == 0
