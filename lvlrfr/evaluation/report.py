"""Markdown tables of verification results."""

from __future__ import annotations

from typing import Any


def format_accuracy(mean: float, std: float) -> str:
    """Format an accuracy as a percentage ``mean ± std``, e.g. ``98.83 ± 0.41``."""
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def format_table(rows: list[dict[str, Any]], sizes: list[int]) -> str:
    """Return a Markdown table: one row per (model, set), accuracy and TAR@FAR=1e-3 per VLR size.

    Each row dict has ``model``, ``input`` (``hr`` or ``vlr``), ``set``, ``size`` and ``result`` (a
    ``VerificationResult``). HR rows show the same HR figure under every size.
    """
    header = ["model", "input", "set"]
    for size in sizes:
        header += [f"acc % at {size}px (mean ± std)", f"TAR@FAR=1e-3 at {size}px"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    grouped: dict[tuple[str, str, str], dict[int, Any]] = {}
    for row in rows:
        grouped.setdefault((row["model"], row["input"], row["set"]), {})[row["size"]] = row["result"]
    for (model, input_kind, set_name), by_size in grouped.items():
        cells = [model, "HR faces" if input_kind == "hr" else "degraded faces", set_name]
        for size in sizes:
            result = by_size.get(size)
            if result is None:
                cells += ["", ""]
                continue
            tar = result.tar_at_far.get(1e-3)
            cells += [format_accuracy(result.accuracy_mean, result.accuracy_std), "" if tar is None else f"{100 * tar:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
