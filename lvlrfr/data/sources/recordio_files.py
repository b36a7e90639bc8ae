"""MXNet RecordIO files (``.rec`` + ``.idx``) as insightface writes them, read and written without mxnet.

Layout of ``train.rec`` (dmlc-core RecordIO, little-endian): each record part is ``uint32 magic 0xced7230a``,
``uint32 lrecord`` (upper 3 bits: continuation flag, lower 29 bits: length), the payload, then zero padding
to a multiple of 4 bytes. The writer splits a payload wherever the magic number occurs at a 4-byte-aligned
position (flags 1 = first part, 2 = middle, 3 = last, 0 = whole record) and the reader puts the magic back.

A payload is an ``IRHeader`` packed as ``<IfQQ`` (flag, label, id, id2; 24 bytes), then ``flag`` float32
labels when ``flag > 0``, then the encoded image (JPEG or PNG). ``train.idx`` has one ``key<TAB>offset``
line per record.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lvlrfr.data.image import encode_rgb
from lvlrfr.data.sources.errors import DataFormatError

logger = logging.getLogger(__name__)

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_IR_HEADER = struct.Struct("<IfQQ")
# Bytes read at once when the record length is not known yet: a whole 112x112 JPEG fits in most cases.
_PREFETCH = 16 * 1024


class IRHeader(NamedTuple):
    """Record header: ``label`` is a float, or a ``(flag,)`` float32 array when ``flag > 0``."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack_record(label: float | np.ndarray | list[float], image_bytes: bytes, record_id: int = 0) -> bytes:
    """Pack a label (a number, or a sequence stored as ``flag`` float32 values) and image bytes as mxnet does."""
    if np.isscalar(label):
        return _IR_HEADER.pack(0, float(label), record_id, 0) + image_bytes
    values = np.asarray(label, dtype=np.float32).ravel()
    return _IR_HEADER.pack(values.size, 0.0, record_id, 0) + values.tobytes() + image_bytes


def unpack_record(payload: bytes) -> tuple[IRHeader, bytes]:
    """Split a record payload into its :class:`IRHeader` and the encoded image bytes."""
    flag, label, record_id, id2 = _IR_HEADER.unpack_from(payload)
    start = _IR_HEADER.size
    if flag > 0:
        label = np.frombuffer(payload, dtype="<f4", count=flag, offset=start).astype(np.float32)
        start += 4 * flag
    return IRHeader(flag, label, record_id, id2), payload[start:]


def class_of(header: IRHeader) -> float:
    """Return the class label of an image record: the label, or its first value when it is an array."""
    return float(header.label[0]) if header.flag > 0 else float(header.label)


