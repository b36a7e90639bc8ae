"""Evaluation sets: the config entry, the loaded set and the image views that ``lvlrfr.data.sets`` builds.

A :class:`FaceSet` contains the HR images, the verification pairs or the identification roles, a manifest for
the result file, and builds the ``{hr, vlr, index}`` dataset at each size: degraded on the fly from the HR
faces, or read from the stored faces of a prepared set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from lvlrfr.data.datamodule import EvaluationFaces, resize_face
from lvlrfr.data.degradation import Degradation
from lvlrfr.data.image import to_tensor
from lvlrfr.data.prepared import PreparedFaces, PreparedManifest
from lvlrfr.utils.errors import ConfigurationError

SetKind = Literal["lfw", "bin", "pairs", "identification", "prepared"]
#: LFW folds evaluated when a set of kind ``lfw`` names none: those the training data module leaves out of training by default.
LFW_DEFAULT_FOLDS = [6, 7, 8, 9, 10]


@dataclass
class EvaluationSet:
    """One evaluation set as written in a config.

    Attributes:
        name: label in tables, plot and file names.
        kind: one of
            ``lfw``: ``pairs_file`` in LFW's View-2 format and the image ``root``.
            ``bin``: an insightface verification ``.bin`` at ``path``.
            ``pairs``: a ``path1 path2 same`` list in ``pairs_file`` and the image ``root``.
            ``identification``: gallery/probe lists and ``root``, or identity folders under ``root`` that
            are split into gallery and probes.
            ``prepared``: a folder written by ``lvlrfr prepare`` at ``path``.
        pairs_file: the pair list of ``lfw`` and ``pairs`` sets.
        root: the image folder of ``lfw``, ``pairs`` and ``identification`` sets.
        path: the ``.bin`` file or the prepared folder.
        folds: folds to evaluate. For ``lfw`` these are ``pairs.txt`` folds (default 6-10); for other
            verification sets, fold ids as the set numbers them (default: all).
        num_folds: number of contiguous blocks of pairs that make the folds of ``bin`` and ``pairs`` sets
            (insightface's split); a prepared set records its own folds.
        gallery_list: ``relative/path label`` lines of the gallery; with ``probe_list`` unset too, identity
            folders under ``root`` are split into ``gallery_per_identity`` gallery images and probes.
        probe_list: ``relative/path label`` lines of the probes.
        distractor_list: images of people in neither list, added to the gallery.
        gallery_per_identity: gallery images per identity when the split is made here.
        split_seed: seed of that split.
        cross_resolution: identification only: match low-resolution probes against the HR gallery instead of
            a gallery degraded to the same size.
        colour_order: channel order of the images as stored (``BGR`` for sets saved from OpenCV arrays).
        convert_to_rgb: swap the channels of a ``BGR`` set on load; without it such a set is rejected,
            because every model input is RGB.
        crop_box: ``[x0, y0, x1, y1]`` crop applied to each image before resizing it to ``hr_size``.
    """

    name: str = "lfw"
    kind: SetKind = "lfw"
    pairs_file: str | None = None
    root: str | None = None
    path: str | None = None
    folds: list[int] | None = None
    num_folds: int = 10
    gallery_list: str | None = None
    probe_list: str | None = None
    distractor_list: str | None = None
    gallery_per_identity: int = 1
    split_seed: int = 0
    cross_resolution: bool = False
    colour_order: Literal["RGB", "BGR"] = "RGB"
    convert_to_rgb: bool = False
    crop_box: list[int] | None = None

    def require(self, *keys: str) -> None:
        """Raise ConfigurationError naming the keys this set's kind needs but the config leaves unset."""
        missing = [key for key in keys if getattr(self, key) is None]
        if missing:
            raise ConfigurationError(f"set {self.name!r} of kind {self.kind!r} needs {', '.join(missing)}; "
                                     "set them in its config entry")


#: The config class of earlier versions, which read only LFW sets.
VerificationSet = EvaluationSet


@dataclass
class VerificationPairs:
    """Pairs of a verification set: ``pairs (P, 2)`` image indices, ``same (P,)`` bool, ``folds (P,)`` int64."""

    pairs: np.ndarray
    same: np.ndarray
    folds: np.ndarray
    fold_assignment: str


@dataclass
class IdentificationRoles:
    """Roles of the images of an identification set.

    Attributes:
        labels: ``(N,)`` int64 identity labels; each distractor gets its own negative label, so that it
            ranks as one more gallery identity.
        gallery: ``(G,)`` indices of the gallery images, distractors included.
        probe: ``(Q,)`` indices of the probe images.
        cross_resolution: probes are matched against the HR gallery.
    """

    labels: np.ndarray
    gallery: np.ndarray
    probe: np.ndarray
    cross_resolution: bool


@dataclass
class FaceSet:
    """A loaded evaluation set.

    Attributes:
        config: the config entry.
        images: the HR images (``__len__`` and ``load(index) -> uint8 (H, W, 3)`` RGB).
        manifest: what identifies the data, written into result files.
        verification: the pairs of a verification set, else None.
        identification: the roles of an identification set, else None.
        prepared: the manifest of a prepared set, else None.
        stored: the stored VLR faces of a prepared set by size; sizes without them are not available.
    """

    config: EvaluationSet
    images: Any
    manifest: dict[str, Any]
    verification: VerificationPairs | None = None
    identification: IdentificationRoles | None = None
    prepared: PreparedManifest | None = None
    stored: dict[int, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def task(self) -> str:
        return "verification" if self.verification is not None else "identification"

    def check_sizes(self, sizes: list[int]) -> None:
        """Raise ConfigurationError when a prepared set has no stored faces at one of ``sizes``."""
        if self.prepared is None:
            return
        missing = sorted(set(sizes) - set(self.stored))
        if missing:
            raise ConfigurationError(
                f"set {self.name!r} stores faces at {sorted(self.stored)} px, not at {missing} px; evaluate it at "
                "those sizes or prepare it at the others")

    def faces(self, degradation: Degradation, hr_size: int) -> Dataset:
        """Return the ``{hr, vlr, index}`` dataset at ``degradation.vlr_size``, up-sampled to its ``input_size``."""
        if self.prepared is not None:
            self.check_sizes([degradation.vlr_size])
            self._check_hr_size(hr_size)
            return PreparedFaces(self.images, self.stored[degradation.vlr_size], degradation, self.name)
        return EvaluationFaces(self.images, hr_size, degradation, crop_box_of(self.config))

    def hr_faces(self, hr_size: int) -> Dataset:
        """Return the ``{hr, index}`` dataset of the HR faces, without degrading them."""
        if self.prepared is not None:
            self._check_hr_size(hr_size)
            return HRFaces(self.images, hr_size, None)
        return HRFaces(self.images, hr_size, crop_box_of(self.config))

    def _check_hr_size(self, hr_size: int) -> None:
        if self.prepared is not None and self.prepared.hr_size != hr_size:
            raise ConfigurationError(
                f"set {self.name!r} was prepared with HR faces of {self.prepared.hr_size} px but hr_size is "
                f"{hr_size}; set hr_size: {self.prepared.hr_size} or prepare the set again")


class HRFaces(Dataset):
    """HR faces of a source as ``{hr, index}``, ``hr`` of shape ``(3, hr_size, hr_size)`` in [-1, 1]."""

    def __init__(self, source: Any, hr_size: int, crop_box: tuple[int, int, int, int] | None) -> None:
        self.source = source
        self.hr_size = hr_size
        self.crop_box = crop_box

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        hr = resize_face(self.source.load(index), self.hr_size, self.crop_box)
        return {"hr": to_tensor(hr), "index": torch.tensor(index, dtype=torch.long)}


class ConvertedToRGB:
    """A source of BGR images that returns them in RGB order."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def load(self, index: int) -> np.ndarray:
        return np.ascontiguousarray(self.source.load(index)[:, :, ::-1])


class IndexedSource:
    """The images ``indices`` of a source, renumbered ``0 .. len(indices) - 1``."""

    def __init__(self, source: Any, indices: np.ndarray) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> np.ndarray:
        return self.source.load(int(self.indices[index]))


def crop_box_of(config: EvaluationSet) -> tuple[int, int, int, int] | None:
    if config.crop_box is None:
        return None
    if len(config.crop_box) != 4:
        raise ConfigurationError(f"set {config.name!r}: crop_box must be [x0, y0, x1, y1], got {config.crop_box}")
    return tuple(int(value) for value in config.crop_box)


def check_colour_order(config: EvaluationSet) -> None:
    """Reject a set declared BGR unless it converts to RGB, the order every model input follows."""
    if config.colour_order == "BGR" and not config.convert_to_rgb:
        raise ConfigurationError(
            f"set {config.name!r} declares colour_order BGR, but every model input is RGB (a recognizer whose spec "
            "declares BGR gets its channels swapped by its wrapper, from RGB) and nothing converts this set; add "
            "convert_to_rgb: true to its config entry, or set colour_order: RGB if its images are RGB")
    if config.colour_order == "RGB" and config.convert_to_rgb:
        raise ConfigurationError(f"set {config.name!r} sets convert_to_rgb but declares colour_order RGB; remove "
                                 "convert_to_rgb or declare colour_order: BGR")
