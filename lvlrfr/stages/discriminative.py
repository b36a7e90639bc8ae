"""Stage 2, discriminative distillation: the student head learns from an HR face recognizer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lvlrfr.losses.distillation import EmbeddingDistillationLoss
from lvlrfr.losses.relational import RelationalContrastiveLoss
from lvlrfr.models.student import StudentBackbone, StudentHead
from lvlrfr.stages.base import FaceStage, check_people_held_out, check_trained_degradation
from lvlrfr.teachers.cache import check_cache_root
from lvlrfr.teachers.cache_entries import open_recognizer_cache
from lvlrfr.teachers.recognizer import load_recognizer

logger = logging.getLogger(__name__)


def read_stage_checkpoint(path: str | Path, expected_stage: str) -> dict[str, Any]:
    """Load a Lightning checkpoint of this project on the CPU and check which stage wrote it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found; run the {expected_stage} stage first (make train-all runs every stage) "
            "or point the config at its checkpoints/final.ckpt"
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "backbone" not in checkpoint.get("hyper_parameters", {}):
        raise ValueError(f"{path} has no student backbone in its hyper-parameters; pass a {expected_stage} checkpoint")
    return checkpoint


class DiscriminativeDistillation(FaceStage):
    """Train the student head with L = L_cls + alpha * L_kd + beta * L_rcd; the backbone stays frozen.

    * L_cls: ArcFace (or CosFace) margin softmax over the training identities, on the student's
      embedding of the VLR face.
    * L_kd: ``1 - cos`` between the student's VLR embedding, linearly projected to the teacher's size
      when the sizes differ, and the HR recognizer's embedding of the HR face.
    * L_rcd: cross-resolution relational contrastive distillation
      (:class:`~lvlrfr.losses.relational.RelationalContrastiveLoss`): relations ``R(t_i - s_j)`` must
      match ``R(t_i - t_j)`` of the same pair against the other pairs of the batch (InfoNCE, temperature tau).

    The backbone and its BatchNorm statistics come from the stage 1 checkpoint and are frozen; the HR
    recognizer is frozen as well. Only the head, the margin weights, the projection and the relation
    module are optimised.

    Args:
        student_checkpoint: stage 1 (``GenerativeDistillation``) checkpoint with the trained backbone.
        recognizer: HR teacher: an ONNX file, an arcface_torch ``.pth``, a ``RecognizerTraining`` ``.ckpt``
            or an insightface model-zoo name.
        recognizer_spec: the teacher's spec: a preset name (``mobilefacenet_arcface``, ``faceplugin``) or a
            dict of ``RecognizerSpec`` fields; checked against the file at load.
        recognizer_backend: ``auto``, ``torch`` (ONNX converted to a torch module) or ``onnxruntime``.
        embedding_size: student embedding size.
        head: student head kind, ``flatten`` or ``gdc``.
        dropout: dropout before the head's linear layer.
        margin: ``arcface`` or ``cosface``.
        margin_scale: logit scale s of the margin softmax.
        margin_value: margin m (radians for ArcFace, cosine units for CosFace).
        alpha: weight of L_kd.
        beta: weight of L_rcd.
        temperature: tau of L_rcd.
        relation_hidden_dim: hidden width of the relation module.
        relation_dim: size of the relation vectors.
        max_relation_pairs: bound on the ordered pairs per batch in L_rcd (None: all B(B-1)).
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_fraction: share of the optimizer steps spent warming up linearly.
        num_classes: training identities; filled from the data module when None.
        degradation: filled from the data module and stored in the checkpoint; leave unset.
        teacher_cache: folder of the teacher cache (:mod:`lvlrfr.teachers.cache`); when set, the
            recognizer's embeddings of every training image and its flip are computed once at the start
            of ``fit`` and read back in ``training_step``.
    """

    def __init__(
        self,
        student_checkpoint: str,
        recognizer: str = "../shared/models/mobilefacenet/mobilefacenet_arcface.onnx",
        recognizer_spec: str | dict[str, Any] | None = "mobilefacenet_arcface",
        recognizer_backend: Literal["auto", "torch", "onnxruntime"] = "auto",
        embedding_size: int = 128,
        head: Literal["flatten", "gdc"] = "flatten",
        dropout: float = 0.0,
        margin: Literal["arcface", "cosface"] = "arcface",
        margin_scale: float = 32.0,
        margin_value: float = 0.5,
        alpha: float = 1.0,
        beta: float = 1.0,
        temperature: float = 0.1,
        relation_hidden_dim: int = 256,
        relation_dim: int = 128,
        max_relation_pairs: int | None = 4096,
        learning_rate: float = 2e-3,
        weight_decay: float = 5e-4,
        warmup_fraction: float = 0.05,
        num_classes: int | None = None,
        degradation: dict[str, Any] | None = None,
        teacher_cache: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._teacher_cache = None
        if teacher_cache:
            check_cache_root(teacher_cache)
        student_state = read_stage_checkpoint(student_checkpoint, "generative distillation (stage 1)")
        backbone_config = student_state["hyper_parameters"]["backbone"]
        self.hparams["backbone"] = backbone_config
        self._student_degradation = student_state["hyper_parameters"].get("degradation")
        self._student_data = student_state.get("datamodule_hyper_parameters")

        self.backbone = StudentBackbone(**backbone_config)
        prefix = "backbone."
        self.backbone.load_state_dict(
            {key[len(prefix):]: value for key, value in student_state["state_dict"].items() if key.startswith(prefix)}
        )
        self.freeze_module("backbone")
        channels, height, width = self.backbone.feature_shapes[-1]
        self.head = StudentHead(channels, height, width, embedding_size, kind=head, dropout=dropout)

        self.recognizer = load_recognizer(recognizer, recognizer_spec, backend=recognizer_backend)
        self.freeze_module("recognizer")
        teacher_size = self.recognizer.output_size
        self.distillation = EmbeddingDistillationLoss(embedding_size, teacher_size)
        self.relational = RelationalContrastiveLoss(
            teacher_size, relation_hidden_dim, relation_dim, temperature=temperature, max_pairs=max_relation_pairs
        )
        self.margin_head = None
        if num_classes is not None:
            self.setup_margin_head("init")

    def _teacher_names(self) -> list[str]:
        return ["recognizer"]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_trained_degradation(self._student_degradation, self.degradation, "the stage 1 backbone")
        check_people_held_out(self._student_data, self.attached_datamodule(), "the stage 1 backbone")
        self.setup_margin_head(stage)
        if stage == "fit" and self.hparams.teacher_cache and self._teacher_cache is None:
            self._teacher_cache = open_recognizer_cache(self.hparams.teacher_cache, self.recognizer, self.trainer)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Return the student embedding ``(B, embedding_size)`` of ``(B, 3, S, S)`` VLR faces."""
        return self.head(self.backbone(images)[-1])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone(batch["vlr"])[-1]
            if self._teacher_cache is not None:
                teacher = self._teacher_cache.read(batch)["embedding"]
            else:
                teacher = self.recognizer(batch["hr"]).float()
        student = self.head(features)

        loss_cls = F.cross_entropy(self.margin_head(student, batch["label"]), batch["label"])
        loss_kd = self.distillation(student, teacher)
        loss_rcd = self.relational(teacher, self.distillation.project(student))
        loss = loss_cls + self.hparams.alpha * loss_kd + self.hparams.beta * loss_rcd

        batch_size = len(student)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/loss_cls", loss_cls, batch_size=batch_size)
        self.log("train/loss_kd", loss_kd, prog_bar=True, batch_size=batch_size)
        self.log("train/loss_rcd", loss_rcd, batch_size=batch_size)
        return loss
