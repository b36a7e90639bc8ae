"""Generic verification pair lists: one ``path1 path2 same`` line per pair, image paths relative to a root.

Used for sets distributed as pair lists (CALFW, CPLFW, XQLFW and similar re-crops of LFW, or any custom
protocol). Fields are separated by whitespace or by commas; ``same`` is ``1``/``0`` or ``true``/``false``
(case-insensitive). Everything after ``#`` on a line is a comment, so paths cannot contain ``#``. A first
line whose third field is neither a ``same`` value nor a number is taken as a CSV header and skipped.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from lvlrfr.data.image import load_rgb
from lvlrfr.data.sources.errors import DataFormatError

logger = logging.getLogger(__name__)

_SAME_VALUES = {"1": True, "true": True, "0": False, "false": False}


def contiguous_folds(num_pairs: int, num_folds: int) -> np.ndarray:
    """Assign pairs to folds in contiguous blocks, as insightface's verification does (``KFold``, no shuffle).

    Returns ``(num_pairs,)`` int64 fold ids from 1 to ``num_folds``. When ``num_pairs`` does not divide by
    ``num_folds`` the first ``num_pairs % num_folds`` folds get one pair more, as in scikit-learn's ``KFold``.
    """
    if not 1 <= num_folds <= num_pairs:
        raise ValueError(f"num_folds={num_folds} must be between 1 and the number of pairs ({num_pairs})")
    sizes = np.full(num_folds, num_pairs // num_folds, dtype=np.int64)
    sizes[: num_pairs % num_folds] += 1
    return np.repeat(np.arange(1, num_folds + 1, dtype=np.int64), sizes)


def _split_fields(line: str) -> list[str]:
    separator = "," if "," in line else None
    return [field.strip() for field in line.split(separator)]


class PairListSource:
    """Verification source over a pair list: unique images, ``(P, 2)`` index pairs, same flags and folds.

    An image named by several pairs appears once in ``paths`` and is read once per evaluation. Folds are
    contiguous blocks of pairs in file order (see :func:`contiguous_folds`).

    Args:
        pairs_file: the pair list.
        root: folder the image paths are relative to (absolute paths in the list are used as they are).
        num_folds: number of cross-validation folds.

    Raises:
        FileNotFoundError: the pairs file or the root is missing.
        DataFormatError: a malformed line or a pair naming a missing image; the message gives the line number.
    """

    format = "pair-list"

    def __init__(self, pairs_file: str | Path, root: str | Path, num_folds: int = 10) -> None:
        self.pairs_file, self.root = Path(pairs_file), Path(root)
        if not self.pairs_file.is_file():
            raise FileNotFoundError(f"pair list {self.pairs_file} not found; check the pairs_file path")
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image root {self.root} of {self.pairs_file.name} is not a folder; check the root path")

        index_of: dict[str, int] = {}
        self.paths: list[Path] = []
        pairs: list[tuple[int, int]] = []
        same: list[bool] = []
        seen_data_line = False
        for line_number, line in enumerate(self.pairs_file.read_text().splitlines(), start=1):
            content = line.split("#", 1)[0].strip()
            if not content:
                continue
            fields = _split_fields(content)
            if len(fields) != 3 or fields[2].lower() not in _SAME_VALUES:
                if not seen_data_line and len(fields) == 3 and not fields[2].lstrip("+-").isdigit():
                    logger.info("Skipping header line %d of %s: %r", line_number, self.pairs_file, content)
                    seen_data_line = True
                    continue
                raise DataFormatError(
                    self.pairs_file, f"line {line_number} is {content!r}; expected 'path1 path2 same' with same "
                                     "one of 1, 0, true, false", "fix or remove the line")
            seen_data_line = True
            indices = []
            for name in fields[:2]:
                if name not in index_of:
                    path = self.root / name
                    if not path.is_file():
                        raise DataFormatError(self.pairs_file, f"line {line_number} names {name}, which is not under "
                                                               f"{self.root}", "check the image root or the pairs file")
                    index_of[name] = len(self.paths)
                    self.paths.append(path)
                indices.append(index_of[name])
            pairs.append((indices[0], indices[1]))
            same.append(_SAME_VALUES[fields[2].lower()])
        if not pairs:
            raise DataFormatError(self.pairs_file, "the file contains no pairs", "add 'path1 path2 same' lines")

        self.pairs = np.asarray(pairs, dtype=np.int64)
        self.same = np.asarray(same, dtype=bool)
        self.folds = contiguous_folds(len(pairs), num_folds)
        logger.info("Read %d pairs (%d same) over %d images from %s",
                    len(pairs), int(self.same.sum()), len(self.paths), self.pairs_file)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        """Read image ``index`` as ``uint8 (H, W, 3)`` RGB."""
        return load_rgb(self.paths[index])

    def describe(self) -> dict:
        return {"format": self.format, "path": str(self.pairs_file), "root": str(self.root), "images": len(self),
                "pairs": len(self.pairs), "same": int(self.same.sum()), "folds": int(self.folds.max())}

    def manifest(self) -> dict:
        """Return a summary for cache keys: the pair list's content hash and the counts."""
        return {**self.describe(), "pairs_sha256": hashlib.sha256(self.pairs_file.read_bytes()).hexdigest()}
