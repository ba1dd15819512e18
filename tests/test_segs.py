"""The Impact Pack's SEGS and BBOX_DETECTOR, as its nodes use them, with our faces.

The Impact Pack is never imported: `ImpactSEG` below is its namedtuple as it declares it, and `segs_paste`,
`combined_mask`, `ordered_filter` and `impact_crop_region` do what its SEGSPaste (feather 0), segs_to_combined_mask,
SEGSOrderedFilter and make_crop_region do, from its code's facts. scripts/check_impact_pack.py runs the real one.
"""

from collections import namedtuple

import numpy as np
import pytest
import torch

import gpen
from gpen.faces.detect import Faces
from gpen.faces.options import SegmentOptions
from gpen.faces.pipeline import locate_faces
from gpen.faces.segs import (
    FaceBox,
    FaceSegmentDetector,
    crop_region,
    faces_to_segs,
    info_to_segs,
    locate_faces_in_segs,
    restore_segs,
)
from tests.helpers import ForgetfulRestorer, GreyRestorer, IdentityRestorer, SplitParser
from tests.test_nodes import load_models, models_dir, pack  # noqa: F401 (pytest fixtures, used by name)

ImpactSEG = namedtuple("SEG", ["cropped_image", "cropped_mask", "confidence", "crop_region", "bbox", "label",
                               "control_net_wrapper"], defaults=[None])


def impact_crop_region(w, h, bbox, crop_factor):
    """make_crop_region: the box scaled about its centre, its corner truncated to int, then moved inside."""
    x1, y1, x2, y2 = bbox
    crop_w, crop_h = (x2 - x1) * crop_factor, (y2 - y1) * crop_factor
    new_x1, new_y1 = int(x1 + (x2 - x1) / 2 - crop_w / 2), int(y1 + (y2 - y1) / 2 - crop_h / 2)

    def normalize(limit, start, size):
        if start < 0:
            return 0, int(min(limit, size))
        if start + size > limit:
            return int(max(0, limit - size)), int(limit)
        return int(start), int(min(limit, start + size))

    (left, right), (top, bottom) = normalize(w, new_x1, crop_w), normalize(h, new_y1, crop_h)
    return [left, top, right, bottom]


def segs_paste(image, segs):
    """SEGSPaste with feather 0: each frame i takes cropped_image[i] under cropped_mask, segment after segment."""
    out = image.clone()
    for i in range(len(image)):
        for seg in segs[1]:
            if seg.cropped_image is None:
                continue
            mask = torch.as_tensor(np.asarray(seg.cropped_mask))
            mask = mask[i] if mask.ndim == 3 else mask
            x, y, *_ = seg.crop_region
            crop = torch.as_tensor(seg.cropped_image)[i]
            h, w = crop.shape[:2]
            out[i, y:y + h, x:x + w] = (1 - mask[..., None]) * out[i, y:y + h, x:x + w] + mask[..., None] * crop
    return out


def combined_mask(segs):
    """segs_to_combined_mask: the masks OR-ed as uint8 (numpy masks, as Impact's own detectors give)."""
    (h, w), segments = segs
    mask = np.zeros((h, w), np.uint8)
    for seg in segments:
        x1, y1, x2, y2 = seg.crop_region
        mask[y1:y2, x1:x2] |= (seg.cropped_mask * 255).astype(np.uint8)
    return torch.from_numpy(mask.astype(np.float32) / 255)


def ordered_filter(segs, take, start=0):
    """SEGSOrderedFilter, area(=w*h) descending: it sorts on crop regions, not boxes."""
    area = lambda seg: (seg.crop_region[2] - seg.crop_region[0]) * (seg.crop_region[3] - seg.crop_region[1])
    return segs[0], sorted(segs[1], key=area, reverse=True)[start:start + take]


def yolo_segs(segs):
    """The same faces as a YOLO detector's SEGS: float numpy boxes without landmarks, float64 masks, no crops."""
    return segs[0], [ImpactSEG(None, seg.cropped_mask.astype(np.float64), np.float32(0.8), list(seg.crop_region),
                               np.asarray(seg.bbox, np.float32).copy(), "face") for seg in segs[1]]


