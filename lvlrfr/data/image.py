"""Image loading and conversion between arrays and the project's tensor convention.

Arrays are ``uint8`` of shape ``(H, W, 3)`` in RGB order. Tensors are ``float32`` of shape
``(3, H, W)`` (or ``(B, 3, H, W)``) in RGB order with values in [-1, 1] (``pixel / 127.5 - 1``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class ImageReadError(OSError):
    """An image file that is missing, truncated or in a format PIL cannot decode."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}; replace or remove the file")


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode (L, LA, P, RGBA, I;16, ...) to a ``uint8 (H, W, 3)`` RGB array."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on black so transparent borders of aligned crops stay black.
        background = Image.new("RGB", image.size)
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        image = background
    elif image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        array = np.clip(array / max(array.max(), 1.0) * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as a ``uint8 (H, W, 3)`` RGB array.

    Raises:
        ImageReadError: when the file is missing or cannot be decoded; the message names the file.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb_array(image)
    except FileNotFoundError as error:
        raise ImageReadError(path, "file not found") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(path, f"{type(error).__name__}: {error}") from error


def decode_rgb(data: bytes, name: str) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, ...) to a ``uint8 (H, W, 3)`` RGB array.

    ``name`` identifies the image in error messages (a record key or a list position).
    """
    import io

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb_array(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(name, f"{type(error).__name__}: {error}") from error


def encode_rgb(image: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """Encode a ``uint8 (H, W, 3)`` RGB array as PNG (lossless) or JPEG (at ``quality``, 1-100).

    PIL writes no timestamp into either format, so the same array and options give the same bytes.
    """
    import io

    image_format = "JPEG" if image_format.lower() in ("jpg", "jpeg") else image_format.upper()
    buffer = io.BytesIO()
    options = {"quality": quality} if image_format == "JPEG" else {}
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """Convert a ``uint8 (H, W, 3)`` RGB array to a ``float32 (3, H, W)`` tensor in [-1, 1]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB array, got {image.dtype} {image.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return tensor / 127.5 - 1.0


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """Convert a ``(3, H, W)`` tensor in [-1, 1] back to a ``uint8 (H, W, 3)`` RGB array."""
    array = ((tensor.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return array.permute(1, 2, 0).to(torch.uint8).numpy()
