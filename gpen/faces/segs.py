"""The Impact Pack's SEGS, without the Impact Pack: our faces as segments, segments as our faces' selection,
and GPEN restoring the faces of any detector's segments.

A SEGS value is a plain tuple `((H, W), [SEG, ...])` describing one image (or, with 3-D masks, the frames of a
clip that share the segments). `SEG` is declared here exactly as the Impact Pack declares it, as other packs do,
so its nodes take our segments and ours take theirs. In a SEG, `crop_region` is `[x1, y1, x2, y2]` in ints,
`bbox` the detector's box in image pixels (floats allowed), `cropped_mask` a float mask of the crop region's
size (2-D, or 3-D one per frame) and `cropped_image` a (frames, h, w, 3) crop or None. Impact's consumers cut
`crop_region` from the image themselves, and SEGSPaste pastes `cropped_image[i]` under `cropped_mask` into
frame i.

Our segments' boxes are `FaceBox`es: arrays like any bbox that also carry the face's five landmarks, so GPEN
Restore SEGS can align a face we found without a detector, through any of Impact's filters.
"""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass, field, replace
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .align import crop_faces, sample
from .detect import Faces, box_iou, threshold_for
from .masks import feather_inside
from .options import MaskOptions, PasteOptions, SegmentOptions, SelectOptions
from .parse import parse_faces
from .paste import footprint, part_to_crop
from .pipeline import (
    OUTSIDE_SEGS,
    FaceInfo,
    Selection,
    box_sides,
    check_cancel,
    cut,
    detect_faces,
    find_faces,
    frame_lines,
    gathered,
    locate_faces,
    parts,
    paste_restored,
)
from .restore import as_restorer, rerun_note
from .tensors import as_images, as_rgb, like_given, match_channels

SEG = namedtuple("SEG", ["cropped_image", "cropped_mask", "confidence", "crop_region", "bbox", "label",
                         "control_net_wrapper"], defaults=[None])
FACE_LABEL = "face"
SAME_ASPECT = 0.02  # SEGS of another size are scaled to the image when their aspects differ less than this
# The detector only has to place the face a segment already says is there; faces of a diffusion model or a
# swap score lower than photographs, so the bar is the detector libraries' usual one, not RetinaFace's 0.95.
REDETECT_THRESHOLD = 0.5
REDETECT_CONTEXT = 2.0  # a segment's face is looked for in its box enlarged this much (detectors need context)


class FaceBox(np.ndarray):
    """A segment's bbox [x1, y1, x2, y2] (float32) that also holds its face's landmarks (5, 2) in image pixels."""

    def __new__(cls, box, landmarks):
        array = np.asarray(box, dtype=np.float32).reshape(4).view(cls)
        array.landmarks = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
        return array

    def __array_finalize__(self, source):
        self.landmarks = getattr(source, "landmarks", None)

    def __array_wrap__(self, array, context=None, return_scalar=False):
        # Arithmetic makes another box, which the landmarks would not follow: it is a plain array.
        array = array.view(np.ndarray)
        return array[()] if return_scalar else array

    def __reduce__(self):  # pickled (ComfyUI's caches, copies) with its landmarks
        return FaceBox, (np.asarray(self), self.landmarks)


def crop_region(width: int, height: int, bbox, crop_factor: float) -> list[int]:
    """The Impact Pack's crop region of a box: the box enlarged `crop_factor` times about its centre, moved (not
    cut) to lie inside the image where it fits, as ints [x1, y1, x2, y2]."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    crop_w, crop_h = (x2 - x1) * crop_factor, (y2 - y1) * crop_factor
    left, right = _inside(width, int((x1 + x2) / 2 - crop_w / 2), crop_w)
    top, bottom = _inside(height, int((y1 + y2) / 2 - crop_h / 2), crop_h)
    return [left, top, right, bottom]


def _inside(limit: int, start: int, size: float) -> tuple[int, int]:
    if start < 0:
        return 0, int(min(limit, size))
    if start + size > limit:
        return int(max(0, limit - size)), limit
    return start, int(min(limit, start + size))


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """`mask` (h, w) grown by a square of `pixels` (shrunk where negative), as the Impact Pack dilates."""
    if pixels == 0:
        return mask
    kernel = np.ones((abs(pixels), abs(pixels)), np.uint8)
    return (cv2.dilate if pixels > 0 else cv2.erode)(mask, kernel)


def shape_mask(region: list[int], box, shape: str) -> np.ndarray:
    """(h, w) float32 in the crop region's pixels: 1 over the face box, or the ellipse inscribed in it."""
    x0, y0, x1, y1 = region
    mask = np.zeros((y1 - y0, x1 - x0), np.float32)
    left, top, right, bottom = (float(v) for v in box)
    if shape == "box":
        mask[max(round(top) - y0, 0):max(round(bottom) - y0, 0), max(round(left) - x0, 0):max(round(right) - x0, 0)] = 1
    else:  # pixels whose centres lie inside the ellipse: never outside the box
        ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
        a, b = max((right - left) / 2, 0.5), max((bottom - top) / 2, 0.5)
        mask[((xs - (left + right) / 2) / a) ** 2 + ((ys - (top + bottom) / 2) / b) ** 2 <= 1] = 1
    return mask


