"""insightface verification sets (``lfw.bin``, ``agedb_30.bin``, ``cfp_fp.bin``, ...), loaded without running code.

A ``.bin`` is a pickle of ``(images, issame)``. ``images`` is a list of ``2 * P`` encoded images (JPEG or PNG
bytes, or those bytes as a ``uint8`` numpy array) and ``issame`` a list of ``P`` bools. Pair ``k`` is images
``2k`` and ``2k + 1``. insightface loads it with ``pickle.load(f, encoding="bytes")``. Unpickling an
arbitrary file can run code, so this module's unpickler resolves no global except the numpy names that a
pickled ``uint8``/``bool`` array needs and the latin-1 decoder of protocol-2 bytes, and checks their arguments.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lvlrfr.data.image import decode_rgb, encode_rgb
from lvlrfr.data.sources.errors import DataFormatError
from lvlrfr.data.sources.pairs import contiguous_folds

logger = logging.getLogger(__name__)

_RECONSTRUCT = np.ndarray(0, dtype=np.uint8).__reduce__()[0]  # numpy's array unpickling helper
_ALLOWED_DTYPES = {"u1": np.dtype(np.uint8), "b1": np.dtype(np.bool_)}
_FIX = "use a .bin written by insightface or by lvlrfr prepare"


class _BlockedGlobal(pickle.UnpicklingError):
    def __init__(self, reference: str) -> None:
        self.reference = reference
        super().__init__(reference)


def _reconstruct_array(subtype: type, shape: tuple, dtype_code: bytes | str) -> np.ndarray:
    if subtype is not np.ndarray:
        raise _BlockedGlobal(f"numpy array subclass {subtype!r}")
    return _RECONSTRUCT(np.ndarray, shape, dtype_code)


def _array_from_buffer(buffer: bytes, dtype: np.dtype, shape: tuple, order: str) -> np.ndarray:
    # Protocol-5 pickles of arrays call numpy's _frombuffer; dtype has already passed _make_dtype.
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _latin1_bytes(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 pickles bytes with protocol 2 or lower as _codecs.encode(text, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise _BlockedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _make_dtype(spec: bytes | str, align: bool = False, copy: bool = False) -> np.dtype:
    name = spec.decode("ascii", "replace") if isinstance(spec, bytes) else str(spec)
    if name not in _ALLOWED_DTYPES:
        raise _BlockedGlobal(f"numpy dtype {name!r}")
    return np.dtype(name)


class _VerificationUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of bytes and plain ``uint8``/``bool`` arrays and raises on the rest.

    Bytes, lists, tuples, bools and ints need no global lookup, so a well-formed ``.bin`` loads. Any other
    class reference (``collections.OrderedDict``, ``os.system``, a custom class) is rejected before it is
    imported or called.
    """

    _GLOBALS = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct_array,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct_array,
        ("numpy.core.numeric", "_frombuffer"): _array_from_buffer,
        ("numpy._core.numeric", "_frombuffer"): _array_from_buffer,
        ("numpy", "ndarray"): np.ndarray,
        ("_codecs", "encode"): _latin1_bytes,
        ("numpy", "dtype"): _make_dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._GLOBALS[(module, name)]
        except KeyError:
            raise _BlockedGlobal(f"{module}.{name}") from None


def _as_bytes(item: object) -> bytes | None:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    return None


