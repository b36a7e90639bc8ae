"""On-disk cache of frozen-teacher outputs, computed once per training image and horizontal flip.

The training batches of ``LowResFaceDataModule`` are a deterministic function of ``(index, flipped)``:
the HR face is the source image, mirrored when ``flipped``, and the VLR face is degraded with the key
``2 * index + flipped``. The frozen teachers are deterministic too (the diffusion teacher draws its tap
noise from the same key), so their outputs can be computed once and read back in every epoch.

A cache entry also stores what the student reads of each item: the VLR face before up-sampling
(``uint8``) and the label. While a stage trains from the cache, the data module serves
:class:`CachedTrainingFaces`, which reads those and the teacher outputs instead of decoding, resizing and
degrading the HR images. It draws the flips exactly as ``TrainingFaces`` does, so a run trains on the
same batches with and without the cache.

A cache entry is the folder ``<root>/<kind>-<hash of the key>/`` with one ``.npy`` file per output,
memory-mapped for reading, each of shape ``(N, 2, ...)`` (row, flip), the student inputs
``input_vlr.npy`` and ``input_label.npy`` of the same layout, and ``indices.npy`` with the ``N``
training-source indices of the rows, sorted. The key lists everything that changes the outputs
(teacher spec and weights hash, degradation, data manifest, HR size), so a changed setting maps to
another folder and a stale entry is never read. ``meta.json`` repeats the key and is checked on open.

Building is atomic and resumable: the arrays are filled in ``.<entry>.building/``, a ``filled.npy``
mask records which ``(row, flip)`` items are written (after their data is flushed), ``meta.json`` is
written last and the folder is then renamed to its final name. A build that was killed resumes from
the mask. Under DDP, rank 0 creates the arrays, every rank fills the rows ``rank::world_size`` of the
same memory maps, and rank 0 checks the mask and renames the folder, with a barrier between steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lvlrfr.data.datamodule import TrainingFaces, draw_flip
from lvlrfr.data.degradation import Degradation
from lvlrfr.data.image import to_tensor
from lvlrfr.utils.errors import ConfigurationError
from lvlrfr.utils.run_info import write_json_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
META_FILE = "meta.json"
BUILD_KEY_FILE = "build.json"
INDICES_FILE = "indices.npy"
FILLED_FILE = "filled.npy"
INPUT_PREFIX = "input_"
OUTPUTS_KEY = "teacher"
"""Batch key of the teacher outputs that :class:`CachedTrainingFaces` adds to each training item."""

Compute = Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]
"""Function from a batch ``{hr, vlr, label, index, flipped}`` to ``{array name: (B, *shape)}``."""


@dataclass(frozen=True)
class ArraySpec:
    """One cached output: its shape per ``(image, flip)`` item and its storage dtype (``float32``, ``float16``)."""

    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


def key_digest(key: Mapping[str, Any]) -> str:
    """Return the sha256 of ``key`` as canonical JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def entry_folder(root: str | os.PathLike, kind: str, key: Mapping[str, Any]) -> Path:
    """Return ``<root>/<kind>-<first 16 hex digits of the key's sha256>``."""
    return Path(root) / f"{kind}-{key_digest(key)[:16]}"


