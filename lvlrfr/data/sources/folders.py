"""Identity-folder trees: ``<root>/<identity>/<image>``, one folder per person."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lvlrfr.data.image import ImageReadError, load_rgb

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")


class IdentityFolderSource:
    """Identity-labelled faces read from one sub-folder per person.

    Labels are the positions of the identities in sorted order of their folder names (restricted to
    ``identities`` when given), so the same folder tree always gives the same labels. Images are read
    on access, never all at once.

    Args:
        root: folder containing one sub-folder per identity.
        identities: names of the identity folders to use; None uses every sub-folder.
        min_images: identities with fewer images are left out (logged).
        skip_unreadable: when True, :meth:`__getitem__` replaces an unreadable image by the next readable
            one of the same list and counts it in ``unreadable``; when False it raises ``ImageReadError``.
    """

    format = "identity-folders"

    def __init__(
        self,
        root: str | Path,
        identities: Iterable[str] | None = None,
        min_images: int = 1,
        skip_unreadable: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"identity folder root {self.root} does not exist; set the data root to a folder "
                "with one sub-folder of images per person"
            )
        self.skip_unreadable = skip_unreadable
        self.unreadable: set[str] = set()

        if identities is None:
            names = sorted(entry.name for entry in self.root.iterdir() if entry.is_dir())
        else:
            names = sorted(set(identities))
        paths: list[Path] = []
        labels: list[int] = []
        identity_names: list[str] = []
        too_few = 0
        for name in names:
            folder = self.root / name
            if not folder.is_dir():
                raise FileNotFoundError(f"identity folder {folder} does not exist; check the data root {self.root}")
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(
                    f"identity folder {folder} contains no images (extensions {', '.join(IMAGE_EXTENSIONS)}); "
                    "remove the folder or add its images"
                )
            if len(files) < min_images:
                too_few += 1
                continue
            label = len(identity_names)
            identity_names.append(name)
            paths.extend(files)
            labels.extend([label] * len(files))
        if too_few:
            logger.info("Left out %d identities with fewer than %d images under %s", too_few, min_images, self.root)
        if not paths:
            raise ValueError(f"no images found under {self.root} for the selected identities")
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.identities = identity_names

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        """Read image ``index`` as ``uint8 (H, W, 3)`` RGB."""
        return load_rgb(self.paths[index])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        try:
            return self.load(index), int(self.labels[index])
        except ImageReadError:
            if not self.skip_unreadable:
                raise
            self.unreadable.add(str(self.paths[index]))
            logger.warning("Skipping unreadable image %s (%d skipped so far)", self.paths[index], len(self.unreadable))
            for offset in range(1, len(self.paths)):
                candidate = (index + offset) % len(self.paths)
                if str(self.paths[candidate]) not in self.unreadable:
                    return self[candidate]
            raise

    def describe(self) -> dict:
        return {"format": self.format, "root": str(self.root), "images": len(self), "identities": self.num_classes}

    def manifest(self) -> dict:
        """Return a summary that changes whenever the list of files or their labels change."""
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels):
            digest.update(f"{path.relative_to(self.root)}\t{label}\n".encode())
        return {**self.describe(), "files_sha256": digest.hexdigest()}
