"""The one-line CLI error shows the message lvlrfr wrote, not the library error it was raised from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_stages_cli import REPO_ROOT, small_run

from lvlrfr.cli import main
from lvlrfr.data.sources.lfw import read_lfw_pairs
from lvlrfr.utils.errors import raised_in_project, user_error_to_report

HUB_ID = "someorg/face-sr-ddpm"
OFFLINE_HUB_MESSAGE = f"failed to load the diffusion SR teacher from Hub id '{HUB_ID}' in offline mode"


def run_console(tmp_path: Path, *arguments: str, debug: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m lvlrfr.cli`` offline, with an empty Hugging Face cache, and capture its output."""
    environment = {key: value for key, value in os.environ.items() if key != "LVLRFR_DEBUG"}
    environment |= {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    if debug:
        environment["LVLRFR_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "lvlrfr.cli", *arguments],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300,
    )


def fit_hub_teacher(tmp_path: Path, lfw_root: Path, debug: bool = False) -> subprocess.CompletedProcess:
    return run_console(
        tmp_path, "fit", "--config", "configs/generative.yaml", "--trainer.max_epochs", "1",
        "--trainer.default_root_dir", str(tmp_path / "run"), "--data.train_root", str(lfw_root),
        "--data.pairs_file", str(lfw_root / "pairs.txt"), "--model.init_args.sr_teacher_checkpoint", HUB_ID,
        debug=debug,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("lvlrfr: error: ")]


def test_offline_hub_teacher_shows_project_message(tmp_path, lfw_root):
    result = fit_hub_teacher(tmp_path, lfw_root)

    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr) == [f"lvlrfr: error: {OFFLINE_HUB_MESSAGE} (HF_HUB_OFFLINE or local_files_only): "
                                          f"{HUB_ID} does not appear to have a file named config.json."]
    assert "place a folder written by DiffusionSRTeacher.save_pretrained" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_offline_hub_teacher_debug_traceback(tmp_path, lfw_root):
    result = fit_hub_teacher(tmp_path, lfw_root, debug=True)

    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "huggingface_hub.errors.LocalEntryNotFoundError" in result.stderr
    assert f"OSError: {OFFLINE_HUB_MESSAGE}" in result.stderr
    assert not error_lines(result.stderr)


def test_teachers_describe_offline_hub_id(tmp_path):
    result = run_console(tmp_path, "teachers", "describe", "--sr-teacher", HUB_ID)

    assert result.returncode == 2, result.stderr
    assert len(error_lines(result.stderr)) == 1
    assert error_lines(result.stderr)[0].startswith(f"lvlrfr: error: {OFFLINE_HUB_MESSAGE}")
    assert "Traceback" not in result.stderr


def test_bad_pairs_header_names_file(lfw_root, tmp_path, capsys):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("ten 300\nAbel_Pacheco 1 2\n")

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO_ROOT / "configs" / "sr_teacher.yaml"), *small_run(lfw_root, tmp_path),
              "--data.pairs_file", str(pairs), "--trainer.fast_dev_run", "1"])

    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"lvlrfr: error: {pairs} line 1 is 'ten 300'; expected '<folds> <pairs per fold>' such as '10 300'" in error
    assert "invalid literal" not in error
    assert "Traceback" not in error


def test_single_eval_fold_stops_before_training(lfw_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO_ROOT / "configs" / "sr_teacher.yaml"), *small_run(lfw_root, tmp_path),
              "--data.eval_folds", "[10]", "--trainer.max_steps", "1"])

    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "lvlrfr: error: data.eval_folds is [10], but k-fold verification needs at least two distinct folds" in error
    assert "e.g. [9, 10], or set data.pairs_file to null" in error
    assert not (tmp_path / "checkpoints").exists()


def raise_project_error(pairs: Path, root: Path) -> ValueError:
    """Return the error that lvlrfr raises for a pairs file whose header is not two integers."""
    pairs.write_text("ten 300\n")
    with pytest.raises(ValueError) as caught:
        read_lfw_pairs(pairs, root)
    return caught.value


def test_report_prefers_project_wrapper(tmp_path, lfw_root):
    project_error = raise_project_error(tmp_path / "pairs.txt", lfw_root)

    assert raised_in_project(project_error)
    assert isinstance(project_error.__cause__, ValueError)
    assert "invalid literal" in str(project_error.__cause__)
    assert user_error_to_report(project_error) is project_error


def test_report_skips_library_wrapper(tmp_path, lfw_root):
    project_error = raise_project_error(tmp_path / "pairs.txt", lfw_root)
    # jsonargparse raises such a ValueError from an exception of a class it instantiates.
    with pytest.raises(ValueError) as caught:
        raise ValueError("Does not validate against any of the Union subtypes") from project_error

    assert not raised_in_project(caught.value)
    assert user_error_to_report(caught.value) is project_error


def test_report_falls_back_to_innermost():
    with pytest.raises(ValueError) as caught:
        try:
            raise FileNotFoundError("inner library message")
        except FileNotFoundError as error:
            raise ValueError("outer library wrapper") from error

    assert str(user_error_to_report(caught.value)) == "inner library message"


def test_report_without_user_error():
    error = RuntimeError("not a user error")

    assert not raised_in_project(error)
    assert user_error_to_report(error) is error
