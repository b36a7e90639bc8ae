"""Face verification on a list of pairs: cosine scores, k-fold accuracy, ROC and TAR@FAR.

Pure numpy/torch functions. The k-fold rule is the LFW View-2 protocol: for each fold the
decision threshold is the one that maximises accuracy on the other folds, and the reported
accuracy is the mean ± standard deviation of the per-fold accuracies.

Usage::

    scores = cosine_scores(fuse_flip(emb, emb_flipped), pairs)
    result = kfold_verification(scores, same, folds, flip_fusion="sum")
    print(result.summary())
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FLIP_FUSION_MODES = ("sum", "concat")


def cosine_scores(embeddings: Tensor | np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Compute the cosine similarity of each pair of embeddings.

    Args:
        embeddings: ``(N, D)`` embeddings, one row per image. Rows are L2-normalised here, so a
            zero row gives a score of 0.
        pairs: ``(P, 2)`` integer row indices into ``embeddings``.

    Returns:
        ``(P,)`` float64 scores in [-1, 1].
    """
    if isinstance(embeddings, Tensor):
        embeddings = embeddings.detach().cpu().double().numpy()
    embeddings = np.asarray(embeddings, dtype=np.float64)
    pairs = np.asarray(pairs)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must have shape (N, D), got {embeddings.shape}")
    if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.issubdtype(pairs.dtype, np.integer):
        raise ValueError(f"pairs must be an integer array of shape (P, 2), got {pairs.dtype} {pairs.shape}")
    if pairs.size and (pairs.min() < 0 or pairs.max() >= len(embeddings)):
        raise ValueError(
            f"pairs reference rows {pairs.min()}..{pairs.max()}, but there are only {len(embeddings)} "
            "embeddings; check that the pair list belongs to this image list"
        )

    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    normalised = embeddings / np.maximum(norms, 1e-12)
    return np.einsum("pd,pd->p", normalised[pairs[:, 0]], normalised[pairs[:, 1]])


def fuse_flip(embedding: Tensor, flipped_embedding: Tensor, mode: str = "sum") -> Tensor:
    """Fuse the embeddings of images and of their horizontal flips into one L2-normalised embedding.

    ``"sum"`` is the usual insightface evaluation rule: add the raw embeddings of the image and
    of its flip, then L2-normalise, so the view with the larger norm weighs more.
    ``"concat"`` L2-normalises each view and concatenates them, so the cosine of two fused
    embeddings is the mean of the image-image and flip-flip cosines.

    Args:
        embedding: ``(B, D)`` embeddings of the images.
        flipped_embedding: ``(B, D)`` embeddings of the horizontally flipped images.
        mode: ``"sum"`` or ``"concat"``.

    Returns:
        ``(B, D)`` for ``"sum"``, ``(B, 2 * D)`` for ``"concat"``, rows of unit L2 norm.
    """
    embedding = torch.as_tensor(embedding)
    flipped_embedding = torch.as_tensor(flipped_embedding)
    if embedding.shape != flipped_embedding.shape or embedding.ndim != 2:
        raise ValueError(
            f"embedding and flipped_embedding must both have shape (B, D), got "
            f"{tuple(embedding.shape)} and {tuple(flipped_embedding.shape)}"
        )
    if mode == "sum":
        return F.normalize(embedding + flipped_embedding, dim=1)
    if mode == "concat":
        views = [F.normalize(embedding, dim=1), F.normalize(flipped_embedding, dim=1)]
        return F.normalize(torch.cat(views, dim=1), dim=1)
    raise ValueError(f"flip fusion mode must be one of {FLIP_FUSION_MODES}, got {mode!r}")