def region_mask(face_mask: torch.Tensor, affine: torch.Tensor, region: list[int]) -> np.ndarray:
    """A mask in aligned-crop coordinates (S, S), with its crop's affine (image -> crop), in the crop region's
    pixels (h, w) float32."""
    x0, y0, x1, y1 = region
    mask = sample(face_mask.float()[None].cpu(), part_to_crop(affine.cpu(), x0, y0), y1 - y0, x1 - x0, mode="bilinear")
    return mask[0, 0].clamp(0, 1).numpy()


def faces_to_segs(faces: Faces, image_size: tuple[int, int], options: SegmentOptions = SegmentOptions(), *,
                  image: torch.Tensor | None = None, face_masks: torch.Tensor | None = None,
                  affines: torch.Tensor | None = None, label: str = FACE_LABEL,
                  post_crop_region: Callable | None = None) -> tuple:
    """The SEGS of one image's faces: each face wider and taller than `options.drop_size` is a segment with its
    crop region (`options.crop_factor`), its mask (box or ellipse, or `face_masks` (N, S, S) in aligned-crop
    coordinates through `affines`, a face parser's), grown by `options.dilation`, its score and `label`;
    `image` (H, W, C), when given, fills each `cropped_image`. `post_crop_region(w, h, bbox, region)` is an
    Impact detailer hook's, which may move a region."""
    height, width = image_size
    segments = []
    for i in range(len(faces)):
        box = faces.boxes[i].tolist()
        if not (box[2] - box[0] > options.drop_size and box[3] - box[1] > options.drop_size):
            continue
        bbox = FaceBox(box, faces.landmarks[i].cpu().numpy())
        region = crop_region(width, height, bbox, options.crop_factor)
        if post_crop_region is not None:
            region = [int(v) for v in post_crop_region(width, height, bbox, region)]
        if face_masks is not None:
            mask = region_mask(face_masks[i], affines[i], region)
        else:
            mask = shape_mask(region, bbox, options.segment_mask)
        x0, y0, x1, y1 = region
        crop = None if image is None else as_rgb(image[y0:y1, x0:x1].cpu())
        segments.append(SEG(crop, dilate(mask, options.dilation), np.float32(faces.scores[i]), region, bbox, label))
    return (height, width), segments


def info_to_segs(info: FaceInfo, options: SegmentOptions = SegmentOptions(), images: torch.Tensor | None = None,
                 parsers=None, masks: MaskOptions = MaskOptions(), *, face_batch: int = 4) -> list[tuple]:
    """One SEGS per frame of the faces Detect and Crop Faces located (`info`): see faces_to_segs. `images`, the
    frames they were found in, fill each segment's cropped_image; with `parsers` (one or several), whose masks
    need them, the segments' masks are the parsers' (`masks.regions`, `masks.feather`), `face_batch` faces
    parsed at a time."""
    if images is not None:
        images = as_images(images)[0]
        if tuple(images.shape[:3]) != (len(info.faces), *info.image_size):
            raise ValueError(f"image is {len(images)} frame(s) of {images.shape[2]}x{images.shape[1]}, but the faces "
                             f"were found in {len(info.faces)} of {info.image_size[1]}x{info.image_size[0]}: "
                             "connect the image Detect and Crop Faces was given")
    face_masks = None
    if parsers is not None:
        if images is None:
            raise ValueError("a face parser looks at the faces: connect the image the faces were found in")
        if len(info):
            face_masks = gathered(len(info), face_batch, lambda part: parse_faces(
                parsers, cut(images, info, part), masks.regions, masks.feather, batch_size=face_batch)).cpu()
    segs, start = [], 0
    for t, faces in enumerate(info.faces):
        part = slice(start, start + len(faces))
        start += len(faces)
        segs.append(faces_to_segs(faces, info.image_size, options, image=None if images is None else images[t],
                                  face_masks=None if face_masks is None else face_masks[part],
                                  affines=info.affines[part]))
    return segs


