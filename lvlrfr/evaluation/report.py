"""Result rows of ``lvlrfr evaluate`` and their Markdown report: verification, identification and thresholds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lvlrfr.evaluation.identification import IdentificationResult
from lvlrfr.evaluation.verification import VerificationResult

#: Flip fusion rule of ``lvlrfr evaluate`` (image and horizontal flip), written into every result file.
FLIP_FUSION = "sum: embeddings of the image and of its horizontal flip are added, then L2-normalised"


@dataclass
class ResultRow:
    """One model scored on one set at one size.

    Attributes:
        model: the model's name.
        input: ``hr`` (HR faces) or ``vlr`` (faces degraded to ``size``).
        set: the set's name.
        task: ``verification`` or ``identification``.
        size: VLR size in pixels, None for HR faces.
        result: the verification or identification result.
        gallery: identification only: ``HR`` or the size of the gallery faces, e.g. ``16px``.
    """

    model: str
    input: str
    set: str
    task: str
    size: int | None
    result: VerificationResult | IdentificationResult
    gallery: str | None = None

    @property
    def size_label(self) -> str:
        return "HR" if self.size is None else f"{self.size}px"

    def to_dict(self) -> dict[str, Any]:
        """Convert to JSON-serialisable values, the result's fields included."""
        return {"model": self.model, "input": self.input, "set": self.set, "task": self.task, "size": self.size,
                "gallery": self.gallery, **self.result.to_dict()}


def format_accuracy(mean: float, std: float) -> str:
    """Format an accuracy as a percentage ``mean ± std``, e.g. ``98.83 ± 0.41``."""
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _table(header: list[str], lines: list[list[str]]) -> str:
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(rows)


def _input_label(row: ResultRow) -> str:
    return "HR faces" if row.input == "hr" else "degraded faces"


def format_verification_table(rows: list[ResultRow]) -> str:
    """Return a Markdown table with one line per (model, set, size): accuracy, TAR@FAR 1e-3 and 1e-4, AUC."""
    header = ["model", "input", "set", "size", "accuracy % (mean ± std)", "TAR@FAR=1e-3 %", "TAR@FAR=1e-4 %", "AUC",
              "pairs"]
    lines = []
    for row in rows:
        result = row.result
        lines.append([row.model, _input_label(row), row.set, row.size_label,
                      format_accuracy(result.accuracy_mean, result.accuracy_std),
                      _percent(result.tar_at_far.get(1e-3)), _percent(result.tar_at_far.get(1e-4)),
                      f"{result.auc:.4f}", str(result.num_pairs)])
    return _table(header, lines)


def format_threshold_table(rows: list[ResultRow]) -> str:
    """Return a Markdown table of the cosine threshold chosen for each fold (on the other folds) per row."""
    folds = sorted({fold for row in rows for fold in row.result.thresholds})
    header = ["model", "set", "size", *[f"fold {fold}" for fold in folds]]
    lines = [[row.model, row.set, row.size_label,
              *[f"{row.result.thresholds[fold]:.4f}" if fold in row.result.thresholds else "" for fold in folds]]
             for row in rows]
    return _table(header, lines)


def format_identification_table(rows: list[ResultRow]) -> str:
    """Return a Markdown table with one line per (model, set, size): rank-1, rank-5 and rank-10 accuracy."""
    header = ["model", "input", "set", "probe size", "gallery size", "rank-1 %", "rank-5 %", "rank-10 %", "probes",
              "gallery identities (distractors)"]
    lines = []
    for row in rows:
        result = row.result
        lines.append([row.model, _input_label(row), row.set, row.size_label, row.gallery or "",
                      *[_percent(result.rank_k.get(k)) for k in (1, 5, 10)], str(result.num_probes),
                      f"{result.num_gallery_identities} ({result.num_distractor_identities})"])
    return _table(header, lines)


def format_report(rows: list[ResultRow], data: dict[str, dict[str, Any]], record: dict[str, Any]) -> str:
    """Return the Markdown report: provenance, the result tables, per-fold thresholds and the protocol notes.

    Args:
        rows: the scored rows.
        data: per set name, its record (``task``, ``fold_assignment`` or the identification counts).
        record: the run record, with ``command``, ``git_commit``, ``time_utc``, ``seed``, ``degradation``.
    """
    degradation = record["degradation"]
    lines = [
        "# Evaluation results",
        "",
        f"- command: `{record['command']}`",
        f"- git commit: {record['git_commit']}, date (UTC): {record['time_utc']}",
        f"- degradation: {_describe_degradation(degradation)}, seed {record['seed']}",
        f"- flip fusion: {FLIP_FUSION}",
    ]
    for name, values in data.items():
        if values["task"] == "verification":
            lines.append(f"- {name}: {values['pairs_evaluated']} pairs, folds: {values['fold_assignment']}")
        else:
            gallery = "HR gallery" if values["cross_resolution"] else "gallery at the probe size"
            lines.append(f"- {name}: {values['probe_images']} probes, {values['gallery_images']} gallery images, "
                         f"{gallery}")

    verification = [row for row in rows if row.task == "verification"]
    identification = [row for row in rows if row.task == "identification"]
    if verification:
        lines += ["", "## Verification", "", format_verification_table(verification)]
        notes = sorted({row.result.note for row in verification if row.result.note})
        if notes:
            lines += ["", *[f"Note: {note}." for note in notes]]
        lines += ["", "### Threshold per fold (chosen on the other folds)", "",
                  format_threshold_table(verification)]
    if identification:
        lines += ["", "## Identification (closed set)", "", format_identification_table(identification)]
    return "\n".join(lines) + "\n"


def _describe_degradation(values: dict[str, Any]) -> str:
    parts = [f"{values['down_kernel']} down-sampling", f"{values['up_kernel']} up-sampling to the model input"]
    if max(values["blur_sigma"]) > 0:
        parts.append(f"blur sigma {values['blur_sigma']}")
    if max(values["noise_std"]) > 0:
        parts.append(f"noise std {values['noise_std']}")
    if values["jpeg_quality"] is not None:
        parts.append(f"JPEG quality {values['jpeg_quality']}")
    return ", ".join(parts)
