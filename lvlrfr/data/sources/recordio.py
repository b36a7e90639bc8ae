"""insightface training sets in MXNet RecordIO (``train.rec`` + ``train.idx``) as an identity-labelled source.

insightface convention (arcface_torch ``MXFaceDataset``): when record 0 has ``flag > 0`` it is a header whose
``label[0]`` is one past the last image key, so images are keys ``1 .. label[0] - 1``. The keys from
``label[0]`` to ``label[1] - 1`` are identity records, each labelled with the ``[start, end)`` key range of
one identity's images. Without such a header every key is an image. An image's class is its label, or
``label[0]`` when the label is an array. The file layout is described in ``recordio_files``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from lvlrfr.data.image import ImageReadError, decode_rgb, encode_rgb
from lvlrfr.data.sources.errors import DataFormatError
from lvlrfr.data.sources.recordio_files import (
    MAGIC,
    IRHeader,
    RecordIOReader,
    RecordIOWriter,
    class_of,
    pack_record,
    unpack_record,
)

__all__ = [
    "MAGIC",
    "IRHeader",
    "RecordIOReader",
    "RecordIOSource",
    "RecordIOWriter",
    "class_of",
    "encode_rgb",
    "pack_record",
    "unpack_record",
]

logger = logging.getLogger(__name__)


class RecordIOSource:
    """Training source over an insightface RecordIO set: ``source[i] -> (uint8 (H, W, 3) RGB, class)``.

    Construction reads the header of every image record (one small read per record, not the image) to
    build ``labels``. ``num_classes`` is ``max(label) + 1``, because insightface's labels are 0..C-1.

    Args:
        rec_path: the ``.rec`` file, or a folder containing ``train.rec`` and ``train.idx``.
        idx_path: the ``.idx`` file; default: ``rec_path`` with the suffix ``.idx``.
        skip_unreadable: when True, construction also decodes every image and leaves out records whose
            image cannot be decoded (a full pass over the file, logged with the count and the first keys).
            When False, an unreadable image raises ``ImageReadError`` naming the record key when loaded.
    """

    format = "insightface-recordio"

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None, skip_unreadable: bool = False) -> None:
        rec_path = Path(rec_path)
        if rec_path.is_dir():
            idx_path = idx_path if idx_path is not None else rec_path / "train.idx"
            rec_path = rec_path / "train.rec"
        self.reader = RecordIOReader(rec_path, idx_path if idx_path is not None else rec_path.with_suffix(".idx"))

        self.header = self.reader.read_header(0) if 0 in self.reader else None
        if self.header is not None and self.header.flag > 0:
            keys = range(1, int(self.header.label[0]))
            missing = [key for key in keys if key not in self.reader]
            if missing:
                raise DataFormatError(self.reader.idx_path, f"header record 0 announces image keys 1..{keys[-1]} but "
                                      f"{len(missing)} are missing (first: {missing[0]})",
                                      "regenerate the .idx together with the .rec")
        else:
            keys = sorted(self.reader.keys)
        if not keys:
            raise DataFormatError(self.reader.idx_path, "the index lists no image records",
                                  "regenerate the .rec and .idx from the images")

        labels = [class_of(self.reader.read_header(key)) for key in keys]
        self.keys = np.asarray(keys, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.float64)
        invalid = ~np.isfinite(self.labels) | (self.labels < 0) | (self.labels != np.floor(self.labels))
        if invalid.any():
            first = np.flatnonzero(invalid)[0]
            raise DataFormatError(self.reader.rec_path,
                                  f"record key {self.keys[first]} has label {self.labels[first]}, "
                                  "not a non-negative integer class", "rewrite the set with integer class labels")
        self.labels = self.labels.astype(np.int64)

        self.skipped: list[int] = []
        if skip_unreadable:
            self._drop_unreadable()
            if not len(self.keys):
                raise DataFormatError(self.reader.rec_path, "no record contains a decodable image",
                                      "check that the file is an image RecordIO set")

        self.num_classes = int(self.labels.max()) + 1
        absent = self.num_classes - len(np.unique(self.labels))
        if absent:
            logger.warning("%s: %d of the classes 0..%d have no image", rec_path, absent, self.num_classes - 1)
        logger.info("Read %d RecordIO images of %d classes from %s", len(self), self.num_classes, rec_path)

    def _drop_unreadable(self) -> None:
        keep = np.ones(len(self.keys), dtype=bool)
        for position in range(len(self.keys)):
            try:
                self.load(position)
            except ImageReadError:
                keep[position] = False
        self.skipped = self.keys[~keep].tolist()
        if self.skipped:
            logger.warning("Skipping %d unreadable images in %s (first record keys: %s)",
                           len(self.skipped), self.reader.rec_path, self.skipped[:5])
        self.keys, self.labels = self.keys[keep], self.labels[keep]

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, index: int) -> np.ndarray:
        """Decode image ``index`` as ``uint8 (H, W, 3)`` RGB."""
        key = int(self.keys[index])
        _, image_bytes = self.reader.read_record(key)
        return decode_rgb(image_bytes, f"{self.reader.rec_path} record key {key}")

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.load(index), int(self.labels[index])

    def describe(self) -> dict:
        return {"format": self.format, "path": str(self.reader.rec_path), "images": len(self),
                "classes": self.num_classes, "skipped": len(self.skipped)}

    def manifest(self) -> dict:
        """Return a summary for cache keys: the ``.idx`` content hash, the ``.rec`` size and the counts."""
        digest = hashlib.sha256()
        with open(self.reader.idx_path, "rb") as index_file:
            for block in iter(lambda: index_file.read(1 << 20), b""):
                digest.update(block)
        return {**self.describe(), "idx_sha256": digest.hexdigest(), "rec_bytes": self.reader.rec_size}
