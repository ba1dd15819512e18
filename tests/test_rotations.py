"""Faces at any angle: `rotations` makes the detector also look at each frame turned in 45-degree steps,
and maps what it finds there back into the frame, one box per face."""

import cv2
import pytest
import torch

import gpen
from gpen.faces.detect import TURNS, Faces, box_iou, turn_affine, turn_back, turn_frames
from tests.helpers import IdentityRestorer
from tests.test_detection import close_up
from tests.test_nodes import models_dir, pack  # noqa: F401 (fixtures: the pack, a models folder)


@pytest.fixture(scope="module")
def group(solvay) -> torch.Tensor:
    """Six people of the Solvay photo, none of them cut by the frame's edge."""
    return solvay[:, 40:280, 680:910].contiguous()


def load(shared, rotations):
    return gpen.load_detector(shared / "models" / "retinaface_mobilenet0.25.pth", device="cpu", rotations=rotations)


@pytest.fixture(scope="module")
def turning(shared):
    return load(shared, "all")


def rotated(image: torch.Tensor, angle: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The (1,H,W,3) image rotated counterclockwise by `angle` degrees (by OpenCV, on a canvas that holds
    all of it), and the (2,3) matrix taking its pixels there."""
    height, width = image.shape[1:3]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    size = round(width * cos + height * sin), round(width * sin + height * cos)
    matrix[:, 2] += ((size[0] - width) / 2, (size[1] - height) / 2)
    photo = cv2.warpAffine(image[0].numpy(), matrix, size, flags=cv2.INTER_LINEAR)
    return torch.from_numpy(photo)[None], torch.from_numpy(matrix)


def moved(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return (points.double() @ matrix[:, :2].T + matrix[:, 2]).float()


@pytest.mark.parametrize("angle", TURNS)
def test_a_spot_turned_lands_where_the_affine_says_and_its_landmarks_map_back(angle):
    ys, xs = torch.meshgrid(torch.arange(30.0), torch.arange(50.0), indexing="ij")
    frame = torch.exp(-((xs - 23) ** 2 + (ys - 13) ** 2) / 8)[None, ..., None].expand(1, 30, 50, 3).contiguous()
    affine, height, width = turn_affine(30, 50, angle)
    turned = turn_frames(frame, angle)[0, ..., 0]
    assert turned.shape == (height, width)
    ys, xs = torch.meshgrid(torch.arange(float(height)), torch.arange(float(width)), indexing="ij")
    centre = torch.stack([(turned * xs).sum(), (turned * ys).sum()]) / turned.sum()
    expected = moved(torch.tensor([23.0, 13.0]), affine)
    assert torch.allclose(centre, expected, atol=1e-4 if angle % 90 == 0 else 0.05)
    if angle % 90 == 0:  # exact: the pixels only move
        assert turned[round(float(expected[1])), round(float(expected[0]))] == 1
    found = Faces(torch.cat([expected - 5, expected + 5])[None], torch.ones(1), expected.expand(1, 5, 2))
    back = turn_back(found, affine)
    assert torch.allclose(back.landmarks, torch.tensor([23.0, 13.0]), atol=1e-4)
    assert torch.allclose(back.boxes, torch.tensor([[18.0, 8.0, 28.0, 18.0]]), atol=1e-4)


@pytest.mark.parametrize("angle", [90, 180, 270, 45])
def test_all_finds_the_six_people_of_a_rotated_group_once_with_landmarks_on_their_faces(
        detector, turning, group, angle):
    (upright,) = detector.detect(group)
    assert len(upright) == 6
    photo, matrix = rotated(group, angle)
    assert len(detector.detect(photo)[0]) < 6  # what rotations is for
    (faces,) = turning.detect(photo)
    assert len(faces) == 6
    assert box_iou(faces.boxes, faces.boxes).fill_diagonal_(0).max() <= 0.3
    expected = moved(upright.landmarks, matrix)
    error = (faces.landmarks[:, None] - expected[None]).norm(dim=-1).mean(-1)  # (found, upright)
    nearest = error.min(1)
    assert sorted(nearest.indices.tolist()) == list(range(6)) and nearest.values.max() <= 3


def test_none_is_the_upright_detector_as_before(shared, detector, group):
    plain = load(shared, "none")
    assert type(plain) is type(detector)
    (faces,), (before,) = plain.detect(group), detector.detect(group)
    assert torch.equal(faces.boxes, before.boxes) and torch.equal(faces.landmarks, before.landmarks)


def test_auto_turns_only_the_frames_whose_upright_pass_finds_too_little(shared, detector, group):
    auto = load(shared, "auto")
    passes = []
    upright_detect = auto.upright.detect
    auto.upright.detect = lambda images, *args, **kwargs: passes.append(len(images)) or \
        upright_detect(images, *args, **kwargs)
    upside_down = group.flip(1, 2)
    plain, turned = auto.detect(torch.cat([group, upside_down]))
    assert passes == [2] + [1] * len(TURNS)  # both frames upright, then only the upside-down one turned
    (before,) = detector.detect(group)  # (alone: a batch of two differs in float rounding only)
    assert torch.allclose(plain.landmarks, before.landmarks, atol=1e-3)
    assert len(turned) == 6 and len(detector.detect(upside_down)[0]) < 6


@pytest.mark.parametrize("angle", [90, 45])
def test_a_rotated_close_up_is_one_face(shared, turning, solvay, reference_faces, angle):
    areas = (reference_faces["boxes"][:, 2:] - reference_faces["boxes"][:, :2]).prod(1)
    portrait = close_up(solvay, reference_faces["boxes"][areas.argmax()], 512, 0.5)
    photo, _ = rotated(portrait, angle)
    assert len(turning.detect(photo)[0]) == 1
    assert len(load(shared, "auto").detect(photo)[0]) == 1


@pytest.mark.parametrize("angle", [90, 45])
def test_faces_of_a_rotated_photo_are_cut_upright_and_pasted_back_where_they_were(
        detector, turning, group, angle):
    photo, _ = rotated(group, angle)
    result = gpen.restore_faces(photo, IdentityRestorer(128), turning)
    assert result.face_count == 6
    away = result.masks[0] == 0
    assert away.float().mean() > 0.3 and torch.equal(result.images[0][away], photo[0][away])
    assert (result.images - photo).abs().mean() < 0.01
    # the crops GPEN is given are the upright photo's, face for face
    upright, _ = gpen.locate_faces(group, detector, 128)
    crops, _ = gpen.locate_faces(photo, turning, 128)
    difference = (crops[:, None] - upright[None]).abs().mean((2, 3, 4))  # (turned, upright)
    same = difference.argmin(1)
    assert sorted(same.tolist()) == list(range(6))
    if angle % 90 == 0:  # the turned pass saw the upright photo itself: the very same crops
        assert difference.min(1).values.max() < 1e-3
    for crop, face in zip(crops, upright[same]):  # upright: nearer the face as it is than the face turned
        turns = [(crop - face.rot90(k)).abs().mean() for k in range(4)]
        assert turns[0] < min(turns[1:]) / 1.5


def test_the_load_face_detector_node_takes_rotations(pack, models_dir):
    load_detector = pack.NODE_CLASS_MAPPINGS["GPENLoadFaceDetector"]().load
    (loaded,) = load_detector("detection_mobilenet0.25_Final.pth", "cpu", "auto", "all")
    assert loaded.model.rotations == "all"
    (upright,) = load_detector("detection_mobilenet0.25_Final.pth", "cpu", "auto")
    assert getattr(upright.model, "rotations", "none") == "none"


def test_the_cli_restores_a_sideways_photo_with_rotations(shared, group, small_checkpoint, tmp_path, monkeypatch,
                                                          capsys):
    from gpen.apps import cli, jobs
    from gpen.files.images import write_image

    photo, _ = rotated(group, 90)
    write_image(tmp_path / "sideways.png", photo[0].numpy())
    monkeypatch.setattr(jobs, "keep_freed_memory", lambda: None)
    assert cli.main(["restore", str(tmp_path / "sideways.png"), "-o", str(tmp_path / "out"), "--rotations", "all",
                     "--model", str(small_checkpoint),
                     "--detector", str(shared / "models" / "retinaface_mobilenet0.25.pth")]) == 0
    assert "restored 6 face(s)" in capsys.readouterr().out
    assert cli.main(["restore", str(tmp_path / "sideways.png"), "-o", str(tmp_path / "out"), "--rotations", "left",
                     "--model", str(small_checkpoint)]) == 1
    assert "rotations must be one of none, auto, all, got 'left'" in capsys.readouterr().err


def test_a_bad_rotations_value_is_refused_with_the_choices(shared):
    with pytest.raises(ValueError, match="rotations must be one of none, auto, all, got 'sideways'"):
        load(shared, "sideways")
