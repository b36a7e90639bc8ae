"""Find insightface model-zoo recognizers on disk and download them with insightface's own code.

insightface keeps model packs under ``<root>/models/<pack>/`` (``root`` defaults to
``~/.insightface``), e.g. ``~/.insightface/models/buffalo_l/w600k_r50.onnx``, and downloads a pack
as ``<root>/models/<pack>.zip`` with ``insightface.utils.storage.ensure_available``. That download
has no timeout, so it runs here in a background thread that is abandoned when the zip file does
not grow for ``download_timeout_s`` seconds. Without network access the call therefore fails
within seconds with a message naming the file to place by hand.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_INSIGHTFACE_ROOT = "~/.insightface"

RECOGNIZER_BY_PACK: dict[str, str] = {
    "buffalo_l": "w600k_r50.onnx",
    "buffalo_m": "w600k_r50.onnx",
    "buffalo_s": "w600k_mbf.onnx",
    "buffalo_sc": "w600k_mbf.onnx",
    "antelopev2": "glintr100.onnx",
}
"""Recognition model in each insightface model pack."""


class ZooModelNotFoundError(FileNotFoundError):
    """An insightface model-zoo recognizer is neither on disk nor downloadable."""


def is_zoo_name(source: str | os.PathLike) -> bool:
    """Return whether ``source`` names an insightface model (not an existing file).

    Accepted forms: a pack (``"buffalo_l"``), a pack and file (``"buffalo_l/w600k_r50.onnx"``) or a
    recognition model of a known pack with or without ``.onnx`` (``"w600k_r50"``).
    """
    text = str(source)
    if Path(text).expanduser().exists():
        return False
    parts = text.split("/")
    if len(parts) == 2:
        return parts[0] in RECOGNIZER_BY_PACK
    if len(parts) != 1:
        return False
    file_name = text if text.endswith(".onnx") else f"{text}.onnx"
    return text in RECOGNIZER_BY_PACK or file_name in RECOGNIZER_BY_PACK.values()


def _split_zoo_name(name: str) -> tuple[str | None, str]:
    """Return ``(pack or None, onnx file name)`` for a name accepted by ``is_zoo_name``."""
    if "/" in name:
        pack, file_name = name.split("/", 1)
    elif name in RECOGNIZER_BY_PACK:
        pack, file_name = name, RECOGNIZER_BY_PACK[name]
    else:
        pack, file_name = None, name
    if not file_name.endswith(".onnx"):
        file_name = f"{file_name}.onnx"
    return pack, file_name


def find_zoo_model(name: str, root: str | os.PathLike = DEFAULT_INSIGHTFACE_ROOT) -> Path | None:
    """Return the path of a zoo model under ``<root>/models``, or None when it is not there.

    A name without a pack is searched in every pack folder and directly under ``models/``, where
    ``insightface.model_zoo.get_model`` puts single downloaded files.
    """
    models = Path(root).expanduser() / "models"
    pack, file_name = _split_zoo_name(name)
    folders = [models / pack] if pack else [models, *sorted(p for p in models.glob("*") if p.is_dir())]
    for folder in folders:
        if (folder / file_name).is_file():
            return folder / file_name
        # Some pack archives (antelopev2) unpack into a nested folder of the same name.
        if pack:
            nested = sorted(folder.rglob(file_name))
            if nested:
                return nested[0]
    return None


def resolve_zoo_model(
    name: str,
    root: str | os.PathLike = DEFAULT_INSIGHTFACE_ROOT,
    download: bool = True,
    download_timeout_s: float = 5.0,
) -> Path:
    """Return the local path of an insightface zoo recognizer, downloading its pack when missing.

    Args:
        name: ``"buffalo_l"``, ``"buffalo_l/w600k_r50.onnx"`` or ``"w600k_r50"``.
        root: insightface's root folder; packs live in ``<root>/models/<pack>/``.
        download: try insightface's downloader when the file is missing.
        download_timeout_s: seconds without download progress (no new bytes in the zip file)
            after which the download is abandoned.

    Raises:
        ZooModelNotFoundError: the file is missing and could not be downloaded; the message names
            the path at which to place it.
    """
    found = find_zoo_model(name, root)
    if found is not None:
        return found

    pack, file_name = _split_zoo_name(name)
    models = Path(root).expanduser() / "models"
    if pack is None:
        packs = [p for p, f in RECOGNIZER_BY_PACK.items() if f == file_name]
        if not packs:
            raise ZooModelNotFoundError(
                f"{file_name} is not under {models} and belongs to no known insightface pack "
                f"({', '.join(RECOGNIZER_BY_PACK)}); place it in {models} or pass its path as the teacher source"
            )
        pack = packs[0]
    target = models / pack / file_name
    placement = (
        f"Place {file_name} (from insightface's {pack}.zip) at {target}, "
        "or pass the path of an ONNX recognizer as the teacher source."
    )
    if not download:
        raise ZooModelNotFoundError(f"insightface model {name!r} is not at {target} and download is off. {placement}")

    logger.info("Downloading insightface pack %s to %s", pack, models)
    try:
        _download_pack(pack, models.parent, download_timeout_s)
    except Exception as error:  # insightface raises requests, OS, zip and runtime errors alike
        raise ZooModelNotFoundError(
            f"insightface model {name!r} is not at {target}, and downloading {pack}.zip failed "
            f"({type(error).__name__}: {error}). {placement}"
        ) from error

    found = find_zoo_model(f"{pack}/{file_name}", root)
    if found is None:
        raise ZooModelNotFoundError(f"{pack}.zip was downloaded to {models} but has no {file_name}. {placement}")
    return found


def _download_pack(pack: str, root: Path, timeout_s: float) -> None:
    """Run insightface's pack download in a daemon thread and raise TimeoutError when it stalls."""
    from insightface.utils import storage

    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            storage.ensure_available("models", pack, root=str(root))
        except BaseException as error:  # handed to the calling thread, which re-raises it
            outcome["error"] = error

    zip_path = root / "models" / f"{pack}.zip"
    thread = threading.Thread(target=run, name=f"insightface-download-{pack}", daemon=True)
    thread.start()
    last_size = -1
    last_progress = time.monotonic()
    while thread.is_alive():
        thread.join(0.1)
        size = zip_path.stat().st_size if zip_path.exists() else -1
        if size != last_size:
            last_size, last_progress = size, time.monotonic()
        elif time.monotonic() - last_progress > timeout_s:
            # The thread cannot be stopped; as a daemon it ends with the process.
            raise TimeoutError(f"no data received for {timeout_s:g} s (is this machine offline?)")
    if "error" in outcome:
        raise outcome["error"]
