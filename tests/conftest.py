"""Shared fixtures: the read-only data in ../shared, and small random-weight GPEN checkpoints."""

from pathlib import Path

import pytest
import torch

from tests.helpers import random_gpen

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"the shared test data folder {SHARED} is not here")
    return SHARED


@pytest.fixture(scope="session")
def reference_io(shared) -> dict:
    """Inputs and outputs of the reference FullGenerator for fixtures/gpen_random_64.pth."""
    return torch.load(shared / "fixtures" / "gpen_random_64_io.pt", weights_only=True)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """A random-weight GPEN-32 saved like the released files: a plain state dict in a .pth."""
    path = tmp_path_factory.mktemp("weights") / "GPEN-random-32.pth"
    torch.save(random_gpen().state_dict(), path)
    return path