def segs_mask(segs) -> torch.Tensor:
    """(H, W) float32: every segment's mask where it lies (the strongest where they overlap), as the Impact
    Pack's detect_combined gives it."""
    (height, width), segments = segs
    combined = torch.zeros(height, width)
    for seg in segments:
        x0, y0, x1, y1 = seg.crop_region
        mask = torch.as_tensor(np.asarray(seg.cropped_mask, np.float32))
        mask = mask.amax(0) if mask.ndim == 3 else mask
        combined[y0:y1, x0:x1] = torch.maximum(combined[y0:y1, x0:x1], mask)
    return combined


class FaceSegmentDetector:
    """The Impact Pack's BBOX_DETECTOR over our face detectors: FaceDetailer, Detailer (SEGS) and every SEGS
    node take it. A face must pass both the caller's threshold and ours (`threshold`; 0 is the detector's own
    default); crop_factor, dilation and drop_size are the caller's, as Impact's detectors take them. With
    `parsers`, each segment's mask is their mask of `regions`, else the `segment_mask` shape."""

    def __init__(self, detector, threshold: float = 0.0, segment_mask: str = "box", parsers=None,
                 regions: str = "face", parse_size: int = 512):
        SelectOptions(threshold=threshold)
        SegmentOptions(segment_mask=segment_mask)
        MaskOptions(regions=regions)
        self.detector, self.threshold, self.segment_mask = detector, threshold, segment_mask
        self.parsers, self.regions, self.parse_size = parsers, regions, parse_size
        self.aux = None  # FaceDetailer says what it looks for ("face") through setAux; we find faces only

    def detect(self, image: torch.Tensor, threshold: float, dilation: int, crop_factor: float, drop_size: int = 1,
               detailer_hook=None) -> tuple:
        images = one_image(image)
        options = SegmentOptions(crop_factor=crop_factor, dilation=int(dilation), drop_size=max(int(drop_size), 1),
                                 segment_mask=self.segment_mask)
        detector, parsers = self.models(images)
        floor = threshold_for(detector, self.threshold)
        faces = detector.detect(images, threshold=max(SelectOptions(threshold=threshold).threshold, floor))[0]
        face_masks = affines = None
        if parsers is not None and len(faces):
            crops, affines = crop_faces(images, faces.landmarks, self.parse_size)
            face_masks = parse_faces(parsers, crops, self.regions)
        hook = getattr(detailer_hook, "post_crop_region", None)
        segs = faces_to_segs(faces, tuple(images.shape[1:3]), options, image=images[0], face_masks=face_masks,
                             affines=affines, post_crop_region=hook)
        if hasattr(detailer_hook, "post_detection"):
            segs = detailer_hook.post_detection(segs)
        return segs

    def models(self, images: torch.Tensor) -> tuple:
        """The detector and the parsers (one, several or None) that look at `images` (1, H, W, C): those given.
        The nodes' detector puts its loaded ones on ComfyUI's device here (nodes/segs_nodes.py)."""
        return self.detector, self.parsers

    def detect_combined(self, image: torch.Tensor, threshold: float, dilation: int) -> torch.Tensor:
        return segs_mask(self.detect(image, threshold, dilation, 1.0))

    def setAux(self, x) -> None:  # the Impact Pack's name
        self.aux = x


def one_image(image) -> torch.Tensor:
    images = as_images(image, "image")[0]
    if len(images) != 1:
        raise ValueError(f"SEGS describe one image, and this is a batch of {len(images)}: split it into single "
                         "images first (the Impact Pack's Image Batch to Image List), as its detailers ask")
    return images


# Reading SEGS from any detector: checked, scaled to the image and clamped to it.

