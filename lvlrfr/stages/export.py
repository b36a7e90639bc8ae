"""Rebuild the trained student from a stage checkpoint, without its teachers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lvlrfr.models.student import Student, StudentBackbone, StudentHead


def load_student(checkpoint_path: str | Path) -> tuple[Student, dict[str, Any]]:
    """Load the student (backbone + head) of a ``DiscriminativeDistillation`` or ``RecognizerTraining`` checkpoint.

    Returns the student in eval mode and the checkpoint's hyper-parameters (which contain its
    ``degradation`` and ``backbone`` settings).

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: the checkpoint contains no trained head (a stage 1 or stage 0a checkpoint).
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"student checkpoint {path} not found; train stage 2 first or fix the path")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    state = checkpoint.get("state_dict", {})
    prefix = "recognizer." if any(key.startswith("recognizer.head.") for key in state) else ""
    if not any(key.startswith(f"{prefix}head.") for key in state) or "backbone" not in hparams:
        raise ValueError(
            f"{path} contains no student head; pass a checkpoint of DiscriminativeDistillation (stage 2) "
            "or RecognizerTraining"
        )
    backbone = StudentBackbone(**hparams["backbone"])
    channels, height, width = backbone.feature_shapes[-1]
    head = StudentHead(
        channels, height, width, hparams["embedding_size"], kind=hparams.get("head", "flatten"),
        dropout=hparams.get("dropout", 0.0),
    )
    student = Student(backbone, head)
    student_state = {key[len(prefix):]: value for key, value in state.items() if key.startswith((f"{prefix}backbone.", f"{prefix}head."))}
    student.load_state_dict(student_state)
    return student.eval(), hparams
