"""Build an evaluation set of any kind from its config entry: LFW, ``.bin``, pair lists, gallery/probe, prepared.

``lvlrfr evaluate`` and ``lvlrfr prepare`` describe each set with an :class:`EvaluationSet` and turn it into a
:class:`FaceSet` with :func:`load_set`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from lvlrfr.data.face_set import (
    LFW_DEFAULT_FOLDS,
    ConvertedToRGB,
    EvaluationSet,
    FaceSet,
    IdentificationRoles,
    IndexedSource,
    VerificationPairs,
    VerificationSet,
    check_colour_order,
)
from lvlrfr.data.prepared import HR_KEY, PreparedManifest, find_manifest, read_manifest, size_key
from lvlrfr.data.sources.identification import IdentificationSource, split_gallery_probe, write_identification_lists
from lvlrfr.data.sources.lfw import read_lfw_pairs
from lvlrfr.data.sources.pairs import PairListSource
from lvlrfr.data.sources.verification_bin import VerificationBinSource
from lvlrfr.utils.errors import ConfigurationError

__all__ = ["EvaluationSet", "FaceSet", "VerificationSet", "load_set"]


def load_set(config: EvaluationSet, lists_dir: str | Path) -> FaceSet:
    """Build the set described by ``config``.

    Args:
        config: the set's config entry.
        lists_dir: folder where the gallery and probe lists of a split made here are written.

    Raises:
        ConfigurationError: a key the kind needs is unset, or the colour order cannot be fed to a model.
        FileNotFoundError, DataFormatError: a file is missing or malformed (the message names it).
    """
    check_colour_order(config)
    loaders = {"lfw": _load_lfw, "pairs": _load_pair_list, "bin": _load_bin, "prepared": _load_prepared,
               "identification": lambda entry: _load_identification(entry, Path(lists_dir))}
    if config.kind not in loaders:
        raise ConfigurationError(f"set {config.name!r} has kind {config.kind!r}; choose one of {sorted(loaders)}")
    face_set = loaders[config.kind](config)
    if config.cross_resolution and face_set.identification is None:
        raise ConfigurationError(f"set {config.name!r}: cross_resolution applies to identification sets only; "
                                 "remove it from this verification set")
    if face_set.prepared is not None and config.crop_box is not None:
        raise ConfigurationError(f"set {config.name!r} reads prepared faces, which were cropped when prepared; "
                                 "remove its crop_box")
    if face_set.prepared is not None and config.colour_order != "RGB":
        raise ConfigurationError(f"set {config.name!r} declares colour_order {config.colour_order}, but lvlrfr prepare "
                                 "stores RGB images; remove colour_order and convert_to_rgb from its entry")
    if config.convert_to_rgb:
        face_set.images = ConvertedToRGB(face_set.images)
        face_set.stored = {size: ConvertedToRGB(source) for size, source in face_set.stored.items()}
    face_set.manifest = {"kind": config.kind, **face_set.manifest, "colour_order": config.colour_order,
                         "converted_to_rgb": config.convert_to_rgb, "crop_box": config.crop_box}
    return face_set


def _load_lfw(config: EvaluationSet) -> FaceSet:
    config.require("pairs_file", "root")
    folds = config.folds if config.folds is not None else LFW_DEFAULT_FOLDS
    protocol = read_lfw_pairs(config.pairs_file, config.root).select_folds(folds)
    manifest = {**protocol.manifest(), "pairs_file": config.pairs_file, "root": config.root, "folds": folds,
                "pairs_file_sha256": hashlib.sha256(Path(config.pairs_file).read_bytes()).hexdigest()}
    pairs = VerificationPairs(protocol.pairs, protocol.same, protocol.folds,
                              f"LFW View-2 folds {folds} of {Path(config.pairs_file).name}")
    return FaceSet(config, protocol, manifest, verification=pairs)


def _load_pair_list(config: EvaluationSet) -> FaceSet:
    config.require("pairs_file", "root")
    source = PairListSource(config.pairs_file, config.root, config.num_folds)
    assignment = f"{config.num_folds} contiguous blocks of the pair list (KFold without shuffling)"
    return _verification_set(config, source, source.pairs, source.same, source.folds, assignment, source.manifest())


def _load_bin(config: EvaluationSet) -> FaceSet:
    config.require("path")
    manifest = find_manifest(config.path)
    if manifest is not None:
        return _load_prepared_verification(config, manifest, only=manifest.key_of(config.path))
    source = VerificationBinSource(config.path, config.num_folds)
    assignment = f"{config.num_folds} contiguous blocks of the .bin pairs (KFold without shuffling, as insightface)"
    return _verification_set(config, source, source.pairs, source.same, source.folds, assignment, source.manifest())


def _verification_set(config: EvaluationSet, source: Any, pairs: np.ndarray, same: np.ndarray, folds: np.ndarray,
                      assignment: str, manifest: dict[str, Any], stored: dict[int, Any] | None = None) -> FaceSet:
    """Build a verification FaceSet, keeping only ``config.folds`` and the images their pairs use."""
    stored = dict(stored or {})
    if config.folds is not None:
        unknown = sorted(set(config.folds) - set(folds.tolist()))
        if unknown:
            raise ConfigurationError(f"set {config.name!r}: folds {unknown} do not exist; its folds are "
                                     f"{sorted(set(folds.tolist()))}")
        keep = np.isin(folds, config.folds)
        used = np.unique(pairs[keep])
        remap = np.full(len(source), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        pairs, same, folds = remap[pairs[keep]], same[keep], folds[keep]
        source = IndexedSource(source, used)
        stored = {size: IndexedSource(lr_source, used) for size, lr_source in stored.items()}
        assignment += f", folds {config.folds}"
        manifest = {**manifest, "folds": config.folds}
    return FaceSet(config, source, manifest, verification=VerificationPairs(pairs, same, folds, assignment),
                   stored=stored)


def _load_prepared(config: EvaluationSet) -> FaceSet:
    config.require("path")
    manifest = read_manifest(config.path)
    if manifest.task == "verification":
        return _load_prepared_verification(config, manifest, only=None)
    return _load_prepared_identification(config, manifest)


def _load_prepared_verification(config: EvaluationSet, manifest: PreparedManifest, only: str | None) -> FaceSet:
    """Load a prepared ``.bin`` set; ``only`` restricts it to one output (the ``.bin`` a ``bin`` set names)."""
    hr = VerificationBinSource(manifest.verified_output(HR_KEY))
    folds = manifest.pair_folds()
    if len(folds) != len(hr.same):
        raise ConfigurationError(f"{manifest.path} records {len(folds)} pair folds for {len(hr.same)} pairs; "
                                 "write the set again with lvlrfr prepare")
    # The HR copy named alone is a plain verification set, degraded on the fly, whose folds the manifest gives.
    stored = {size: VerificationBinSource(manifest.verified_output(size_key(size)))
              for size in manifest.sizes if only in (None, size_key(size))}
    assignment = f"{manifest.values['fold_assignment']} (recorded in {manifest.path})"
    description = {"prepared": str(manifest.folder), "prepared_manifest_sha256": _manifest_digest(manifest),
                   "source": manifest.values["source"], "counts": manifest.values["counts"],
                   "prepared_degradation": manifest.values["degradation"]}
    images, pairs = hr, hr.pairs
    if only != HR_KEY:
        images, pairs, stored = _deduplicate(hr, stored)
        description["images_embedded"] = len(images)
    face_set = _verification_set(config, images, pairs, hr.same, folds, assignment, description, stored)
    face_set.prepared = None if only == HR_KEY else manifest
    return face_set


def _deduplicate(hr: VerificationBinSource, stored: dict[int, VerificationBinSource]
                 ) -> tuple[IndexedSource, np.ndarray, dict[int, IndexedSource]]:
    """Index each image of a prepared ``.bin`` set once, so that it is embedded once.

    A ``.bin`` stores an image once per pair it is in. Two positions are the same image when their bytes
    agree in the HR output and in every stored size (a random degradation makes the copies differ).

    Returns:
        the HR images, the ``(P, 2)`` pairs over them, and the stored VLR images, each in the same order.
    """
    unique_position: dict[tuple[bytes, ...], int] = {}
    first_positions: list[int] = []
    remap = np.empty(len(hr), dtype=np.int64)
    for index in range(len(hr)):
        key = (hr.encoded[index], *(source.encoded[index] for source in stored.values()))
        if key not in unique_position:
            unique_position[key] = len(first_positions)
            first_positions.append(index)
        remap[index] = unique_position[key]
    indices = np.asarray(first_positions, dtype=np.int64)
    return (IndexedSource(hr, indices), remap[hr.pairs],
            {size: IndexedSource(source, indices) for size, source in stored.items()})


def _load_prepared_identification(config: EvaluationSet, manifest: PreparedManifest) -> FaceSet:
    lists = {role: manifest.verified_output(role) for role in ("gallery", "probe", "distractor")
             if role in manifest.values["outputs"]}
    distractors = lists.get("distractor")
    hr = IdentificationSource(lists["gallery"], lists["probe"], manifest.verified_output(HR_KEY), distractors)
    stored = {size: IdentificationSource(lists["gallery"], lists["probe"], manifest.verified_output(size_key(size)),
                                         distractors)
              for size in manifest.sizes}
    description = {"prepared": str(manifest.folder), "prepared_manifest_sha256": _manifest_digest(manifest),
                   "source": manifest.values["source"], "counts": manifest.values["counts"],
                   "prepared_degradation": manifest.values["degradation"], **hr.manifest()}
    return FaceSet(config, hr, description, identification=_roles(hr, config.cross_resolution), prepared=manifest,
                   stored=stored)


def _load_identification(config: EvaluationSet, lists_dir: Path) -> FaceSet:
    config.require("root")
    if config.gallery_list is None and config.probe_list is None:
        gallery, probes = split_gallery_probe(config.root, config.gallery_per_identity, config.split_seed)
        written = write_identification_lists(lists_dir / f"{config.name}_lists", gallery, probes)
        gallery_list, probe_list = written["gallery"], written["probe"]
        split = {"split": f"{config.gallery_per_identity} gallery image(s) per identity folder, seed "
                          f"{config.split_seed}", "lists": str(lists_dir / f"{config.name}_lists")}
    else:
        config.require("gallery_list", "probe_list")
        gallery_list, probe_list, split = config.gallery_list, config.probe_list, {}
    source = IdentificationSource(gallery_list, probe_list, config.root, config.distractor_list)
    return FaceSet(config, source, {**source.manifest(), **split},
                   identification=_roles(source, config.cross_resolution))


def _roles(source: IdentificationSource, cross_resolution: bool) -> IdentificationRoles:
    labels = source.labels.copy()
    distractors = source.indices("distractor")
    # Distractors are strangers to each other as well: one negative label each.
    labels[distractors] = -1 - np.arange(len(distractors))
    gallery = np.concatenate([source.indices("gallery"), distractors])
    return IdentificationRoles(labels, gallery, source.indices("probe"), cross_resolution)


def _manifest_digest(manifest: PreparedManifest) -> str:
    return hashlib.sha256(manifest.path.read_bytes()).hexdigest()
