"""Labeled Faces in the Wild: the identity-folder layout and the View-2 ``pairs.txt`` protocol."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lvlrfr.data.image import load_rgb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairProtocol:
    """Verification pairs over a list of unique images.

    Attributes:
        paths: unique image files, referenced by index from ``pairs``.
        pairs: ``(P, 2)`` int64 indices into ``paths``.
        same: ``(P,)`` bool, True for a matched (same person) pair.
        folds: ``(P,)`` int64, 1-based fold of each pair.
        people: ``(P, 2)`` person names of each pair.
    """

    paths: list[Path]
    pairs: np.ndarray
    same: np.ndarray
    folds: np.ndarray
    people: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        return load_rgb(self.paths[index])

    def people_in_folds(self, folds: list[int]) -> set[str]:
        """Return the names of everyone who appears in a pair of the given folds."""
        mask = np.isin(self.folds, folds)
        return set(self.people[mask].ravel().tolist())

    def select_folds(self, folds: list[int]) -> PairProtocol:
        """Return the pairs of the given folds with the image list reduced to the images they use."""
        mask = np.isin(self.folds, folds)
        missing = sorted(set(folds) - set(self.folds.tolist()))
        if missing:
            raise ValueError(f"folds {missing} are not in the pairs file (it has {sorted(set(self.folds.tolist()))})")
        used = np.unique(self.pairs[mask])
        remap = np.full(len(self.paths), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        return PairProtocol(
            paths=[self.paths[i] for i in used],
            pairs=remap[self.pairs[mask]],
            same=self.same[mask],
            folds=self.folds[mask],
            people=self.people[mask],
        )

    def manifest(self) -> dict:
        digest = hashlib.sha256()
        for (left, right), same, fold in zip(self.pairs, self.same, self.folds):
            digest.update(f"{self.paths[left].name}\t{self.paths[right].name}\t{int(same)}\t{fold}\n".encode())
        return {"pairs": int(len(self.pairs)), "images": len(self.paths), "pairs_sha256": digest.hexdigest()}


def _image_path(root: Path, name: str, number: str, suffix: str) -> Path:
    return root / name / f"{name}_{int(number):04d}{suffix}"


def _are_image_numbers(*fields: str) -> bool:
    """Return True when every field is a decimal image number that ``int`` accepts."""
    return all(field.isdecimal() for field in fields)


def read_lfw_pairs(pairs_file: str | Path, root: str | Path, suffix: str = ".jpg") -> PairProtocol:
    """Parse LFW's View-2 ``pairs.txt`` into a :class:`PairProtocol` with images under ``root``.

    The file starts with ``<folds> <n>``, then each fold has ``n`` matched lines ``name i j`` followed by
    ``n`` mismatched lines ``name1 i name2 j``; image ``i`` of ``name`` is ``<root>/name/name_%04d.jpg``.

    Raises:
        FileNotFoundError: the pairs file or an image it names is missing (the message gives the line).
        ValueError: a malformed line, with its number and content.
    """
    pairs_file, root = Path(pairs_file), Path(root)
    if not pairs_file.is_file():
        raise FileNotFoundError(
            f"LFW pairs file {pairs_file} not found; point pairs_file at LFW's View-2 pairs.txt"
        )
    if not root.is_dir():
        raise FileNotFoundError(f"LFW image root {root} not found; point it at the folder with one sub-folder per person")
    lines = pairs_file.read_text().splitlines()
    try:
        num_folds, per_fold = (int(value) for value in lines[0].split())
    except (ValueError, IndexError) as error:
        raise ValueError(
            f"{pairs_file} line 1 is {lines[0] if lines else ''!r}; expected '<folds> <pairs per fold>' such as '10 300'"
        ) from error
    expected_lines = 1 + num_folds * 2 * per_fold
    if len([line for line in lines if line.strip()]) < expected_lines:
        raise ValueError(f"{pairs_file} has {len(lines)} lines but its header '{lines[0]}' needs {expected_lines}")

    index_of: dict[Path, int] = {}
    paths: list[Path] = []
    pairs, same, folds, people = [], [], [], []

    def add(path: Path, line_number: int) -> int:
        if path not in index_of:
            if not path.is_file():
                raise FileNotFoundError(
                    f"{pairs_file.name} line {line_number} names {path.name}, which is not under {root}; "
                    "check the LFW root or the pairs file"
                )
            index_of[path] = len(paths)
            paths.append(path)
        return index_of[path]

    line_number = 1
    for fold in range(1, num_folds + 1):
        for position in range(2 * per_fold):
            line_number += 1
            fields = lines[line_number - 1].split()
            if position < per_fold and len(fields) == 3 and _are_image_numbers(fields[1], fields[2]):
                name, first, second = fields
                left, right = _image_path(root, name, first, suffix), _image_path(root, name, second, suffix)
                names = (name, name)
            elif position >= per_fold and len(fields) == 4 and _are_image_numbers(fields[1], fields[3]):
                left = _image_path(root, fields[0], fields[1], suffix)
                right = _image_path(root, fields[2], fields[3], suffix)
                names = (fields[0], fields[2])
            else:
                kind = "matched 'name i j'" if position < per_fold else "mismatched 'name1 i name2 j'"
                raise ValueError(
                    f"{pairs_file} line {line_number} is {lines[line_number - 1]!r}; expected a {kind} pair "
                    "with integer image numbers i and j"
                )
            pairs.append((add(left, line_number), add(right, line_number)))
            same.append(position < per_fold)
            folds.append(fold)
            people.append(names)
    logger.info("Read %d LFW pairs in %d folds over %d images from %s", len(pairs), num_folds, len(paths), pairs_file)
    return PairProtocol(
        paths=paths,
        pairs=np.asarray(pairs, dtype=np.int64),
        same=np.asarray(same, dtype=bool),
        folds=np.asarray(folds, dtype=np.int64),
        people=np.asarray(people, dtype=object),
    )


def download_lfw_pairs(root: str | Path) -> Path:
    """Fetch LFW (deep-funneled) and ``pairs.txt`` with torchvision's own downloader into ``root``.

    Returns the folder holding the identity folders. Without network access this fails at once with a
    message that names where to place a local copy.
    """
    from torchvision.datasets import LFWPairs

    try:
        dataset = LFWPairs(str(root), split="10fold", image_set="deepfunneled", download=True)
    except OSError as error:  # URLError and socket errors are OSErrors
        raise RuntimeError(
            f"downloading LFW into {root} failed ({error}); without network access place an LFW copy with "
            "one folder per person and its pairs.txt locally and set data.train_root / data.pairs_file to it"
        ) from error
    return Path(dataset.root) / dataset.base_folder / dataset.images_dir
