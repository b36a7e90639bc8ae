"""Slow end-to-end runs: the console script as a user calls it, DDP over gloo, and the final report."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LVLRFR = [sys.executable, "-m", "lvlrfr.cli"]

pytestmark = pytest.mark.slow


def run_lvlrfr(*arguments: str, cwd: Path = REPO_ROOT, timeout: float = 1500) -> subprocess.CompletedProcess:
    environment = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [*LVLRFR, *arguments], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def data_overrides(lfw_root: Path, images: int) -> list[str]:
    return [
        "--data.train_root", str(lfw_root),
        "--data.pairs_file", str(lfw_root / "pairs.txt"),
        "--data.eval_folds", "[9, 10]",
        "--data.max_train_images", str(images),
        "--data.num_workers", "0",
        "--trainer.enable_progress_bar", "false",
    ]


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def trained_chain(lfw_root, shared_models, tmp_path_factory) -> Path:
    """Train every stage briefly on 1,024 LFW images and return the run folder."""
    runs = tmp_path_factory.mktemp("runs")
    data = data_overrides(lfw_root, 1024)
    run_lvlrfr("fit", "--config", "configs/sr_teacher.yaml", "--trainer.default_root_dir", str(runs / "sr"),
               "--trainer.max_epochs", "2", "--model.init_args.sample_steps", "5", *data)
    run_lvlrfr("fit", "--config", "configs/generative.yaml", "--trainer.default_root_dir", str(runs / "generative"),
               "--trainer.max_epochs", "3", "--model.init_args.sr_teacher_checkpoint",
               str(runs / "sr" / "checkpoints" / "final.ckpt"), *data)
    run_lvlrfr("fit", "--config", "configs/discriminative.yaml", "--trainer.default_root_dir",
               str(runs / "discriminative"), "--trainer.max_epochs", "4",
               "--model.init_args.student_checkpoint", str(runs / "generative" / "checkpoints" / "final.ckpt"),
               "--model.init_args.recognizer", str(shared_models / "mobilefacenet" / "mobilefacenet_arcface.onnx"),
               *data)
    return runs


def test_chain_student_above_chance(trained_chain):
    rows = [row for row in read_metrics(trained_chain / "discriminative") if row.get("val/lfw16_acc")]
    accuracy = float(rows[-1]["val/lfw16_acc"])
    # 1,200 pairs of folds 9-10, half matched: chance is 0.5.
    assert accuracy > 0.6


def test_sr_teacher_loss_decreases(trained_chain):
    losses = [float(row["val/loss"]) for row in read_metrics(trained_chain / "sr") if row.get("val/loss")]
    assert losses[-1] < losses[0]


def test_report_records_provenance(trained_chain, lfw_root, shared_models, tmp_path):
    teacher = str(shared_models / "mobilefacenet" / "mobilefacenet_arcface.onnx")
    config = {
        "output_dir": str(tmp_path / "report"),
        "models": [
            {"name": "student", "checkpoint": str(trained_chain / "discriminative" / "checkpoints" / "final.ckpt")},
            {"name": "teacher", "recognizer": teacher, "spec": "mobilefacenet_arcface", "backend": "onnxruntime",
             "input": "hr"},
            {"name": "teacher", "recognizer": teacher, "spec": "mobilefacenet_arcface", "backend": "onnxruntime",
             "input": "vlr"},
        ],
        "sets": [{"name": "lfw", "pairs_file": str(lfw_root / "pairs.txt"), "root": str(lfw_root), "folds": [9, 10]}],
        "sizes": [16],
        "num_workers": 0,
    }
    config_file = tmp_path / "evaluate.json"
    config_file.write_text(json.dumps(config))
    completed = run_lvlrfr("evaluate", "--config", str(config_file))
    assert "| student |" in completed.stdout
    record = json.loads((tmp_path / "report" / "results.json").read_text())
    for key in ("command", "git_commit", "seed", "degradation", "data"):
        assert key in record, key
    results = {(row["model"], row["input"]): row for row in record["results"]}
    assert results[("teacher", "hr")]["accuracy_mean"] > 0.95
    assert results[("teacher", "hr")]["accuracy_mean"] > results[("teacher", "vlr")]["accuracy_mean"]
    assert results[("student", "vlr")]["accuracy_mean"] > 0.6
    assert (tmp_path / "report" / "roc_lfw_16px.png").stat().st_size > 0


def test_generative_stage_ddp_mixed_precision(trained_chain, lfw_root, tmp_path):
    """Two CPU processes over gloo with bf16 autocast: training runs and LFW accuracy is gathered."""
    run = tmp_path / "ddp"
    # The run took about 20 seconds on a 2-core CPU machine. A rank that waits in a collective the other
    # rank never calls blocks until the DDP timeout (30 minutes by default), so this limit is shorter.
    run_lvlrfr(
        "fit", "--config", "configs/generative.yaml", "--trainer.default_root_dir", str(run),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.precision", "bf16-mixed",
        "--trainer.max_epochs", "1", "--trainer.max_steps", "4",
        "--model.init_args.sr_teacher_checkpoint", str(trained_chain / "sr" / "checkpoints" / "final.ckpt"),
        *data_overrides(lfw_root, 256),
        timeout=600,
    )
    # Each rank embeds half of the evaluation images, and VerificationMetric.compute raises unless the
    # gathered embeddings cover every image, so a logged accuracy means the gather across ranks worked.
    rows = [row for row in read_metrics(run) if row.get("val/lfw16_acc")]
    assert rows, "no validation accuracy was logged"
    assert 0.0 < float(rows[-1]["val/lfw16_acc"]) <= 1.0
    assert (run / "csv" / "roc" / "val_epoch000.png").is_file()
    assert (run / "checkpoints" / "final.ckpt").is_file()


def test_stage2_ddp_builds_teacher_cache(trained_chain, lfw_root, shared_models, tmp_path):
    """Two CPU processes share one cache build, each filling half the rows, then train from the cache."""
    run, cache = tmp_path / "ddp_cache", tmp_path / "cache"
    run_lvlrfr(
        "fit", "--config", "configs/discriminative.yaml", "--trainer.default_root_dir", str(run),
        "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0.0", "--trainer.log_every_n_steps", "1",
        "--model.init_args.student_checkpoint", str(trained_chain / "generative" / "checkpoints" / "final.ckpt"),
        "--model.init_args.recognizer", str(shared_models / "mobilefacenet" / "mobilefacenet_arcface.onnx"),
        "--model.init_args.teacher_cache", str(cache),
        *data_overrides(lfw_root, 256),
        timeout=600,
    )
    (meta_file,) = cache.glob("recognizer-*/meta.json")
    meta = json.loads(meta_file.read_text())
    assert meta["world_size"] == 2
    assert meta["rows"] == 256
    assert not list(cache.glob(".*.building"))
    losses = [float(row["train/loss"]) for row in read_metrics(run) if row.get("train/loss")]
    # 256 images on 2 processes in batches of 64: 2 steps.
    assert len(losses) == 2
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert (run / "checkpoints" / "final.ckpt").is_file()
