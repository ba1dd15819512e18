"""Face detection: the reference detector's faces on the Solvay photo, both backbones, NMS, batches."""

import cv2
import pytest
import torch

import gpen
from gpen import CheckpointError
from gpen.archs.retinaface import RetinaFace, fold_batch_norms
from gpen.faces.detect import box_iou, nms


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
    # Shrunk as the detector shrinks frames on the CPU: by pixel areas (OpenCV's INTER_AREA).
    working = cv2.resize(big[0].permute(1, 2, 0).numpy(), (1600, 684), interpolation=cv2.INTER_AREA)
    (at_working_scale,) = detector.detect(torch.from_numpy(working)[None])
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
    with pytest.raises(CheckpointError, match="holds GPEN weights, not a detector"):
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
    assert detector.info.arch == "SCRFD face-detector"
    (faces,) = detector.detect(torch.rand(1, height, width, 3), threshold=0.5)
    scale = width / 640  # insightface fits the longer side into 640
    assert len(faces) == 1 and faces.scores[0] == pytest.approx(0.95, abs=1e-4)
    assert torch.allclose(faces.boxes[0], box * scale, atol=1e-2)
    assert torch.allclose(faces.landmarks[0], points * scale, atol=1e-2)


def close_up(photo: torch.Tensor, box: torch.Tensor, side: int, fill: float) -> torch.Tensor:
    """A square frame of `side` px in which the face in `box` spans `fill` of the width, as a close-up
    shot or an upscaled portrait would show it."""
    from gpen.faces.align import warp

    zoom = side * fill / float(box[2] - box[0])
    centre = (box[:2] + box[2:]) / 2
    affine = torch.tensor([[[zoom, 0, side / 2 - zoom * centre[0]], [0, zoom, side / 2 - zoom * centre[1]]]],
                          dtype=torch.float64)
    return warp(photo[0].permute(2, 0, 1), affine, side, side)[0].permute(1, 2, 0).clamp(0, 1)[None]


def assert_one_box_per_face(faces):
    if len(faces) > 1:
        overlap = box_iou(faces.boxes, faces.boxes).fill_diagonal_(0)
        assert overlap.max() <= 0.3


@pytest.mark.parametrize("side, fill", [(768, 0.5), (1024, 0.5), (2048, 0.5), (2048, 0.75)])
def test_a_face_filling_the_frame_is_found_once(detector, solvay, reference_faces, side, fill):
    areas = (reference_faces["boxes"][:, 2:] - reference_faces["boxes"][:, :2]).prod(1)
    (faces,) = detector.detect(close_up(solvay, reference_faces["boxes"][areas.argmax()], side, fill))
    assert len(faces) == 1 and faces.scores[0] > 0.9
    width = faces.boxes[0, 2] - faces.boxes[0, 0]
    assert 0.6 * fill * side < width < 1.6 * fill * side  # the whole face, not a part of it


def portrait(side: int, height: int | None = None) -> torch.Tensor:
    """NASA's public-domain portrait of Eileen Collins (scikit-image's astronaut), scaled to side px wide."""
    data = pytest.importorskip("skimage.data", reason="scikit-image (installed with insightface) holds the portrait")
    import cv2

    image = cv2.resize(data.astronaut(), (side, height or side), interpolation=cv2.INTER_CUBIC)
    return torch.from_numpy(image).float()[None] / 255


@pytest.mark.parametrize("side, height", [(512, None), (768, None), (1024, None), (2048, None), (3024, 4032)],
                         ids=["512", "768", "1024", "2048", "phone-3024x4032"])
def test_a_portrait_has_one_face_at_every_resolution(detector, side, height):
    (faces,) = detector.detect(portrait(side, height))
    assert len(faces) == 1 and faces.scores[0] > 0.9


def test_a_group_photo_keeps_every_face(detector):
    import os

    insightface = pytest.importorskip("insightface", reason="insightface ships the 6-person test photo t1.jpg")
    import cv2

    bgr = cv2.imread(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg"))
    (faces,) = detector.detect(torch.from_numpy(bgr[..., ::-1].copy()).float()[None] / 255)
    assert len(faces) == 6
    assert_one_box_per_face(faces)


def test_the_solvay_faces_are_kept_when_detected_in_two_passes(detector, solvay, reference_faces):
    big = torch.nn.functional.interpolate(solvay.permute(0, 3, 1, 2), scale_factor=2.5, mode="bicubic")
    (faces,) = detector.detect(big.permute(0, 2, 3, 1).clamp(0, 1))  # 3320 px: fine and coarse passes
    assert len(faces) == 29
    assert_one_box_per_face(faces)


def test_detect_size_is_auto_or_a_fixed_long_side(shared, solvay):
    from gpen.faces.detect import detection_scales

    assert detection_scales(1080, 1920) == [1600 / 1920, 640 / 1920]  # fine for small faces, coarse for large
    assert detection_scales(568, 1328) == [1.0, 640 / 1328]
    assert detection_scales(512, 512) == [1.0]
    assert detection_scales(1080, 1920, 960) == [0.5]
    assert detection_scales(32, 100000) == [1.0]  # a strip keeps its short side
    assert detection_scales(0, 0) == [] and detection_scales(20, 500) == []
    fixed = gpen.load_detector(shared / "models" / "retinaface_mobilenet0.25.pth", device="cpu", detect_size=1328)
    (faces,) = fixed.detect(solvay)
    assert len(faces) == 29
    with pytest.raises(ValueError, match="detect_size"):
        gpen.load_detector(shared / "models" / "retinaface_mobilenet0.25.pth", detect_size="big")


def test_boxes_inside_or_over_another_are_one_face():
    from gpen.faces.detect import Faces, one_box_per_face

    boxes = torch.tensor([[0, 0, 100, 100], [10, 10, 60, 60], [5, 0, 105, 100], [200, 0, 260, 60.0]])
    faces = Faces(boxes, torch.tensor([0.9, 0.99, 0.8, 0.7]), torch.zeros(4, 5, 2))
    kept = one_box_per_face(faces)
    assert kept.boxes.tolist() == [[10, 10, 60, 60], [200, 0, 260, 60]]  # the best of each group


def test_a_detector_with_nan_weights_is_refused(tmp_path, shared):
    state = torch.load(shared / "models" / "retinaface_mobilenet0.25.pth", map_location="cpu", weights_only=True)
    state["ClassHead.0.conv1x1.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="broken.pth: ClassHead.0.conv1x1.weight holds NaN"):
        gpen.load_detector(tmp_path / "broken.pth")


@pytest.mark.parametrize("backbone", ["mobilenet0.25", "resnet50"])
def test_batch_norms_fold_into_the_convolutions_before_them(backbone):
    torch.manual_seed(0)
    net = RetinaFace(backbone).eval().requires_grad_(False)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:  # statistics as a trained network has them
        norm.running_mean.normal_(0, 0.2), norm.running_var.uniform_(0.5, 2)
        norm.weight.normal_(1, 0.2), norm.bias.normal_(0, 0.2)
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        expected = net(x)
        folded = fold_batch_norms(net)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(folded(x), expected))