@dataclass
class Segment:
    """One SEG as the image sees it: its crop region clamped to the image, its masks (frames, h, w) there."""

    index: int  # in the SEGS
    region: list[int]  # [x1, y1, x2, y2] ints inside the image
    box: np.ndarray  # (4,) float32 in image pixels
    masks: torch.Tensor  # (1 or frames, h, w) float32 0..1
    landmarks: np.ndarray | None  # (5, 2) from one of our detectors, in image pixels
    seg: SEG = field(repr=False)  # as given, scaled to the image


@dataclass
class ReadSegs:
    size: tuple[int, int]  # (H, W) the SEGS were made for
    segments: list[Segment]
    outside: list[int]  # indices of segments whose crop region lies outside the image
    notes: list[str]
    given: list = field(repr=False, default_factory=list)  # every SEG, scaled to the image


def read_segs(segs, image_size: tuple[int, int], frames: int = 1) -> ReadSegs:
    """SEGS from any pack, as segments of an image of `image_size` with `frames` frames. SEGS of another size
    with the same aspect are scaled to it (as Impact's SEGSPaste does); float regions are rounded; regions are
    clamped to the image (one wholly outside is left out, and listed); a mask that is None, of another size
    than its region, or not finite is made whole, resized, or zeroed there. Anything else is a ValueError
    naming what is wrong."""
    if not isinstance(segs, (tuple, list)) or len(segs) != 2 or not isinstance(segs[1], (list, tuple)):
        raise ValueError(f"segs must be the Impact Pack's SEGS, ((height, width), [SEG, ...]); got {_kind(segs)}")
    size, given = segs
    try:
        seg_h, seg_w = int(size[0]), int(size[1])
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"segs' first item must be the (height, width) they were made for; got {size!r}") from None
    height, width = image_size
    notes = []
    scale = (1.0, 1.0)
    if (seg_h, seg_w) != (height, width) and seg_h > 0 and seg_w > 0 and given:
        if abs(math.log(width / height) - math.log(seg_w / seg_h)) > SAME_ASPECT:
            raise ValueError(f"the SEGS were made for a {seg_w}x{seg_h} image but the image is {width}x{height}, "
                             "another shape: connect the image the segments were detected in")
        scale = (height / seg_h, width / seg_w)
        notes.append(f"SEGS made for {seg_w}x{seg_h}, scaled to the image's {width}x{height}")
    segments, outside, scaled = [], [], []
    for index, seg in enumerate(given):
        if not hasattr(seg, "crop_region") or not hasattr(seg, "cropped_mask"):
            raise ValueError(f"segment {index} of segs is a {type(seg).__name__}, not a SEG")
        seg, region, box = _scaled(seg, index, scale)
        scaled.append(seg)
        clamped = [min(max(region[0], 0), width), min(max(region[1], 0), height),
                   min(max(region[2], 0), width), min(max(region[3], 0), height)]
        if clamped[2] <= clamped[0] or clamped[3] <= clamped[1]:
            outside.append(index)
            continue
        masks = _masks(seg.cropped_mask, index, region, frames)[:, clamped[1] - region[1]:clamped[3] - region[1],
                                                                clamped[0] - region[0]:clamped[2] - region[0]]
        landmarks = getattr(seg.bbox, "landmarks", None)
        if landmarks is not None and scale != (1.0, 1.0):
            landmarks = landmarks * np.array([scale[1], scale[0]], np.float32)
        segments.append(Segment(index, clamped, box, masks, landmarks, seg))
    if outside:
        notes.append(f"{len(outside)} segment(s) outside the image left as they were")
    return ReadSegs((seg_h, seg_w), segments, outside, notes, scaled)


def frame_segs(segs, images: torch.Tensor) -> list[ReadSegs]:
    """The segments of each frame of `images`: one SEGS shared by every frame (the same ReadSegs each time), or
    a list of SEGS, one per frame (as Faces to SEGS gives them)."""
    size, frames = tuple(images.shape[1:3]), len(images)
    if not one_per_frame(segs):
        return [read_segs(segs, size, frames)] * frames
    if len(segs) != frames:
        raise ValueError(f"{len(segs)} SEGS for {frames} frame(s): give one SEGS for all frames, or one per frame")
    return [read_segs(one, size) for one in segs]


def one_per_frame(segs) -> bool:
    """Whether `segs` is a list of SEGS (one per frame) rather than one SEGS, whose first item is (H, W)."""
    return isinstance(segs, list) and all(isinstance(s, (tuple, list)) and len(s) == 2 and
                                          isinstance(s[1], (tuple, list)) for s in segs)


