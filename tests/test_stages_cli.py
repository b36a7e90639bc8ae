"""Every stage through the real LightningCLI on real LFW faces, chained as `make train-all` chains them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from lvlrfr.cli import main
from lvlrfr.data.datamodule import LowResFaceDataModule
from lvlrfr.data.degradation import Degradation
from lvlrfr.stages import DiscriminativeDistillation, GenerativeDistillation

REPO_ROOT = Path(__file__).resolve().parents[1]
TEACHER_ONNX = "mobilefacenet/mobilefacenet_arcface.onnx"


def small_run(lfw_root: Path, root: Path) -> list[str]:
    """Overrides that shrink any stage config to a few seconds: few images, two folds, no workers."""
    return [
        "--trainer.default_root_dir", str(root),
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--data.train_root", str(lfw_root),
        "--data.pairs_file", str(lfw_root / "pairs.txt"),
        "--data.eval_folds", "[9, 10]",
        "--data.max_train_images", "96",
        "--data.batch_size", "16",
        "--data.eval_batch_size", "128",
        "--data.num_workers", "0",
    ]


def fit(config: str, lfw_root: Path, root: Path, *extra: str) -> None:
    main(["fit", "--config", str(REPO_ROOT / "configs" / config), *small_run(lfw_root, root), *extra])


@pytest.fixture(scope="module")
def chain(lfw_root, shared_models, tmp_path_factory) -> dict[str, Path]:
    """Run stage 0a, 1 and 2 for two optimizer steps each and return their final checkpoints."""
    runs = tmp_path_factory.mktemp("runs")
    fit("sr_teacher.yaml", lfw_root, runs / "sr", "--trainer.max_steps", "2", "--trainer.max_epochs", "1",
        "--trainer.limit_val_batches", "0.2", "--model.init_args.sample_steps", "2",
        "--model.init_args.sample_grid_size", "2")
    sr = runs / "sr" / "checkpoints" / "final.ckpt"
    fit("generative.yaml", lfw_root, runs / "generative", "--trainer.max_steps", "2", "--trainer.max_epochs", "1",
        "--model.init_args.sr_teacher_checkpoint", str(sr))
    generative = runs / "generative" / "checkpoints" / "final.ckpt"
    fit("discriminative.yaml", lfw_root, runs / "discriminative", "--trainer.max_steps", "2", "--trainer.max_epochs", "1",
        "--model.init_args.student_checkpoint", str(generative),
        "--model.init_args.recognizer", str(shared_models / TEACHER_ONNX))
    return {
        "sr": sr,
        "generative": generative,
        "discriminative": runs / "discriminative" / "checkpoints" / "final.ckpt",
        "runs": runs,
    }


def test_chain_writes_final_checkpoints(chain):
    for stage in ("sr", "generative", "discriminative"):
        assert chain[stage].is_file(), stage


def test_stage_checkpoints_record_degradation(chain):
    expected = Degradation(vlr_size=16, input_size=32).to_dict()
    for stage in ("sr", "generative", "discriminative"):
        checkpoint = torch.load(chain[stage], map_location="cpu", weights_only=False)
        assert checkpoint["hyper_parameters"]["degradation"] == expected, stage


def test_teachers_left_out_of_checkpoints(chain):
    generative = torch.load(chain["generative"], map_location="cpu", weights_only=False)["state_dict"]
    discriminative = torch.load(chain["discriminative"], map_location="cpu", weights_only=False)["state_dict"]
    assert not any(key.startswith("sr_teacher.") for key in generative)
    assert not any(key.startswith("recognizer.") for key in discriminative)
    assert any(key.startswith("backbone.") for key in generative)
    assert any(key.startswith("head.") for key in discriminative)


def test_stage1_backbone_loads_into_stage2(chain, shared_models):
    generative = torch.load(chain["generative"], map_location="cpu", weights_only=False)["state_dict"]
    stage2 = DiscriminativeDistillation(
        student_checkpoint=str(chain["generative"]),
        recognizer=str(shared_models / TEACHER_ONNX),
        recognizer_backend="onnxruntime",
        num_classes=10,
    )
    for name, value in stage2.backbone.state_dict().items():
        torch.testing.assert_close(value, generative[f"backbone.{name}"], msg=name)


@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("sr_teacher.yaml", ["--model.init_args.sample_steps", "2"]),
        ("recognizer.yaml", ["--model.init_args.input_size", "32", "--data.hr_size", "32"]),
    ],
)
def test_stage_fast_dev_run(config, extra, lfw_root, tmp_path):
    fit(config, lfw_root, tmp_path, "--trainer.fast_dev_run", "1", *extra)


def test_distillation_stages_fast_dev_run(chain, lfw_root, shared_models, tmp_path):
    fit("generative.yaml", lfw_root, tmp_path / "g", "--trainer.fast_dev_run", "1",
        "--model.init_args.sr_teacher_checkpoint", str(chain["sr"]))
    fit("discriminative.yaml", lfw_root, tmp_path / "d", "--trainer.fast_dev_run", "1",
        "--model.init_args.student_checkpoint", str(chain["generative"]),
        "--model.init_args.recognizer", str(shared_models / TEACHER_ONNX))


def real_batch(lfw_root: Path, size: int = 8) -> dict[str, torch.Tensor]:
    datamodule = LowResFaceDataModule(
        train_root=str(lfw_root), pairs_file=str(lfw_root / "pairs.txt"), num_workers=0, batch_size=size,
        max_train_images=64, degradation=Degradation(vlr_size=16, input_size=32),
    )
    return next(iter(datamodule.train_dataloader()))


def test_sr_teacher_frozen_in_stage1(chain, lfw_root):
    stage = GenerativeDistillation(sr_teacher_checkpoint=str(chain["sr"]), depths=[2, 2, 2], widths=[32, 64, 128])
    stage.train()
    assert not stage.sr_teacher.training
    assert all(not parameter.requires_grad for parameter in stage.sr_teacher.parameters())
    loss, _ = stage.regression(stage.backbone(real_batch(lfw_root)["vlr"]), stage.teacher_taps(real_batch(lfw_root)))
    loss.backward()
    assert all(parameter.grad is None for parameter in stage.sr_teacher.parameters())
    assert any(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in stage.backbone.parameters())


def test_stage2_trains_head_only(chain, lfw_root, shared_models):
    stage = DiscriminativeDistillation(
        student_checkpoint=str(chain["generative"]),
        recognizer=str(shared_models / TEACHER_ONNX),
        recognizer_backend="onnxruntime",
        num_classes=3554,
    )
    stage.train()
    assert not stage.backbone.training
    assert not stage.recognizer.training
    backbone_before = copy.deepcopy(stage.backbone.state_dict())
    head_before = copy.deepcopy(stage.head.state_dict())
    optimizer = torch.optim.SGD(stage.trainable_parameters(), lr=0.1)
    stage.log = lambda *args, **kwargs: None  # no Trainer attached
    for _ in range(2):
        optimizer.zero_grad()
        stage.training_step(real_batch(lfw_root), 0).backward()
        optimizer.step()
    # Weights and BatchNorm running statistics of the backbone are unchanged; the head moved.
    for name, value in stage.backbone.state_dict().items():
        torch.testing.assert_close(value, backbone_before[name], msg=name)
    assert any(not torch.equal(value, head_before[name]) for name, value in stage.head.state_dict().items())
    assert all(parameter.grad is None for parameter in stage.backbone.parameters())


def test_print_config_runs_again(chain, lfw_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit("generative.yaml", lfw_root, tmp_path / "g", "--model.init_args.sr_teacher_checkpoint", str(chain["sr"]),
            "--print_config")
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["class_path"] == "lvlrfr.stages.GenerativeDistillation"
    assert config["data"]["degradation"]["vlr_size"] == 16
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    main(["fit", "--config", str(saved), "--trainer.fast_dev_run", "1"])


def test_missing_data_folder_is_one_error(chain, tmp_path, capsys, lfw_root):
    missing = tmp_path / "missing_faces"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO_ROOT / "configs" / "generative.yaml"),
              "--model.init_args.sr_teacher_checkpoint", str(chain["sr"]),
              "--data.train_root", str(missing), "--trainer.fast_dev_run", "1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"data.train_root {missing} does not exist" in error
    assert "Traceback" not in error


def test_missing_teacher_file_is_one_error(chain, tmp_path, capsys):
    missing = tmp_path / "teacher.onnx"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO_ROOT / "configs" / "discriminative.yaml"),
              "--model.init_args.student_checkpoint", str(chain["generative"]),
              "--model.init_args.recognizer", str(missing), "--trainer.fast_dev_run", "1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert str(missing) in error
    assert "Traceback" not in error


def test_unknown_config_key_is_one_error(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("trainer:\n  max_epocs: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO_ROOT / "configs" / "sr_teacher.yaml"), "--config", str(config)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "trainer.max_epocs" in error
    assert "usage:" not in error


def test_unknown_model_key_is_one_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO_ROOT / "configs" / "generative.yaml"), "--model.init_args.learnin_rate", "3"])
    assert exit_info.value.code == 2
    assert "learnin_rate" in capsys.readouterr().err


def test_relational_loss_reaches_head(chain, lfw_root, shared_models):
    stage = DiscriminativeDistillation(
        student_checkpoint=str(chain["generative"]),
        recognizer=str(shared_models / TEACHER_ONNX),
        recognizer_backend="onnxruntime",
        num_classes=3554,
    )
    stage.train()
    batch = real_batch(lfw_root)
    with torch.no_grad():
        features = stage.backbone(batch["vlr"])[-1]
        teacher = stage.recognizer(batch["hr"])
    student = stage.distillation.project(stage.head(features))
    stage.relational(teacher, student).backward()
    assert stage.head.fc.weight.grad is not None
    assert stage.head.fc.weight.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in stage.backbone.parameters())
