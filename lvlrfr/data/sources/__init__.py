"""Readers of face data sets: identity folders, LFW pairs, pair lists, RecordIO, ``.bin`` and gallery/probe lists.

Every source has ``__len__``, ``load(index) -> uint8 (H, W, 3)`` RGB, ``describe()`` and ``manifest()``.
Identity-labelled sources also return ``(image, label)`` from ``source[index]``, and verification sources
have ``pairs``, ``same`` and ``folds`` arrays.
"""

from lvlrfr.data.sources.errors import DataFormatError
from lvlrfr.data.sources.folders import IMAGE_EXTENSIONS, IdentityFolderSource
from lvlrfr.data.sources.identification import (
    IdentificationSource,
    read_image_list,
    split_gallery_probe,
    write_identification_lists,
)
from lvlrfr.data.sources.lfw import PairProtocol, read_lfw_pairs
from lvlrfr.data.sources.pairs import PairListSource, contiguous_folds
from lvlrfr.data.sources.recordio import RecordIOSource
from lvlrfr.data.sources.recordio_files import RecordIOReader, RecordIOWriter
from lvlrfr.data.sources.verification_bin import VerificationBinSource, read_verification_bin, write_verification_bin

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataFormatError",
    "IdentificationSource",
    "IdentityFolderSource",
    "PairListSource",
    "PairProtocol",
    "RecordIOReader",
    "RecordIOSource",
    "RecordIOWriter",
    "VerificationBinSource",
    "contiguous_folds",
    "read_image_list",
    "read_lfw_pairs",
    "read_verification_bin",
    "split_gallery_probe",
    "write_identification_lists",
    "write_verification_bin",
]