def _kind(value) -> str:
    return f"a {type(value).__name__}" + (f" of {len(value)}" if isinstance(value, (tuple, list)) else "")


def _scaled(seg: SEG, index: int, scale: tuple[float, float]) -> tuple[SEG, list[int], np.ndarray]:
    """The SEG with its region and box in the image's pixels (region rounded to ints), and those two."""
    try:
        region = [float(v) for v in seg.crop_region]
        box = np.asarray(seg.bbox if seg.bbox is not None else region, np.float32).reshape(4)
    except (TypeError, ValueError):
        raise ValueError(f"segment {index}: crop_region and bbox must be [x1, y1, x2, y2]; got "
                         f"{seg.crop_region!r} and {seg.bbox!r}") from None
    if len(region) != 4 or not np.isfinite(region).all() or not np.isfinite(box).all():
        raise ValueError(f"segment {index}: crop_region and bbox must be four finite numbers [x1, y1, x2, y2]; "
                         f"got {seg.crop_region!r} and {seg.bbox!r}")
    sy, sx = scale
    region = [round(region[0] * sx), round(region[1] * sy), round(region[2] * sx), round(region[3] * sy)]
    box = box * np.array([sx, sy, sx, sy], np.float32)
    if isinstance(seg.bbox, FaceBox):
        box = FaceBox(box, seg.bbox.landmarks * np.array([sx, sy], np.float32))
    if scale == (1.0, 1.0) and all(isinstance(v, (int, np.integer)) for v in seg.crop_region):
        return seg, region, box  # passed on as it came, where nothing is restored in it
    return seg._replace(crop_region=region, bbox=box), region, box


def _masks(mask, index: int, region: list[int], frames: int) -> torch.Tensor:
    """(1 or frames, h, w) float32 0..1 of a SEG's cropped_mask, at its region's size."""
    h, w = region[3] - region[1], region[2] - region[0]
    if mask is None:
        return torch.ones(1, h, w)
    try:
        mask = torch.as_tensor(np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, np.float32))
    except (TypeError, ValueError):
        raise ValueError(f"segment {index}: cropped_mask must be a float mask, not {type(mask).__name__}") from None
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or 0 in mask.shape:
        raise ValueError(f"segment {index}: cropped_mask must be (h, w) or (frames, h, w); got {tuple(mask.shape)}")
    if len(mask) not in (1, frames):
        raise ValueError(f"segment {index}: cropped_mask holds {len(mask)} frames for an image of {frames}")
    if tuple(mask.shape[1:]) != (h, w):
        mask = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return torch.nan_to_num(mask, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0, 1)


# Finding the face of each segment.

def segment_faces(images: torch.Tensor, reads: list[ReadSegs], detector=None,
                  cancel: Callable | None = None) -> list[list[Faces]]:
    """[frame][segment] the one face (or none) each segment of the frame holds: detected near its box (the
    candidate centred in the box that overlaps it most) when a detector is given, else the landmarks our own
    detectors put in its bbox. Without either, a ValueError."""
    found = []
    for t, read in enumerate(reads):
        row = []
        for segment in read.segments:
            check_cancel(cancel)
            if detector is not None:
                row.append(face_near(images[t:t + 1], segment.box, detector))
            elif segment.landmarks is not None:
                lm = torch.as_tensor(segment.landmarks, dtype=torch.float32)[None]
                row.append(Faces(torch.as_tensor(np.asarray(segment.box, np.float32))[None], torch.ones(1), lm))
            else:
                raise ValueError(f"segment {segment.index} comes from a detector without face landmarks: connect "
                                 "a face detector (Load Face Detector) to find the faces in the segments")
        found.append(row)
    return found


def face_near(image: torch.Tensor, box: np.ndarray, detector) -> Faces:
    """The face a segment with this box holds in `image` (1, H, W, C): detected in the box enlarged
    REDETECT_CONTEXT times (whatever the segment's crop region, so that its landmarks do not depend on the
    crop_factor); of the faces whose centre lies in the box, the one overlapping it most. Empty when none."""
    height, width = image.shape[1:3]
    x0, y0, x1, y1 = crop_region(width, height, box, REDETECT_CONTEXT)
    faces = detector.detect(image[:, y0:y1, x0:x1], threshold=REDETECT_THRESHOLD)[0]
    if not len(faces):
        return faces
    shift = torch.tensor([x0, y0], dtype=faces.boxes.dtype)
    faces = Faces(faces.boxes + shift.repeat(2), faces.scores, faces.landmarks + shift)
    centres = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2
    target = torch.as_tensor(np.asarray(box, np.float32))
    inside = (centres >= target[:2]).all(1) & (centres <= target[2:]).all(1)
    if not inside.any():
        return faces[:0]
    overlap = box_iou(faces.boxes.float(), target[None]).squeeze(1).where(inside, torch.tensor(-1.0))
    return faces[overlap.argmax()[None]]