def building_folder(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.building")


# ------------------------------------------------------------------------------------------ items


class FlipPairFaces(Dataset):
    """The training faces of the cache rows, each once unflipped and once mirrored.

    Item ``k`` is ``(row, flipped) = pairs[k]``: the training item of ``(indices[row], flipped)`` as
    ``TrainingFaces.item`` builds it (``hr``, ``vlr``, ``label``, ``index``, ``flipped``), plus ``row`` and
    ``vlr_pixels``, the ``uint8 (vlr_size, vlr_size, 3)`` VLR face before up-sampling that the cache stores.
    """

    def __init__(self, faces: TrainingFaces, indices: np.ndarray, pairs: list[tuple[int, int]] | None = None) -> None:
        self.faces = faces
        self.indices = np.asarray(indices, dtype=np.int64)
        self.pairs = pairs if pairs is not None else [(row, flip) for row in range(len(self.indices)) for flip in (0, 1)]

    @classmethod
    def from_datamodule(cls, datamodule: Any) -> FlipPairFaces:
        """Build the faces from the training images and the used indices of a ``LowResFaceDataModule``."""
        return cls(datamodule.training_faces(), datamodule.train_indices)

    @property
    def degradation(self) -> Degradation:
        return self.faces.degradation

    def with_pairs(self, pairs: list[tuple[int, int]]) -> FlipPairFaces:
        """Return the same faces restricted to ``pairs`` of ``(row, flipped)``."""
        return FlipPairFaces(self.faces, self.indices, pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        row, flipped = self.pairs[item]
        index = int(self.indices[row])
        hr, vlr, label = self.faces.faces(index, bool(flipped))
        return {
            "hr": to_tensor(hr),
            "vlr": to_tensor(self.degradation.upsample(vlr)),
            "vlr_pixels": torch.from_numpy(vlr),
            "label": torch.tensor(label, dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
            "flipped": torch.tensor(bool(flipped)),
            "row": torch.tensor(row, dtype=torch.long),
        }


def input_arrays(degradation: Degradation) -> dict[str, ArraySpec]:
    """Return the specs of the student inputs stored with every entry: the VLR face before up-sampling and the label."""
    size = degradation.vlr_size
    return {"vlr": ArraySpec((size, size, 3), "uint8"), "label": ArraySpec((), "int64")}


class CachedTrainingFaces(Dataset):
    """Training items read from a cache entry: ``{vlr, label, index, flipped, teacher: {name: output}}``.

    Item ``k`` is cache row ``k``. Its flip is drawn as ``TrainingFaces`` draws it, and its ``vlr`` is the
    stored VLR face up-sampled by ``degradation``, equal to the ``vlr`` of ``TrainingFaces``. There is no
    ``hr``: a stage that trains from the cache does not run its teacher. Teacher outputs keep their
    storage dtype (float16 taps) until the stage widens them on its device.

    The memory maps are opened in each data-loader worker on first use, so a worker started by pickling
    does not copy the arrays.
    """

    def __init__(self, folder: str | os.PathLike, degradation: Degradation, flip: bool) -> None:
        self.folder = Path(folder)
        self.degradation = degradation
        self.flip = flip
        meta = json.loads((self.folder / META_FILE).read_text())
        self.output_names = list(meta["arrays"])
        self.indices = np.load(self.folder / INDICES_FILE)
        self._arrays: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            names = [*self.output_names, *(INPUT_PREFIX + name for name in ("vlr", "label"))]
            self._arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in names}
        return self._arrays

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, row: int) -> dict[str, Any]:
        flipped = draw_flip(self.flip)
        arrays = self._open()
        vlr = np.asarray(arrays[INPUT_PREFIX + "vlr"][row, int(flipped)])
        return {
            "vlr": to_tensor(self.degradation.upsample(vlr)),
            "label": torch.tensor(int(arrays[INPUT_PREFIX + "label"][row, int(flipped)]), dtype=torch.long),
            "index": torch.tensor(int(self.indices[row]), dtype=torch.long),
            "flipped": torch.tensor(flipped),
            OUTPUTS_KEY: {name: torch.from_numpy(np.array(arrays[name][row, int(flipped)])) for name in self.output_names},
        }


# -------------------------------------------------------------------------------------- reading


class TeacherCache:
    """A complete cache entry, memory-mapped read-only.

    Attributes:
        folder: the entry folder.
        meta: the contents of ``meta.json`` (key, arrays, build time).
        indices: ``(N,)`` int64 sorted training-source indices of the rows.
        arrays: ``{name: memmap (N, 2, *shape)}`` of the teacher outputs.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META_FILE).read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"teacher cache {self.folder} has format version {self.meta.get('format_version')}, but this version of "
                f"lvlrfr reads version {FORMAT_VERSION}"
            )
        self.indices = np.load(self.folder / INDICES_FILE)
        self.arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in self.meta["arrays"]}
        for name, array in self.arrays.items():
            spec = self.meta["arrays"][name]
            expected = (len(self.indices), 2, *spec["shape"])
            if array.shape != expected or str(array.dtype) != spec["dtype"]:
                raise ValueError(
                    f"teacher cache {self.folder}: {name}.npy has shape {array.shape} and dtype {array.dtype}, but "
                    f"meta.json records {expected} {spec['dtype']}; delete the folder to rebuild it"
                )

    @classmethod
    def open(cls, folder: str | os.PathLike, key: Mapping[str, Any]) -> TeacherCache | None:
        """Open the entry at ``folder`` when it is complete and built for ``key``; return None otherwise."""
        folder = Path(folder)
        if not (folder / META_FILE).is_file():
            return None
        try:
            cache = cls(folder)
        except (OSError, ValueError) as error:
            logger.warning("Teacher cache %s is unreadable (%s); it will be rebuilt", folder, error)
            return None
        if cache.meta.get("key") != json.loads(json.dumps(dict(key), default=str)):
            logger.warning("Teacher cache %s was built for another key; it will be rebuilt", folder)
            return None
        return cache

    def __len__(self) -> int:
        return len(self.indices)

    def training_faces(self, degradation: Degradation, flip: bool) -> CachedTrainingFaces:
        """Return the dataset that serves the training items from this entry (see :class:`CachedTrainingFaces`)."""
        return CachedTrainingFaces(self.folder, degradation, flip)

    def rows(self, index: torch.Tensor) -> np.ndarray:
        """Map ``(B,)`` training-source indices to cache rows; raise KeyError for an index not in the cache."""
        requested = index.detach().cpu().numpy().astype(np.int64)
        rows = np.searchsorted(self.indices, requested)
        found = (rows < len(self.indices)) & (self.indices[np.minimum(rows, len(self.indices) - 1)] == requested)
        if not found.all():
            missing = requested[~found][:5].tolist()
            raise KeyError(
                f"training images {missing} are not in the teacher cache {self.folder}, which contains the "
                f"{len(self.indices)} images the data module used when it was built; delete the folder to rebuild it"
            )
        return rows

    def read(self, batch: Mapping[str, Any], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Return ``{name: (B, *shape) float32}`` teacher outputs for a training batch.

        A batch served by :class:`CachedTrainingFaces` carries them already. Any other batch is looked up
        by its ``index`` and ``flipped`` (unflipped when it has no ``flipped``). The tensors are on
        ``device``, by default the device of ``batch["index"]``.
        """
        index = batch["index"]
        device = index.device if device is None else device
        if OUTPUTS_KEY in batch:
            return {name: value.to(device).float() for name, value in batch[OUTPUTS_KEY].items()}
        flipped = batch.get("flipped")
        flips = np.zeros(len(index), dtype=np.int64) if flipped is None else flipped.detach().cpu().numpy().astype(np.int64)
        rows = self.rows(index)
        return {
            # Widening float16 in torch after the copy is faster than numpy's conversion and halves the bytes
            # sent to a GPU.
            name: torch.from_numpy(np.asarray(array[rows, flips])).to(device).float()
            for name, array in self.arrays.items()
        }


# ------------------------------------------------------------------------------------- building


def check_cache_root(root: str | os.PathLike, writable: bool = False) -> Path:
    """Check that ``root`` can hold cache entries: a folder or a path that does not exist yet.

    With ``writable``, also create it and check that new entries can be written there. Raises
    ``ConfigurationError`` naming ``model.init_args.teacher_cache`` and the fix.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigurationError(
            f"model.init_args.teacher_cache {root} is a file; set it to a folder (it is created when missing)"
        )
    if writable:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigurationError(
                f"model.init_args.teacher_cache {root} cannot be created ({error.strerror}); set it to a writable folder"
            ) from error
        if not os.access(root, os.W_OK | os.X_OK):
            raise ConfigurationError(
                f"model.init_args.teacher_cache {root} is not writable, so the teacher cache cannot be built there; "
                "set it to a writable folder, or copy a complete cache entry into it"
            )
    return root


def prepare_build(
    folder: Path, key: Mapping[str, Any], arrays: Mapping[str, ArraySpec], indices: np.ndarray, inputs: Mapping[str, ArraySpec]
) -> Path:
    """Create (or keep, to resume) the building folder of ``folder`` with empty arrays; run on rank 0 only.

    A building folder left by an earlier run is kept when it was started for the same key, arrays and
    indices, so its filled items are not computed again. Any other building folder is deleted first.
    """
    building = building_folder(folder)
    plan = {
        "format_version": FORMAT_VERSION,
        "key": json.loads(json.dumps(dict(key), default=str)),
        "arrays": {name: spec.to_dict() for name, spec in arrays.items()},
        "inputs": {name: spec.to_dict() for name, spec in inputs.items()},
        "rows": int(len(indices)),
    }
    plan_file = building / BUILD_KEY_FILE
    if plan_file.is_file() and json.loads(plan_file.read_text()) == plan:
        if np.array_equal(np.load(building / INDICES_FILE), indices):
            done = int(np.load(building / FILLED_FILE, mmap_mode="r").sum())
            logger.info("Resuming the teacher cache build in %s: %d of %d items done", building, done, 2 * len(indices))
            return building
    if building.exists():
        logger.info("Deleting the unfinished teacher cache build %s, which was started for other settings", building)
        shutil.rmtree(building)
    building.mkdir(parents=True)
    np.save(building / INDICES_FILE, np.asarray(indices, dtype=np.int64))
    files = {**arrays, **{INPUT_PREFIX + name: spec for name, spec in inputs.items()}}
    for name, spec in files.items():
        np.lib.format.open_memmap(building / f"{name}.npy", mode="w+", dtype=spec.dtype, shape=(len(indices), 2, *spec.shape)).flush()
    np.lib.format.open_memmap(building / FILLED_FILE, mode="w+", dtype=np.uint8, shape=(len(indices), 2)).flush()
    # The plan is written last, so a folder without it is never resumed.
    write_json_atomic(plan, plan_file)
    return building


def shard_pairs(filled: np.ndarray, rank: int, world_size: int) -> list[tuple[int, int]]:
    """Return the unfilled ``(row, flipped)`` items of the rows ``rank::world_size``."""
    rows = np.arange(rank, len(filled), world_size)
    return [(int(row), flip) for row in rows for flip in (0, 1) if not filled[row, flip]]


def fill_shard(
    folder: Path,
    faces: FlipPairFaces,
    compute: Compute,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> int:
    """Compute and write the unfilled items of this rank's rows into the building folder of ``folder``.

    ``faces`` must list the rows of the build (its ``pairs`` are replaced). Each batch is moved to
    ``device`` and passed to ``compute``; its ``vlr_pixels`` and ``label`` are stored as the student inputs.
    Returns the number of items written.
    """
    building = building_folder(folder)
    plan = json.loads((building / BUILD_KEY_FILE).read_text())
    arrays = {name: np.load(building / f"{name}.npy", mmap_mode="r+") for name in plan["arrays"]}
    inputs = {name: np.load(building / f"{INPUT_PREFIX}{name}.npy", mmap_mode="r+") for name in plan["inputs"]}
    filled = np.load(building / FILLED_FILE, mmap_mode="r+")
    pairs = shard_pairs(filled, rank, world_size)
    if not pairs:
        return 0

    loader = DataLoader(faces.with_pairs(pairs), batch_size=batch_size, num_workers=num_workers, shuffle=False)
    progress = tqdm(loader, desc=f"Teacher cache {folder.name}", unit="batch", disable=rank != 0, leave=False)
    for batch in progress:
        rows, flips = batch["row"].numpy(), batch["flipped"].numpy().astype(np.int64)
        on_device = {name: value.to(device) for name, value in batch.items()}
        with torch.no_grad():
            outputs = compute(on_device)
        for name, array in arrays.items():
            with np.errstate(over="ignore"):
                values = outputs[name].detach().float().cpu().numpy().astype(array.dtype)
            if not np.isfinite(values).all():
                raise ValueError(
                    f"teacher output {name!r} has values outside the range of {array.dtype} for training images "
                    f"{batch['index'].tolist()[:5]}; store it as float32"
                )
            array[rows, flips] = values
            array.flush()
        for name, array in inputs.items():
            array[rows, flips] = batch["vlr_pixels" if name == "vlr" else name].numpy()
            array.flush()
        # The mask is set only after the data is on disk, so a killed build never skips an unwritten item.
        filled[rows, flips] = 1
        filled.flush()
    return len(pairs)


def finish_build(folder: Path, build_seconds: float, world_size: int = 1) -> Path:
    """Check that every item is filled, write ``meta.json`` and rename the building folder; run on rank 0 only."""
    building = building_folder(folder)
    plan = json.loads((building / BUILD_KEY_FILE).read_text())
    filled = np.load(building / FILLED_FILE)
    if not filled.all():
        missing = np.argwhere(filled == 0)
        raise RuntimeError(
            f"teacher cache build {building} has {len(missing)} unfilled (row, flip) items, first "
            f"{missing[:3].tolist()}; a rank stopped early. Run the training again to resume the build"
        )
    names = [*plan["arrays"], *(INPUT_PREFIX + name for name in plan["inputs"])]
    sizes = {name: (building / f"{name}.npy").stat().st_size for name in names}
    meta = {
        **plan,
        "key_sha256": key_digest(plan["key"]),
        "bytes": int(sum(sizes.values())),
        "build_seconds": round(build_seconds, 3),
        "world_size": world_size,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(meta, building / META_FILE)
    if folder.exists():
        # Another run finished the same entry first, or the entry is stale: keep the fresh build.
        shutil.rmtree(folder)
    os.replace(building, folder)
    return folder


def open_or_build(
    root: str | os.PathLike,
    kind: str,
    key: Mapping[str, Any],
    arrays: Mapping[str, ArraySpec],
    faces: FlipPairFaces,
    compute: Compute,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
) -> TeacherCache:
    """Open the cache entry of ``key`` under ``root``, building it first when it is missing, stale or unfinished.

    Every rank calls this with the same arguments and its own ``rank``; ``barrier`` synchronises them
    (None for one process). The folder must be visible to every rank (one machine, or a shared file system).
    The global torch random state is restored afterwards, so the training run draws the same
    shuffles and flips with and without a cache.
    """
    barrier = barrier or (lambda: None)
    folder = entry_folder(root, kind, key)
    cache = TeacherCache.open(folder, key)
    # Every rank must see the same state before rank 0 changes anything.
    barrier()
    if cache is not None:
        logger.info("Opened teacher cache %s (%d images x 2 flips)", folder, len(cache))
        return cache

    start = time.monotonic()
    specs = [*arrays.values(), *input_arrays(faces.degradation).values()]
    total = sum(int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize for spec in specs) * 2 * len(faces.indices)
    # Every rank checks, so that all of them stop on a folder they cannot write instead of waiting for rank 0.
    check_cache_root(root, writable=True)
    if rank == 0:
        logger.info(
            "Building teacher cache %s: %d images x 2 flips, %.1f MiB, on %d process%s",
            folder, len(faces.indices), total / 2**20, world_size, "" if world_size == 1 else "es",
        )
        prepare_build(folder, key, arrays, faces.indices, input_arrays(faces.degradation))
    barrier()
    try:
        with torch.random.fork_rng(devices=[]):
            written = fill_shard(folder, faces, compute, rank, world_size, batch_size, num_workers, device)
    except KeyboardInterrupt:
        logger.warning(
            "Teacher cache build interrupted. The items written so far are kept in %s, and the next run resumes "
            "from them", building_folder(folder),
        )
        raise
    logger.debug("Rank %d wrote %d teacher cache items", rank, written)
    barrier()
    if rank == 0:
        finish_build(folder, time.monotonic() - start, world_size)
        logger.info("Built teacher cache %s in %.1f s", folder, time.monotonic() - start)
    barrier()
    cache = TeacherCache.open(folder, key)
    if cache is None:
        raise RuntimeError(f"teacher cache {folder} is missing after its build; check that every rank can read this folder")
    return cache
