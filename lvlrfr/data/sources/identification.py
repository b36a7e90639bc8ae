"""Gallery/probe identification protocols (TinyFace-style): text lists of ``relative/path label`` lines.

A protocol has a gallery list, a probe list and optionally a list of distractors, images of people in
neither that are added to the gallery (TinyFace's open-set protocol has such a list). Paths are relative to
one root folder and may contain spaces, because the label is the last field of the line. Labels are
non-negative integers. Distractor lines may omit theirs, and every distractor gets the label -1. Lines that
are empty or start with ``#`` are skipped.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lvlrfr.data.image import load_rgb
from lvlrfr.data.sources.errors import DataFormatError
from lvlrfr.data.sources.folders import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

ROLES = ("gallery", "probe", "distractor")
DISTRACTOR_LABEL = -1


def read_image_list(list_file: str | Path, root: str | Path, labelled: bool = True) -> list[tuple[str, int]]:
    """Read ``relative/path label`` lines as ``(path, label)`` entries, checking that each image is under ``root``.

    With ``labelled=False`` (distractor lists) a line is a path, optionally followed by a label that is
    ignored, and every entry gets :data:`DISTRACTOR_LABEL`.

    Raises:
        FileNotFoundError: the list file is missing.
        DataFormatError: a line without an integer label, or naming an image that is not under ``root``.
    """
    list_file, root = Path(list_file), Path(root)
    if not list_file.is_file():
        raise FileNotFoundError(f"image list {list_file} not found; check the list path")
    entries = []
    for line_number, line in enumerate(list_file.read_text().splitlines(), start=1):
        content = line.strip()
        if not content or content.startswith("#"):
            continue
        fields = content.rsplit(maxsplit=1)
        has_label = len(fields) == 2 and fields[1].lstrip("-").isdigit()
        if labelled and not (has_label and fields[1].isdigit()):
            raise DataFormatError(list_file, f"line {line_number} is {content!r}; expected 'relative/path label' "
                                             "with a non-negative integer label", "fix or remove the line")
        path = fields[0] if has_label else content
        if not (root / path).is_file():
            raise DataFormatError(list_file, f"line {line_number} names {path}, which is not under {root}",
                                  "check the image root or the list")
        entries.append((path, int(fields[1]) if labelled else DISTRACTOR_LABEL))
    if not entries:
        raise DataFormatError(list_file, "the list contains no images", "add 'relative/path label' lines")
    return entries


class IdentificationSource:
    """Images of a gallery/probe protocol in one list: gallery first, then probes, then distractors.

    Attributes:
        paths: image files, ``N`` of them.
        labels: ``(N,)`` int64 identity labels as written in the lists, -1 for distractors.
        roles: ``(N,)`` str, one of ``"gallery"``, ``"probe"``, ``"distractor"``.

    Raises:
        DataFormatError: a malformed line, a missing image, an image listed twice (within a list or in two
            roles), or a probe whose label has no gallery image.
    """

    format = "identification-lists"

    def __init__(self, gallery_list: str | Path, probe_list: str | Path, root: str | Path,
                 distractor_list: str | Path | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image root {self.root} is not a folder; check the root path")
        self.list_files = {"gallery": Path(gallery_list), "probe": Path(probe_list)}
        if distractor_list is not None:
            self.list_files["distractor"] = Path(distractor_list)

        listed_in: dict[str, str] = {}
        paths: list[Path] = []
        labels: list[int] = []
        roles: list[str] = []
        for role, list_file in self.list_files.items():
            for path, label in read_image_list(list_file, self.root, labelled=role != "distractor"):
                if path in listed_in:
                    raise DataFormatError(list_file, f"{path} is already in the {listed_in[path]} list",
                                          "list each image once, in one role")
                listed_in[path] = role
                paths.append(self.root / path)
                labels.append(label)
                roles.append(role)
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.roles = np.asarray(roles)

        gallery_labels = set(self.labels[self.roles == "gallery"].tolist())
        unknown = sorted(set(self.labels[self.roles == "probe"].tolist()) - gallery_labels)
        if unknown:
            raise DataFormatError(self.list_files["probe"], f"{len(unknown)} probe labels have no gallery image "
                                  f"(first: {unknown[:5]})", "add their gallery images or remove those probes")
        counts = ", ".join(f"{count} {role}" for role, count in self.describe()["counts"].items())
        logger.info("Read identification lists under %s: %s images", self.root, counts)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        """Read image ``index`` as ``uint8 (H, W, 3)`` RGB."""
        return load_rgb(self.paths[index])

    def indices(self, role: str) -> np.ndarray:
        """Return the ``(M,)`` int64 image indices of one role, in list order."""
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {ROLES}")
        return np.flatnonzero(self.roles == role).astype(np.int64)

    def describe(self) -> dict:
        counts = {role: int((self.roles == role).sum()) for role in self.list_files}
        return {"format": self.format, "root": str(self.root), "images": len(self), "counts": counts,
                "gallery_identities": len(set(self.labels[self.roles == "gallery"].tolist()))}

    def manifest(self) -> dict:
        """Return a summary for cache keys: the content hash of each list and the counts."""
        hashes = {role: hashlib.sha256(path.read_bytes()).hexdigest() for role, path in self.list_files.items()}
        return {**self.describe(), "lists_sha256": hashes}


def split_gallery_probe(identity_folder_root: str | Path, gallery_per_identity: int = 1,
                        seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split an identity-folder tree into gallery and probe entries ``(relative/path, label)``.

    Labels are the positions of the identity folders in sorted order of their names, as in
    ``IdentityFolderSource``. ``gallery_per_identity`` images of each identity, drawn with ``seed``, go to
    the gallery and the rest become probes. An identity with no more images than that has no probes.

    Raises:
        DataFormatError: an identity folder without images, or a root without identity folders.
    """
    root = Path(identity_folder_root)
    if gallery_per_identity < 1:
        raise ValueError(f"gallery_per_identity={gallery_per_identity} must be at least 1")
    if not root.is_dir():
        raise FileNotFoundError(f"identity folder root {root} is not a folder; check the data root")
    folders = sorted(entry for entry in root.iterdir() if entry.is_dir())
    if not folders:
        raise DataFormatError(root, "the folder has no identity sub-folders", "point it at one folder per person")

    rng = np.random.default_rng(seed)
    gallery: list[tuple[str, int]] = []
    probes: list[tuple[str, int]] = []
    without_probes = 0
    for label, folder in enumerate(folders):
        files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataFormatError(folder, f"identity folder contains no images ({', '.join(IMAGE_EXTENSIONS)})",
                                  "remove the folder or add its images")
        chosen = set(rng.choice(len(files), size=min(gallery_per_identity, len(files)), replace=False).tolist())
        for position, path in enumerate(files):
            entry = (path.relative_to(root).as_posix(), label)
            (gallery if position in chosen else probes).append(entry)
        without_probes += len(files) <= gallery_per_identity
    if without_probes:
        logger.info("%d identities under %s have no probe images", without_probes, root)
    return gallery, probes


def write_identification_lists(output_dir: str | Path, gallery: Sequence[tuple[str, int]],
                               probes: Sequence[tuple[str, int]],
                               distractors: Sequence[tuple[str, int]] | None = None) -> dict[str, Path]:
    """Write ``gallery.txt``, ``probe.txt`` (and ``distractor.txt``) as ``relative/path label`` lines.

    Each file is written under a temporary name and moved into place. Returns the file of each role.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for role, entries in zip(ROLES, (gallery, probes, distractors)):
        if entries is None:
            continue
        lines = []
        for path, label in entries:
            if "\n" in path or "\r" in path:
                raise ValueError(f"image path {path!r} contains a line break and cannot be written to a list")
            lines.append(f"{path} {int(label)}\n")
        target = output_dir / f"{role}.txt"
        temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        temporary.write_text("".join(lines))
        os.replace(temporary, target)
        written[role] = target
    logger.info("Wrote identification lists to %s", output_dir)
    return written