# GPEN on segments.

@dataclass
class SegsRestoration:
    images: torch.Tensor  # like the input
    segs: tuple | list  # the SEGS in the image's size (or one per frame, as given), with restored cropped_images
    masks: torch.Tensor  # (B, H, W) where restored pixels went
    segments: int = 0  # (frame, segment) pairs looked at
    records: list[tuple[int, str, str]] = field(default_factory=list)  # (frame, outcome, "segment 3 face 0.99 40px")
    notes: list[str] = field(default_factory=list)
    frames: int = 1

    @property
    def restored(self) -> int:
        return sum(outcome == RESTORED for _, outcome, _ in self.records)

    def count(self, outcome: str) -> int:
        return sum(o == outcome for _, o, _ in self.records)

    @property
    def summary(self) -> str:
        """As the other nodes' summaries: a headline, then a line a frame (the first MAX_FRAME_LINES) with each
        segment restored (its face's detector score and box side) and each passed through, with why."""
        where = "1 image" if self.frames == 1 else f"{self.frames} frames"
        headline = f"restored {self.restored} face(s) in {self.segments} segment(s) of {where}"
        if not self.restored:
            headline += ": images returned unchanged"
        counts = [f"{self.count(o)} {o}" for o in OUTCOMES[1:] if self.count(o)]
        groups: dict[int, dict[str, list[str]]] = {}  # frame -> outcome -> segments
        for t, outcome, text in self.records:
            groups.setdefault(t, {}).setdefault(outcome, []).append(text)
        return "\n".join(["; ".join([headline, *counts, *self.notes]),
                          *frame_lines(groups, OUTCOMES, self.frames == 1, "segments")])


RESTORED, NO_FACE, LEFT = "restored", "without a face (passed through)", "left as they were (not finite, or masked out)"
OUTCOMES = (RESTORED, NO_FACE, LEFT)


