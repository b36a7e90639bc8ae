"""Stage 1, generative distillation: the student backbone regresses the diffusion teacher's encoder features."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from lvlrfr.losses.distillation import FeatureRegressionLoss, pair_taps_by_stride
from lvlrfr.models.student import StudentBackbone
from lvlrfr.stages.base import FaceStage, check_people_held_out, check_trained_degradation
from lvlrfr.teachers.cache import check_cache_root
from lvlrfr.teachers.cache_entries import open_tap_cache
from lvlrfr.teachers.diffusion import DiffusionSRTeacher
from lvlrfr.utils.errors import ConfigurationError

logger = logging.getLogger(__name__)


class GenerativeDistillation(FaceStage):
    """Train the student backbone on VLR faces to regress the SR teacher's encoder taps (L_gen = MSE).

    Each diffusion encoder tap (``down0``, ``down1``, ..., ``mid``) is paired with the student stage of
    the closest stride and reached through a 1x1 convolution adapter
    (:class:`~lvlrfr.losses.distillation.FeatureRegressionLoss`). The teacher reads the same VLR face,
    resized to its own sample size, at a fixed timestep and a fixed noise per image, so its taps are
    deterministic targets. Stage 2 reads ``backbone.*`` from this stage's checkpoint and freezes it.

    Validation logs ``val/loss_gen`` and the LFW verification accuracy of the globally average-pooled
    last backbone map (``val/lfw16_acc``), a headless diagnostic of how discriminative the features are.

    Args:
        sr_teacher_checkpoint: stage 0a checkpoint, or a folder written by ``DiffusionSRTeacher.save_pretrained``
            or a diffusers hub id.
        arch: student backbone, ``iresnet``, ``mobilefacenet`` or ``timm:<name>``.
        input_size: student input side in pixels; must equal ``data.degradation.input_size``.
        depths: blocks per backbone stage (architecture default when None).
        widths: channels per backbone stage (``iresnet`` only).
        width: channel multiplier (``mobilefacenet`` only).
        out_indices: stages returned by a timm backbone.
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_fraction: share of the optimizer steps spent warming up linearly.
        degradation: filled from the data module and stored in the checkpoint; leave unset.
        pairing: ``{tap name: student stage index}``; by default taps go to the stage of the closest stride
            and the ``mid`` tap to the last stage, so every stage is trained.
        teacher_cache: folder of the teacher cache (:mod:`lvlrfr.teachers.cache`); when set, the taps of
            every training image and its flip are computed once at the start of ``fit`` (float16 on disk)
            and read back in ``training_step``. Validation still runs the teacher.
    """

    def __init__(
        self,
        sr_teacher_checkpoint: str,
        arch: str = "iresnet",
        input_size: int = 32,
        depths: list[int] | None = None,
        widths: list[int] | None = None,
        width: float = 1.0,
        out_indices: list[int] | None = None,
        learning_rate: float = 2e-3,
        weight_decay: float = 5e-4,
        warmup_fraction: float = 0.05,
        degradation: dict[str, Any] | None = None,
        teacher_cache: str | None = None,
        pairing: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._teacher_cache = None
        if teacher_cache:
            check_cache_root(teacher_cache)
        self.backbone = StudentBackbone(arch, input_size, depths=depths, widths=widths, width=width, out_indices=out_indices)
        self.hparams["backbone"] = {
            "arch": arch, "input_size": input_size, "depths": depths, "widths": widths,
            "width": width, "out_indices": out_indices,
        }
        self.sr_teacher = load_sr_teacher(sr_teacher_checkpoint)
        self.freeze_module("sr_teacher")
        self.regression = FeatureRegressionLoss(
            self.backbone.feature_channels,
            self.sr_teacher.tap_shapes(),
            pairing=pairing or default_pairing(self.backbone.feature_shapes, self.sr_teacher, input_size),
        )

    def _teacher_names(self) -> list[str]:
        return ["sr_teacher"]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        expected = self.degradation.input_size
        if self.hparams.input_size != expected:
            raise ConfigurationError(
                f"model.init_args.input_size={self.hparams.input_size} but data.degradation.input_size={expected}; "
                "set both to the same model input size"
            )
        check_trained_degradation(self.sr_teacher.trained_degradation, self.degradation, "the diffusion SR teacher")
        check_people_held_out(self.sr_teacher.trained_data, self.attached_datamodule(), "the diffusion SR teacher")
        if stage == "fit" and self.hparams.teacher_cache and self._teacher_cache is None:
            self._teacher_cache = open_tap_cache(self.hparams.teacher_cache, self.sr_teacher, self.teacher_taps, self.trainer)

    def teacher_taps(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the frozen teacher's encoder taps for a batch; the noise key of an image is (index, flip)."""
        keys = 2 * batch["index"] + batch.get("flipped", torch.zeros_like(batch["index"])).long()
        with torch.no_grad():
            return self.sr_teacher.encode(batch["vlr"], batch["hr"], keys=keys)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        taps = self._teacher_cache.read(batch) if self._teacher_cache is not None else self.teacher_taps(batch)
        loss, per_tap = self.regression(self.backbone(batch["vlr"]), taps)
        batch_size = len(batch["vlr"])
        self.log("train/loss_gen", loss, prog_bar=True, batch_size=batch_size)
        for name, value in per_tap.items():
            self.log(f"train/loss_gen_{name}", value, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        loss, _ = self.regression(self.backbone(batch["vlr"]), self.teacher_taps(batch))
        name = self.eval_names[dataloader_idx] if self.eval_names else f"dl{dataloader_idx}"
        self.log(f"val/{name}_loss_gen", loss, batch_size=len(batch["vlr"]), add_dataloader_idx=False, sync_dist=True)
        super().validation_step(batch, batch_idx, dataloader_idx)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Average-pool the last backbone map: ``(B, 3, S, S)`` -> ``(B, C)``."""
        return F.adaptive_avg_pool2d(self.backbone(images)[-1], 1).flatten(1)



def default_pairing(student_shapes: list[tuple[int, int, int]], teacher: DiffusionSRTeacher, input_size: int) -> dict[str, int]:
    """Pair each teacher tap with the student stage of the closest stride, and the middle block with the last stage.

    Stride matching alone can leave the deepest student stage without a target. For example, a 32-pixel
    UNet's deepest tap has stride 4 and a three-stage student's last map stride 8. That stage would then
    keep its random initialisation when stage 2 freezes the backbone.
    """
    pairing = pair_taps_by_stride([input_size / shape[1] for shape in student_shapes], teacher.tap_shapes(), teacher.sample_size)
    pairing["mid"] = len(student_shapes) - 1
    return pairing


def load_sr_teacher(source: str) -> DiffusionSRTeacher:
    """Load the diffusion SR teacher from a stage 0a ``.ckpt`` file, a ``save_pretrained`` folder or a hub id."""
    if source.endswith(".ckpt"):
        return DiffusionSRTeacher.from_checkpoint(source)
    return DiffusionSRTeacher.from_pretrained(source)
