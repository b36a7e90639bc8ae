"""``lvlrfr prepare``: write low-resolution copies of an evaluation set at several sizes, with a manifest.

Example::

    lvlrfr prepare --output_dir runs/prepared/lfw --sizes '[16, 12, 8]' \\
        --source.name lfw --source.kind lfw --source.folds '[6, 7, 8, 9, 10]' \\
        --source.pairs_file ../shared/data/lfw-112x112/pairs.txt --source.root ../shared/data/lfw-112x112

A verification set becomes ``<name>_hr.bin`` (the HR faces) and ``<name>_<size>px.bin`` per size in
insightface's ``.bin`` format. An identification set becomes ``hr/`` and ``<size>px/`` image folders with
gallery, probe and distractor lists. ``manifest.json`` records the source files and their SHA-256, the
degradation, the counts, the fold of each pair and the SHA-256 of every output. The same source, options and
lvlrfr version give byte-identical outputs: PNG and JPEG encoding are deterministic, and the manifest
contains no time or output path. Everything is written to a temporary folder beside ``output_dir`` and renamed into
place at the end, so an interrupted run leaves no partial set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

import lvlrfr
from lvlrfr.data.datamodule import resize_face
from lvlrfr.commands.parsing import parse_function_arguments
from lvlrfr.data.degradation import Degradation
from lvlrfr.data.image import encode_rgb
from lvlrfr.data.prepared import (
    HR_KEY,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    encode_fold_runs,
    output_sha256,
    size_key,
)
from lvlrfr.data.face_set import crop_box_of
from lvlrfr.data.sets import EvaluationSet, FaceSet, load_set
from lvlrfr.data.sources.identification import write_identification_lists
from lvlrfr.data.sources.verification_bin import write_verification_bin
from lvlrfr.utils.errors import ConfigurationError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {"png": ".png", "jpeg": ".jpg"}


def prepare(
    source: EvaluationSet,
    output_dir: str,
    sizes: list[int] = [16, 12, 8],  # noqa: B006 (jsonargparse needs a literal default)
    degradation: Degradation = Degradation(),  # noqa: B008
    hr_size: int = 112,
    image_format: Literal["png", "jpeg"] = "png",
    jpeg_quality: int = 95,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the HR faces of ``source`` and their degraded versions at each size, and return the manifest.

    Args:
        source: the set to prepare, described as in ``lvlrfr evaluate`` (any kind but ``prepared``).
        output_dir: folder to create; it must not exist unless ``overwrite`` is true.
        sizes: VLR sizes in pixels; each gets one output.
        degradation: the HR → VLR spec (its ``vlr_size`` and ``input_size`` are replaced by each size and
            unused, because outputs store the faces before up-sampling).
        hr_size: side in pixels of the stored HR faces (after ``source.crop_box``).
        image_format: ``png`` keeps pixels exact; ``jpeg`` at ``jpeg_quality`` is what insightface's sets use.
        jpeg_quality: JPEG quality, 1-100.
        overwrite: replace an existing ``output_dir``.
    """
    output = Path(output_dir)
    if output.exists() and not overwrite:
        raise ConfigurationError(f"output_dir {output} already exists; choose another folder or pass --overwrite true")
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise ConfigurationError(f"sizes must be distinct positive pixel sizes, got {sizes}")
    if source.kind == "prepared":
        raise ConfigurationError(f"set {source.name!r} is already prepared; point the source at its HR faces")
    if not 1 <= jpeg_quality <= 100:
        raise ConfigurationError(f"jpeg_quality must lie in [1, 100], got {jpeg_quality}")

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        with tempfile.TemporaryDirectory() as lists_dir:
            face_set = load_set(source, lists_dir)
            if face_set.prepared is not None:
                raise ConfigurationError(f"{source.path} stores low-resolution faces; prepare from the HR copy "
                                         "beside it or from the original set")
            writer = PreparedWriter(face_set, staging, sizes, degradation, hr_size, image_format, jpeg_quality)
            manifest = writer.write()
        _replace_folder(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Wrote prepared set %r to %s", source.name, output)
    return manifest


class PreparedWriter:
    """Write one prepared set into ``folder``; see :func:`prepare` for the arguments."""

    def __init__(self, face_set: FaceSet, folder: Path, sizes: list[int], degradation: Degradation, hr_size: int,
                 image_format: str, jpeg_quality: int) -> None:
        self.face_set = face_set
        self.folder = folder
        self.sizes = [int(size) for size in sizes]
        self.degradation = degradation
        self.degradations = {size: degradation.with_size(size) for size in self.sizes}
        self.hr_size = hr_size
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.crop_box = crop_box_of(face_set.config)
        self.image_digest = hashlib.sha256()

    def encode(self, image: np.ndarray) -> bytes:
        return encode_rgb(image, self.image_format, self.jpeg_quality)

    def load_hr(self, index: int) -> np.ndarray:
        """Read image ``index``, hash its source bytes, and crop and resize it to ``(hr_size, hr_size, 3)``."""
        self.image_digest.update(source_image_bytes(self.face_set.images, index))
        return resize_face(self.face_set.images.load(index), self.hr_size, self.crop_box)

    def degrade(self, hr: np.ndarray, size: int, position: int) -> np.ndarray:
        # Key 2 * position is the key lvlrfr evaluate uses for image `position` of the HR output, so evaluating
        # the HR output degraded on the fly gives the same faces as the stored ones.
        return self.degradations[size].degrade(hr, key=2 * position)

    def write(self) -> dict[str, Any]:
        if self.face_set.verification is not None:
            outputs, counts, extra = self.write_verification()
        else:
            outputs, counts, extra = self.write_identification()
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "created_by": f"lvlrfr {lvlrfr.__version__} prepare",
            "task": self.face_set.task,
            "name": self.face_set.name,
            # The lists of a split made here lie in a temporary folder, so their path is left out.
            "source": {**{key: value for key, value in self.face_set.manifest.items() if key != "lists"},
                       "images_sha256": self.image_digest.hexdigest()},
            "degradation": self.degradation.with_size(self.sizes[0]).to_dict(),
            "degradation_note": "vlr_size and input_size do not apply: each output is at one of sizes, before "
                                "up-sampling; image j of an output is degraded with key 2 * j",
            "sizes": self.sizes,
            "hr_size": self.hr_size,
            "image_format": self.image_format,
            **({"jpeg_quality": self.jpeg_quality} if self.image_format == "jpeg" else {}),
            "colour_order": "RGB",
            "counts": counts,
            **extra,
            "outputs": {key: {"path": path.name, "sha256": output_sha256(path)} for key, path in outputs.items()},
        }
        (self.folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest

    def write_verification(self) -> tuple[dict[str, Path], dict[str, int], dict[str, Any]]:
        """Write the HR ``.bin`` and one ``.bin`` per size, pair ``k`` as images ``2k`` and ``2k + 1``."""
        pairs = self.face_set.verification
        # Output position of each source image: an image in several pairs is stored once per pair.
        positions: dict[int, list[int]] = defaultdict(list)
        for position, index in enumerate(pairs.pairs.reshape(-1).tolist()):
            positions[index].append(position)

        count = 2 * len(pairs.pairs)
        hr_images: list[bytes] = [b""] * count
        vlr_images: dict[int, list[bytes]] = {size: [b""] * count for size in self.sizes}
        for index in tqdm(sorted(positions), desc=f"Preparing {self.face_set.name}", unit="image"):
            hr = self.load_hr(index)
            encoded = self.encode(hr)
            for position in positions[index]:
                hr_images[position] = encoded
                for size in self.sizes:
                    vlr_images[size][position] = self.encode(self.degrade(hr, size, position))

        name = self.face_set.name
        outputs = {HR_KEY: self.folder / f"{name}_hr.bin"}
        outputs.update({size_key(size): self.folder / f"{name}_{size_key(size)}.bin" for size in self.sizes})
        write_verification_bin(outputs[HR_KEY], hr_images, pairs.same)
        for size in self.sizes:
            write_verification_bin(outputs[size_key(size)], vlr_images[size], pairs.same)
        counts = {"pairs": len(pairs.pairs), "same": int(pairs.same.sum()), "images": count,
                  "unique_images": len(positions)}
        extra = {"fold_assignment": pairs.fold_assignment, "pair_folds": encode_fold_runs(pairs.folds)}
        return outputs, counts, extra

    def write_identification(self) -> tuple[dict[str, Path], dict[str, int], dict[str, Any]]:
        """Write ``hr/`` and ``<size>px/`` image folders and the gallery, probe and distractor lists."""
        source = self.face_set.images
        relative = self.output_paths(source)
        outputs = {HR_KEY: self.folder / HR_KEY}
        outputs.update({size_key(size): self.folder / size_key(size) for size in self.sizes})

        for index in tqdm(range(len(source)), desc=f"Preparing {self.face_set.name}", unit="image"):
            hr = self.load_hr(index)
            self.write_image(outputs[HR_KEY] / relative[index], hr)
            for size in self.sizes:
                self.write_image(outputs[size_key(size)] / relative[index], self.degrade(hr, size, index))

        lists = unwrap_source(source)
        entries = {role: [(relative[i], int(lists.labels[i])) for i in lists.indices(role)]
                   for role in ("gallery", "probe", "distractor")}
        written = write_identification_lists(self.folder, entries["gallery"], entries["probe"],
                                             entries["distractor"] or None)
        outputs.update(written)
        counts = {role: len(items) for role, items in entries.items()}
        counts["gallery_identities"] = len({label for _, label in entries["gallery"]})
        return outputs, counts, {}

    def output_paths(self, source: Any) -> list[str]:
        """Return the relative output path of each image: its path under the root, with the output suffix."""
        suffix = IMAGE_SUFFIXES[self.image_format]
        lists = unwrap_source(source)
        relative = [path.relative_to(lists.root).with_suffix(suffix).as_posix() for path in lists.paths]
        if len(set(relative)) != len(relative):
            duplicate = next(path for path in relative if relative.count(path) > 1)
            raise ConfigurationError(f"two images of set {self.face_set.name!r} map to {duplicate} once stored as "
                                     f"{self.image_format}; rename one of them")
        return relative

    def write_image(self, path: Path, image: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.encode(image))


def unwrap_source(images: Any) -> Any:
    """Return the reader under the wrappers of ``lvlrfr.data.sets`` (channel swap, index subset)."""
    while hasattr(images, "source"):
        images = images.source
    return images


def source_image_bytes(images: Any, index: int) -> bytes:
    """Return the stored bytes of image ``index``: its file, or its encoded bytes in a ``.bin``."""
    while hasattr(images, "source"):
        if hasattr(images, "indices"):
            index = int(images.indices[index])
        images = images.source
    if hasattr(images, "encoded"):
        return images.encoded[index]
    return Path(images.paths[index]).read_bytes()


def _replace_folder(staging: Path, output: Path) -> None:
    """Move ``staging`` to ``output``, replacing an existing ``output`` only once the new one is complete."""
    os.chmod(staging, 0o755)  # mkdtemp creates the folder readable by the owner only
    if not output.exists():
        os.replace(staging, output)
        return
    previous = output.with_name(f".{output.name}.old-{os.getpid()}")
    os.replace(output, previous)
    os.replace(staging, output)
    shutil.rmtree(previous)


def main(argv: list[str]) -> None:
    arguments = parse_function_arguments(prepare, "lvlrfr prepare", __doc__.split("\n\n")[0], argv)
    if isinstance(arguments["source"], dict):
        arguments["source"] = EvaluationSet(**arguments["source"])
    if isinstance(arguments["degradation"], dict):
        arguments["degradation"] = Degradation.from_dict(arguments["degradation"])
    manifest = prepare(**arguments)
    print(f"Prepared {manifest['name']!r} ({manifest['task']}): {manifest['counts']}")
    for key, output in manifest["outputs"].items():
        print(f"  {key:>6}: {Path(arguments['output_dir']) / output['path']}  sha256 {output['sha256']}")
    print(f"  manifest: {Path(arguments['output_dir']) / MANIFEST_NAME}")
