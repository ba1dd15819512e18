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


@pytest.fixture(scope="session")
def solvay(shared) -> torch.Tensor:
    """The 29-face Solvay photo as a ComfyUI IMAGE batch of one (1,H,W,3 float 0..1)."""
    import cv2

    bgr = cv2.imread(str(shared / "images" / "solvay_1927.png"), cv2.IMREAD_COLOR)
    return torch.from_numpy(bgr[..., ::-1].copy()).float()[None] / 255


@pytest.fixture(scope="session")
def detector(shared):
    import gpen

    return gpen.load_detector(shared / "models" / "retinaface_mobilenet0.25.pth", device="cpu")


@pytest.fixture(scope="session")
def reference_faces(shared) -> dict:
    import json

    faces = json.loads((shared / "fixtures" / "retinaface_solvay_1927.json").read_text())["faces"]
    return {"boxes": torch.tensor([f["box"] for f in faces]), "scores": torch.tensor([f["score"] for f in faces]),
            "landmarks": torch.tensor([f["landmarks"] for f in faces])}
