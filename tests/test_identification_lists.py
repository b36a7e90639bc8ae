"""Gallery/probe identification lists on the AT&T faces."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lvlrfr.data.sources.errors import DataFormatError
from lvlrfr.data.sources.identification import (
    IdentificationSource,
    read_image_list,
    split_gallery_probe,
    write_identification_lists,
)


@pytest.fixture(scope="module")
def att_root(shared_data: Path) -> Path:
    return shared_data / "att_faces"


def test_split_one_gallery_image_per_person(att_root):
    gallery, probes = split_gallery_probe(att_root, gallery_per_identity=1, seed=0)

    assert len(gallery) == 40
    assert len(probes) == 360
    assert sorted(label for _, label in gallery) == list(range(40))
    assert not {path for path, _ in gallery} & {path for path, _ in probes}
    for path, label in gallery + probes:
        folder = path.split("/")[0]
        assert sorted(p.name for p in att_root.iterdir() if p.is_dir()).index(folder) == label
        assert path.endswith(".pgm")


def test_split_seeded(att_root):
    first, _ = split_gallery_probe(att_root, gallery_per_identity=2, seed=3)
    again, _ = split_gallery_probe(att_root, gallery_per_identity=2, seed=3)
    other, _ = split_gallery_probe(att_root, gallery_per_identity=2, seed=4)

    assert len(first) == 80
    assert first == again
    assert first != other


def test_lists_round_trip(tmp_path, att_root):
    gallery, probes = split_gallery_probe(att_root, gallery_per_identity=1, seed=0)
    written = write_identification_lists(tmp_path, gallery, probes)
    source = IdentificationSource(written["gallery"], written["probe"], att_root)

    assert len(source) == 400
    assert source.describe()["counts"] == {"gallery": 40, "probe": 360}
    assert source.indices("gallery").tolist() == list(range(40))
    assert source.indices("probe").tolist() == list(range(40, 400))
    assert source.labels.dtype == np.int64
    assert source.labels[source.indices("probe")].tolist() == [label for _, label in probes]
    assert source.paths[41] == att_root / probes[1][0]
    image = source.load(0)
    assert image.dtype == np.uint8
    assert image.shape == (112, 92, 3)
    assert np.array_equal(image[..., 0], image[..., 2])  # greyscale PGM expanded to three equal channels


def test_distractors_labelled_minus_one(tmp_path, att_root):
    gallery, probes = split_gallery_probe(att_root, gallery_per_identity=1, seed=0)
    known = [entry for entry in gallery + probes if entry[1] < 39]
    distractors = [entry for entry in probes if entry[1] == 39]
    written = write_identification_lists(tmp_path, [e for e in gallery if e[1] < 39],
                                         [e for e in known if e not in gallery], distractors)
    (tmp_path / "unlabelled.txt").write_text("".join(f"{path}\n" for path, _ in distractors))

    for distractor_list in (written["distractor"], tmp_path / "unlabelled.txt"):
        source = IdentificationSource(written["gallery"], written["probe"], att_root, distractor_list)
        assert source.describe()["counts"] == {"gallery": 39, "probe": 351, "distractor": 9}
        assert (source.labels[source.indices("distractor")] == -1).all()
        assert source.describe()["gallery_identities"] == 39


def test_probe_label_not_in_gallery(tmp_path, att_root):
    gallery, probes = split_gallery_probe(att_root, gallery_per_identity=1, seed=0)
    written = write_identification_lists(tmp_path, [entry for entry in gallery if entry[1] != 7], probes)

    with pytest.raises(DataFormatError, match=r"probe labels have no gallery image \(first: \[7\]\)") as error:
        IdentificationSource(written["gallery"], written["probe"], att_root)
    assert "probe.txt" in str(error.value)


def test_empty_identity_folder(tmp_path, att_root):
    (tmp_path / "s1").mkdir()
    for name in ("1.pgm", "2.pgm"):
        shutil.copy(att_root / "s1" / name, tmp_path / "s1" / name)
    (tmp_path / "s2").mkdir()

    with pytest.raises(DataFormatError, match="contains no images") as error:
        split_gallery_probe(tmp_path)
    assert str(tmp_path / "s2") in str(error.value)


def test_image_in_two_roles(tmp_path, att_root):
    (tmp_path / "gallery.txt").write_text("s1/1.pgm 0\n")
    (tmp_path / "probe.txt").write_text("s1/2.pgm 0\ns1/1.pgm 0\n")

    with pytest.raises(DataFormatError, match="s1/1.pgm is already in the gallery list"):
        IdentificationSource(tmp_path / "gallery.txt", tmp_path / "probe.txt", att_root)


def test_line_without_label(tmp_path, att_root):
    (tmp_path / "gallery.txt").write_text("# gallery\ns1/1.pgm 0\ns2/1.pgm\n")

    with pytest.raises(DataFormatError, match="line 3") as error:
        read_image_list(tmp_path / "gallery.txt", att_root)
    assert "gallery.txt" in str(error.value)


def test_missing_image_names_root(tmp_path, att_root):
    (tmp_path / "probe.txt").write_text("s1/1.pgm 0\ns41/1.pgm 40\n")

    with pytest.raises(DataFormatError, match="line 2 names s41/1.pgm") as error:
        read_image_list(tmp_path / "probe.txt", att_root)
    assert str(att_root) in str(error.value)


def test_path_with_spaces(tmp_path, att_root):
    (tmp_path / "person one").mkdir()
    shutil.copy(att_root / "s1" / "1.pgm", tmp_path / "person one" / "face 1.pgm")
    write_identification_lists(tmp_path, [("person one/face 1.pgm", 0)], [])

    assert read_image_list(tmp_path / "gallery.txt", tmp_path) == [("person one/face 1.pgm", 0)]
