"""``LowResFaceDataModule``: HR/VLR face pairs for training and degraded verification pairs for evaluation.

Every stage uses this one data module, so the teachers, the student and the evaluation read faces
degraded by the same :class:`~lvlrfr.data.degradation.Degradation`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lvlrfr.data.degradation import Degradation
from lvlrfr.data.image import to_tensor
from lvlrfr.data.sources.folders import IdentityFolderSource
from lvlrfr.data.sources.lfw import PairProtocol, read_lfw_pairs
from lvlrfr.utils.errors import ConfigurationError

logger = logging.getLogger(__name__)

LFW_FOLDS = list(range(1, 11))


def resize_face(image: np.ndarray, size: int, crop_box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Crop an aligned face to ``crop_box`` (x0, y0, x1, y1 in source pixels) and resize it to ``size``.

    Down-sizing uses area averaging and up-sizing bicubic interpolation, so HR faces are never aliased.
    """
    if crop_box is not None:
        x0, y0, x1, y1 = crop_box
        height, width = image.shape[:2]
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"crop_box {list(crop_box)} does not fit in an image of {width}x{height} pixels")
        image = image[y0:y1, x0:x1]
    if image.shape[0] == size and image.shape[1] == size:
        return image
    kernel = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=kernel)


class TrainingFaces(Dataset):
    """Training items ``{hr, vlr, label, index, flipped}`` from an identity-labelled source.

    ``hr`` is ``(3, hr_size, hr_size)`` and ``vlr`` ``(3, input_size, input_size)``, both in [-1, 1].
    The horizontal flip is drawn from torch's generator, which Lightning seeds per worker.
    """

    def __init__(self, source: Any, hr_size: int, degradation: Degradation, flip: bool, crop_box=None) -> None:
        self.source = source
        self.hr_size = hr_size
        self.degradation = degradation
        self.flip = flip
        self.crop_box = crop_box

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.item(index, draw_flip(self.flip))

    def faces(self, index: int, flipped: bool) -> tuple[np.ndarray, np.ndarray, int]:
        """Return the HR face ``uint8 (hr_size, hr_size, 3)``, its VLR face before up-sampling and the label.

        The degradation key is ``2 * index + flipped``, so each (image, flip) has one fixed VLR face and a
        cache of teacher outputs per (image, flip) stays valid.
        """
        image, label = self.source[index]
        hr = resize_face(image, self.hr_size, self.crop_box)
        if flipped:
            hr = np.ascontiguousarray(hr[:, ::-1])
        return hr, self.degradation.degrade(hr, key=2 * index + int(flipped)), int(label)

    def item(self, index: int, flipped: bool) -> dict[str, torch.Tensor]:
        """Return the training item of source image ``index``, mirrored when ``flipped``."""
        hr, vlr, label = self.faces(index, flipped)
        return {
            "hr": to_tensor(hr),
            "vlr": to_tensor(self.degradation.upsample(vlr)),
            "label": torch.tensor(label, dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
            "flipped": torch.tensor(flipped),
        }


def draw_flip(enabled: bool) -> bool:
    """Draw a horizontal flip with probability 0.5 from torch's generator; False without drawing when disabled.

    Every training dataset draws its flips here, so a run draws the same flips with and without the teacher cache.
    """
    return bool(enabled and torch.rand(()) < 0.5)


class EvaluationFaces(Dataset):
    """Unique images of a verification protocol as ``{hr, vlr, index}`` at one VLR size."""

    def __init__(self, protocol: PairProtocol, hr_size: int, degradation: Degradation, crop_box=None) -> None:
        self.protocol = protocol
        self.hr_size = hr_size
        self.degradation = degradation
        self.crop_box = crop_box

    def __len__(self) -> int:
        return len(self.protocol)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        hr = resize_face(self.protocol.load(index), self.hr_size, self.crop_box)
        vlr = self.degradation(hr, key=2 * index)
        return {"hr": to_tensor(hr), "vlr": to_tensor(vlr), "index": torch.tensor(index, dtype=torch.long)}


class LowResFaceDataModule(L.LightningDataModule):
    """Identity-labelled HR faces with their VLR versions, and degraded LFW verification pairs.

    The default protocol keeps training and test people apart with LFW's person-disjoint View-2 folds:
    it evaluates on the pairs of ``eval_folds`` (6–10, 3,000 pairs) and trains on every person who
    appears in none of those pairs (the people of folds 1–5 and those in no pair). The mirror half is
    ``eval_folds: [1, 2, 3, 4, 5]``; training both halves and merging their folds gives all 10 folds.

    Args:
        train_root: identity-folder tree of HR faces aligned to the teacher's template.
        pairs_file: LFW-style ``pairs.txt`` for verification; None disables evaluation.
        eval_root: image root of ``pairs_file``; defaults to ``train_root``.
        eval_folds: 1-based folds of ``pairs_file`` used for evaluation.
        exclude_eval_people: drop from training everyone who appears in an evaluated pair. Only
            meaningful when training and evaluation share one image root.
        hr_size: side of the HR face in pixels (the HR teacher's input size, 112 for ArcFace models).
        crop_box: optional (x0, y0, x1, y1) crop applied before resizing, for unaligned sources.
        degradation: the HR → VLR spec; its ``vlr_size`` is the training resolution.
        eval_sizes: VLR sizes evaluated, one validation dataloader each; defaults to the training size.
        batch_size: training batch size per device.
        eval_batch_size: evaluation batch size per device.
        num_workers: data loader worker processes.
        flip: random horizontal flips of training faces.
        max_train_images: keep only this many training images (an evenly spaced subset), for quick runs.
        skip_unreadable: count and skip unreadable training images instead of failing.
    """

    def __init__(
        self,
        train_root: str = "../shared/data/lfw-112x112",
        pairs_file: str | None = "../shared/data/lfw-112x112/pairs.txt",
        eval_root: str | None = None,
        eval_folds: list[int] = [6, 7, 8, 9, 10],  # noqa: B006 (jsonargparse needs a literal default)
        exclude_eval_people: bool = True,
        hr_size: int = 112,
        crop_box: tuple[int, int, int, int] | None = None,
        degradation: Degradation = Degradation(),  # noqa: B008
        eval_sizes: list[int] | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 128,
        num_workers: int = 2,
        flip: bool = True,
        max_train_images: int | None = None,
        skip_unreadable: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(degradation, dict):
            degradation = Degradation.from_dict(degradation)
        self.save_hyperparameters({**self._plain_arguments(locals()), "degradation": degradation.to_dict()})
        self.train_root = Path(train_root)
        self.pairs_file = Path(pairs_file) if pairs_file else None
        self.eval_root = Path(eval_root) if eval_root else self.train_root
        self.eval_folds = sorted(set(eval_folds))
        self.exclude_eval_people = exclude_eval_people
        self.hr_size = hr_size
        self.crop_box = tuple(crop_box) if crop_box else None
        self.degradation = degradation
        self.eval_sizes = list(eval_sizes) if eval_sizes else [degradation.vlr_size]
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.flip = flip
        self.max_train_images = max_train_images
        self.skip_unreadable = skip_unreadable
        self._training_faces: Dataset | None = None
        self._check_paths()

    @staticmethod
    def _plain_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in arguments.items() if key not in ("self", "__class__", "degradation")}

    def _check_paths(self) -> None:
        if not self.train_root.is_dir():
            raise FileNotFoundError(
                f"data.train_root {self.train_root} does not exist; set it to a folder with one sub-folder of "
                "aligned face images per person (the default expects the shared data folder beside the repository)"
            )
        if self.pairs_file is not None and not self.pairs_file.is_file():
            raise FileNotFoundError(
                f"data.pairs_file {self.pairs_file} does not exist; set it to LFW's View-2 pairs.txt "
                "or to null to train without evaluation"
            )
        unknown = sorted(set(self.eval_folds) - set(LFW_FOLDS))
        if unknown:
            raise ValueError(f"data.eval_folds contains {unknown}; LFW folds are numbered 1 to 10")
        if self.pairs_file is not None and len(self.eval_folds) < 2:
            raise ConfigurationError(
                f"data.eval_folds is {self.hparams['eval_folds']}, but k-fold verification needs at least two "
                "distinct folds because the threshold for each fold is chosen on the other folds; give at least "
                "two folds, e.g. [9, 10], or set data.pairs_file to null to train without evaluation"
            )

    # ------------------------------------------------------------------------------------ sources

    @cached_property
    def full_protocol(self) -> PairProtocol | None:
        if self.pairs_file is None:
            return None
        return read_lfw_pairs(self.pairs_file, self.eval_root)

    @cached_property
    def eval_protocol(self) -> PairProtocol | None:
        """Pairs of the evaluated folds, with the image list reduced to the images they use."""
        if self.full_protocol is None:
            return None
        return self.full_protocol.select_folds(self.eval_folds)

    @cached_property
    def train_source(self) -> IdentityFolderSource:
        identities = None
        if self.exclude_eval_people and self.full_protocol is not None and self.eval_root == self.train_root:
            held_out = self.full_protocol.people_in_folds(self.eval_folds)
            identities = [p.name for p in self.train_root.iterdir() if p.is_dir() and p.name not in held_out]
            logger.info(
                "Training on %d people who appear in no pair of folds %s (%d held out)",
                len(identities), self.eval_folds, len(held_out),
            )
        source = IdentityFolderSource(self.train_root, identities, skip_unreadable=self.skip_unreadable)
        return source

    @cached_property
    def train_indices(self) -> np.ndarray:
        """Indices of the training images used, all of them unless ``max_train_images`` is set."""
        count = len(self.train_source)
        if self.max_train_images is None or self.max_train_images >= count:
            return np.arange(count)
        return np.linspace(0, count - 1, self.max_train_images).round().astype(np.int64)

    @property
    def num_classes(self) -> int:
        """Number of training identities (the size of the margin head)."""
        return self.train_source.num_classes

    @property
    def eval_names(self) -> list[str]:
        """Metric prefix of each validation dataloader, e.g. ``lfw16``."""
        return [f"lfw{size}" for size in self.eval_sizes]

    def manifest(self) -> dict[str, Any]:
        """Return what identifies the data: sources, protocol and degradation, with a combined hash."""
        values: dict[str, Any] = {
            "train": self.train_source.manifest(),
            "train_images_used": int(len(self.train_indices)),
            "eval_folds": self.eval_folds,
            "eval": self.eval_protocol.manifest() if self.eval_protocol is not None else None,
            "hr_size": self.hr_size,
            "crop_box": list(self.crop_box) if self.crop_box else None,
        }
        values["sha256"] = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
        return values

    # ------------------------------------------------------------------------------------ loaders

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            logger.info(
                "Training data: %s, using %d of the images", self.train_source.describe(), len(self.train_indices)
            )
        if stage in (None, "fit", "validate", "test", "predict") and self.eval_protocol is not None:
            logger.info(
                "Evaluation: %d pairs of folds %s over %d images at %s px",
                len(self.eval_protocol.pairs), self.eval_folds, len(self.eval_protocol), self.eval_sizes,
            )

    def use_training_faces(self, dataset: Dataset | None) -> None:
        """Serve ``dataset`` as the training set instead of reading and degrading the images; None undoes it.

        The teacher cache passes a dataset that reads the stored VLR faces and teacher outputs. It must
        have one item per used training image, in the order of :attr:`train_indices`.
        """
        if dataset is not None and len(dataset) != len(self.train_indices):
            raise ValueError(
                f"the replacement training set has {len(dataset)} items but the data module uses "
                f"{len(self.train_indices)} training images"
            )
        self._training_faces = dataset

    def training_faces(self) -> TrainingFaces:
        """Return the training images as read from the source, before any subset."""
        return TrainingFaces(self.train_source, self.hr_size, self.degradation, self.flip, self.crop_box)

    def train_dataset(self) -> Dataset:
        if self._training_faces is not None:
            return self._training_faces
        dataset = self.training_faces()
        if len(self.train_indices) < len(self.train_source):
            return torch.utils.data.Subset(dataset, self.train_indices.tolist())
        return dataset

    def eval_dataset(self, size: int) -> EvaluationFaces:
        if self.eval_protocol is None:
            raise RuntimeError("no evaluation pairs: set data.pairs_file to an LFW-style pairs.txt")
        return EvaluationFaces(self.eval_protocol, self.hr_size, self.degradation.with_size(size), self.crop_box)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset(), self.batch_size, shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        if self.eval_protocol is None:
            return []
        return [self._loader(self.eval_dataset(size), self.eval_batch_size, shuffle=False) for size in self.eval_sizes]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()
