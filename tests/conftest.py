"""Shared fixtures: paths to the real face data and pretrained recognizers beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]

# One thread per test process keeps timings stable on small CI machines.
torch.set_num_threads(1)


def _shared_folder(env_name: str, default: Path) -> Path:
    path = Path(os.environ.get(env_name, default))
    if not path.is_dir():
        pytest.fail(
            f"{path} is not a folder; place the shared data beside the repository (../shared) "
            f"or set {env_name} to its location"
        )
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder with the real face data sets (aligned LFW, AT&T faces, insightface fixtures)."""
    return _shared_folder("LVLRFR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_models() -> Path:
    """Folder with the pretrained face recognizers used as HR teachers."""
    return _shared_folder("LVLRFR_SHARED_MODELS", REPO_ROOT.parent / "shared" / "models")


@pytest.fixture(scope="session")
def lfw_root(shared_data: Path) -> Path:
    """Aligned 112x112 LFW in identity folders, with the official ``pairs.txt``."""
    return shared_data / "lfw-112x112"
