"""A stage stops when its teacher or its stage 1 backbone was trained on another degradation than the data module's."""

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


@pytest.fixture(scope="module")
def sr_checkpoint(tmp_path_factory) -> Path:
    """A stage 0a checkpoint of a small SR teacher trained on 16-pixel faces (area down-sampling, seed 0)."""
    torch.manual_seed(0)
    teacher = DiffusionSRTeacher(**SR_TEACHER)
    path = tmp_path_factory.mktemp("sr") / "final.ckpt"
    state = {f"teacher.{key}": value for key, value in teacher.state_dict().items()}
    torch.save({"hyper_parameters": {"teacher": SR_TEACHER, "degradation": TRAINED_ON.to_dict()}, "state_dict": state}, path)
    return path


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

    assert "the diffusion SR teacher was trained on 16-pixel faces, the data module produces 12-pixel faces" in caplog.text
