"""Score an embedding model on a loaded evaluation set: verification or identification, HR or degraded faces.

The model is any callable that maps ``(B, 3, H, W)`` RGB images in [-1, 1] to ``(B, D)`` flip-fused
embeddings. ``lvlrfr evaluate`` passes its ``Embedder``; this module does not load models.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from lvlrfr.data.degradation import Degradation
from lvlrfr.data.face_set import FaceSet
from lvlrfr.evaluation.identification import IdentificationResult, rank_k_identification
from lvlrfr.evaluation.plots import plot_cmc, plot_roc
from lvlrfr.evaluation.report import ResultRow
from lvlrfr.evaluation.verification import VerificationResult, cosine_scores, kfold_verification

IDENTIFICATION_RANKS = (1, 5, 10)

EmbeddingModel = Callable[[torch.Tensor], torch.Tensor]


def embed_images(model: EmbeddingModel, dataset: Dataset, key: str, batch_size: int, workers: int, label: str,
                 indices: np.ndarray | None = None) -> np.ndarray:
    """Embed the images of ``dataset`` (batch key ``hr`` or ``vlr``), or only ``indices``, as ``(N, D)`` rows.

    The rows follow ``indices`` when given, else the dataset order.
    """
    if indices is not None:
        dataset = Subset(dataset, np.asarray(indices).tolist())
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    chunks = [model(batch[key]).numpy() for batch in tqdm(loader, desc=label, unit="batch", leave=False)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)


class SetScorer:
    """Scores of models on one loaded set; the HR embeddings of each model callable are cached and reused."""

    def __init__(self, face_set: FaceSet, hr_size: int, batch_size: int, num_workers: int) -> None:
        self.face_set = face_set
        self.hr_size = hr_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        # Per model: (N, D) HR embeddings and the (N,) mask of rows computed so far.
        self._hr_embeddings: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def hr_embeddings(self, model: EmbeddingModel, name: str, indices: np.ndarray | None = None) -> np.ndarray:
        """Return ``(N, D)`` embeddings of the HR faces; only the rows of ``indices`` (default: all) are filled."""
        count = len(self.face_set.images)
        needed = np.arange(count) if indices is None else np.asarray(indices, dtype=np.int64)
        embeddings, done = self._hr_embeddings.get(id(model), (None, np.zeros(count, dtype=bool)))
        missing = needed[~done[needed]]
        if len(missing):
            dataset = self.face_set.hr_faces(self.hr_size)
            label = f"{name} on {self.face_set.name} HR"
            rows = embed_images(model, dataset, "hr", self.batch_size, self.num_workers, label, missing)
            if embeddings is None:
                embeddings = np.zeros((count, rows.shape[1]), dtype=rows.dtype)
            embeddings[missing] = rows
            done[missing] = True
            self._hr_embeddings[id(model)] = (embeddings, done)
        return embeddings

    def score(self, model: EmbeddingModel, name: str,
              degradation: Degradation | None) -> VerificationResult | IdentificationResult:
        """Score ``model`` on HR faces (``degradation`` None) or on faces degraded by ``degradation``.

        ``degradation.input_size`` must be the model's input size. Identification with
        ``cross_resolution`` matches the degraded probes against the HR gallery.
        """
        face_set = self.face_set
        if degradation is None:
            embeddings = self.hr_embeddings(model, name)
            return self._result(embeddings, embeddings)

        dataset = face_set.faces(degradation, self.hr_size)
        label = f"{name} on {face_set.name} at {degradation.vlr_size}px"
        roles = face_set.identification
        if roles is not None and roles.cross_resolution:
            probes = embed_images(model, dataset, "vlr", self.batch_size, self.num_workers, label, roles.probe)
            low_resolution = np.zeros((len(dataset), probes.shape[1]), dtype=probes.dtype)
            low_resolution[roles.probe] = probes
            return self._result(self.hr_embeddings(model, name, roles.gallery), low_resolution)
        embeddings = embed_images(model, dataset, "vlr", self.batch_size, self.num_workers, label)
        return self._result(embeddings, embeddings)

    def _result(self, gallery_embeddings: np.ndarray,
                probe_embeddings: np.ndarray) -> VerificationResult | IdentificationResult:
        """Score the pairs of ``probe_embeddings``, or rank its probe rows against the gallery rows of the other."""
        pairs, roles = self.face_set.verification, self.face_set.identification
        if pairs is not None:
            scores = cosine_scores(probe_embeddings, pairs.pairs)
            return kfold_verification(scores, pairs.same, pairs.folds, flip_fusion="sum")
        return rank_k_identification(gallery_embeddings[roles.gallery], roles.labels[roles.gallery],
                                     probe_embeddings[roles.probe], roles.labels[roles.probe], IDENTIFICATION_RANKS)


def gallery_label(face_set: FaceSet, size: int | None) -> str | None:
    """Return the gallery an identification row is scored against (``HR`` or e.g. ``16px``), None for verification."""
    if face_set.identification is None:
        return None
    if size is None or face_set.identification.cross_resolution:
        return "HR"
    return f"{size}px"


def plot_curves(face_set: FaceSet, rows: list[ResultRow], sizes: list[int], output: Path) -> list[str]:
    """Draw one ROC (verification) or CMC (identification) plot per size and return the file names.

    HR rows appear in each plot as a reference, and alone in ``<prefix>_<set>_hr.png`` when no size is scored.
    """
    plot = plot_roc if face_set.task == "verification" else plot_cmc
    prefix = "roc" if face_set.task == "verification" else "cmc"
    hr_rows = {f"{row.model} (HR)": row.result for row in rows if row.size is None}
    written = []
    for size in sizes:
        curves = {**hr_rows, **{f"{row.model} ({size}px)": row.result for row in rows if row.size == size}}
        path = output / f"{prefix}_{face_set.name}_{size}px.png"
        plot(curves, path)
        written.append(path.name)
    if not sizes and hr_rows:
        path = output / f"{prefix}_{face_set.name}_hr.png"
        plot(hr_rows, path)
        written.append(path.name)
    return written


def data_record(face_set: FaceSet) -> dict[str, Any]:
    """Return what the result file records of a set: its manifest, task, fold assignment or role counts."""
    values = {"task": face_set.task, **face_set.manifest}
    if face_set.verification is not None:
        values["fold_assignment"] = face_set.verification.fold_assignment
        values["pairs_evaluated"] = int(len(face_set.verification.pairs))
    else:
        roles = face_set.identification
        values["cross_resolution"] = roles.cross_resolution
        values["gallery_images"] = int(len(roles.gallery))
        values["probe_images"] = int(len(roles.probe))
    return values
