"""Atomic checkpoint writing and the end-of-training checkpoint used to chain stages."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lvlrfr.utils.run_info import make_readable_by_all

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Save ``obj`` with ``torch.save`` to a temporary file beside ``path``, then rename it into place.

    A process killed during the write leaves the previous file (or none) at ``path``, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        make_readable_by_all(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes each checkpoint atomically (temporary file + rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO does not use storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)


class FinalCheckpoint(Callback):
    """Write ``<dirpath>/final.ckpt`` when training finishes without interruption.

    The next stage of the pipeline reads this file, so its presence means "this stage is complete";
    an interrupted run leaves only ``last.ckpt``, from which ``--ckpt_path last`` resumes.
    """

    def __init__(self, dirpath: str, filename: str = "final.ckpt") -> None:
        self.path = Path(dirpath) / filename

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or trainer.sanity_checking or trainer.fast_dev_run:
            return
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            logger.info("Training finished: wrote %s", self.path)
