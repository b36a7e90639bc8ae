"""Prepared low-resolution sets written by ``lvlrfr prepare``: the manifest format and the readers.

A prepared set is a folder with a ``manifest.json`` and one output per resolution:

* verification: ``<name>_hr.bin`` (the HR faces) and ``<name>_<size>px.bin`` per size, insightface ``.bin``
  files whose image ``2k`` and ``2k + 1`` form pair ``k``;
* identification: ``hr/`` and ``<size>px/`` folders with the same relative image paths, and
  ``gallery.txt``, ``probe.txt`` (and ``distractor.txt``) listing those paths with their labels.

Low-resolution outputs store the faces at ``vlr_size`` pixels, before up-sampling, so a model of any input
size can read them. The manifest records the degradation, the source files and their SHA-256, the counts,
the fold of each pair and the SHA-256 of every output, which the readers check before use.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lvlrfr.data.degradation import Degradation
from lvlrfr.data.image import to_tensor
from lvlrfr.data.sources.errors import DataFormatError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "lvlrfr-prepared-set"
MANIFEST_VERSION = 1
HR_KEY = "hr"
_REQUIRED_KEYS = ("format", "version", "task", "name", "degradation", "sizes", "hr_size", "outputs", "counts")
_FIX = "write the set again with lvlrfr prepare"


def file_sha256(path: str | Path) -> str:
    """Return the SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: str | Path) -> tuple[str, int]:
    """Return a SHA-256 over the relative path and content hash of every file under ``folder``, and the file count.

    Files are taken in sorted order of their relative POSIX paths, so the digest does not depend on the
    order in which the file system lists them.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\t{file_sha256(path)}\n".encode())
    return digest.hexdigest(), len(files)


def output_sha256(path: Path) -> str:
    """Return the digest the manifest records for an output: of the file, or of every file in a folder."""
    return folder_sha256(path)[0] if path.is_dir() else file_sha256(path)


def size_key(size: int) -> str:
    """Return the manifest key of the output at ``size`` pixels, e.g. ``"16px"``."""
    return f"{int(size)}px"


def encode_fold_runs(folds: np.ndarray) -> list[list[int]]:
    """Run-length encode ``(P,)`` fold ids as ``[[fold, count], ...]`` for the manifest."""
    runs: list[list[int]] = []
    for fold in np.asarray(folds).tolist():
        if runs and runs[-1][0] == fold:
            runs[-1][1] += 1
        else:
            runs.append([int(fold), 1])
    return runs


def decode_fold_runs(runs: list[list[int]]) -> np.ndarray:
    """Expand ``[[fold, count], ...]`` back to ``(P,)`` int64 fold ids."""
    return np.concatenate([np.full(count, fold, dtype=np.int64) for fold, count in runs])


@dataclass(frozen=True)
class PreparedManifest:
    """The parsed ``manifest.json`` of a prepared set.

    Attributes:
        path: the manifest file.
        values: its content.
    """

    path: Path
    values: dict[str, Any]

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def task(self) -> str:
        """``"verification"`` or ``"identification"``."""
        return self.values["task"]

    @property
    def degradation(self) -> Degradation:
        """The degradation that made the low-resolution outputs (``vlr_size`` is that of the first size)."""
        return Degradation.from_dict(self.values["degradation"])

    @property
    def sizes(self) -> list[int]:
        return [int(size) for size in self.values["sizes"]]

    @property
    def hr_size(self) -> int:
        return int(self.values["hr_size"])

    def output_path(self, key: str) -> Path:
        """Return the path of output ``key`` (``"hr"`` or ``"16px"``)."""
        if key not in self.values["outputs"]:
            raise DataFormatError(self.path, f"no output {key!r} (it lists {sorted(self.values['outputs'])})", _FIX)
        return self.folder / self.values["outputs"][key]["path"]

    def verified_output(self, key: str) -> Path:
        """Return the path of output ``key`` after checking that its SHA-256 matches the manifest.

        Raises:
            DataFormatError: the output is missing or was changed after the manifest was written.
        """
        path = self.output_path(key)
        if not path.exists():
            raise DataFormatError(path, f"listed in {self.path} but missing", _FIX)
        expected = self.values["outputs"][key]["sha256"]
        found = output_sha256(path)
        if found != expected:
            raise DataFormatError(path, f"SHA-256 {found[:12]}... differs from {expected[:12]}... recorded in "
                                        f"{self.path}, so the output changed after it was prepared", _FIX)
        return path

    def key_of(self, path: str | Path) -> str | None:
        """Return the output key of ``path`` when this manifest lists it, else None."""
        name = Path(path).name
        for key, output in self.values["outputs"].items():
            if output["path"] == name:
                return key
        return None

    def pair_folds(self) -> np.ndarray:
        """Return the ``(P,)`` fold id of each pair of a verification set."""
        return decode_fold_runs(self.values["pair_folds"])


def read_manifest(path: str | Path) -> PreparedManifest:
    """Read the manifest of a prepared set from its folder or from the ``manifest.json`` itself.

    Raises:
        FileNotFoundError: no manifest at that path.
        DataFormatError: the file is not a manifest written by ``lvlrfr prepare`` of this version.
    """
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"prepared set manifest {path} not found; point the set path at a folder written "
                                "by lvlrfr prepare, or run lvlrfr prepare to write it")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataFormatError(path, f"not valid JSON ({error})", _FIX) from None
    if not isinstance(values, dict) or values.get("format") != MANIFEST_FORMAT:
        raise DataFormatError(path, f"not a manifest of format {MANIFEST_FORMAT!r}", _FIX)
    if values.get("version") != MANIFEST_VERSION:
        raise DataFormatError(path, f"manifest version {values.get('version')!r}, but this lvlrfr reads version "
                                    f"{MANIFEST_VERSION}", _FIX)
    missing = [key for key in _REQUIRED_KEYS if key not in values]
    if missing:
        raise DataFormatError(path, f"the manifest lacks the keys {missing}", _FIX)
    return PreparedManifest(path, values)


def find_manifest(output: str | Path) -> PreparedManifest | None:
    """Return the manifest beside ``output`` when it lists that file, or None for a file of other origin."""
    candidate = Path(output).parent / MANIFEST_NAME
    if not candidate.is_file():
        return None
    manifest = read_manifest(candidate)
    return manifest if manifest.key_of(output) is not None else None


class PreparedFaces(Dataset):
    """Prepared faces as ``{hr, vlr, index}``: stored HR faces and stored VLR faces up-sampled to the model input.

    ``hr`` is ``(3, hr_size, hr_size)`` and ``vlr`` ``(3, input_size, input_size)``, in [-1, 1]. The VLR
    faces are up-sampled with ``degradation.up_kernel`` to ``degradation.input_size``.

    Args:
        hr_source: the HR faces; ``load(index)`` returns ``uint8 (hr_size, hr_size, 3)``.
        vlr_source: the VLR faces in the same order; ``load(index)`` returns ``uint8 (vlr_size, vlr_size, 3)``.
        degradation: the spec whose ``vlr_size``, ``input_size`` and ``up_kernel`` apply.
        name: the set name, for error messages.
    """

    def __init__(self, hr_source: Any, vlr_source: Any, degradation: Degradation, name: str) -> None:
        if len(hr_source) != len(vlr_source):
            raise DataFormatError(name, f"{len(hr_source)} HR faces but {len(vlr_source)} faces at "
                                        f"{degradation.vlr_size} px", _FIX)
        self.hr_source = hr_source
        self.vlr_source = vlr_source
        self.degradation = degradation
        self.name = name

    def __len__(self) -> int:
        return len(self.hr_source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        vlr = self.vlr_source.load(index)
        size = self.degradation.vlr_size
        if vlr.shape[:2] != (size, size):
            raise DataFormatError(self.name, f"image {index} is {vlr.shape[1]}x{vlr.shape[0]} pixels in the "
                                             f"{size} px output", _FIX)
        return {
            "hr": to_tensor(self.hr_source.load(index)),
            "vlr": to_tensor(self.degradation.upsample(vlr)),
            "index": torch.tensor(index, dtype=torch.long),
        }
