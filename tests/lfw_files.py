"""Small LFW protocol files that tests write from the real ``pairs.txt``."""

from __future__ import annotations

from pathlib import Path


def write_pairs_subset(lfw_root: Path, path: Path, per_fold: int, folds: int = 2) -> Path:
    """Write an LFW ``pairs.txt`` with the first ``per_fold`` matched and mismatched pairs of the first folds."""
    lines = (lfw_root / "pairs.txt").read_text().splitlines()
    _, official_per_fold = (int(value) for value in lines[0].split())
    subset = [f"{folds} {per_fold}"]
    for fold in range(folds):
        start = 1 + 2 * official_per_fold * fold
        subset += lines[start:start + per_fold]
        subset += lines[start + official_per_fold:start + official_per_fold + per_fold]
    path.write_text("\n".join(subset) + "\n")
    return path
