"""The one degradation spec that turns an aligned HR face into a very-low-resolution (VLR) model input.

Training, the teachers and evaluation all build their VLR faces from the same :class:`Degradation`, and
every checkpoint and result file stores it, because the down-sampling kernel, blur, noise and JPEG
settings change low-resolution accuracy by several points and are part of the experiment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np

Kernel = Literal["nearest", "bilinear", "bicubic", "area", "lanczos"]

KERNELS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


def _as_range(value: float | tuple[float, float] | list[float], name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"degradation {name}={value!r} must be a number or a [low, high] range with low <= high")
    return float(value[0]), float(value[1])


@dataclass(frozen=True)
class Degradation:
    """HR → VLR → model-input degradation, deterministic for a given ``seed`` and image key.

    The HR face (``uint8 (H, W, 3)`` RGB) is optionally blurred, down-sampled to ``vlr_size`` with
    ``down_kernel``, given Gaussian noise and JPEG compression, then up-sampled to ``input_size`` with
    ``up_kernel`` (the size the student and the SR teacher read). Ranges are sampled per image from a
    generator seeded by ``seed`` and the image key, so an image is degraded the same way every epoch.

    Attributes:
        vlr_size: side of the very-low-resolution face in pixels (16, 12 or 8 in the usual protocols).
        input_size: side of the model input in pixels; the VLR face is up-sampled to it.
        down_kernel: interpolation from HR to ``vlr_size`` ("area" averages pixels, so it does not alias).
        up_kernel: interpolation from ``vlr_size`` to ``input_size``.
        blur_sigma: Gaussian blur sigma in HR pixels before down-sampling, a value or [low, high]; 0 disables.
        noise_std: Gaussian noise standard deviation as a fraction of 255 at VLR, a value or [low, high].
        jpeg_quality: JPEG quality [low, high] applied at VLR, or None for no compression.
        seed: seed of the per-image parameter sampling.
        colour_order: channel order of every image the pipeline reads; the project works in RGB.
    """

    vlr_size: int = 16
    input_size: int = 32
    down_kernel: Kernel = "area"
    up_kernel: Kernel = "bicubic"
    blur_sigma: float | tuple[float, float] = 0.0
    noise_std: float | tuple[float, float] = 0.0
    jpeg_quality: tuple[int, int] | None = None
    seed: int = 0
    colour_order: Literal["RGB"] = "RGB"

    def __post_init__(self) -> None:
        if self.vlr_size < 1 or self.input_size < 1:
            raise ValueError(
                f"degradation sizes must be positive, got vlr_size={self.vlr_size}, input_size={self.input_size}"
            )
        for name in ("down_kernel", "up_kernel"):
            kernel = getattr(self, name)
            if kernel not in KERNELS:
                raise ValueError(f"degradation {name}={kernel!r} is not one of {sorted(KERNELS)}")
        if self.colour_order != "RGB":
            raise ValueError(f"degradation colour_order={self.colour_order!r}: the project works in RGB only")
        # Normalise lists from YAML to tuples so specs compare and hash the same however they were written.
        object.__setattr__(self, "blur_sigma", _as_range(self.blur_sigma, "blur_sigma"))
        object.__setattr__(self, "noise_std", _as_range(self.noise_std, "noise_std"))
        if self.jpeg_quality is not None:
            low, high = (int(q) for q in _as_range(self.jpeg_quality, "jpeg_quality"))
            if not 1 <= low <= high <= 100:
                raise ValueError(f"degradation jpeg_quality={self.jpeg_quality!r} must lie in [1, 100]")
            object.__setattr__(self, "jpeg_quality", (low, high))

    # ----------------------------------------------------------------------------------------- pipelines

    @cached_property
    def _down_pipeline(self) -> A.Compose:
        steps: list[A.BasicTransform] = []
        if self.blur_sigma[1] > 0:
            steps.append(A.GaussianBlur(blur_limit=0, sigma_limit=self.blur_sigma, p=1.0))
        steps.append(A.Resize(self.vlr_size, self.vlr_size, interpolation=KERNELS[self.down_kernel]))
        if self.noise_std[1] > 0:
            steps.append(A.GaussNoise(std_range=self.noise_std, per_channel=True, p=1.0))
        if self.jpeg_quality is not None:
            steps.append(A.ImageCompression(compression_type="jpeg", quality_range=self.jpeg_quality, p=1.0))
        return A.Compose(steps, seed=self.seed)

    @cached_property
    def _up_pipeline(self) -> A.Compose:
        return A.Compose([A.Resize(self.input_size, self.input_size, interpolation=KERNELS[self.up_kernel])])

    def degrade(self, hr: np.ndarray, key: int = 0) -> np.ndarray:
        """Degrade an HR face to ``uint8 (vlr_size, vlr_size, 3)``; ``key`` (the image index) fixes the random draws."""
        if hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[2] != 3:
            raise ValueError(f"Degradation expects a uint8 (H, W, 3) RGB array, got {hr.dtype} {hr.shape}")
        pipeline = self._down_pipeline
        # One seed per (spec seed, image key): the same image is degraded identically in every worker and epoch.
        pipeline.set_random_seed(int(np.random.SeedSequence([self.seed, int(key)]).generate_state(1)[0]))
        return pipeline(image=hr)["image"]

    def upsample(self, vlr: np.ndarray) -> np.ndarray:
        """Up-sample a VLR face to the model input size ``uint8 (input_size, input_size, 3)``."""
        return self._up_pipeline(image=vlr)["image"]

    def __call__(self, hr: np.ndarray, key: int = 0) -> np.ndarray:
        """Degrade an HR face and up-sample it to the model input: ``uint8 (input_size, input_size, 3)``."""
        return self.upsample(self.degrade(hr, key))

    # ---------------------------------------------------------------------------------- serialisation

    def with_size(self, vlr_size: int) -> Degradation:
        """Return the same spec at another VLR size (evaluation at 16, 12 and 8 pixels)."""
        return dataclasses.replace(self, vlr_size=vlr_size)

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as JSON-serialisable values (ranges as lists)."""
        values = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Degradation:
        """Build a spec from :meth:`to_dict` output; unknown keys raise with the list of valid ones."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown degradation keys {unknown}; valid keys are {sorted(names)}")
        return cls(**values)

    def fingerprint(self) -> str:
        """Return a short hash of the spec, used in cache keys and result files."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """Return a one-line human-readable summary, e.g. ``16px area↓ bicubic↑ (32px input), seed 0``."""
        parts = [f"{self.vlr_size}px {self.down_kernel} down", f"{self.up_kernel} up to {self.input_size}px"]
        if self.blur_sigma[1] > 0:
            parts.append(f"blur sigma {self.blur_sigma}")
        if self.noise_std[1] > 0:
            parts.append(f"noise std {self.noise_std}")
        if self.jpeg_quality is not None:
            parts.append(f"JPEG q{self.jpeg_quality}")
        return ", ".join(parts) + f", seed {self.seed}"


def coerce_degradation(value: Degradation | dict[str, Any] | None) -> Degradation:
    """Accept a spec, its dict form (from a checkpoint or YAML) or None (the default spec)."""
    if value is None:
        return Degradation()
    if isinstance(value, Degradation):
        return value
    return Degradation.from_dict(dict(value))
