"""Face detection: the reference detector's faces on the Solvay photo, both backbones, NMS, batches."""

import pytest
import torch

import gpen
from gpen import CheckpointError
from gpen.detection import box_iou, nms
from gpen.retinaface import RetinaFace


def assert_matches_reference(faces, reference, box_scale=1.0):
    assert len(faces) == len(reference["boxes"])
    iou = box_iou(reference["boxes"] * box_scale, faces.boxes)
    best_iou, match = iou.max(1)
    assert best_iou.min() >= 0.9
    diagonal = (reference["boxes"][:, 2:] - reference["boxes"][:, :2]).norm(dim=1) * box_scale
    error = (faces.landmarks[match] - reference["landmarks"] * box_scale).norm(dim=-1).max(1).values
    assert (error / diagonal).max() <= 0.03


def test_finds_the_29_solvay_faces_like_the_reference(detector, solvay, reference_faces):
    (faces,) = detector.detect(solvay, threshold=0.5)
    assert_matches_reference(faces, reference_faces)
    assert faces.scores.tolist() == sorted(faces.scores.tolist(), reverse=True)
    assert faces.landmarks.shape == (29, 5, 2)
    left_eye, right_eye = faces.landmarks[:, 0], faces.landmarks[:, 1]
    assert (left_eye[:, 0] < right_eye[:, 0]).all()  # as seen in the image


def test_frames_are_detected_in_one_batch(detector, solvay, reference_faces):
    flipped = solvay.flip(2)
    plain, mirrored = detector.detect(torch.cat([solvay, flipped]))
    assert_matches_reference(plain, reference_faces)
    assert len(mirrored) == 29


def test_large_frames_are_detected_downscaled_and_mapped_back(detector, solvay):
    big = torch.nn.functional.interpolate(solvay.permute(0, 3, 1, 2), scale_factor=2, mode="bilinear")
    (faces,) = detector.detect(big.permute(0, 2, 3, 1))  # 2656 px wide: run at the detector's 1600
    working = torch.nn.functional.interpolate(big, size=(684, 1600), mode="bilinear", antialias=True)
    (at_working_scale,) = detector.detect(working.permute(0, 2, 3, 1))
    assert len(faces) == len(at_working_scale) == 29
    scale = torch.tensor([2656 / 1600, 1136 / 684] * 2)
    assert torch.allclose(faces.boxes, at_working_scale.boxes * scale, atol=0.5)


def test_backbone_comes_from_the_keys_not_the_file_name(tmp_path):
    net = RetinaFace("resnet50")
    path = tmp_path / "detection_mobilenet0.25_Final.pth"  # misleading name on purpose
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    detector = gpen.load_detector(path, device="cpu")
    assert detector.name == "RetinaFace resnet50"
    (faces,) = detector.detect(torch.rand(1, 64, 64, 3), threshold=0.99)
    assert faces.boxes.shape[1] == 4


def test_restoration_weights_are_not_a_detector(shared):
    with pytest.raises(CheckpointError, match="GPEN restoration weights"):
        gpen.load_detector(shared / "fixtures" / "gpen_random_64.pth")


def greedy_nms(boxes, scores, threshold):
    order, keep = scores.argsort(descending=True).tolist(), []
    while order:
        best, order = order[0], order[1:]
        keep.append(best)
        order = [i for i in order if box_iou(boxes[best][None], boxes[i][None]).item() <= threshold]
    return keep


def test_vectorised_nms_equals_greedy_nms():
    torch.manual_seed(0)
    corners = torch.rand(300, 2) * 100
    boxes = torch.cat([corners, corners + 5 + torch.rand(300, 2) * 30], 1)
    scores = torch.rand(300)
    assert nms(boxes, scores, 0.4).tolist() == greedy_nms(boxes, scores, 0.4)


@pytest.mark.parametrize("height, width", [(640, 640), (720, 1280)])
def test_scrfd_onnx_runs_through_insightface_in_image_pixels(tmp_path, height, width):
    pytest.importorskip("insightface")
    pytest.importorskip("onnx")
    from tests.helpers import export_fake_scrfd

    path = tmp_path / "det_10g.onnx"
    box, points = export_fake_scrfd(path)
    detector = gpen.load_detector(path, device="cpu")
    assert detector.kind == "scrfd"
    (faces,) = detector.detect(torch.rand(1, height, width, 3), threshold=0.5)
    scale = width / 640  # insightface fits the longer side into 640
    assert len(faces) == 1 and faces.scores[0] == pytest.approx(0.95, abs=1e-4)
    assert torch.allclose(faces.boxes[0], box * scale, atol=1e-2)
    assert torch.allclose(faces.landmarks[0], points * scale, atol=1e-2)
