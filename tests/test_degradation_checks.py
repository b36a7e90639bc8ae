"""A stage stops when its teacher or stage 1 backbone was trained on another degradation, or on evaluated people."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from test_stages_cli import REPO_ROOT, small_run

from lvlrfr.cli import main
from lvlrfr.data.degradation import Degradation
from lvlrfr.teachers.diffusion import DiffusionSRTeacher

SR_TEACHER = {"sample_size": 32, "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8}
TRAINED_ON = Degradation(vlr_size=16, input_size=32, down_kernel="area", up_kernel="bicubic", seed=0)


def save_sr_checkpoint(path: Path, lfw_root: Path, eval_folds: list[int] | None) -> Path:
    """Write a stage 0a checkpoint of a small SR teacher trained on 16-pixel LFW faces (area down-sampling, seed 0).

    The teacher's training held out the people of ``eval_folds`` (None: it trained on everyone).
    """
    torch.manual_seed(0)
    teacher = DiffusionSRTeacher(**SR_TEACHER)
    state = {f"teacher.{key}": value for key, value in teacher.state_dict().items()}
    data = {
        "train_root": str(lfw_root), "pairs_file": str(lfw_root / "pairs.txt") if eval_folds else None, "eval_root": None,
        "eval_folds": eval_folds or [], "exclude_eval_people": True,
    }
    hyper_parameters = {"teacher": SR_TEACHER, "degradation": TRAINED_ON.to_dict()}
    torch.save({"hyper_parameters": hyper_parameters, "datamodule_hyper_parameters": data, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def sr_checkpoint(lfw_root, tmp_path_factory) -> Path:
    """A stage 0a checkpoint whose training held out the people of LFW folds 9 and 10, which the tests evaluate."""
    return save_sr_checkpoint(tmp_path_factory.mktemp("sr") / "final.ckpt", lfw_root, [9, 10])


def fit_generative(lfw_root: Path, root: Path, sr_checkpoint: Path, *extra: str) -> None:
    main([
        "fit", "--config", str(REPO_ROOT / "configs" / "generative.yaml"), *small_run(lfw_root, root),
        "--model.init_args.sr_teacher_checkpoint", str(sr_checkpoint), "--trainer.fast_dev_run", "1", *extra,
    ])


def test_stage1_rejects_teacher_of_other_degradation(lfw_root, tmp_path, sr_checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit_generative(lfw_root, tmp_path, sr_checkpoint, "--data.degradation.down_kernel", "bicubic")

    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "the diffusion SR teacher was trained on degradation" in error
    assert "down_kernel: 'area' -> 'bicubic'" in error
    assert "Traceback" not in error


def test_stage1_warns_about_other_vlr_size(lfw_root, tmp_path, sr_checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="lvlrfr.stages.base"):
        fit_generative(lfw_root, tmp_path, sr_checkpoint, "--data.degradation.vlr_size", "12", "--data.eval_sizes", "[12]")

    assert "the diffusion SR teacher was trained on 16-pixel faces, but the data module produces 12-pixel faces" in caplog.text


@pytest.mark.parametrize("held_out", [[10], None], ids=["other-folds", "no-folds"])
def test_stage1_rejects_teacher_seeing_evaluated_people(lfw_root, tmp_path, held_out, capsys):
    checkpoint = save_sr_checkpoint(tmp_path / "sr.ckpt", lfw_root, held_out)

    with pytest.raises(SystemExit) as exit_info:
        fit_generative(lfw_root, tmp_path / "run", checkpoint)

    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "the diffusion SR teacher was trained on" in error
    assert "people of the evaluated pairs (data.eval_folds [9, 10])" in error
    assert f"held out the folds {held_out or 'none'}" in error


def test_stage1_accepts_subset_of_held_out_folds(lfw_root, tmp_path, sr_checkpoint, capsys):
    fit_generative(lfw_root, tmp_path, sr_checkpoint, "--data.eval_folds", "[9, 10]")
    checkpoint = save_sr_checkpoint(tmp_path / "sr.ckpt", lfw_root, [8, 9, 10])

    fit_generative(lfw_root, tmp_path / "subset", checkpoint)

    assert "Traceback" not in capsys.readouterr().err
