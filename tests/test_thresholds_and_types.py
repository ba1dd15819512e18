"""Defaults that restore real faces only, and images of any type.

Each detector declares the score a face must pass by default (ArchSpec.threshold, measured by
scripts/measure_thresholds.py: BENCHMARKS.md, "Detector thresholds"); SelectOptions' threshold 0 asks for
it. The API takes float and uint8 tensors and numpy arrays and gives back what it was given.
"""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import gpen
from gpen.archs.onnx import SCRFD
from gpen.archs.retinaface import SPEC as RETINAFACE
from gpen.faces.options import SelectOptions, declared, spec_of
from gpen.faces.pipeline import detect_faces
from tests.helpers import GreyRestorer
from tests.test_node_definitions import FROZEN, WIDGET_TYPES

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


@pytest.fixture(scope="module")
def cat() -> torch.Tensor:
    """scikit-image's photo of a cat, upscaled 2x (Lanczos), as a batch of one: RetinaFace finds a 'face'
    in it scoring 0.81, above the old default 0.5."""
    data = pytest.importorskip("skimage.data")
    image = cv2.resize(data.chelsea(), None, fx=2, fy=2, interpolation=cv2.INTER_LANCZOS4)
    return torch.from_numpy(image).float()[None] / 255


def test_every_detector_declares_the_threshold_its_faces_must_pass_by_default():
    assert RETINAFACE.threshold == 0.95 and SCRFD.threshold == 0.5
    help_text = next(spec_of(f).help for f in declared(SelectOptions) if f.name == "threshold")
    assert f"RetinaFace {RETINAFACE.threshold:g}" in help_text and f"SCRFD {SCRFD.threshold:g}" in help_text
    with pytest.raises(ValueError, match="a detector says the score"):
        gpen.ArchSpec("toy detector", "detector", lambda state: False, lambda state: {}, torch.nn.Identity)


def test_threshold_0_is_the_detectors_own_and_a_set_one_is_used_as_it_is(detector, cat):
    assert SelectOptions().threshold == 0 and detector.threshold == RETINAFACE.threshold
    (default,) = detect_faces(cat, detector)
    (asked,) = detect_faces(cat, detector, SelectOptions(threshold=0.5))
    assert len(default) == 0 and len(asked) == 1 and 0.5 < asked.scores[0] < RETINAFACE.threshold


def test_a_false_face_below_the_default_is_not_restored_while_every_real_face_is(detector, solvay, cat):
    photo = gpen.restore_faces(solvay, GreyRestorer(), detector)
    assert photo.face_count == 29 and photo.faces[0].scores.min() > RETINAFACE.threshold
    animal = gpen.restore_faces(cat, GreyRestorer(), detector)
    assert animal.face_count == 0 and torch.equal(animal.images, cat)
    assert gpen.restore_faces(cat, GreyRestorer(), detector, select=SelectOptions(threshold=0.5)).face_count == 1


def test_every_shipped_workflow_asks_for_the_detectors_own_threshold():
    asked = []
    for path in WORKFLOWS.glob("*.json"):
        for node in json.loads(path.read_text())["nodes"]:
            widgets = [e["name"] for e in FROZEN.get(node["type"], {}).get("required", []) if e["type"] in WIDGET_TYPES]
            if "threshold" in widgets:
                asked.append(node["widgets_values"][widgets.index("threshold")])
    assert len(asked) == 9 and set(asked) == {0}  # the FaceDetailer workflow's detector too


@pytest.fixture(scope="module")
def floats(solvay, detector) -> gpen.Restoration:
    return gpen.restore_faces(solvay, GreyRestorer(), detector)


def test_uint8_tensors_come_back_uint8_with_the_float_paths_pixels(solvay, detector, floats):
    given = (solvay * 255).round().to(torch.uint8)
    result = gpen.restore_faces(given, GreyRestorer(), detector)
    assert result.images.dtype == torch.uint8 and result.images.shape == given.shape
    assert torch.equal(result.images, (floats.images * 255).round().to(torch.uint8))
    assert result.face_count == floats.face_count == 29


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_numpy_images_come_back_as_numpy_of_their_shape_and_dtype(solvay, detector, floats, dtype):
    pixels = (solvay[0].numpy() * 255).round().astype(np.uint8) if dtype == np.uint8 else solvay[0].numpy()
    result = gpen.restore_faces(pixels, GreyRestorer(), detector)  # (H, W, 3): one image, no batch dimension
    assert isinstance(result.images, np.ndarray) and result.images.shape == pixels.shape
    assert result.images.dtype == dtype
    expected = floats.images[0].numpy()
    assert np.array_equal(result.images, (expected * 255).round().astype(np.uint8) if dtype == np.uint8 else expected)


def test_the_modular_stages_take_uint8_and_numpy_too(solvay, detector, floats):
    pixels = (solvay[0].numpy() * 255).round().astype(np.uint8)
    crops, info = gpen.locate_faces(pixels, detector, 512)
    assert len(info) == 29 and torch.equal(info.affines, floats.info.affines)
    restored = GreyRestorer().restore(crops)
    pasted = gpen.paste_restored(torch.from_numpy(pixels)[None], restored, info)
    assert pasted.images.dtype == torch.uint8 and not np.array_equal(pasted.images[0].numpy(), pixels)
    images, masks = gpen.paste_faces(pixels, restored, info.affines)
    assert isinstance(images, np.ndarray) and np.array_equal(images, pasted.images[0].numpy())


@pytest.mark.parametrize("images, why", [
    ([[0.5]], "list"), ("photo.png", "str"), (torch.zeros(1, 8, 8, 3, dtype=torch.int16), "torch.int16"),
    (np.zeros((1, 3, 64, 64), np.float32), r"shape \(1, 3, 64, 64\)"), (torch.zeros(64, 64), r"shape \(64, 64\)"),
])
def test_other_images_are_refused_with_what_images_must_be(detector, images, why):
    with pytest.raises(ValueError, match=rf"images must be a torch tensor or numpy array, float in 0..1 or uint8 .*{why}"):
        gpen.restore_faces(images, GreyRestorer(), detector)