class RecordIOReader:
    """Random access to the records of a ``.rec`` file through its ``.idx`` offsets.

    The file is opened lazily and reopened in each process (the owning pid is tracked), so one reader can
    be shared by forked or spawned DataLoader workers. Reads use ``os.pread`` and move no file position.

    Raises:
        FileNotFoundError: a missing ``.rec`` or ``.idx``.
        DataFormatError: at construction, an ``.idx`` line that is not two integers, a duplicate key, or an
            offset past the end of the ``.rec``. When a record is read, a bad magic number or a record running
            past the end of the ``.rec``.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path) -> None:
        self._fd: int | None = None
        self._pid: int | None = None
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path)
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"RecordIO file {path} not found; point the data path at a train.rec with its train.idx")
        self.rec_size = self.rec_path.stat().st_size
        self._offsets = self._read_index()
        self.keys = list(self._offsets)

    def _read_index(self) -> dict[int, int]:
        offsets: dict[int, int] = {}
        with open(self.idx_path, encoding="ascii", errors="replace") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                fields = line.rstrip("\r\n").split("\t")
                if len(fields) != 2 or not all(field.strip().lstrip("-").isdigit() for field in fields):
                    raise DataFormatError(
                        self.idx_path, f"line {line_number}: expected '<key>\\t<offset>' with two integers, "
                                       f"found {line.rstrip()!r}", "regenerate the .idx together with the .rec")
                key, offset = int(fields[0]), int(fields[1])
                if key in offsets:
                    raise DataFormatError(self.idx_path, f"line {line_number}: key {key} appears twice",
                                          "regenerate the .idx together with the .rec")
                if offset < 0 or offset % 4 or offset + 8 > self.rec_size:
                    raise DataFormatError(
                        self.idx_path,
                        f"line {line_number}: key {key} has offset {offset}, which is not a record start in "
                        f"{self.rec_path.name} ({self.rec_size} bytes, records start at multiples of 4)",
                        "the .idx does not belong to this .rec or the .rec is truncated; copy both files again")
                offsets[key] = offset
        if not offsets:
            raise DataFormatError(self.idx_path, "the index has no records",
                                  "regenerate the .idx together with the .rec")
        return offsets

    def __len__(self) -> int:
        return len(self._offsets)

    def __contains__(self, key: int) -> bool:
        return key in self._offsets

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            # A forked child shares the parent's descriptor, so it opens its own and leaves the parent's open.
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def close(self) -> None:
        """Close this process's file descriptor (the reader reopens it on the next read)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        self.close()

    def _fail(self, key: int, offset: int, problem: str) -> DataFormatError:
        return DataFormatError(self.rec_path, f"record key {key} (offset {offset}): {problem}",
                               "the file is truncated or the .idx does not belong to it; copy both files again")

    def read(self, key: int, max_bytes: int | None = None) -> bytes:
        """Return the payload of record ``key``, or only its first ``max_bytes`` bytes when given."""
        if key not in self._offsets:
            raise KeyError(f"record key {key} is not in {self.idx_path}")
        fd = self._file()
        start = position = self._offsets[key]
        pieces: list[bytes] = []
        size = 0
        while True:
            request_size = _PREFETCH if max_bytes is None else max_bytes - size
            chunk = os.pread(fd, 8 + request_size, position)
            if len(chunk) < 8:
                raise self._fail(key, start, f"the record header at byte {position} runs past the end of the file")
            magic, lrecord = struct.unpack_from("<II", chunk)
            if magic != MAGIC:
                raise self._fail(key, start,
                                 f"bad magic number 0x{magic:08x} at byte {position} (expected 0x{MAGIC:08x})")
            flag, length = lrecord >> 29, lrecord & _LENGTH_MASK
            if flag not in ((0, 1) if position == start else (2, 3)):
                raise self._fail(key, start, f"continuation flag {flag} at byte {position} is out of sequence")
            if position + 8 + length > self.rec_size:
                raise self._fail(key, start, f"the record part at byte {position} has length {length}, "
                                             f"past the end of the file ({self.rec_size} bytes)")
            take = length if max_bytes is None else min(length, max_bytes - size)
            data = chunk[8:8 + take]
            if len(data) < take:
                data += os.pread(fd, take - len(data), position + 8 + len(data))
            pieces.append(data)
            size += take
            if flag in (0, 3) or (max_bytes is not None and size >= max_bytes):
                break
            pieces.append(_MAGIC_BYTES)  # the writer split the payload at this occurrence of the magic
            size += 4
            if max_bytes is not None and size >= max_bytes:
                break
            position += 8 + ((length + 3) & ~3)
        payload = b"".join(pieces)
        return payload if max_bytes is None else payload[:max_bytes]

    def read_header(self, key: int) -> IRHeader:
        """Read the :class:`IRHeader` of record ``key`` without reading its image bytes."""
        # One read covers the header and up to 4 float labels; longer label arrays need a second read.
        payload = self.read(key, max_bytes=_IR_HEADER.size + 16)
        if len(payload) < _IR_HEADER.size:
            raise self._fail(key, self._offsets[key], f"the payload has {len(payload)} bytes, shorter than the "
                                                      f"{_IR_HEADER.size}-byte IRHeader")
        needed = _IR_HEADER.size + 4 * _IR_HEADER.unpack_from(payload)[0]
        if len(payload) < needed:
            payload = self.read(key, max_bytes=needed)
        if len(payload) < needed:
            raise self._fail(key, self._offsets[key], f"the IRHeader announces {(needed - _IR_HEADER.size) // 4} "
                                                      "labels but the record ends before them")
        return unpack_record(payload)[0]

    def read_record(self, key: int) -> tuple[IRHeader, bytes]:
        """Read record ``key`` as its header and encoded image bytes."""
        return unpack_record(self.read(key))