@pytest.fixture(scope="module")
def solvay_segs(solvay, detector):
    return FaceSegmentDetector(detector).detect(solvay, 0.5, 10, 3.0, 10)


def test_our_detector_gives_segs_impacts_nodes_read(solvay, solvay_segs):
    (height, width), segments = solvay_segs
    assert (height, width) == solvay.shape[1:3] and len(segments) == 29
    for seg in segments:
        assert seg._fields == ImpactSEG._fields and seg.label == "face" and 0.95 < seg.confidence <= 1
        x1, y1, x2, y2 = seg.crop_region
        assert all(type(v) is int for v in seg.crop_region) and 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert seg.cropped_mask.dtype == np.float32 and seg.cropped_mask.shape == (y2 - y1, x2 - x1)
        assert seg.cropped_image.shape == (1, y2 - y1, x2 - x1, 3)
        assert torch.equal(seg.cropped_image[0], solvay[0, y1:y2, x1:x2])
        assert seg.bbox.landmarks.shape == (5, 2) and seg.control_net_wrapper is None
        assert seg.crop_region == impact_crop_region(width, height, seg.bbox.tolist(), 3.0)
    assert combined_mask(solvay_segs).sum() > 0


def test_crop_factor_dilation_and_drop_size_behave_as_impacts():
    faces = Faces(torch.tensor([[100.0, 100, 140, 150], [10, 10, 19, 30], [280, 250, 330, 300.5]]),
                  torch.tensor([0.99, 0.98, 0.97]), torch.zeros(3, 5, 2))
    segs = faces_to_segs(faces, (300, 320), SegmentOptions(crop_factor=2.0, dilation=0, drop_size=10))
    assert len(segs[1]) == 2  # a 9 px wide box is not wider than drop_size 10
    near_edge = segs[1][1]
    assert near_edge.crop_region == impact_crop_region(320, 300, [280, 250, 330, 300.5], 2.0) == [220, 199, 320, 300]
    plain = segs[1][0].cropped_mask
    assert plain.sum() == 40 * 50  # the box itself
    grown = faces_to_segs(faces[:1], (300, 320), SegmentOptions(crop_factor=2.0, dilation=11))[1][0].cropped_mask
    shrunk = faces_to_segs(faces[:1], (300, 320), SegmentOptions(crop_factor=2.0, dilation=-11))[1][0].cropped_mask
    assert grown.sum() == (40 + 10) * (50 + 10) and shrunk.sum() == (40 - 10) * (50 - 10)
    oval = faces_to_segs(faces[:1], (300, 320), SegmentOptions(crop_factor=2.0, dilation=0, segment_mask="ellipse"))
    oval = oval[1][0].cropped_mask
    assert (oval <= plain).all() and 0.7 < oval.sum() / plain.sum() < 0.85  # pi / 4 of the box
    assert crop_region(320, 300, [100, 100, 140, 150], 1.0) == [100, 100, 140, 150]


def test_our_boxes_keep_their_landmarks_through_copies_but_not_through_arithmetic(solvay_segs):
    import copy
    import pickle

    box = solvay_segs[1][0].bbox
    for kept in (copy.deepcopy(box), pickle.loads(pickle.dumps(box)), box.copy()):
        assert isinstance(kept, FaceBox) and np.array_equal(kept.landmarks, box.landmarks)
    assert type(box * 2) is np.ndarray  # scaled boxes are plain: the landmarks would not follow them
    x1, y1, x2, y2 = box
    assert x2 - x1 > 0 and int(x1) == int(box[0])


