"""ROC and CMC plots written as PNG files.

The figures are drawn on matplotlib's Agg canvas directly (no pyplot), so plotting needs no
display and leaves pyplot's global state alone. Files are written atomically: a temporary
file in the target folder is renamed over the target, so a reader never opens a partial PNG.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lvlrfr.evaluation.identification import IdentificationResult
from lvlrfr.evaluation.verification import VerificationResult


def plot_roc(results: dict[str, VerificationResult], path: str | Path) -> Path:
    """Plot TAR against FAR (log scale) for each named result and save a PNG at ``path``.

    The legend gives each curve's k-fold accuracy (mean ± std, %) and AUC. Points at FAR = 0
    cannot be drawn on a log axis and are left out.
    """
    _check_results(results, "plot_roc")
    figure = Figure(figsize=(6, 5))
    axes = figure.add_subplot()

    smallest_far = 1.0
    for name, result in results.items():
        drawn = result.roc.fpr > 0
        fpr = result.roc.fpr[drawn]
        smallest_far = min(smallest_far, float(fpr.min()))
        label = (
            f"{name} (acc {100 * result.accuracy_mean:.2f} ± {100 * result.accuracy_std:.2f}%, "
            f"AUC {result.auc:.4f})"
        )
        axes.plot(fpr, result.roc.tpr[drawn], label=label)

    axes.set_xscale("log")
    axes.set_xlim(smallest_far, 1.0)
    axes.set_ylim(0.0, 1.01)
    axes.set_xlabel("False accept rate (FAR)")
    axes.set_ylabel("True accept rate (TAR)")
    axes.set_title("ROC")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    return _save_atomically(figure, Path(path))


def plot_cmc(results: dict[str, IdentificationResult], path: str | Path) -> Path:
    """Plot the CMC curve (identification rate against rank) of each named result as a PNG at ``path``."""
    _check_results(results, "plot_cmc")
    figure = Figure(figsize=(6, 5))
    axes = figure.add_subplot()

    for name, result in results.items():
        ranks = np.arange(1, len(result.cmc) + 1)
        marker = "." if len(ranks) <= 50 else None
        axes.plot(ranks, result.cmc, marker=marker, label=f"{name} (rank-1 {100 * result.cmc[0]:.2f}%)")

    axes.set_xlim(1, max(len(result.cmc) for result in results.values()))
    axes.set_ylim(0.0, 1.01)
    axes.set_xlabel("Rank")
    axes.set_ylabel("Identification rate")
    axes.set_title("CMC")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    return _save_atomically(figure, Path(path))


def _check_results(results: dict, caller: str) -> None:
    if not results:
        raise ValueError(f"{caller} needs at least one named result, got an empty dict")


def _save_atomically(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            figure.savefig(file, format="png", dpi=150)
        # mkstemp creates the file readable by the owner only; give it the usual file mode.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