def assign_folds(num_pairs: int, num_folds: int = 10) -> np.ndarray:
    """Assign contiguous blocks of a pair list to folds numbered ``1..num_folds``.

    The split is that of scikit-learn's ``KFold(num_folds, shuffle=False)``, which insightface
    uses for its ``.bin`` verification sets: the first ``num_pairs % num_folds`` folds get one
    pair more than the others. On LFW's 6,000 pairs in ``pairs.txt`` order this gives the
    official 10 folds of 600.

    Returns:
        ``(num_pairs,)`` int64 fold ids.
    """
    if num_folds < 2 or num_pairs < num_folds:
        raise ValueError(f"cannot split {num_pairs} pairs into {num_folds} folds; need 2 <= num_folds <= num_pairs")
    base, extra = divmod(num_pairs, num_folds)
    sizes = [base + 1] * extra + [base] * (num_folds - extra)
    return np.repeat(np.arange(1, num_folds + 1, dtype=np.int64), sizes)


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Find the threshold that maximises verification accuracy on these pairs.

    A pair is predicted "same" when ``score > threshold``. The candidates are the midpoints
    between consecutive distinct scores plus two ends, one score unit below the minimum (accept
    all) and one above the maximum (reject all). Ties go to the smallest best threshold.

    Returns:
        ``(threshold, accuracy)`` with accuracy in [0, 1].
    """
    distinct = np.unique(scores)
    midpoints = (distinct[:-1] + distinct[1:]) / 2
    candidates = np.concatenate([[distinct[0] - 1.0], midpoints, [distinct[-1] + 1.0]])

    positive_scores = np.sort(scores[same])
    negative_scores = np.sort(scores[~same])
    true_accepts = len(positive_scores) - np.searchsorted(positive_scores, candidates, side="right")
    true_rejects = np.searchsorted(negative_scores, candidates, side="right")
    accuracy = (true_accepts + true_rejects) / len(scores)

    best = int(np.argmax(accuracy))  # argmax returns the first maximum, i.e. the smallest threshold
    return float(candidates[best]), float(accuracy[best])


@dataclass
class RocCurve:
    """ROC curve over all pairs, accepting a pair when ``score >= threshold``.

    ``fpr``, ``tpr`` and ``thresholds`` have one entry per distinct score plus a first point
    (0, 0) at threshold +inf, as scikit-learn's ``roc_curve(drop_intermediate=False)`` returns.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def roc_curve(scores: np.ndarray, same: np.ndarray) -> RocCurve:
    """Compute the ROC curve of ``(P,)`` scores against ``(P,)`` bool labels."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    sorted_same = same[order]

    # Index of the last pair of each run of equal scores: all of them are accepted together.
    run_ends = np.concatenate([np.flatnonzero(np.diff(sorted_scores)), [len(scores) - 1]])
    true_accepts = np.cumsum(sorted_same)[run_ends]
    false_accepts = run_ends + 1 - true_accepts

    return RocCurve(
        fpr=np.concatenate([[0.0], false_accepts / (~same).sum()]),
        tpr=np.concatenate([[0.0], true_accepts / same.sum()]),
        thresholds=np.concatenate([[np.inf], sorted_scores[run_ends]]),
    )


@dataclass
class VerificationResult:
    """k-fold verification accuracy, ROC and TAR@FAR of one model on one pair list.

    Accuracies are fractions in [0, 1]. ``accuracy_std`` is the population standard deviation
    (``np.std``, ddof=0) of the per-fold accuracies, as in the LFW convention. ``tar_at_far``
    maps each FAR target to the TAR over all pairs at the ROC threshold whose false accept rate
    is at most the target, and ``tar_at_far_thresholds`` contains those thresholds.
    ``note`` flags coarse TAR@FAR estimates and is empty otherwise.
    """

    accuracy_mean: float
    accuracy_std: float
    per_fold_accuracy: dict[int, float]
    thresholds: dict[int, float]
    tar_at_far: dict[float, float]
    tar_at_far_thresholds: dict[float, float]
    roc: RocCurve
    auc: float
    num_pairs: int
    num_positive: int
    num_negative: int
    protocol: str
    note: str = field(default="")

    def summary(self) -> str:
        """Format the main numbers as one line for logs."""
        tars = ", ".join(f"TAR@FAR={far:g}: {100 * tar:.2f}%" for far, tar in self.tar_at_far.items())
        return (
            f"accuracy {100 * self.accuracy_mean:.2f} ± {100 * self.accuracy_std:.2f}% "
            f"over {len(self.per_fold_accuracy)} folds, AUC {self.auc:.4f}, {tars} ({self.num_pairs} pairs)"
        )

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """Return the scalar metrics under flat names, e.g. for ``LightningModule.log_dict``."""
        values = {"acc": self.accuracy_mean, "acc_std": self.accuracy_std, "auc": self.auc}
        for far, tar in self.tar_at_far.items():
            values[f"tar@far={far:g}"] = tar
        return {prefix + name: float(value) for name, value in values.items()}

    def to_dict(self) -> dict:
        """Convert to JSON-serialisable types. Dict keys become strings and the +inf ROC threshold becomes None."""
        return {
            "accuracy_mean": self.accuracy_mean,
            "accuracy_std": self.accuracy_std,
            "per_fold_accuracy": {str(fold): acc for fold, acc in self.per_fold_accuracy.items()},
            "thresholds": {str(fold): thr for fold, thr in self.thresholds.items()},
            "tar_at_far": {f"{far:g}": tar for far, tar in self.tar_at_far.items()},
            "tar_at_far_thresholds": {f"{far:g}": _finite_or_none(t) for far, t in self.tar_at_far_thresholds.items()},
            "roc": {
                "fpr": self.roc.fpr.tolist(),
                "tpr": self.roc.tpr.tolist(),
                "thresholds": [_finite_or_none(t) for t in self.roc.thresholds.tolist()],
            },
            "auc": self.auc,
            "num_pairs": self.num_pairs,
            "num_positive": self.num_positive,
            "num_negative": self.num_negative,
            "protocol": self.protocol,
            "note": self.note,
        }


def kfold_verification(
    scores: np.ndarray,
    same: np.ndarray,
    folds: np.ndarray,
    far_targets: tuple[float, ...] = (1e-3, 1e-4),
    flip_fusion: str = "none",
) -> VerificationResult:
    """Evaluate verification with the threshold of each fold chosen on the other folds.

    For each fold id k present in ``folds``, the threshold that maximises accuracy on the pairs
    of all other present folds is chosen (see ``best_threshold`` for the candidates and the
    tie-break) and applied to the pairs of fold k. With LFW's 10 folds this is the standard
    rule. With a subset, e.g. folds 6-10, the threshold for fold 6 comes from folds 7-10.
    ROC, AUC and TAR@FAR are computed on all pairs at once.

    Args:
        scores: ``(P,)`` similarity scores, higher meaning more likely the same identity.
        same: ``(P,)`` bool, True for pairs of the same identity.
        folds: ``(P,)`` int fold id of each pair; at least two distinct ids.
        far_targets: false accept rates at which to report TAR.
        flip_fusion: how the embeddings were fused with their flips, recorded in ``protocol``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    folds = np.asarray(folds)
    _check_pair_arrays(scores, same, folds)

    fold_ids = np.unique(folds)
    per_fold_accuracy: dict[int, float] = {}
    thresholds: dict[int, float] = {}
    for fold in fold_ids.tolist():
        held_out = folds == fold
        threshold, _ = best_threshold(scores[~held_out], same[~held_out])
        predicted_same = scores[held_out] > threshold
        thresholds[fold] = threshold
        per_fold_accuracy[fold] = float(np.mean(predicted_same == same[held_out]))

    roc = roc_curve(scores, same)
    num_negative = int((~same).sum())
    tar_at_far: dict[float, float] = {}
    tar_at_far_thresholds: dict[float, float] = {}
    coarse = []
    for far in far_targets:
        # fpr is non-decreasing, so the last point with fpr <= far has the largest TAR.
        point = int(np.searchsorted(roc.fpr, far, side="right")) - 1
        tar_at_far[far] = float(roc.tpr[point])
        tar_at_far_thresholds[far] = float(roc.thresholds[point])
        if num_negative * far < 1:
            coarse.append(f"{far:g}")
    note = ""
    if coarse:
        note = (
            f"TAR@FAR={', '.join(coarse)} is coarse: with {num_negative} negative pairs the smallest "
            f"non-zero FAR is {1 / num_negative:.2g}, so it is measured at zero false accepts"
        )

    accuracies = np.array(list(per_fold_accuracy.values()))
    fold_list = ", ".join(str(fold) for fold in fold_ids.tolist())
    return VerificationResult(
        accuracy_mean=float(accuracies.mean()),
        accuracy_std=float(accuracies.std()),
        per_fold_accuracy=per_fold_accuracy,
        thresholds=thresholds,
        tar_at_far=tar_at_far,
        tar_at_far_thresholds=tar_at_far_thresholds,
        roc=roc,
        auc=float(np.trapezoid(roc.tpr, roc.fpr)),
        num_pairs=len(scores),
        num_positive=int(same.sum()),
        num_negative=num_negative,
        protocol=(
            f"{len(fold_ids)}-fold (folds {fold_list}): threshold chosen on the other evaluated folds; "
            f"flip fusion: {flip_fusion}"
        ),
        note=note,
    )


def _check_pair_arrays(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> None:
    if scores.ndim != 1 or same.shape != scores.shape or folds.shape != scores.shape:
        raise ValueError(
            f"scores, same and folds must be 1-D arrays of equal length, got shapes "
            f"{scores.shape}, {same.shape} and {folds.shape}"
        )
    if not np.isfinite(scores).all():
        raise ValueError(
            f"{int((~np.isfinite(scores)).sum())} of {len(scores)} scores are NaN or infinite; "
            "check the embeddings for NaN"
        )
    if not np.issubdtype(folds.dtype, np.integer):
        raise ValueError(f"folds must contain integer fold ids, got dtype {folds.dtype}")
    if len(np.unique(folds)) < 2:
        only_fold = folds[0] if len(folds) else None
        raise ValueError(
            f"k-fold verification needs at least two folds, but every pair has fold id {only_fold}; the "
            "threshold for a fold is chosen on the other folds (use assign_folds for a pair list without folds)"
        )
    if same.all() or not same.any():
        raise ValueError(
            f"the pair list needs both same-identity and different-identity pairs for ROC and TAR@FAR, "
            f"got {int(same.sum())} same and {int((~same).sum())} different"
        )


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
