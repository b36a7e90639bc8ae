"""``lvlrfr evaluate`` end to end: LFW and ``.bin`` verification, AT&T identification, degradation checks.

The recognizer is the real MobileFaceNet ArcFace ONNX model run by onnxruntime. Each image costs two
forward passes (image and flip), so the subsets are small: 24 LFW pairs and 36 AT&T faces.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from lfw_files import write_pairs_subset

from lvlrfr.cli import main as cli_main
from lvlrfr.commands.prepare import prepare
from lvlrfr.data.degradation import Degradation
from lvlrfr.data.image import load_rgb
from lvlrfr.data.sets import EvaluationSet
from lvlrfr.data.sources.lfw import read_lfw_pairs
from lvlrfr.data.sources.verification_bin import write_verification_bin
from lvlrfr.models.student import Student, StudentBackbone, StudentHead


@pytest.fixture(scope="module")
def teacher(shared_models) -> dict:
    return {"recognizer": str(shared_models / "mobilefacenet" / "mobilefacenet_arcface.onnx"),
            "spec": "mobilefacenet_arcface", "backend": "onnxruntime"}


@pytest.fixture(scope="module")
def lfw_subset(tmp_path_factory, lfw_root) -> dict:
    """24 LFW pairs (6 matched and 6 mismatched of folds 1 and 2) and the same pairs in a PNG ``.bin``."""
    folder = tmp_path_factory.mktemp("lfw")
    pairs_file = write_pairs_subset(lfw_root, folder / "pairs.txt", per_fold=6)
    protocol = read_lfw_pairs(pairs_file, lfw_root)
    images = [load_rgb(protocol.paths[index]) for index in protocol.pairs.reshape(-1)]
    write_verification_bin(folder / "pairs.bin", images, protocol.same, image_format="png")
    return {"pairs_file": str(pairs_file), "root": str(lfw_root), "bin": str(folder / "pairs.bin")}


@pytest.fixture(scope="module")
def att_subset(tmp_path_factory, shared_data) -> Path:
    """AT&T faces of 12 people, three images each."""
    root = tmp_path_factory.mktemp("att")
    for person in range(1, 13):
        (root / f"s{person}").mkdir()
        for image in ("1.pgm", "2.pgm", "3.pgm"):
            shutil.copy(shared_data / "att_faces" / f"s{person}" / image, root / f"s{person}" / image)
    return root


def run_evaluate(folder: Path, config: dict, *extra: str) -> dict:
    """Write ``config`` as YAML, run ``lvlrfr evaluate`` on it and return ``results.json``."""
    config = {"output_dir": str(folder), "batch_size": 64, "num_workers": 0, "degradation": Degradation().to_dict(),
              **config}
    path = folder.parent / f"{folder.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cli_main(["evaluate", "--config", str(path), *extra])
    return json.loads((folder / "results.json").read_text())


def rows_by(record: dict, set_name: str) -> dict:
    return {row["size"]: row for row in record["results"] if row["set"] == set_name}


@pytest.fixture(scope="module")
def lfw_sizes(tmp_path_factory, teacher, lfw_subset) -> tuple[Path, dict]:
    """The teacher on the LFW subset: HR faces, and faces degraded to 16 and 8 px."""
    folder = tmp_path_factory.mktemp("runs") / "lfw_sizes"
    # The set entry has no kind: configs written before the other kinds keep working as LFW sets.
    config = {"models": [{"name": "teacher", **teacher, "input": "hr"}, {"name": "teacher", **teacher, "input": "vlr"}],
              "sets": [{"name": "lfw", "pairs_file": lfw_subset["pairs_file"], "root": lfw_subset["root"],
                        "folds": [1, 2]}],
              "sizes": [16, 8]}
    return folder, run_evaluate(folder, config)


def test_accuracy_drops_with_size(lfw_sizes):
    _, record = lfw_sizes
    rows = rows_by(record, "lfw")

    assert set(rows) == {None, 16, 8}
    assert rows[None]["input"] == "hr"
    assert rows[None]["accuracy_mean"] > rows[16]["accuracy_mean"] > rows[8]["accuracy_mean"]
    assert rows[8]["accuracy_mean"] > 0.5


def test_results_record_protocol(lfw_sizes):
    folder, record = lfw_sizes
    row = rows_by(record, "lfw")[16]

    for key in ("command", "git_commit", "seed", "degradation", "data", "data_sha256", "flip_fusion"):
        assert key in record
    assert record["degradation"]["down_kernel"] == "area"
    assert "sum" in record["flip_fusion"]
    assert record["data"]["lfw"]["fold_assignment"] == "LFW View-2 folds [1, 2] of pairs.txt"
    assert record["data"]["lfw"]["pairs_evaluated"] == 24
    assert set(row["thresholds"]) == {"1", "2"}
    assert set(row["per_fold_accuracy"]) == {"1", "2"}
    assert set(row["tar_at_far"]) == {"0.001", "0.0001"}
    assert "flip fusion: sum" in row["protocol"]
    assert record["models"][1]["colour_conversion"] == "none (the recognizer takes RGB)"


def test_results_files_written(lfw_sizes):
    folder, record = lfw_sizes
    report = (folder / "results.md").read_text()

    assert record["plots"] == ["roc_lfw_16px.png", "roc_lfw_8px.png"]
    for name in record["plots"]:
        with Image.open(folder / name) as image:
            assert image.format == "PNG"
            assert image.width > 100
    assert "| model | input | set | size | accuracy % (mean ± std) | TAR@FAR=1e-3 % | TAR@FAR=1e-4 % |" in report
    accuracy_16 = rows_by(record, "lfw")[16]["accuracy_mean"]
    assert f"| teacher | degraded faces | lfw | 16px | {100 * accuracy_16:.2f} ± " in report
    assert "### Threshold per fold" in report


def test_bin_scores_equal_folder_scores(tmp_path, teacher, lfw_subset, lfw_sizes):
    _, folder_record = lfw_sizes
    config = {"models": [{"name": "teacher", **teacher, "input": "hr"}],
              "sets": [{"name": "lfwbin", "kind": "bin", "path": lfw_subset["bin"], "num_folds": 2}],
              "sizes": [16]}
    bin_row = rows_by(run_evaluate(tmp_path / "bin", config), "lfwbin")[None]
    folder_row = rows_by(folder_record, "lfw")[None]

    assert bin_row["accuracy_mean"] == folder_row["accuracy_mean"]
    assert bin_row["per_fold_accuracy"] == folder_row["per_fold_accuracy"]
    # The ROC thresholds are the distinct pair scores, so this compares every score.
    np.testing.assert_allclose(bin_row["roc"]["thresholds"][1:], folder_row["roc"]["thresholds"][1:], atol=1e-6)
    np.testing.assert_allclose(list(bin_row["thresholds"].values()), list(folder_row["thresholds"].values()),
                               atol=1e-6)


def test_identification_ranks_and_cmc(tmp_path, teacher, att_subset):
    common = {"kind": "identification", "root": str(att_subset), "crop_box": [0, 10, 92, 102]}
    config = {"models": [{"name": "teacher", **teacher, "input": "vlr"}],
              "sets": [{"name": "att", **common}, {"name": "att_cross", **common, "cross_resolution": True}],
              "sizes": [16, 8]}
    record = run_evaluate(tmp_path / "att", config)

    assert (tmp_path / "att" / "att_lists" / "gallery.txt").read_text().count("\n") == 12
    assert (tmp_path / "att" / "att_lists" / "probe.txt").read_text().count("\n") == 24
    for set_name, gallery in (("att", "{size}px"), ("att_cross", "HR")):
        rows = rows_by(record, set_name)
        assert sorted(rows) == [8, 16]
        for size, row in rows.items():
            ranks = [row["rank_k"][k] for k in ("1", "5", "10")]
            assert row["gallery"] == gallery.format(size=size)
            assert row["num_probes"] == 24
            assert row["num_gallery_identities"] == 12
            assert 0 < ranks[0] <= ranks[1] <= ranks[2] <= 1
            assert len(row["cmc"]) == 12
        for size in (16, 8):
            with Image.open(tmp_path / "att" / f"cmc_{set_name}_{size}px.png") as image:
                assert image.format == "PNG"
    # At 16 px a random gallery identity would be ranked first for one probe in 12.
    assert rows_by(record, "att")[16]["rank_k"]["1"] > 0.5
    report = (tmp_path / "att" / "results.md").read_text()
    assert "| model | input | set | probe size | gallery size | rank-1 % | rank-5 % | rank-10 % | probes |" in report


def write_student(path: Path, degradation: Degradation) -> Path:
    """Save a randomly initialised student as a stage checkpoint that records ``degradation``."""
    torch.manual_seed(0)
    backbone_arguments = {"arch": "iresnet", "input_size": 32, "depths": [1, 1], "widths": [8, 16]}
    backbone = StudentBackbone(**backbone_arguments)
    head = StudentHead(*backbone.feature_shapes[-1], 32)
    hyper_parameters = {"backbone": backbone_arguments, "embedding_size": 32, "head": "flatten",
                        "degradation": degradation.to_dict()}
    torch.save({"hyper_parameters": hyper_parameters, "state_dict": Student(backbone, head).state_dict()}, path)
    return path


def student_config(checkpoint: Path, att_subset: Path, **set_fields) -> dict:
    return {"models": [{"name": "student", "checkpoint": str(checkpoint)}],
            "sets": [{"name": "att", "kind": "identification", "root": str(att_subset), **set_fields}],
            "sizes": [16]}


def test_student_degradation_mismatch(tmp_path, capsys, att_subset):
    checkpoint = write_student(tmp_path / "student.ckpt", Degradation(down_kernel="bicubic"))
    config = student_config(checkpoint, att_subset)

    with pytest.raises(SystemExit):
        run_evaluate(tmp_path / "refused", config)
    message = capsys.readouterr().err
    assert "model 'student' was trained on" in message
    assert "down_kernel: trained 'bicubic', requested 'area'" in message
    assert not (tmp_path / "refused" / "results.json").exists()

    record = run_evaluate(tmp_path / "allowed", config, "--allow_degradation_mismatch", "true")
    assert len(record["degradation_mismatches_allowed"]) == 1
    assert "down_kernel" in record["degradation_mismatches_allowed"][0]
    assert record["models"][0]["trained_degradation"]["down_kernel"] == "bicubic"
    assert rows_by(record, "att")[16]["num_probes"] == 24


def test_prepared_degradation_mismatch(tmp_path, capsys, att_subset):
    prepare(EvaluationSet(name="att", kind="identification", root=str(att_subset)), str(tmp_path / "prepared"),
            sizes=[16], degradation=Degradation(down_kernel="bilinear"))
    checkpoint = write_student(tmp_path / "student.ckpt", Degradation())
    config = {**student_config(checkpoint, att_subset),
              "sets": [{"name": "att_prepared", "kind": "prepared", "path": str(tmp_path / "prepared")}]}

    with pytest.raises(SystemExit):
        run_evaluate(tmp_path / "refused", config)
    message = capsys.readouterr().err
    assert f"set 'att_prepared' ({tmp_path / 'prepared' / 'manifest.json'}) was prepared with" in message
    assert "down_kernel: prepared 'bilinear', requested 'area'" in message

    record = run_evaluate(tmp_path / "allowed", config, "--allow_degradation_mismatch", "true")
    # Once against the requested degradation and once against the student's, which are the same here.
    assert len(record["degradation_mismatches_allowed"]) == 2
    assert record["data"]["att_prepared"]["prepared_degradation"]["down_kernel"] == "bilinear"
    assert rows_by(record, "att_prepared")[16]["num_probes"] == 24


def test_bgr_set_rejected(tmp_path, capsys, att_subset):
    checkpoint = write_student(tmp_path / "student.ckpt", Degradation())

    with pytest.raises(SystemExit):
        run_evaluate(tmp_path / "bgr", student_config(checkpoint, att_subset, colour_order="BGR"))
    message = capsys.readouterr().err
    assert "set 'att' declares colour_order BGR" in message
    assert "convert_to_rgb: true" in message
