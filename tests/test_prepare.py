"""``lvlrfr prepare``: reproducible low-resolution copies of verification and identification sets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lfw_files import write_pairs_subset

from lvlrfr.cli import main as cli_main
from lvlrfr.commands.prepare import prepare
from lvlrfr.data.degradation import Degradation
from lvlrfr.data.image import decode_rgb, load_rgb
from lvlrfr.data.prepared import file_sha256, folder_sha256, read_manifest
from lvlrfr.data.sets import EvaluationSet, load_set
from lvlrfr.data.sources.errors import DataFormatError
from lvlrfr.data.sources.verification_bin import read_verification_bin
from lvlrfr.utils.errors import ConfigurationError

SIZES = [16, 8]


@pytest.fixture(scope="module")
def lfw_pairs_file(tmp_path_factory, lfw_root) -> Path:
    """Ten pairs of each of LFW folds 1 and 2: five matched, then five mismatched."""
    return write_pairs_subset(lfw_root, tmp_path_factory.mktemp("pairs") / "pairs.txt", per_fold=5)


@pytest.fixture(scope="module")
def att_subset(tmp_path_factory, shared_data) -> Path:
    """AT&T faces of five people, three images each."""
    root = tmp_path_factory.mktemp("att")
    for person in range(1, 6):
        (root / f"s{person}").mkdir()
        for image in (1, 2, 3):
            shutil.copy(shared_data / "att_faces" / f"s{person}" / f"{image}.pgm", root / f"s{person}" / f"{image}.pgm")
    return root


def lfw_source(pairs_file: Path, lfw_root: Path, **fields) -> EvaluationSet:
    return EvaluationSet(name="lfw", kind="lfw", pairs_file=str(pairs_file), root=str(lfw_root),
                         **{"folds": [1, 2], **fields})


@pytest.fixture(scope="module")
def prepared_lfw(tmp_path_factory, lfw_pairs_file, lfw_root) -> Path:
    output = tmp_path_factory.mktemp("prepared") / "lfw"
    prepare(lfw_source(lfw_pairs_file, lfw_root), str(output), sizes=SIZES)
    return output


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_verification_twice_byte_identical(tmp_path, lfw_pairs_file, lfw_root, image_format):
    arguments = ["prepare", "--sizes", "[16, 8]", "--source.name", "lfw", "--source.kind", "lfw",
                 "--source.pairs_file", str(lfw_pairs_file), "--source.root", str(lfw_root),
                 "--source.folds", "[1, 2]", "--image_format", image_format]
    cli_main([*arguments, "--output_dir", str(tmp_path / "first")])
    cli_main([*arguments, "--output_dir", str(tmp_path / "second")])
    first, second = folder_bytes(tmp_path / "first"), folder_bytes(tmp_path / "second")

    assert sorted(first) == ["lfw_16px.bin", "lfw_8px.bin", "lfw_hr.bin", "manifest.json"]
    assert first == second
    assert json.loads(first["manifest.json"])["image_format"] == image_format
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary folder left


def test_verification_manifest_contents(prepared_lfw, lfw_pairs_file):
    manifest = json.loads((prepared_lfw / "manifest.json").read_text())

    assert manifest["task"] == "verification"
    assert manifest["sizes"] == SIZES
    assert manifest["counts"]["pairs"] == 20
    assert manifest["counts"]["same"] == 10
    assert manifest["counts"]["images"] == 40
    assert manifest["pair_folds"] == [[1, 10], [2, 10]]
    assert manifest["source"]["pairs_file_sha256"] == file_sha256(lfw_pairs_file)
    assert manifest["degradation"] == Degradation().to_dict()
    for key, name in (("hr", "lfw_hr.bin"), ("16px", "lfw_16px.bin"), ("8px", "lfw_8px.bin")):
        assert manifest["outputs"][key]["path"] == name
        assert manifest["outputs"][key]["sha256"] == file_sha256(prepared_lfw / name)


def test_bins_hold_pairs_at_each_size(prepared_lfw, lfw_pairs_file, lfw_root):
    protocol = load_set(lfw_source(lfw_pairs_file, lfw_root), prepared_lfw).verification
    for name, side in (("lfw_hr.bin", 112), ("lfw_16px.bin", 16), ("lfw_8px.bin", 8)):
        images, same = read_verification_bin(prepared_lfw / name)
        assert same.tolist() == protocol.same.tolist()
        assert len(images) == 40
        assert decode_rgb(images[0], name).shape == (side, side, 3)


def test_prepared_faces_equal_on_the_fly(prepared_lfw, lfw_pairs_file, lfw_root):
    on_the_fly = load_set(lfw_source(lfw_pairs_file, lfw_root), prepared_lfw)
    stored = load_set(EvaluationSet(name="stored", kind="prepared", path=str(prepared_lfw)), prepared_lfw)
    spec = Degradation(vlr_size=16, input_size=112)
    live_faces, stored_faces = on_the_fly.faces(spec, 112), stored.faces(spec, 112)

    assert stored.verification.folds.tolist() == on_the_fly.verification.folds.tolist()
    assert stored.verification.same.tolist() == on_the_fly.verification.same.tolist()
    # Each set indexes an image once, the prepared one in order of first use.
    assert len(stored.images) == len(on_the_fly.images) == 33
    for index, position in zip(on_the_fly.verification.pairs.reshape(-1), stored.verification.pairs.reshape(-1)):
        live, stored_face = live_faces[int(index)], stored_faces[int(position)]
        assert torch.equal(live["hr"], stored_face["hr"])
        assert torch.equal(live["vlr"], stored_face["vlr"])


def test_bin_with_manifest_reads_stored_size(prepared_lfw):
    low = load_set(EvaluationSet(name="low", kind="bin", path=str(prepared_lfw / "lfw_8px.bin")), prepared_lfw)
    high = load_set(EvaluationSet(name="high", kind="bin", path=str(prepared_lfw / "lfw_hr.bin")), prepared_lfw)

    assert sorted(low.stored) == [8]
    with pytest.raises(ConfigurationError, match=r"stores faces at \[8\] px, not at \[16\] px"):
        low.check_sizes([16, 8])
    # The HR copy alone is degraded on the fly, with the folds the manifest records, not 10 blocks.
    assert high.prepared is None
    assert high.verification.folds.tolist() == [1] * 10 + [2] * 10
    assert torch.equal(high.faces(Degradation(vlr_size=8), 112)[0]["vlr"], low.faces(Degradation(vlr_size=8), 112)[0]["vlr"])


def test_changed_output_rejected(tmp_path, prepared_lfw):
    copy = tmp_path / "copy"
    shutil.copytree(prepared_lfw, copy)
    data = bytearray((copy / "lfw_8px.bin").read_bytes())
    data[-20] ^= 0xFF
    (copy / "lfw_8px.bin").write_bytes(bytes(data))

    with pytest.raises(DataFormatError, match="changed after it was prepared") as error:
        load_set(EvaluationSet(name="copy", kind="prepared", path=str(copy)), tmp_path)
    assert str(copy / "lfw_8px.bin") in str(error.value)


def test_existing_output_rejected_then_replaced(tmp_path, lfw_pairs_file, lfw_root):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("previous run")

    with pytest.raises(ConfigurationError, match="already exists"):
        prepare(lfw_source(lfw_pairs_file, lfw_root, folds=[1]), str(output), sizes=[8])
    assert (output / "old.txt").is_file()
    prepare(lfw_source(lfw_pairs_file, lfw_root), str(output), sizes=[8], overwrite=True)
    assert sorted(path.name for path in output.iterdir()) == ["lfw_8px.bin", "lfw_hr.bin", "manifest.json"]
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_bgr_set_needs_conversion(tmp_path, lfw_pairs_file, lfw_root):
    with pytest.raises(ConfigurationError, match="convert_to_rgb: true"):
        prepare(lfw_source(lfw_pairs_file, lfw_root, colour_order="BGR"), str(tmp_path / "bgr"), sizes=[8])
    assert not (tmp_path / "bgr").exists()

    prepare(lfw_source(lfw_pairs_file, lfw_root, colour_order="BGR", convert_to_rgb=True), str(tmp_path / "bgr"),
            sizes=[8])
    converted = load_set(EvaluationSet(name="bgr", kind="prepared", path=str(tmp_path / "bgr")), tmp_path)
    first_image = load_set(lfw_source(lfw_pairs_file, lfw_root), tmp_path).images.load(0)
    assert np.array_equal(converted.images.load(0), first_image[:, :, ::-1])
    with pytest.raises(ConfigurationError, match="stores RGB images"):
        load_set(EvaluationSet(name="bgr", kind="prepared", path=str(tmp_path / "bgr"), colour_order="BGR",
                               convert_to_rgb=True), tmp_path)


def test_identification_twice_byte_identical(tmp_path, att_subset):
    source = EvaluationSet(name="att", kind="identification", root=str(att_subset), crop_box=[0, 10, 92, 102])
    first = prepare(source, str(tmp_path / "first"), sizes=SIZES)
    prepare(source, str(tmp_path / "second"), sizes=SIZES)

    assert folder_bytes(tmp_path / "first") == folder_bytes(tmp_path / "second")
    files = folder_bytes(tmp_path / "first")
    assert len([name for name in files if name.startswith("hr/")]) == 15
    assert len([name for name in files if name.startswith("8px/")]) == 15
    assert first["counts"] == {"gallery": 5, "probe": 10, "distractor": 0, "gallery_identities": 5}
    assert first["outputs"]["16px"]["sha256"] == folder_sha256(tmp_path / "first" / "16px")[0]
    assert load_rgb(tmp_path / "first" / "16px" / "s1" / "1.png").shape == (16, 16, 3)


def test_identification_prepared_roles(tmp_path, att_subset):
    source = EvaluationSet(name="att", kind="identification", root=str(att_subset))
    prepare(source, str(tmp_path / "att"), sizes=[8])
    live = load_set(source, tmp_path / "lists")
    stored = load_set(EvaluationSet(name="att", kind="prepared", path=str(tmp_path / "att")), tmp_path)
    spec = Degradation(vlr_size=8, input_size=32)

    assert stored.task == "identification"
    assert stored.identification.labels.tolist() == live.identification.labels.tolist()
    assert stored.identification.gallery.tolist() == live.identification.gallery.tolist()
    assert torch.equal(stored.faces(spec, 112)[7]["vlr"], live.faces(spec, 112)[7]["vlr"])
    assert read_manifest(tmp_path / "att").sizes == [8]


def test_distractors_get_own_labels(tmp_path, att_subset):
    (tmp_path / "gallery.txt").write_text("s1/1.pgm 0\ns2/1.pgm 1\n")
    (tmp_path / "probe.txt").write_text("s1/2.pgm 0\ns2/2.pgm 1\n")
    (tmp_path / "distractor.txt").write_text("s3/1.pgm\ns4/1.pgm\ns5/1.pgm\n")
    config = EvaluationSet(name="att", kind="identification", root=str(att_subset),
                           gallery_list=str(tmp_path / "gallery.txt"), probe_list=str(tmp_path / "probe.txt"),
                           distractor_list=str(tmp_path / "distractor.txt"))
    roles = load_set(config, tmp_path).identification

    assert roles.gallery.tolist() == [0, 1, 4, 5, 6]
    assert roles.probe.tolist() == [2, 3]
    # Each distractor ranks as an identity of its own, not as one shared "unknown" identity.
    assert roles.labels[roles.gallery].tolist() == [0, 1, -1, -2, -3]