def read_verification_bin(path: str | Path) -> tuple[list[bytes], np.ndarray]:
    """Load a verification ``.bin`` as ``(encoded images, issame)``: ``2 * P`` byte strings and ``(P,)`` bool.

    Raises:
        FileNotFoundError: the file is missing.
        DataFormatError: the file is not a pickle, refers to a class other than a plain numpy array (it is
            not loaded), or its content is not ``(list of 2 * P encoded images, list of P bools)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification set {path} not found; point the evaluation set path at a .bin file")
    try:
        with open(path, "rb") as file:
            content = _VerificationUnpickler(file, encoding="bytes").load()
    except _BlockedGlobal as error:
        raise DataFormatError(path, f"the pickle refers to {error.reference}, which a verification .bin does not "
                                    "contain, so the file was not loaded", _FIX) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            OverflowError) as error:
        raise DataFormatError(path, f"not a readable pickle ({type(error).__name__}: {error})", _FIX) from None

    if not isinstance(content, (tuple, list)) or len(content) != 2:
        found = f"a {type(content).__name__}"
        if isinstance(content, (tuple, list)):
            found += f" of length {len(content)}"
        raise DataFormatError(path, f"expected a pickled (images, issame) pair, found {found}", _FIX)
    images, issame = content
    if not isinstance(images, (list, tuple)):
        raise DataFormatError(path, f"expected a list of encoded images first, found a {type(images).__name__}", _FIX)
    encoded = [_as_bytes(item) for item in images]
    bad = [position for position, item in enumerate(encoded) if item is None]
    if bad:
        item = images[bad[0]]
        kind = f"{type(item).__name__} of dtype {item.dtype}" if isinstance(item, np.ndarray) else type(item).__name__
        raise DataFormatError(path, f"image {bad[0]} is a {kind}; expected encoded image bytes", _FIX)

    if isinstance(issame, np.ndarray) and issame.dtype == np.bool_ and issame.ndim == 1:
        issame = issame.tolist()
    flags_valid = isinstance(issame, (list, tuple)) and all(
        isinstance(flag, (bool, int)) and flag in (0, 1) for flag in issame)
    if not flags_valid:
        raise DataFormatError(path, f"expected a list of bools second, found {type(issame).__name__} "
                                    f"{str(issame)[:80]}", _FIX)
    if not issame or len(encoded) != 2 * len(issame):
        raise DataFormatError(path, f"found {len(encoded)} images for {len(issame)} pairs; expected two images per "
                                    "pair and at least one pair", _FIX)
    return encoded, np.asarray(issame, dtype=bool)


def write_verification_bin(path: str | Path, images: Sequence[np.ndarray | bytes], issame: Sequence[bool],
                           quality: int = 95, image_format: str = "jpeg") -> None:
    """Write ``images`` (``2 * P`` arrays ``uint8 (H, W, 3)`` RGB or encoded bytes) and ``issame`` as a ``.bin``.

    Arrays are encoded as JPEG at ``quality`` (as insightface's sets are) or, with ``image_format="png"``,
    losslessly. The file is written under a temporary name and moved into place.
    """
    path = Path(path)
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs; pair k is images 2k and 2k + 1")
    encoded = [image if isinstance(image, bytes) else encode_rgb(image, image_format, quality) for image in images]
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            pickle.dump((encoded, [bool(flag) for flag in issame]), file, protocol=4)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    logger.info("Wrote %d pairs to %s", len(issame), path)


class VerificationBinSource:
    """Verification source over an insightface ``.bin``: images ``2k`` and ``2k + 1`` form pair ``k``.

    Folds are ``num_folds`` contiguous blocks of pairs, as insightface's ``verification.py`` splits them
    (``KFold`` without shuffling). For LFW's 6000 pairs these are LFW's own 10 folds of 600. The encoded
    images stay in memory and are decoded on :meth:`load`.
    """

    format = "insightface-bin"

    def __init__(self, path: str | Path, num_folds: int = 10) -> None:
        self.path = Path(path)
        self.encoded, self.same = read_verification_bin(self.path)
        num_pairs = len(self.same)
        self.pairs = np.arange(2 * num_pairs, dtype=np.int64).reshape(num_pairs, 2)
        self.folds = contiguous_folds(num_pairs, num_folds)
        logger.info("Read %d pairs (%d same) from %s", num_pairs, int(self.same.sum()), self.path)

    def __len__(self) -> int:
        return len(self.encoded)

    def load(self, index: int) -> np.ndarray:
        """Decode image ``index`` as ``uint8 (H, W, 3)`` RGB."""
        return decode_rgb(self.encoded[index], f"{self.path} image {index}")

    def describe(self) -> dict:
        return {"format": self.format, "path": str(self.path), "images": len(self), "pairs": len(self.pairs),
                "same": int(self.same.sum()), "folds": int(self.folds.max())}

    def manifest(self) -> dict:
        """Return a summary for cache keys: the file's content hash and the counts."""
        return {**self.describe(), "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest()}
