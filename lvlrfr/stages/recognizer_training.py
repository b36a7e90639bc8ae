"""Stage 0b: train a face recognizer with a margin softmax, as the HR teacher or as a VLR-only baseline."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lvlrfr.models.student import Student, build_student
from lvlrfr.stages.base import FaceStage
from lvlrfr.utils.errors import ConfigurationError

logger = logging.getLogger(__name__)


class RecognizerTraining(FaceStage):
    """Train a recognizer (backbone + embedding head) with ArcFace or CosFace on one input of the batch.

    With ``input: hr`` it trains the HR teacher used by stage 2 when no pretrained recognizer is
    configured (``DiscriminativeDistillation.recognizer`` accepts this stage's checkpoint). With
    ``input: vlr`` it trains the same network on VLR faces only: the baseline without distillation.

    Args:
        input: batch key the recognizer reads, ``hr`` or ``vlr``.
        input_size: network input side in pixels; must equal ``data.hr_size`` for ``hr`` and
            ``data.degradation.input_size`` for ``vlr``.
        arch, depths, widths, width, out_indices: backbone, as in ``StudentBackbone``.
        embedding_size, head, dropout: embedding head, as in ``StudentHead``.
        margin, margin_scale, margin_value: the margin softmax.
        learning_rate, weight_decay, warmup_fraction: AdamW with linear warm-up and cosine decay.
        num_classes: training identities; filled from the data module when None.
        degradation: filled from the data module and stored in the checkpoint; leave unset.
    """

    def __init__(
        self,
        input: Literal["hr", "vlr"] = "hr",
        input_size: int = 112,
        arch: str = "iresnet",
        depths: list[int] | None = None,
        widths: list[int] | None = None,
        width: float = 1.0,
        out_indices: list[int] | None = None,
        embedding_size: int = 512,
        head: Literal["flatten", "gdc"] = "flatten",
        dropout: float = 0.0,
        margin: Literal["arcface", "cosface"] = "arcface",
        margin_scale: float = 32.0,
        margin_value: float = 0.5,
        learning_rate: float = 2e-3,
        weight_decay: float = 5e-4,
        warmup_fraction: float = 0.05,
        num_classes: int | None = None,
        degradation: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if input not in ("hr", "vlr"):
            raise ConfigurationError(f"model.init_args.input={input!r} must be 'hr' or 'vlr'")
        self.save_hyperparameters()
        backbone, embedding_head = build_student(
            arch, input_size, embedding_size, depths=depths, widths=widths, width=width,
            out_indices=out_indices, head=head, dropout=dropout,
        )
        self.hparams["backbone"] = {
            "arch": arch, "input_size": input_size, "depths": depths, "widths": widths,
            "width": width, "out_indices": out_indices,
        }
        self.recognizer = Student(backbone, embedding_head)
        self.margin_head = None
        if num_classes is not None:
            self.setup_margin_head("init")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            expected = datamodule.hr_size if self.hparams.input == "hr" else self.degradation.input_size
            if self.hparams.input_size != expected:
                source = "data.hr_size" if self.hparams.input == "hr" else "data.degradation.input_size"
                raise ConfigurationError(
                    f"model.init_args.input_size={self.hparams.input_size} but {source}={expected}; set them equal"
                )
        self.setup_margin_head(stage)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Return the embedding ``(B, embedding_size)`` of ``(B, 3, input_size, input_size)`` faces."""
        return self.recognizer(images)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        embeddings = self.recognizer(batch[self.hparams.input])
        loss = F.cross_entropy(self.margin_head(embeddings, batch["label"]), batch["label"])
        self.log("train/loss_cls", loss, prog_bar=True, batch_size=len(embeddings))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.verification_metrics:
            images = batch[self.hparams.input]
            self.verification_metrics[dataloader_idx].update(self.embed_with_flip(images), batch["index"])
