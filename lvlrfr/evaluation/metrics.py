"""torchmetrics wrappers that collect embeddings per image index and evaluate at ``compute()``.

Under DDP each rank embeds a shard of the evaluation images. The embeddings and their image
indices are states reduced by concatenation, so ``compute()`` receives the rows of every rank. A
``DistributedSampler`` pads the last shard with repeated samples, so the gathered indices can
contain duplicates. They are dropped, keeping the first row of each index.

The caller fuses flips before ``update``: it embeds each image and its horizontal flip and
passes ``fuse_flip(emb, emb_flipped)``, so the metrics store one fused embedding per image.

Usage in a LightningModule::

    self.val_verification = VerificationMetric(pairs, same, folds)
    # validation_step:
    self.val_verification.update(fuse_flip(net(x), net(x.flip(3))), batch["index"])
    # on_validation_epoch_end:
    result = self.val_verification.compute()
    self.log_dict(result.scalars("val/"))
    self.val_verification.reset()
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lvlrfr.evaluation.identification import IdentificationResult, rank_k_identification
from lvlrfr.evaluation.verification import VerificationResult, cosine_scores, kfold_verification


class EmbeddingCollector(Metric):
    """Base metric that stores ``(B, D)`` embeddings with their ``(B,)`` image indices.

    Subclasses call ``gathered_embeddings(required)`` in ``compute`` to get one row per index.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: Tensor, indices: Tensor) -> None:
        """Store ``(B, D)`` embeddings of the images with ``(B,)`` indices into the evaluation image list."""
        if embeddings.ndim != 2 or indices.ndim != 1 or len(embeddings) != len(indices):
            raise ValueError(
                f"{type(self).__name__}.update expects embeddings (B, D) and indices (B,), got "
                f"{tuple(embeddings.shape)} and {tuple(indices.shape)}"
            )
        self.embeddings.append(embeddings.detach().float())
        self.indices.append(indices.detach().long())

    def gathered_embeddings(self, required: np.ndarray) -> tuple[np.ndarray, Tensor]:
        """Return the unique stored indices ``(U,)``, sorted, and their embeddings ``(U, D)``.

        Raises:
            ValueError: when no embeddings were stored, or when an index in ``required`` has no
                embedding.
        """
        if isinstance(self.indices, list) and not self.indices:
            raise ValueError(f"{type(self).__name__}.compute was called before any update")
        embeddings = dim_zero_cat(self.embeddings)
        # An empty rank contributes a float tensor (see Metric._sync_dist), so cast back to int64.
        indices = dim_zero_cat(self.indices).long().cpu().numpy()

        unique_indices, first_rows = np.unique(indices, return_index=True)
        missing = np.setdiff1d(required, unique_indices)
        if len(missing):
            shown = missing[:10].tolist()
            raise ValueError(
                f"{type(self).__name__} has no embedding for {len(missing)} of the {len(required)} images it "
                f"needs (first missing indices: {shown}); check that the evaluation dataloader covers every "
                "image, e.g. that limit_val_batches / limit_test_batches is 1.0"
            )
        return unique_indices, embeddings[torch.from_numpy(first_rows).to(embeddings.device)]


class VerificationMetric(EmbeddingCollector):
    """k-fold verification over a fixed pair list, correct under DDP.

    Args:
        pairs: ``(P, 2)`` image indices of the two faces of each pair, the same indices that are
            passed to ``update``.
        same: ``(P,)`` bool, True for same-identity pairs.
        folds: ``(P,)`` int fold id of each pair (``assign_folds`` makes them for a plain list).
        flip_fusion: how the caller fused flips before ``update``, recorded in the protocol.
        far_targets: false accept rates at which to report TAR.

    ``compute()`` returns a ``VerificationResult``. Its ``scalars(prefix)`` gives the floats to
    log (mean and std accuracy, AUC, TAR@FAR). Log those, not the metric object itself.
    """

    def __init__(
        self,
        pairs: np.ndarray,
        same: np.ndarray,
        folds: np.ndarray,
        flip_fusion: str = "sum",
        far_targets: tuple[float, ...] = (1e-3, 1e-4),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.pairs = np.asarray(pairs, dtype=np.int64)
        self.same = np.asarray(same, dtype=bool)
        self.folds = np.asarray(folds, dtype=np.int64)
        if self.pairs.ndim != 2 or self.pairs.shape[1] != 2:
            raise ValueError(f"pairs must have shape (P, 2), got {self.pairs.shape}")
        if self.same.shape != (len(self.pairs),) or self.folds.shape != (len(self.pairs),):
            raise ValueError(
                f"same and folds must have shape ({len(self.pairs)},) like pairs, got {self.same.shape} "
                f"and {self.folds.shape}"
            )
        self.flip_fusion = flip_fusion
        self.far_targets = tuple(far_targets)

    def compute(self) -> VerificationResult:
        """Evaluate all gathered embeddings on the pair list."""
        unique_indices, embeddings = self.gathered_embeddings(np.unique(self.pairs))
        rows = np.searchsorted(unique_indices, self.pairs)
        scores = cosine_scores(embeddings, rows)
        return kfold_verification(scores, self.same, self.folds, self.far_targets, self.flip_fusion)


class IdentificationMetric(EmbeddingCollector):
    """Closed-set rank-k identification over a fixed gallery/probe split, correct under DDP.

    Args:
        labels: ``(N,)`` identity label of each evaluation image, indexed by image index.
        is_gallery: ``(N,)`` bool, True for gallery images and False for probe images.
        ks: ranks at which to report accuracy.

    Every image ``0 .. N-1`` must be passed to ``update``. ``compute()`` returns an
    ``IdentificationResult``; log its ``scalars(prefix)``.
    """

    def __init__(
        self,
        labels: np.ndarray,
        is_gallery: np.ndarray,
        ks: tuple[int, ...] = (1, 5, 10),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.labels = np.asarray(labels)
        self.is_gallery = np.asarray(is_gallery, dtype=bool)
        if self.labels.ndim != 1 or self.is_gallery.shape != self.labels.shape:
            raise ValueError(
                f"labels and is_gallery must be 1-D of equal length, got {self.labels.shape} and "
                f"{self.is_gallery.shape}"
            )
        self.ks = tuple(ks)

    def compute(self) -> IdentificationResult:
        """Rank every probe image against the gallery images."""
        unique_indices, embeddings = self.gathered_embeddings(np.arange(len(self.labels)))
        # Indices outside 0 .. N-1 are not part of this protocol and are ignored.
        in_protocol = (unique_indices >= 0) & (unique_indices < len(self.labels))
        unique_indices = unique_indices[in_protocol]
        embeddings = embeddings[torch.from_numpy(in_protocol).to(embeddings.device)]

        gallery = self.is_gallery[unique_indices]
        gallery_rows = torch.from_numpy(gallery).to(embeddings.device)
        return rank_k_identification(
            embeddings[gallery_rows],
            self.labels[unique_indices[gallery]],
            embeddings[~gallery_rows],
            self.labels[unique_indices[~gallery]],
            self.ks,
        )
