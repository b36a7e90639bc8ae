"""Behaviour shared by every training stage: degradation bookkeeping, frozen teachers, LFW validation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lvlrfr.data.degradation import Degradation, coerce_degradation
from lvlrfr.data.sources.lfw import read_lfw_pairs
from lvlrfr.evaluation.metrics import VerificationMetric
from lvlrfr.evaluation.plots import plot_roc
from lvlrfr.evaluation.verification import fuse_flip
from lvlrfr.losses.margin import ArcFaceHead, CosFaceHead, MarginHead
from lvlrfr.stages.optim import adamw_with_cosine
from lvlrfr.utils.errors import ConfigurationError

logger = logging.getLogger(__name__)


class DegradationMismatchError(ValueError):
    """A stage or checkpoint was trained on a different degradation than the data module produces."""


def describe_difference(expected: dict[str, Any], found: dict[str, Any]) -> str:
    """Return ``key: expected -> found`` lines for the keys whose values differ."""
    keys = sorted(set(expected) | set(found))
    return "; ".join(f"{key}: {expected.get(key)!r} -> {found.get(key)!r}" for key in keys if expected.get(key) != found.get(key))


def check_trained_degradation(recorded: dict[str, Any] | None, data: Degradation, source: str) -> None:
    """Raise ``ConfigurationError`` when ``source`` was trained on another degradation than ``data``.

    ``recorded`` is the degradation stored with a teacher or checkpoint (None when it stores none, which
    passes). Every field but the VLR size must match. A model trained at one VLR size may be trained
    further or evaluated at another, so a different size is only logged as a warning.
    """
    if recorded is None:
        return
    recorded, data_spec = dict(recorded), data.to_dict()
    if {**recorded, "vlr_size": None} != {**data_spec, "vlr_size": None}:
        raise ConfigurationError(
            f"{source} was trained on degradation {recorded} but the data module produces {data_spec} "
            f"({describe_difference(recorded, data_spec)}); use the same data.degradation"
        )
    if recorded.get("vlr_size") != data_spec["vlr_size"]:
        logger.warning(
            "%s was trained on %s-pixel faces, but the data module produces %d-pixel faces",
            source, recorded.get("vlr_size"), data_spec["vlr_size"],
        )


def check_people_held_out(recorded: dict[str, Any] | None, datamodule: Any, source: str) -> None:
    """Raise ``ConfigurationError`` when ``source`` was trained on people whom ``datamodule`` evaluates.

    ``recorded`` is the data module's hyper-parameters stored in the checkpoint that ``source`` comes from
    (``datamodule_hyper_parameters``; None when it stores none, which passes). An earlier stage trained on
    the image root of the evaluation pairs must have left out everyone in the evaluated pairs, or the
    verification figures of this stage would include faces that its teacher or backbone was trained on.
    """
    protocol = getattr(datamodule, "full_protocol", None) if datamodule is not None else None
    if not recorded or protocol is None or not recorded.get("train_root"):
        return
    train_root = Path(recorded["train_root"]).resolve()
    if train_root != Path(datamodule.eval_root).resolve():
        return
    held_out: set[str] = set()
    earlier_eval_root = Path(recorded.get("eval_root") or recorded["train_root"]).resolve()
    if recorded.get("pairs_file") and recorded.get("exclude_eval_people", True) and earlier_eval_root == train_root:
        pairs_file = Path(recorded["pairs_file"])
        earlier_folds = list(recorded.get("eval_folds") or [])
        if pairs_file.resolve() == Path(datamodule.pairs_file).resolve():
            held_out = protocol.people_in_folds(earlier_folds)
        elif pairs_file.is_file():
            held_out = read_lfw_pairs(pairs_file, train_root).people_in_folds(earlier_folds)
        else:
            logger.warning(
                "Skipped the check of which people %s was trained on, because its pairs file %s is missing",
                source, pairs_file,
            )
            return
    leaked = sorted(protocol.people_in_folds(datamodule.eval_folds) - held_out)
    if leaked:
        raise ConfigurationError(
            f"{source} was trained on {len(leaked)} people of the evaluated pairs (data.eval_folds "
            f"{datamodule.eval_folds}), for example {', '.join(leaked[:3])}: its training held out the folds "
            f"{recorded.get('eval_folds') if held_out else 'none'}. Evaluate on folds that every earlier stage held "
            "out, or train the earlier stages with the same data.eval_folds"
        )


MARGIN_HEADS = {"arcface": ArcFaceHead, "cosface": CosFaceHead}


def build_margin_head(kind: str, embedding_size: int, num_classes: int, scale: float, margin: float) -> MarginHead:
    """Build the ArcFace or CosFace classifier over ``num_classes`` training identities."""
    if kind not in MARGIN_HEADS:
        raise ConfigurationError(f"model.init_args.margin={kind!r} is not one of {sorted(MARGIN_HEADS)}")
    return MARGIN_HEADS[kind](embedding_size, num_classes, scale=scale, margin=margin)


class FaceStage(L.LightningModule):
    """Base LightningModule of the stages.

    Subclasses register their teachers with :meth:`freeze_module`, implement :meth:`embed` when their
    model produces face embeddings, and call ``super().setup(stage)``. The base class then

    * keeps frozen modules in eval mode and leaves their weights out of the stage's checkpoint (they are
      reloaded from their own files), so ``strict_loading`` is off for those keys only;
    * records the data module's :class:`Degradation` in the hyper-parameters and rejects a mismatch;
    * evaluates LFW verification on every validation dataloader (one per VLR size), fusing each
      image's embedding with that of its horizontal flip, and logs ``val/lfw16_acc``,
      ``val/lfw16_acc_std``, ``val/lfw16_tar@far1e-3`` and an ROC curve PNG.
    """

    #: Whether :meth:`embed` is meaningful for verification; stages without embeddings set False.
    evaluates_verification = True

    def __init__(self) -> None:
        super().__init__()
        self._frozen_names: list[str] = []
        self.verification_metrics = nn.ModuleList()
        self.eval_names: list[str] = []
        # Teachers are not saved in the checkpoint, so loading must tolerate their missing keys.
        self.strict_loading = False

    # ------------------------------------------------------------------------------ frozen modules

    def freeze_module(self, name: str) -> None:
        """Freeze submodule ``name``: no gradients, eval mode kept, excluded from the optimizer and checkpoint."""
        module: nn.Module = getattr(self, name)
        module.requires_grad_(False)
        module.eval()
        if name not in self._frozen_names:
            self._frozen_names.append(name)

    def train(self, mode: bool = True) -> FaceStage:
        super().train(mode)
        for name in self._frozen_names:
            getattr(self, name).eval()
        return self

    def teardown(self, stage: str) -> None:
        # A data module that served training items from the teacher cache reads images again afterwards, so
        # a later fit with the same data module does not receive this stage's cached batches.
        if stage == "fit" and getattr(self, "_teacher_cache", None) is not None:
            datamodule = self.attached_datamodule()
            if hasattr(datamodule, "use_training_faces"):
                datamodule.use_training_faces(None)
            self._teacher_cache = None
        super().teardown(stage)

    def attached_datamodule(self) -> Any:
        """Return the trainer's data module, or None without a trainer or data module."""
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def configure_optimizers(self) -> dict:
        """Return AdamW over the trainable parameters with linear warm-up and cosine decay.

        Reads the hyper-parameters ``learning_rate``, ``weight_decay`` and ``warmup_fraction`` (the share of
        the optimizer steps spent warming up).
        """
        total = self.trainer.estimated_stepping_batches
        return adamw_with_cosine(
            self.trainable_parameters(),
            self.hparams.learning_rate,
            self.hparams.weight_decay,
            total_steps=total,
            warmup_steps=int(self.hparams.warmup_fraction * total),
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefixes = tuple(f"{name}." for name in self._teacher_names())
        if prefixes:
            state = checkpoint["state_dict"]
            for key in [key for key in state if key.startswith(prefixes)]:
                del state[key]

    def _teacher_names(self) -> list[str]:
        """Frozen submodules reloaded from their own files; subclasses list them to keep them out of checkpoints."""
        return []

    # --------------------------------------------------------------------------------- degradation

    @property
    def degradation(self) -> Degradation:
        return coerce_degradation(self.hparams.get("degradation"))

    def _sync_degradation(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "degradation"):
            return
        data_spec = datamodule.degradation.to_dict()
        recorded = self.hparams.get("degradation")
        if recorded is None:
            self.hparams["degradation"] = data_spec
            # Loggers read the initial hyper-parameters and reject a key that differs from the data module's.
            if getattr(self, "_hparams_initial", None) is not None:
                self._hparams_initial["degradation"] = data_spec
            return
        recorded = coerce_degradation(recorded).to_dict()
        # The evaluation size may differ from the training size; every other field must match.
        if {**recorded, "vlr_size": None} != {**data_spec, "vlr_size": None}:
            raise DegradationMismatchError(
                f"{type(self).__name__} was configured for degradation {recorded} but the data module produces "
                f"{data_spec} ({describe_difference(recorded, data_spec)}); use one degradation for every stage "
                "(data.degradation) or remove model.init_args.degradation"
            )

    # ------------------------------------------------------------------------------- margin head

    def setup_margin_head(self, stage: str) -> None:
        """Build ``self.margin_head`` once the number of identities is known (hparams or data module).

        Uses the hyper-parameters ``margin``, ``margin_scale``, ``margin_value``, ``embedding_size`` and
        ``num_classes``; the count found in the data is stored so a checkpoint rebuilds the same head.
        """
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        configured = self.hparams.get("num_classes")
        if configured is None:
            if datamodule is None:
                raise ConfigurationError(
                    "model.init_args.num_classes is not set and there is no data module to count identities"
                )
            configured = datamodule.num_classes
        elif datamodule is not None and stage == "fit" and datamodule.num_classes != configured:
            raise ConfigurationError(
                f"model.init_args.num_classes={configured} but the training data has {datamodule.num_classes} "
                "identities; remove num_classes to take it from the data"
            )
        if getattr(self, "margin_head", None) is None:
            self.margin_head = build_margin_head(
                self.hparams.margin, self.hparams.embedding_size, configured,
                self.hparams.margin_scale, self.hparams.margin_value,
            )
        self.hparams["num_classes"] = configured

    # ---------------------------------------------------------------------------------- validation

    def setup(self, stage: str) -> None:
        self._sync_degradation()
        datamodule = getattr(self.trainer, "datamodule", None)
        protocol = getattr(datamodule, "eval_protocol", None)
        if not self.evaluates_verification or protocol is None or len(self.verification_metrics):
            return
        self.eval_names = list(datamodule.eval_names)
        for _ in self.eval_names:
            self.verification_metrics.append(VerificationMetric(protocol.pairs, protocol.same, protocol.folds))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Embed ``(B, 3, S, S)`` faces in [-1, 1] to ``(B, D)``; stages that evaluate verification override it."""
        raise NotImplementedError(f"{type(self).__name__} does not produce face embeddings")

    def embed_with_flip(self, images: torch.Tensor) -> torch.Tensor:
        """Return the flip-fused embedding ``(B, D)``: the sum of the embeddings of the image and its mirror."""
        return fuse_flip(self.embed(images), self.embed(torch.flip(images, dims=[3])))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.evaluates_verification or not len(self.verification_metrics):
            return
        self.verification_metrics[dataloader_idx].update(self.embed_with_flip(batch["vlr"]), batch["index"])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_verification("val")

    def on_test_epoch_end(self) -> None:
        self._log_verification("test")

    def _covers_all_images(self, split: str) -> bool:
        """Return whether this loop visits every batch of its dataloaders (no sanity check, limit or fast_dev_run)."""
        if self.trainer.sanity_checking or self.trainer.fast_dev_run:
            return False
        loaders = self.trainer.val_dataloaders if split == "val" else self.trainer.test_dataloaders
        counts = self.trainer.num_val_batches if split == "val" else self.trainer.num_test_batches
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        return all(count >= len(loader) for count, loader in zip(counts, loaders))

    def _log_verification(self, split: str) -> None:
        # A partial pass sees only some of the pairs' images, so no accuracy can be computed.
        if not self._covers_all_images(split):
            if not self.trainer.sanity_checking and not getattr(self, "_warned_partial", False):
                logger.warning("The %s loop covers part of the evaluation images; verification is skipped", split)
                self._warned_partial = True
            for metric in self.verification_metrics:
                metric.reset()
            return
        results = {}
        for name, metric in zip(self.eval_names, self.verification_metrics):
            if not metric.update_called:
                continue
            result = metric.compute()
            metric.reset()
            results[name] = result
            self.log(f"{split}/{name}_acc", result.accuracy_mean, prog_bar=True, sync_dist=False)
            self.log(f"{split}/{name}_acc_std", result.accuracy_std, sync_dist=False)
            for far, tar in result.tar_at_far.items():
                self.log(f"{split}/{name}_tar@far{far:.0e}".replace("e-0", "e-"), tar, sync_dist=False)
        if results and not self.trainer.sanity_checking:
            # Trainer.log_dir broadcasts from rank 0, so every rank reads it before rank 0 writes the plot.
            # Reading it on rank 0 alone leaves rank 0 waiting in the broadcast for the other ranks.
            log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            self._save_roc(results, split, log_dir / "roc")

    @rank_zero_only
    def _save_roc(self, results: dict[str, Any], split: str, folder: Path) -> None:
        path = plot_roc(results, folder / f"{split}_epoch{self.current_epoch:03d}.png")
        for logger_ in self.loggers:
            if hasattr(logger_, "log_image"):
                logger_.log_image(key=f"{split}/roc", images=[str(path)])
