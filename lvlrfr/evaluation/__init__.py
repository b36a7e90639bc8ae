"""Verification (k-fold accuracy, ROC, TAR@FAR), closed-set identification, their plots and torchmetrics wrappers."""

from lvlrfr.evaluation.identification import IdentificationResult, rank_k_identification
from lvlrfr.evaluation.metrics import EmbeddingCollector, IdentificationMetric, VerificationMetric
from lvlrfr.evaluation.plots import plot_cmc, plot_roc
from lvlrfr.evaluation.verification import (
    RocCurve,
    VerificationResult,
    assign_folds,
    best_threshold,
    cosine_scores,
    fuse_flip,
    kfold_verification,
    roc_curve,
)

__all__ = [
    "EmbeddingCollector",
    "IdentificationMetric",
    "IdentificationResult",
    "RocCurve",
    "VerificationMetric",
    "VerificationResult",
    "assign_folds",
    "best_threshold",
    "cosine_scores",
    "fuse_flip",
    "kfold_verification",
    "plot_cmc",
    "plot_roc",
    "rank_k_identification",
    "roc_curve",
]