def test_a_face_must_pass_the_detailers_threshold_and_ours(solvay, detector, solvay_segs):
    scores = sorted(float(seg.confidence) for seg in solvay_segs[1])
    strict_caller = FaceSegmentDetector(detector).detect(solvay, scores[10], 0, 3.0)
    strict_ours = FaceSegmentDetector(detector, threshold=scores[10]).detect(solvay, 0.5, 0, 3.0)
    assert len(strict_caller[1]) == len(strict_ours[1]) == 29 - 11
    # 0 is the detector's own default, as on our other nodes: the detailer's 0.5 does not lower it.
    assert FaceSegmentDetector(detector).detect(solvay, 0.01, 0, 3.0)[1] == [] or \
        min(seg.confidence for seg in FaceSegmentDetector(detector).detect(solvay, 0.01, 0, 3.0)[1]) > 0.95


def test_the_bbox_detector_duck_type_as_facedetailer_calls_it(solvay, detector):
    class Hook:  # an Impact detailer hook: may move crop regions and see the SEGS
        seen = None

        def post_crop_region(self, w, h, item_bbox, crop_region):
            return [0, 0, crop_region[2], crop_region[3]]

        def post_detection(self, segs):
            Hook.seen = segs
            return segs[0], segs[1][:2]

    bbox_detector = FaceSegmentDetector(detector)
    bbox_detector.setAux("face")
    segs = bbox_detector.detect(solvay, 0.5, 10, 3.0, 10, Hook())  # the hook is the sixth positional argument
    bbox_detector.setAux(None)
    assert len(segs[1]) == 2 and len(Hook.seen[1]) == 29
    assert all(seg.crop_region[:2] == [0, 0] and seg.cropped_mask.shape == (seg.crop_region[3], seg.crop_region[2])
               for seg in segs[1])
    mask = bbox_detector.detect_combined(solvay, 0.5, 10)
    assert mask.shape == solvay.shape[1:3] and mask.dtype == torch.float32 and set(mask.unique().tolist()) == {0, 1}
    with pytest.raises(ValueError, match="SEGS describe one image.*Image Batch to Image List"):
        bbox_detector.detect(solvay.expand(2, -1, -1, -1), 0.5, 10, 3.0)


