"""What each frozen teacher stores in the teacher cache, under which key, and how a stage opens it.

* Recognizer (stage 2): ``embedding`` of shape ``(N, 2, output_size)`` float32, the teacher's output
  for the HR face of the training batch (unflipped, mirrored). Key: the ``RecognizerSpec``
  and the sha256 of the model file (of the weights for a module without a file).
* Diffusion SR teacher (stage 1): one array per encoder tap, ``(N, 2, C, H, W)`` float16, the taps
  of ``encode(vlr, hr, keys=2 * index + flipped)``. Key: ``describe()``, the scheduler config and the
  sha256 of the weights. float16 halves the disk size; its relative rounding error is below 1e-3,
  and values beyond 65504 stop the build with an error.

Both keys also contain the data key: the data module's manifest sha256, the degradation and the HR size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lvlrfr.teachers.cache import ArraySpec, Compute, FlipPairFaces, TeacherCache, open_or_build
from lvlrfr.teachers.spec import file_sha256
from lvlrfr.utils.errors import ConfigurationError

RECOGNIZER_KIND = "recognizer"
SR_TEACHER_KIND = "sr_teacher"
TAP_DTYPE = "float16"
EMBEDDING_DTYPE = "float32"


def module_sha256(module: nn.Module) -> str:
    """Return the sha256 of a module's state dict (names, dtypes, shapes and values, in key order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_key(datamodule: Any) -> dict[str, Any]:
    """Return the part of a cache key that identifies the training faces of a ``LowResFaceDataModule``."""
    required = ("manifest", "degradation", "hr_size", "flip", "train_indices", "training_faces", "use_training_faces")
    missing = [name for name in required if not hasattr(datamodule, name)]
    if missing:
        raise ConfigurationError(
            f"model.init_args.teacher_cache needs the LowResFaceDataModule (data: ...), but the trainer's data module "
            f"{type(datamodule).__name__} has no {missing}; remove teacher_cache or train with LowResFaceDataModule"
        )
    return {
        "data_manifest_sha256": datamodule.manifest()["sha256"],
        "degradation": datamodule.degradation.to_dict(),
        "degradation_fingerprint": datamodule.degradation.fingerprint(),
        "hr_size": int(datamodule.hr_size),
    }


def recognizer_key(teacher: Any, datamodule: Any) -> dict[str, Any]:
    """Return the cache key of a ``RecognizerTeacher``'s embeddings of the data module's training faces."""
    source = Path(teacher.source)
    return {
        "kind": RECOGNIZER_KIND,
        "spec": teacher.spec.to_dict(),
        "source_sha256": file_sha256(source) if source.is_file() else module_sha256(teacher),
        **data_key(datamodule),
    }


def sr_teacher_key(teacher: Any, datamodule: Any) -> dict[str, Any]:
    """Return the cache key of a ``DiffusionSRTeacher``'s encoder taps of the data module's training faces."""
    scheduler = {name: value for name, value in dict(teacher.scheduler.config).items() if not name.startswith("_")}
    return {
        "kind": SR_TEACHER_KIND,
        "teacher": teacher.describe(),
        "scheduler": scheduler,
        "weights_sha256": module_sha256(teacher),
        **data_key(datamodule),
    }


def recognizer_arrays(teacher: Any) -> dict[str, ArraySpec]:
    return {"embedding": ArraySpec((int(teacher.output_size),), EMBEDDING_DTYPE)}


def sr_teacher_arrays(teacher: Any) -> dict[str, ArraySpec]:
    return {name: ArraySpec(tuple(shape), TAP_DTYPE) for name, shape in teacher.tap_shapes().items()}


def _open_for_trainer(
    root: str, kind: str, key: dict[str, Any], arrays: dict[str, ArraySpec], compute: Compute, trainer: Any
) -> TeacherCache:
    """Open or build the entry on every rank, then let the data module serve the training items from it."""
    datamodule = trainer.datamodule
    cache = open_or_build(
        root,
        kind,
        key,
        arrays,
        FlipPairFaces.from_datamodule(datamodule),
        compute,
        batch_size=int(getattr(datamodule, "eval_batch_size", 64)),
        num_workers=int(getattr(datamodule, "num_workers", 0)),
        device=trainer.strategy.root_device,
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        barrier=lambda: trainer.strategy.barrier("teacher_cache"),
    )
    if not np.array_equal(cache.indices, datamodule.train_indices):
        raise RuntimeError(
            f"teacher cache {cache.folder} was built for other training images than the data module uses; delete it to rebuild"
        )
    datamodule.use_training_faces(cache.training_faces(datamodule.degradation, datamodule.flip))
    return cache


def _datamodule(trainer: Any) -> Any:
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        raise ConfigurationError(
            "model.init_args.teacher_cache is set but the trainer has no data module; pass the data module "
            "to trainer.fit (the lvlrfr command line does) or remove teacher_cache"
        )
    return datamodule


def open_recognizer_cache(root: str, teacher: nn.Module, trainer: Any) -> TeacherCache:
    """Open (building it on first use) the cache of ``teacher``'s embeddings for the trainer's training faces.

    The build runs on the trainer's root device and, under DDP, on every rank. Afterwards the data module
    serves the training items from the cache.
    """
    datamodule = _datamodule(trainer)
    teacher.to(trainer.strategy.root_device)

    def compute(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"embedding": teacher(batch["hr"]).float()}

    key = recognizer_key(teacher, datamodule)
    return _open_for_trainer(root, RECOGNIZER_KIND, key, recognizer_arrays(teacher), compute, trainer)


def open_tap_cache(
    root: str, teacher: nn.Module, compute_taps: Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]], trainer: Any
) -> TeacherCache:
    """Open (building it on first use) the cache of the diffusion teacher's taps, computed by ``compute_taps(batch)``.

    Afterwards the data module serves the training items from the cache.
    """
    datamodule = _datamodule(trainer)
    teacher.to(trainer.strategy.root_device)
    key = sr_teacher_key(teacher, datamodule)
    return _open_for_trainer(root, SR_TEACHER_KIND, key, sr_teacher_arrays(teacher), compute_taps, trainer)