class RecordIOWriter:
    """Write an insightface ``.rec``/``.idx`` pair: images as keys 1..N, identity records, then header record 0.

    Images must arrive grouped by class (all images of one identity in a row), because each identity record
    stores the key range of its images. Arrays are encoded as JPEG at ``quality`` (insightface's choice) or,
    with ``image_format="png"``, losslessly; encoded bytes are stored as given. Both files are written under
    temporary names and moved into place by :meth:`close`, ``.rec`` first, then ``.idx``. An exception
    inside the ``with`` block removes the temporary files.

    Example::

        with RecordIOWriter(folder / "train.rec", folder / "train.idx") as writer:
            for image, label in samples:
                writer.add(image, label)
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None, image_format: str = "jpeg",
                 quality: int = 95) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        self.image_format, self.quality = image_format, quality
        self._rec_tmp = self.rec_path.with_name(f".{self.rec_path.name}.tmp-{os.getpid()}")
        self._idx_tmp = self.idx_path.with_name(f".{self.idx_path.name}.tmp-{os.getpid()}")
        self._rec = open(self._rec_tmp, "wb")
        self._idx = open(self._idx_tmp, "w", encoding="ascii")
        self._identity_ranges: dict[int, list[int]] = {}  # class -> [first key, one past last key]
        self._last_class: int | None = None
        self._next_key = 1

    def _write(self, key: int, payload: bytes) -> None:
        if len(payload) > _LENGTH_MASK:
            raise ValueError(f"record key {key} has {len(payload)} bytes; "
                             "RecordIO records are limited to 2**29 - 1 bytes")
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        size, start = len(payload), 0
        for position in range(0, size - size % 4, 4):
            if payload[position:position + 4] == _MAGIC_BYTES:
                self._rec.write(struct.pack("<II", MAGIC, ((1 if start == 0 else 2) << 29) | (position - start)))
                self._rec.write(payload[start:position])
                start = position + 4
        self._rec.write(struct.pack("<II", MAGIC, ((3 if start else 0) << 29) | (size - start)))
        self._rec.write(payload[start:] + b"\0" * (-size % 4))

    def add(self, image: np.ndarray | bytes, label: int | list[float] | np.ndarray) -> int:
        """Append an image (``uint8 (H, W, 3)`` RGB, or already encoded bytes) and return its key.

        ``label`` is the class index, or a float array whose first value is the class index.
        """
        class_index = int(label if np.isscalar(label) else np.asarray(label).ravel()[0])
        if class_index != self._last_class and class_index in self._identity_ranges:
            raise ValueError(f"class {class_index} comes back after class {self._last_class}; RecordIO stores each "
                             "identity's images as one key range, so add the images grouped by class")
        key = self._next_key
        image_bytes = image if isinstance(image, bytes) else encode_rgb(image, self.image_format, self.quality)
        self._write(key, pack_record(label, image_bytes))
        self._identity_ranges.setdefault(class_index, [key, key])[1] = key + 1
        self._last_class = class_index
        self._next_key += 1
        return key

    def close(self) -> None:
        """Write the identity records and the header record 0, then move both files into place."""
        first_identity_key = self._next_key
        for key, (start, end) in enumerate(self._identity_ranges.values(), start=first_identity_key):
            self._write(key, pack_record([start, end], b""))
        self._write(0, pack_record([first_identity_key, first_identity_key + len(self._identity_ranges)], b""))
        for handle in (self._rec, self._idx):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        os.replace(self._rec_tmp, self.rec_path)
        os.replace(self._idx_tmp, self.idx_path)
        logger.info("Wrote %d images of %d identities to %s",
                    self._next_key - 1, len(self._identity_ranges), self.rec_path)

    def abort(self) -> None:
        """Close and delete the temporary files, leaving any existing ``.rec``/``.idx`` untouched."""
        for handle, path in ((self._rec, self._rec_tmp), (self._idx, self._idx_tmp)):
            handle.close()
            path.unlink(missing_ok=True)

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
