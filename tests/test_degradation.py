"""Degradation spec: sizes, value range, determinism per seed, serialisation."""

from __future__ import annotations

import numpy as np
import pytest

from lvlrfr.data.degradation import KERNELS, Degradation, coerce_degradation
from lvlrfr.data.image import load_rgb


@pytest.fixture(scope="module")
def face(lfw_root) -> np.ndarray:
    return load_rgb(lfw_root / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg")


@pytest.mark.parametrize("vlr_size", [16, 12, 8])
def test_degrade_output_size(face, vlr_size):
    spec = Degradation(vlr_size=vlr_size, input_size=32)
    vlr = spec.degrade(face, key=0)
    assert vlr.shape == (vlr_size, vlr_size, 3)
    assert vlr.dtype == np.uint8
    model_input = spec(face, key=0)
    assert model_input.shape == (32, 32, 3)
    assert model_input.dtype == np.uint8


def test_degrade_matches_area_average(face):
    # With the area kernel and no other step, each VLR pixel is the mean of a 7x7 HR block (112 / 16).
    vlr = Degradation(vlr_size=16, down_kernel="area").degrade(face, key=0).astype(np.float64)
    block_means = face.reshape(16, 7, 16, 7, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(vlr - block_means).max() <= 1.0


def test_degrade_range_with_noise_and_jpeg(face):
    spec = Degradation(noise_std=(0.02, 0.08), jpeg_quality=(30, 70), blur_sigma=(0.5, 1.5))
    vlr = spec.degrade(face, key=3)
    assert vlr.min() >= 0
    assert vlr.max() <= 255
    # Noise and JPEG must change the image compared with the clean spec.
    assert not np.array_equal(vlr, Degradation().degrade(face, key=3))


def test_degrade_deterministic_per_seed(face):
    spec = Degradation(noise_std=(0.02, 0.08), jpeg_quality=(30, 70), seed=7)
    first = spec.degrade(face, key=11)
    second = spec.degrade(face, key=11)
    np.testing.assert_array_equal(first, second)
    # A rebuilt spec with the same values (as in another worker) gives the same pixels.
    np.testing.assert_array_equal(first, Degradation.from_dict(spec.to_dict()).degrade(face, key=11))


def test_degrade_differs_across_seeds_and_keys(face):
    noisy = dict(noise_std=(0.05, 0.05), jpeg_quality=(50, 50))
    base = Degradation(seed=0, **noisy).degrade(face, key=1)
    assert not np.array_equal(base, Degradation(seed=1, **noisy).degrade(face, key=1))
    assert not np.array_equal(base, Degradation(seed=0, **noisy).degrade(face, key=2))


def test_kernels_change_output(face):
    outputs = {kernel: Degradation(down_kernel=kernel).degrade(face) for kernel in KERNELS}
    assert not np.array_equal(outputs["nearest"], outputs["area"])
    assert not np.array_equal(outputs["bicubic"], outputs["area"])


def test_spec_round_trip_and_fingerprint():
    spec = Degradation(vlr_size=12, noise_std=[0.01, 0.02], jpeg_quality=[40, 60], seed=5)
    values = spec.to_dict()
    assert values["noise_std"] == [0.01, 0.02]
    assert Degradation.from_dict(values) == spec
    assert coerce_degradation(values) == spec
    assert spec.fingerprint() == Degradation.from_dict(values).fingerprint()
    assert spec.fingerprint() != spec.with_size(8).fingerprint()
    assert spec.with_size(8).vlr_size == 8


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"down_kernel": "box"}, "down_kernel='box'"),
        ({"vlr_size": 0}, "vlr_size=0"),
        ({"jpeg_quality": (0, 50)}, "jpeg_quality"),
        ({"noise_std": (0.2, 0.1)}, "noise_std"),
        ({"colour_order": "BGR"}, "colour_order='BGR'"),
    ],
)
def test_invalid_spec_names_field(values, fragment):
    with pytest.raises(ValueError, match=fragment):
        Degradation(**values)


def test_unknown_key_rejected():
    with pytest.raises(ValueError, match="unknown degradation keys \\['size'\\]"):
        Degradation.from_dict({"size": 16})
