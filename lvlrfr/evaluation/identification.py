"""Closed-set rank-k identification and the CMC curve.

Each probe is compared with every gallery image by cosine similarity. An identity scores the
maximum similarity over its gallery images, and the rank of a probe is the position of its true
identity among all gallery identities sorted by that score. Gallery identities that no probe
has are distractors: they only make ranking harder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Probes scored per matrix product, which bounds memory to PROBE_CHUNK x gallery size floats.
PROBE_CHUNK = 1024


@dataclass
class IdentificationResult:
    """Rank-k accuracies and the CMC curve of one closed-set identification protocol.

    ``cmc[r - 1]`` is the fraction of probes whose true identity is within the top r gallery
    identities, for r = 1 .. number of gallery identities, so ``cmc[-1] == 1``. ``rank_k`` maps
    each requested k to ``cmc[min(k, len(cmc)) - 1]``.
    """

    rank_k: dict[int, float]
    cmc: np.ndarray
    num_probes: int
    num_gallery_images: int
    num_gallery_identities: int
    num_distractor_identities: int
    protocol: str

    def summary(self) -> str:
        """Format the rank-k accuracies as one line for logs."""
        ranks = ", ".join(f"rank-{k}: {100 * acc:.2f}%" for k, acc in self.rank_k.items())
        return (
            f"{ranks} ({self.num_probes} probes, {self.num_gallery_identities} gallery identities, "
            f"{self.num_distractor_identities} of them distractors)"
        )

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """Return the rank-k accuracies under flat names, e.g. for ``LightningModule.log_dict``."""
        return {f"{prefix}rank{k}": float(acc) for k, acc in self.rank_k.items()}

    def to_dict(self) -> dict:
        """Convert to JSON-serialisable types. Rank keys become strings."""
        return {
            "rank_k": {str(k): acc for k, acc in self.rank_k.items()},
            "cmc": self.cmc.tolist(),
            "num_probes": self.num_probes,
            "num_gallery_images": self.num_gallery_images,
            "num_gallery_identities": self.num_gallery_identities,
            "num_distractor_identities": self.num_distractor_identities,
            "protocol": self.protocol,
        }


def rank_k_identification(
    gallery_embeddings: Tensor | np.ndarray,
    gallery_labels: Tensor | np.ndarray,
    probe_embeddings: Tensor | np.ndarray,
    probe_labels: Tensor | np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
) -> IdentificationResult:
    """Compute closed-set rank-k identification accuracy and the CMC curve.

    Ties count against the probe: an impostor identity with a score equal to that of the
    true identity ranks ahead of it.

    Args:
        gallery_embeddings: ``(G, D)`` gallery embeddings, L2-normalised here.
        gallery_labels: ``(G,)`` integer identity labels; an identity may have several images.
        probe_embeddings: ``(Q, D)`` probe embeddings, L2-normalised here.
        probe_labels: ``(Q,)`` integer identity labels, each of which must occur in the gallery.
        ks: ranks at which to report accuracy.

    Raises:
        ValueError: on mismatched shapes, or when a probe identity has no gallery image.
    """
    gallery = F.normalize(torch.as_tensor(gallery_embeddings).detach().cpu().float(), dim=1)
    probes = F.normalize(torch.as_tensor(probe_embeddings).detach().cpu().float(), dim=1)
    gallery_labels = _as_label_array(gallery_labels, "gallery_labels", len(gallery))
    probe_labels = _as_label_array(probe_labels, "probe_labels", len(probes))
    if gallery.shape[1] != probes.shape[1]:
        raise ValueError(
            f"gallery and probe embeddings must have the same size, got {gallery.shape[1]} and {probes.shape[1]}"
        )
    if len(gallery) == 0 or len(probes) == 0:
        raise ValueError(
            f"identification needs a non-empty gallery and probe set, got {len(gallery)} and {len(probes)} images"
        )
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive ranks, got {ks}")

    identities, gallery_identity = np.unique(gallery_labels, return_inverse=True)
    missing = np.setdiff1d(np.unique(probe_labels), identities)
    if len(missing):
        raise ValueError(
            f"closed-set identification needs every probe identity in the gallery, but {len(missing)} are "
            f"missing: {missing[:10].tolist()}{' ...' if len(missing) > 10 else ''}; "
            "add their images to the gallery or drop those probes"
        )
    probe_identity = np.searchsorted(identities, probe_labels)

    ranks = _true_identity_ranks(gallery, torch.from_numpy(gallery_identity), probes, probe_identity, len(identities))
    num_identities = len(identities)
    cmc = np.bincount(ranks - 1, minlength=num_identities).cumsum() / len(ranks)
    num_distractors = num_identities - len(np.unique(probe_identity))
    return IdentificationResult(
        rank_k={k: float(cmc[min(k, num_identities) - 1]) for k in ks},
        cmc=cmc,
        num_probes=len(probes),
        num_gallery_images=len(gallery),
        num_gallery_identities=num_identities,
        num_distractor_identities=num_distractors,
        protocol="closed set: cosine similarity, identity score = max over its gallery images, ties count as misses",
    )


def _true_identity_ranks(
    gallery: Tensor,
    gallery_identity: Tensor,
    probes: Tensor,
    probe_identity: np.ndarray,
    num_identities: int,
) -> np.ndarray:
    """Return the 1-based rank of each probe's true identity, shape ``(Q,)`` int64."""
    ranks = []
    probe_identity_tensor = torch.from_numpy(probe_identity)
    for start in range(0, len(probes), PROBE_CHUNK):
        similarity = probes[start : start + PROBE_CHUNK] @ gallery.T  # (chunk, G)
        identity_scores = torch.full((len(similarity), num_identities), -torch.inf)
        index = gallery_identity.expand(len(similarity), -1)
        identity_scores.scatter_reduce_(1, index, similarity, reduce="amax")

        true_identity = probe_identity_tensor[start : start + PROBE_CHUNK, None]
        true_score = identity_scores.gather(1, true_identity)
        # Every identity scoring >= the true one, itself included, ranks at or ahead of it.
        ranks.append((identity_scores >= true_score).sum(dim=1))
    return torch.cat(ranks).numpy().astype(np.int64)


def _as_label_array(labels: Tensor | np.ndarray, name: str, expected_length: int) -> np.ndarray:
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.shape != (expected_length,):
        raise ValueError(f"{name} must have shape ({expected_length},) to match the embeddings, got {labels.shape}")
    return labels
