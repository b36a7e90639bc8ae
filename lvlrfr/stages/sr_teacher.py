"""Stage 0a: train the diffusion super-resolution teacher that stage 1 distills from."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio

from lvlrfr.stages.base import FaceStage
from lvlrfr.teachers.diffusion import DiffusionSRTeacher
from lvlrfr.utils.images import make_grid_image, save_png_atomic

logger = logging.getLogger(__name__)


class SuperResolutionTeacher(FaceStage):
    """Train a :class:`DiffusionSRTeacher` with the DDPM noise-prediction loss on (HR, VLR) pairs.

    Batches are dicts with ``hr`` ``(B, 3, H, W)`` and ``vlr`` ``(B, 3, S, S)`` in [-1, 1], where ``vlr`` is
    already degraded and up-sampled to the model input size. The teacher resizes both to its
    ``sample_size`` (see :class:`DiffusionSRTeacher`).

    Validation logs ``val/loss`` (the same loss with a generator seeded by ``val_seed`` and the batch
    index, so epochs are comparable) for the first validation dataloader and ``val/loss_dl{i}`` for
    dataloader ``i > 0``. On the first batch of the first dataloader it also samples SR faces for up to
    ``sample_grid_size`` images. It logs their ``val/psnr`` in dB against the HR faces resized to
    ``sample_size``, over those images only, and writes a grid of rows HR / VLR / SR to
    ``<log_dir>/samples/epoch_XXX.png`` and to any W&B or TensorBoard logger.

    Args:
        teacher: keyword arguments of :class:`DiffusionSRTeacher` (``sample_size``, ``block_out_channels``,
            ...), or None for its defaults. Stored in the hyper-parameters, so
            :meth:`DiffusionSRTeacher.from_checkpoint` can rebuild the teacher from a checkpoint.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: "cosine" anneals the learning rate to 0 over the run's optimizer steps, "constant" keeps it.
        degradation: the degradation spec as a dict. None takes the data module's at setup, and a spec
            that differs from the data module's raises (see :class:`FaceStage`).
        sample_grid_size: number of images (columns) in the sample grid.
        sample_steps: DDIM steps used to sample the grid, each costing one UNet forward pass.
        val_seed: seed of the validation noise and of the sample grid's start noise.
    """

    # The SR teacher produces no face embeddings, so the base class skips LFW verification.
    evaluates_verification = False

    def __init__(
        self,
        teacher: dict[str, Any] | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        degradation: dict[str, Any] | None = None,
        sample_grid_size: int = 8,
        sample_steps: int = 50,
        val_seed: int = 0,
    ) -> None:
        super().__init__()
        # Nothing here is frozen or left out of the checkpoint, so every key must load.
        self.strict_loading = True
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"invalid lr_schedule={lr_schedule!r}, expected 'cosine' or 'constant'")
        self.save_hyperparameters()
        self.teacher = DiffusionSRTeacher(**(teacher or {}))
        logger.info("Diffusion SR teacher: %s", self.teacher.describe())

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.teacher.training_loss(batch["hr"], batch["vlr"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["hr"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        hr, vlr = batch["hr"], batch["vlr"]
        generator = torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        loss = self.teacher.training_loss(hr, vlr, generator=generator)
        name = "val/loss" if dataloader_idx == 0 else f"val/loss_dl{dataloader_idx}"
        self.log(name, loss, batch_size=len(hr), add_dataloader_idx=False, sync_dist=True)

        # The sanity check would write a grid for an untrained model, then epoch 0 would overwrite it.
        if batch_idx == 0 and dataloader_idx == 0 and not self.trainer.sanity_checking:
            self._log_samples(hr, vlr)

    def _log_samples(self, hr: Tensor, vlr: Tensor) -> None:
        count = min(self.hparams.sample_grid_size, len(hr))
        hr, vlr = hr[:count], vlr[:count]
        generator = torch.Generator().manual_seed(self.hparams.val_seed)
        reconstruction = self.teacher.super_resolve(
            vlr, num_inference_steps=self.hparams.sample_steps, generator=generator
        )
        psnr = peak_signal_noise_ratio(
            reconstruction, self.teacher.resize_target(hr), data_range=(-1.0, 1.0), dim=(1, 2, 3)
        )
        self.log("val/psnr", psnr, batch_size=count, add_dataloader_idx=False, sync_dist=True)

        grid = make_grid_image([hr, vlr, reconstruction], ["HR", "VLR", "SR"])
        # Trainer.log_dir broadcasts from rank 0, so every rank calls it before rank 0 writes.
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if not self.trainer.is_global_zero:
            return
        path = save_png_atomic(grid, log_dir / "samples" / f"epoch_{self.current_epoch:03d}.png")
        logger.info("Wrote SR samples to %s", path)
        caption = f"epoch {self.current_epoch}, rows HR / VLR / SR"
        for experiment_logger in self.trainer.loggers:
            if isinstance(experiment_logger, WandbLogger):
                experiment_logger.log_image(key="samples/sr", images=[grid], caption=[caption], step=self.global_step)
            elif isinstance(experiment_logger, TensorBoardLogger):
                experiment_logger.experiment.add_image(
                    "samples/sr", np.asarray(grid), self.global_step, dataformats="HWC"
                )

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.teacher.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )
        if self.hparams.lr_schedule == "constant":
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ValueError(
                "lr_schedule='cosine' needs a finite run. Set the trainer's max_steps or max_epochs, "
                "or use lr_schedule='constant'"
            )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(total_steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