def restore_segs(images, segs, model, detector=None, *, paste: PasteOptions = PasteOptions(),
                 masks: MaskOptions = MaskOptions(), feather: float = SegmentOptions().feather,
                 template: str = "gpen", face_batch: int = 4,
                 progress: Callable[[int, int], None] | None = None,
                 cancel: Callable[[], bool | None] | None = None) -> SegsRestoration:
    """Restore the face in each segment of `segs` (from any detector: ours, YOLO, a person detector's masks)
    in each frame of `images`, and paste it back under the segment's own mask. `segs` is one SEGS, shared by
    every frame, or a list of SEGS, one per frame.

    Each segment's face is found near its box (`detector`; without one, the landmarks our detectors leave in
    their segments), aligned, cut and restored by `model` a batch of `face_batch` at a time, and pasted as
    restore_faces pastes (`paste`, `masks`: a face parser's regions), then limited to the segment's
    `cropped_mask`, its edge softened inside it over `feather` times the mask's shorter side (0: as given).
    Segments are pasted in their order, each over what is there, as the Impact Pack's SEGSPaste does with
    feather 0. The result's `segs` are the segments in the image's size with `cropped_image` (frames, h, w, 3)
    the restored crop region, for SEGSPaste and Impact's other SEGS nodes; a segment without a face in any
    frame is passed through as given, and the summary counts it.
    """
    SegmentOptions(feather=feather)
    images, given = as_images(images)
    reads = frame_segs(segs, images)
    shared = not one_per_frame(segs)
    restorer = as_restorer(model)
    faces = segment_faces(images, reads, detector, cancel)
    notes = list(dict.fromkeys(note for read in reads for note in read.notes))
    result = SegsRestoration(images, segs, torch.zeros(images.shape[:3]), notes=notes, frames=len(images),
                             segments=sum(len(read.given) for read in reads))
    result.records = [(t, NO_FACE, describe(reads[t].segments[k])) for t, row in enumerate(faces)
                      for k, f in enumerate(row) if not len(f)]
    flat = [(t, k, f) for t, row in enumerate(faces) for k, f in enumerate(row) if len(f)]
    pasted = {}  # (frame, segment) -> (h, w, 3) restored crop region
    out = images
    if flat:
        info = find_faces(images, detector, restorer.size, SelectOptions(template=template),
                          faces=[Faces.joined([Faces.empty(), *row]) for row in faces])
        out, reruns = images.clone(), []
        for part in parts(len(flat), face_batch):  # cut and restored a face batch at a time
            crops = cut(images, info, part)
            restored = restorer.restore(crops, batch_size=face_batch,
                                        on_batch=progress and (lambda done, _, at=part.start: progress(at + done, len(flat))),
                                        cancel=cancel and (lambda: check_cancel(cancel)),
                                        on_rerun=reruns.append).to(info.device)
            for i in range(part.start, part.stop):
                check_cancel(cancel)
                (t, k, face), j = flat[i], i - part.start
                segment = reads[t].segments[k]
                region, weight, kept = paste_in_region(images[t:t + 1], restored[j:j + 1], crops[j:j + 1], info.affines[i],
                                                       face, restorer.size, segment.region, paste, masks)
                result.records.append((t, RESTORED if kept else LEFT, describe(segment, face)))
                if kept:
                    x0, y0, x1, y1 = segment.region
                    mask = soften_inside(segment.masks[t if len(segment.masks) > 1 else 0], feather)
                    here = out[t, y0:y1, x0:x1]
                    here += (match_channels(region, here) - here) * mask[..., None].to(here)
                    result.masks[t, y0:y1, x0:x1] = torch.maximum(result.masks[t, y0:y1, x0:x1], weight.cpu() * mask)
                    pasted[t, k] = region
            del crops, restored  # before the next batch is cut
        if sum(reruns):
            result.notes.append(rerun_note(sum(reruns)))
    result.records.sort(key=lambda record: record[0])
    result.images = like_given(out, given)
    size = tuple(images.shape[1:3])
    result.segs = (size, with_restored_crops(reads[0], images, pasted)) if shared else \
        [(size, with_restored_crops(read, images[t:t + 1], {(0, k): v for (u, k), v in pasted.items() if u == t}))
         for t, read in enumerate(reads)]
    return result


def describe(segment: Segment, face: Faces | None = None) -> str:
    """A segment as the summary lists it: "segment 3 face 0.998 40px" (its face's score and box side), or for
    one without a face its label and confidence: "segment 5 (person 0.90)"."""
    if face is None:
        return f"segment {segment.index} ({segment.seg.label} {float(segment.seg.confidence):.2f})"
    side = float(box_sides(face)[0])
    return f"segment {segment.index} face {float(face.scores[0]):.3f} {side:.0f}px"


def soften_inside(mask: torch.Tensor, feather: float) -> torch.Tensor:
    """A segment's mask (h, w) with its edge made soft inside it, over `feather` times the shorter side of what it
    covers (so a close-up's face fades over as much of itself as a small one's): where it was 0 it stays 0, and
    the crop region's border counts as an edge too, so the pasted face fades out before it."""
    rows, columns = mask.amax(1).nonzero(), mask.amax(0).nonzero()
    if feather <= 0 or not len(rows):
        return mask
    pixels = round(feather * min(int(rows[-1] - rows[0]) + 1, int(columns[-1] - columns[0]) + 1))
    if pixels < 1:
        return mask
    padded = F.pad(mask[None], (pixels,) * 4)
    return feather_inside(padded, pixels / 3 / padded.shape[-1])[0, pixels:-pixels, pixels:-pixels]