def test_with_a_parser_each_segment_mask_is_the_parsers(solvay, detector):
    parser = SplitParser(1, 0)  # skin on the left half of each aligned face, background on the right
    boxes = FaceSegmentDetector(detector).detect(solvay, 0.5, 0, 3.0)
    parsed = FaceSegmentDetector(detector, parsers=parser).detect(solvay, 0.5, 0, 3.0)
    for box, seg in zip(boxes[1], parsed[1]):
        w = seg.cropped_mask.shape[1]
        left, right = seg.cropped_mask[:, : w // 2].sum(), seg.cropped_mask[:, w // 2:].sum()
        assert left > 5 * right and 0 < seg.cropped_mask.max() <= 1  # the face's left half, as the parser says
        assert seg.crop_region == box.crop_region


def test_restore_segs_pastes_under_each_mask_and_gives_segs_segspaste_pastes_the_same(solvay, detector, solvay_segs):
    result = restore_segs(solvay, solvay_segs, GreyRestorer(512), detector, feather=0)
    assert result.restored == 29 and result.summary.startswith(
        "restored 29 face(s) in 29 segment(s) of 1 image\nimage: 29 restored: segment 0 face 0.99")
    outside = combined_mask(solvay_segs) == 0
    assert torch.equal(result.images[0][outside], solvay[0][outside])  # bit-identical outside the segments
    assert (result.images - solvay).abs().amax() > 0.3 and result.masks.shape == solvay.shape[:3]
    for given, restored in zip(solvay_segs[1], result.segs[1]):
        assert restored.cropped_image.shape == given.cropped_image.shape
        assert (restored.confidence, restored.label, restored.crop_region) == (given.confidence, given.label,
                                                                              given.crop_region)
    assert (segs_paste(solvay, result.segs) - result.images).abs().max() < 1e-6



def test_restore_segs_cuts_and_restores_a_face_batch_at_a_time(solvay, detector, solvay_segs):
    """As restore_faces does: the restorer is given the crops of its batch alone, and by the next batch those
    crops and the faces it handed back are gone (29 faces at GPEN-2048: 1.46 GB a set)."""
    restorer = ForgetfulRestorer(64, remember=False)

    result = restore_segs(solvay, solvay_segs, restorer, detector, face_batch=8)

    assert result.restored == 29
    assert restorer.held_bytes == [8 * 64 * 64 * 3 * 4] * 3 + [5 * 64 * 64 * 3 * 4]
    assert restorer.alive == [0, 0, 0, 0]
    progress = []
    restore_segs(solvay, solvay_segs, IdentityRestorer(64), detector, face_batch=8, progress=lambda *a: progress.append(a))
    assert progress == [(8, 29), (16, 29), (24, 29), (29, 29)]

def test_feather_fades_the_face_out_inside_a_hard_segment_mask(solvay, detector, solvay_segs):
    """A box mask cuts GPEN's blend where it is near full (about 0.98 at its edge on these faces): a seam.
    feather softens the mask inside itself, as SEGSPaste's does, so the weight reaches 0 at its edge."""
    seg = solvay_segs[1][0]
    x1, y1, x2, y2 = seg.crop_region
    box = torch.as_tensor(seg.cropped_mask) > 0
    inner = -torch.nn.functional.max_pool2d(-box[None, None].float(), 3, 1, 1)[0, 0] > 0
    edge = box & ~inner  # the mask's outermost pixels
    hard = restore_segs(solvay, (solvay_segs[0], [seg]), GreyRestorer(512), feather=0).masks[0, y1:y2, x1:x2]
    soft = restore_segs(solvay, (solvay_segs[0], [seg]), GreyRestorer(512), feather=0.1).masks[0, y1:y2, x1:x2]
    assert hard[edge].mean() > 0.9 and soft[edge].max() < 0.01
    assert (soft[~box] == 0).all() and soft[box].max() > 0.9  # nothing outside the mask; the face itself whole


def test_segments_of_another_detector_are_restored_with_a_detector_for_landmarks(solvay, detector, solvay_segs):
    yolo = yolo_segs(solvay_segs)
    ours = restore_segs(solvay, solvay_segs, IdentityRestorer(512), detector)
    theirs = restore_segs(solvay, yolo, IdentityRestorer(512), detector)
    assert theirs.restored == 29 and (theirs.images - ours.images).abs().max() < 1e-6
    assert theirs.segs[1][0].label == "face" and theirs.segs[1][0].confidence == np.float32(0.8)
    with pytest.raises(ValueError, match="segment 0 comes from a detector without face landmarks: connect a face"):
        restore_segs(solvay, yolo, IdentityRestorer(512))
    # Ours carry the landmarks: no detector needed, through Impact's filters too.
    assert restore_segs(solvay, ordered_filter(solvay_segs, 3), GreyRestorer(512)).restored == 3


def test_a_segment_without_a_face_is_passed_through_and_counted(solvay, detector, solvay_segs):
    wall = ImpactSEG(None, np.ones((60, 60), np.float32), 0.9, [1200, 400, 1260, 460],
                     np.array([1210.5, 410.2, 1250.7, 450.9], np.float32), "person")
    segs = (solvay_segs[0], [*solvay_segs[1][:2], wall])
    result = restore_segs(solvay, segs, GreyRestorer(512), detector)
    assert result.restored == 2 and result.segs[1][2] is wall
    assert result.summary.endswith("; 1 without a face (passed through): segment 2 (person 0.90)")
    assert result.summary.startswith("restored 2 face(s) in 3 segment(s) of 1 image; 1 without a face (passed "
                                     "through)\nimage: 2 restored: segment 0 face ")
    assert torch.equal(result.images[0, 400:460, 1200:1260], solvay[0, 400:460, 1200:1260])


def test_hostile_segs_are_handled_or_refused_by_name(solvay, detector, solvay_segs):
    two = solvay_segs[0], solvay_segs[1][:2]
    full = restore_segs(solvay, two, IdentityRestorer(512), detector)
    # SEGS of the same picture at half size are scaled to the image, as SEGSPaste scales them.
    half = (solvay.shape[1] // 2, solvay.shape[2] // 2), [
        seg._replace(crop_region=[v / 2 for v in seg.crop_region], bbox=np.asarray(seg.bbox) / 2, cropped_image=None,
                     cropped_mask=seg.cropped_mask[::2, ::2]) for seg in two[1]]
    scaled = restore_segs(solvay, half, IdentityRestorer(512), detector)
    assert scaled.restored == 2 and "SEGS made for 664x284, scaled to the image's 1328x568" in scaled.summary
    assert scaled.segs[0] == solvay.shape[1:3] and all(type(v) is int for v in scaled.segs[1][0].crop_region)
    with pytest.raises(ValueError, match="made for a 600x600 image but the image is 1328x568"):
        restore_segs(solvay, ((600, 600), two[1]), IdentityRestorer(512), detector)
    empty = restore_segs(solvay, (solvay.shape[1:3], []), IdentityRestorer(512), detector)
    assert torch.equal(empty.images, solvay) and empty.restored == 0
    assert empty.summary == "restored 0 face(s) in 0 segment(s) of 1 image: images returned unchanged"
    # A region partly outside is clamped; one wholly outside is left as it was, and said.
    x1, y1, x2, y2 = two[1][0].crop_region
    spill = two[1][0]._replace(crop_region=[x1 - 2000, y1, x2, y2], cropped_mask=np.pad(two[1][0].cropped_mask,
                                                                                     ((0, 0), (2000, 0))))
    away = two[1][1]._replace(crop_region=[5000, 5000, 5100, 5100])
    result = restore_segs(solvay, (two[0], [spill, away]), IdentityRestorer(512), detector)
    assert result.restored == 1 and "1 segment(s) outside the image left as they were" in result.summary
    assert result.segs[1][0].crop_region == [0, y1, x2, y2] and result.segs[1][1] is away
    assert (full.images - result.images)[:, y1:y2, x1:x2].abs().max() < 1e-5  # float rounding of another window
    for bad, message in ((None, "segs must be the Impact Pack's SEGS"), ((1, 2), "segs must be the Impact Pack's"),
                         (("a", []), "the .height, width. they were made for"),
                         ((two[0], [42]), "segment 0 of segs is a int, not a SEG"),
                         ((two[0], [two[1][0]._replace(crop_region=[0, 0, float("nan"), 5])]), "four finite"),
                         ((two[0], [two[1][0]._replace(cropped_mask=np.ones((2, 3, 4, 5)))]), r"\(frames, h, w\)")):
        with pytest.raises(ValueError, match=message):
            restore_segs(solvay, bad, IdentityRestorer(512), detector)


def test_a_batch_shares_its_segments_and_3d_masks_give_each_frame_its_own(solvay, detector, solvay_segs):
    frames = torch.cat([solvay, solvay.flip(-1)])  # a colour change: the faces stay where they are
    seg = solvay_segs[1][0]
    x1, y1, x2, y2 = seg.crop_region
    per_frame = seg._replace(cropped_mask=np.stack([seg.cropped_mask, np.zeros_like(seg.cropped_mask)]))
    result = restore_segs(frames, (solvay_segs[0], [per_frame]), GreyRestorer(512), detector, feather=0)
    assert result.restored == 2 and result.segs[1][0].cropped_image.shape == (2, y2 - y1, x2 - x1, 3)
    assert (result.images[0] - frames[0]).abs().amax() > 0.3 and torch.equal(result.images[1], frames[1])
    assert (segs_paste(frames, result.segs) - result.images).abs().max() < 1e-6
    with pytest.raises(ValueError, match="segment 0: cropped_mask holds 2 frames for an image of 3"):
        restore_segs(torch.cat([frames, solvay]), (solvay_segs[0], [per_frame]), GreyRestorer(512), detector)


def test_impacts_filters_choose_the_faces_our_modular_nodes_restore(solvay, detector, solvay_segs):
    chosen = ordered_filter(solvay_segs, 3)
    crops, info, notes = locate_faces_in_segs(solvay, chosen, detector, 256)
    assert len(crops) == 3 and notes == []
    centres = (info.faces[0].boxes[:, :2] + info.faces[0].boxes[:, 2:]) / 2
    for seg, (x, y) in zip(chosen[1], centres.tolist()):  # in the segments' order
        assert seg.bbox[0] <= x <= seg.bbox[2] and seg.bbox[1] <= y <= seg.bbox[3]
    assert info.selection.skipped_counts == {"outside the SEGS": 26}


def test_our_faces_as_segs_one_per_frame(solvay, detector):
    frames = torch.cat([solvay, solvay.flip(2)])
    _, info = locate_faces(frames, detector, 256)
    segs = info_to_segs(info, SegmentOptions(), frames)
    assert [len(s[1]) for s in segs] == [29, 29] and all(s[0] == solvay.shape[1:3] for s in segs)
    assert isinstance(segs[1][1][0].bbox, FaceBox)
    torch.testing.assert_close(torch.as_tensor(segs[1][1][0].bbox.landmarks), info.faces[1].landmarks[0])
    assert restore_segs(frames[1:], segs[1], GreyRestorer(512)).restored == 29  # their landmarks align them
    with pytest.raises(ValueError, match="connect the image Detect and Crop Faces was given"):
        info_to_segs(info, SegmentOptions(), solvay)
    with pytest.raises(ValueError, match="a face parser looks at the faces: connect the image"):
        info_to_segs(info, SegmentOptions(), parsers=SplitParser(1, 0))


def test_inside_a_whole_mask_a_face_is_pasted_as_restore_faces_pastes_it(solvay, detector, solvay_segs):
    seg = solvay_segs[1][4]
    x1, y1, x2, y2 = seg.crop_region
    whole = seg._replace(cropped_mask=np.ones((y2 - y1, x2 - x1), np.float32))
    faces = Faces(torch.as_tensor(np.asarray(seg.bbox))[None], torch.ones(1), torch.as_tensor(seg.bbox.landmarks)[None])
    expected = gpen.restore_faces(solvay, GreyRestorer(512), detector, faces=[faces]).images
    result = restore_segs(solvay, (solvay_segs[0], [whole]), GreyRestorer(512), feather=0)  # the SEG's landmarks
    assert (result.images - expected).abs().max() < 1e-5 and (expected - solvay).abs().amax() > 0.3


# The nodes, as a graph wires them.

def test_the_nodes_in_a_graph(pack, models_dir, solvay):
    nodes = pack.NODE_CLASS_MAPPINGS
    model, detector = load_models(pack)
    (bbox_detector,) = nodes["GPENFaceDetectorForFaceDetailer"]().make(detector, threshold=0.0, segment_mask="box")
    segs = bbox_detector.detect(solvay, 0.5, 10, 3.0, 10)  # as BBOX Detector (SEGS) and FaceDetailer call it
    # They take lists (INPUT_IS_LIST), as ComfyUI gives them: [value] for a value.
    (image,), (restored_segs,), (mask,), (summary,) = nodes["GPENRestoreSEGS"]().restore(
        [solvay], [ordered_filter(segs, 5)], [model], strength=[1.0], face_batch=[4], color_correction=[False],
        feather=[0], face_detector=[detector])
    assert summary.startswith("restored 5 face(s) in 5 segment(s) of 1 image\n") and image.shape == solvay.shape
    assert mask.shape == solvay.shape[:3] and (segs_paste(solvay, restored_segs) - image).abs().max() < 1e-6
    crops, info, _, _ = nodes["GPENDetectAndCropFaces"]().detect(
        solvay, detector, crop_size=256, template="gpen", threshold=0.0, min_size=0, max_faces=0, order="largest",
        indices="", temporal_smoothing=0.0)
    (per_frame,) = nodes["GPENFacesToSEGS"]().convert(info, crop_factor=2.0, dilation=0, drop_size=10,
                                                        segment_mask="ellipse", image=solvay)
    assert nodes["GPENFacesToSEGS"].OUTPUT_IS_LIST == (True,) and len(per_frame) == 1 and len(per_frame[0][1]) == 29
    (crops,), (info,), (face_mask,), (summary,) = nodes["GPENSEGSToFaces"]().detect(
        [solvay], [ordered_filter(per_frame[0], 2)], [detector], crop_size=[512], template=["gpen"], threshold=[0.0],
        gpen_model=[model])
    assert crops.shape == (2, 64, 64, 3) and face_mask.shape == solvay.shape[:3]
    assert summary.startswith("2 face(s) cropped\nimage: 2 cropped") and "27 outside the SEGS" in summary


def test_a_batch_with_one_segs_per_frame_restores_each_frame_with_its_own(pack, models_dir, solvay):
    """The video graph: Detect and Crop Faces on a batch -> Faces to SEGS (one SEGS per frame) -> a SEGS filter
    on each -> GPEN Restore SEGS on the batch, which pairs frame t with SEGS t."""
    nodes = pack.NODE_CLASS_MAPPINGS
    model, detector = load_models(pack)
    frames = torch.cat([solvay, solvay.flip(2)])
    _, info, _, _ = nodes["GPENDetectAndCropFaces"]().detect(
        frames, detector, crop_size=256, template="gpen", threshold=0.0, min_size=0, max_faces=0, order="largest",
        indices="", temporal_smoothing=0.0)
    (per_frame,) = nodes["GPENFacesToSEGS"]().convert(info, crop_factor=3.0, dilation=0, drop_size=10,
                                                        segment_mask="box")
    chosen = [ordered_filter(per_frame[0], 1), ordered_filter(per_frame[1], 2)]
    (image,), segs, (mask,), (summary,) = nodes["GPENRestoreSEGS"]().restore(
        [frames], chosen, [model], strength=[1.0], face_batch=[4], color_correction=[False], feather=[0])
    assert summary.startswith("restored 3 face(s) in 3 segment(s) of 2 frames\nframe 0: 1 restored: segment 0 ")
    assert "\nframe 1: 2 restored: segment 0 face" in summary and image.shape == frames.shape
    assert len(segs) == 2 and [len(s[1]) for s in segs] == [1, 2]
    assert [len(torch.as_tensor(m).nonzero()) > 0 for m in mask] == [True, True]
    for t in range(2):
        assert (segs_paste(frames[t:t + 1], segs[t]) - image[t:t + 1]).abs().max() < 1e-6
    (crops,), (found,), _, _ = nodes["GPENSEGSToFaces"]().detect(
        [frames], chosen, [detector], crop_size=[256], template=["gpen"], threshold=[0.0])
    assert found.frames.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="3 SEGS for 2 frame.s.: give one SEGS for all frames, or one per frame"):
        nodes["GPENRestoreSEGS"]().restore([frames], chosen + chosen[:1], [model], strength=[1.0], face_batch=[4],
                                           color_correction=[False], feather=[0.1])


def test_grey_and_rgba_images_keep_their_channels_and_alpha(solvay, detector, solvay_segs):
    segs = ordered_filter(solvay_segs, 3)
    rgb = restore_segs(solvay, segs, GreyRestorer(512), detector).images
    grey = restore_segs(solvay[..., :1], segs, GreyRestorer(512), detector).images
    alpha = torch.rand(solvay.shape[:3] + (1,))
    rgba = restore_segs(torch.cat([solvay, alpha], -1), segs, GreyRestorer(512), detector).images
    assert grey.shape[-1] == 1 and rgba.shape[-1] == 4 and torch.equal(rgba[..., 3:], alpha)
    assert (rgba[..., :3] - rgb).abs().max() < 1e-6
    as_rgb = restore_segs(solvay[..., :1].expand(-1, -1, -1, 3), segs, GreyRestorer(512), detector).images
    luma = (as_rgb * torch.tensor([0.299, 0.587, 0.114])).sum(-1, keepdim=True)
    assert (grey - solvay[..., :1]).abs().max() > 0.1 and (grey - luma).abs().max() < 1e-5