def paste_in_region(image: torch.Tensor, restored: torch.Tensor, crop: torch.Tensor, affine: torch.Tensor,
                    face: Faces, size: int, region: list[int], paste: PasteOptions,
                    masks: MaskOptions) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One restored face pasted into its frame (1, H, W, C) as restore_faces pastes it, cut to `region`: the
    crop region's RGB (h, w, 3), the blend weight there (h, w), and whether it was pasted at all. Only the
    window holding the region and the face's crop is worked on: the whole frame's pixels, to float rounding."""
    height, width = image.shape[1:3]
    # The window: the region and what the face covers, 1 px more for the bicubic look at the frame around it
    # (colour correction) where its edge falls on a whole pixel.
    covered = footprint(affine.double(), size, height, width)
    y0, y1, x0, x1 = covered if covered is not None else (region[1], region[3], region[0], region[2])
    wx0, wy0 = max(min(x0 - 1, region[0]), 0), max(min(y0 - 1, region[1]), 0)
    wx1, wy1 = min(max(x1 + 1, region[2]), width), min(max(y1 + 1, region[3]), height)
    local = part_to_crop(affine, wx0, wy0)[0]
    shift = torch.tensor([wx0, wy0], dtype=face.boxes.dtype)
    window = image[:, wy0:wy1, wx0:wx1]
    info = FaceInfo([Faces(face.boxes - shift.repeat(2), face.scores, face.landmarks - shift)], local.float()[None],
                    torch.zeros(1, dtype=torch.long), size, (wy1 - wy0, wx1 - wx0), restored.device, Selection())
    done = paste_restored(window, restored, info, replace(paste, background=None, upscale_by=1.0, upscaler=None),
                          masks, crops=crop)
    x0, y0, x1, y1 = region[0] - wx0, region[1] - wy0, region[2] - wx0, region[3] - wy0
    return as_rgb(done.images[:, y0:y1, x0:x1])[0], done.masks[0, y0:y1, x0:x1], not done.left_as_was


def with_restored_crops(read: ReadSegs, images: torch.Tensor, pasted: dict) -> list:
    """The SEGS' segments (in the image's size) with each restored one's cropped_image (frames, h, w, 3): its
    restored crop region in the frames where its face was found, the frame's own pixels in the others."""
    segments = list(read.given)
    for k, segment in enumerate(read.segments):
        if not any((t, k) in pasted for t in range(len(images))):
            continue
        x0, y0, x1, y1 = segment.region
        crops = torch.stack([pasted.get((t, k), as_rgb(images[t:t + 1, y0:y1, x0:x1])[0]).cpu()
                             for t in range(len(images))])
        mask = segment.masks.numpy()
        segments[segment.index] = segment.seg._replace(cropped_image=crops, crop_region=list(segment.region),
                                                       cropped_mask=mask[0] if len(mask) == 1 else mask)
    return segments


# SEGS as the selection of our pipeline.

def locate_faces_in_segs(images: torch.Tensor, segs, detector, crop_size: int,
                         options: SelectOptions = SelectOptions(), *,
                         cancel: Callable[[], bool | None] | None = None) -> tuple[torch.Tensor, FaceInfo, list[str]]:
    """Aligned crops and their FaceInfo (see pipeline.locate_faces), and notes on the SEGS, of the faces
    `detector` finds whose box centre lies on a segment of `segs` (inside its crop region, where its mask is
    over 0), listed frame by frame in the segments' order; `segs` is one SEGS for every frame, or a list of
    one per frame. Impact's SEGS filters so choose the faces our modular nodes restore. Faces outside every
    segment are counted in the summary."""
    images = as_images(images)[0]
    reads = frame_segs(segs, images)
    selection = Selection()
    found = detect_faces(images, detector, replace(options, max_faces=0, indices=""), selection=selection,
                         cancel=cancel)
    kept = []
    for t, faces in enumerate(found):
        owner = segment_of(faces, reads[t].segments, t)
        selection.skip(faces[owner < 0], OUTSIDE_SEGS, t)
        order = sorted((int(owner[i]), i) for i in range(len(faces)) if owner[i] >= 0)
        kept.append(faces[torch.tensor([i for _, i in order], dtype=torch.long)])
    crops, info = locate_faces(images, detector, crop_size, options, faces=kept, cancel=cancel)
    info.selection = selection
    return crops, info, list(dict.fromkeys(note for read in reads for note in read.notes))


def segment_of(faces: Faces, segments: list[Segment], frame: int) -> torch.Tensor:
    """(N,) the first segment on whose mask each face's box centre lies (its position in `segments`), or -1."""
    owner = torch.full((len(faces),), -1, dtype=torch.long)
    centres = ((faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2).tolist()
    for i, (x, y) in enumerate(centres):
        for k, segment in enumerate(segments):
            x0, y0, x1, y1 = segment.region
            if x0 <= x < x1 and y0 <= y < y1:
                mask = segment.masks[frame if len(segment.masks) > 1 else 0]
                if mask[int(y) - y0, int(x) - x0] > 0:
                    owner[i] = k
                    break
    return owner

