"""Face detection on ComfyUI image batches: RetinaFace in torch, or insightface's SCRFD.

`load_detector(path)` recognises the file; `detector.detect(images)` takes (B,H,W,3) float 0..1 and
returns one `Faces` per image, in image pixels, best score first. Both handles share the scale policy
(`detection_scales`, `merge_scales`, `one_box_per_face`), and `rotations` looks at frames turned
(`TurningDetector`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..archs.onnx import SCRFD
from ..archs.retinaface import SPEC as RETINAFACE
from ..archs.retinaface import RetinaFace, decode, fold_batch_norms, prior_boxes
from ..archs.working_memory import forward_bytes, weight_bytes
from ..files.weights import CheckpointError, first_line
from .options import SelectOptions
from .tensors import as_rgb, check_frames

BGR_MEAN = (104.0, 117.0, 123.0)
DEFAULT_THRESHOLD = 0.5  # for a detector that names no default of its own: the detector libraries' usual one
log = logging.getLogger("gpen")


@dataclass
class Faces:
    """Faces found in one image: boxes (N,4) xyxy px, scores (N), landmarks (N,5,2) px.

    Landmark order: left eye, right eye, nose, left mouth corner, right mouth corner, as seen in the image.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, index) -> "Faces":
        return Faces(self.boxes[index], self.scores[index], self.landmarks[index])

    @classmethod
    def empty(cls) -> "Faces":
        return cls(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2))

    @classmethod
    def joined(cls, parts: list["Faces"]) -> "Faces":
        return cls(*(torch.cat([getattr(f, name) for f in parts]) for name in ("boxes", "scores", "landmarks")))


@runtime_checkable
class Detector(Protocol):
    """Finds faces: one `Faces` per image of a (B,H,W,3) float 0..1 batch, in image pixels, best first.
    Its `threshold` attribute, where it has one, is the score a face must pass by default."""

    def detect(self, images: torch.Tensor, threshold: float = 0.5, nms_threshold: float = 0.4,
               top_k: int = 5000) -> list[Faces]: ...


def threshold_for(detector, threshold: float | None = 0) -> float:
    """The score a face must pass: `threshold`, or where it is 0 (or None) the detector's own default.
    NaN or infinity is refused: no score passes it, and every face would be dropped without a word."""
    if threshold:
        return SelectOptions(threshold=threshold).threshold
    return getattr(detector, "threshold", DEFAULT_THRESHOLD)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) intersection over union of xyxy boxes."""
    area = lambda x: (x[:, 2] - x[:, 0]).clamp(min=0) * (x[:, 3] - x[:, 1]).clamp(min=0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices kept by greedy NMS, best first, computed without a Python loop over boxes.

    Cluster-NMS: iterating 'keep the boxes not overlapped by a kept, better box' reaches the exact
    greedy result in a few matrix steps, which suits GPUs.
    """
    order = scores.argsort(descending=True)
    boxes = boxes[order]
    overlaps = torch.triu(box_iou(boxes, boxes) > iou_threshold, diagonal=1).float()  # [i, j]: better i overlaps j
    keep = torch.ones(len(boxes), device=boxes.device)
    for _ in range(len(boxes)):
        new_keep = (keep @ overlaps == 0).float()
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return order[keep.bool()]


# The scale policy. RetinaFace and SCRFD anchors span 16-512 px: a face larger than about 400 px at
# the scale it is detected at breaks into several partial boxes, and one smaller than about 16 px is
# missed. "auto" detects twice, at most FINE_SIDE on the long side for small faces and at COARSE_SIDE
# for large ones, and keeps each face from the pass that sees it at a workable size.
FINE_SIDE = 1600
COARSE_SIDE = 640
FINE_MAX_FACE = 400  # px at the fine scale: larger faces are left to the coarse pass
COARSE_MIN_FACE = 64  # px at the coarse scale: smaller faces are left to the fine pass
MIN_SHORT_SIDE = 32  # a pass keeps the image's short side at least this long (the coarsest stride)
SAME_FACE_IOU = 0.3  # two boxes overlapping more than this are one face
SAME_FACE_INSIDE = 0.6  # as is a box with this much of its area inside another
# The most pixels one detection pass (all its frames together) sees: a 4K UHD frame's. RetinaFace ResNet-50
# holds about 250 bytes a pixel of its input at its peak (BENCHMARKS.md), so this is ~2 GB; detect_size 8192
# on a 1080p frame asked for 38 MP (9 GB), on a 64x64 one 67 MP. "auto" never comes near it (at most 1600^2).
MAX_DETECT_PIXELS = 3840 * 2160


def detection_scales(height: int, width: int, detect_size: int | str = "auto") -> list[float]:
    """The scales a frame is detected at: [fine, coarse] for "auto" (one when they coincide), or the one
    scale that gives the fixed long side `detect_size`, lowered where the frame would have more than
    MAX_DETECT_PIXELS at it (with a warning); none for a frame too thin to hold a face."""
    long, short = max(height, width), min(height, width)
    if short < MIN_SHORT_SIDE:
        return []
    if detect_size != "auto":
        scales = [min(int(detect_size) / long, largest_scale(height, width, int(detect_size)))]
    else:
        fine = min(1.0, max(FINE_SIDE / long, MIN_SHORT_SIDE / short))
        scales = [fine, COARSE_SIDE / long] if long * fine > COARSE_SIDE * 1.25 else [fine]
    return [s for s in scales if short * s >= MIN_SHORT_SIDE]  # a thinner image has no cell at stride 32


def largest_scale(height: int, width: int, detect_size: int | str = "auto") -> float:
    """The largest scale that keeps a frame within MAX_DETECT_PIXELS (warned about once per frame size)."""
    scale = math.sqrt(MAX_DETECT_PIXELS / (height * width))
    if detect_size != "auto" and int(detect_size) / max(height, width) > scale:
        _warn_lowered(height, width, int(detect_size), scale)
    return scale


@functools.lru_cache(maxsize=32)
def _warn_lowered(height: int, width: int, detect_size: int, scale: float) -> None:
    log.warning("detect_size %d on a %dx%d frame would detect %.0f MP at once; detecting at %dx%d, the most one "
                "pass takes (%.1f MP)", detect_size, width, height, (detect_size / max(height, width)) ** 2 * height *
                width / 1e6, round(width * scale), round(height * scale), MAX_DETECT_PIXELS / 1e6)


def frames_per_pass(height: int, width: int, scales: list[float], frames: int) -> int:
    """How many of `frames` frames of this size one pass takes without going over MAX_DETECT_PIXELS."""
    largest = max(scales, default=0) ** 2 * height * width
    return max(1, min(frames, int(MAX_DETECT_PIXELS // largest) if largest else frames))


def check_detect_size(detect_size) -> int | str:
    if detect_size == "auto":
        return detect_size
    try:
        side = int(detect_size)
    except (TypeError, ValueError):
        side = 0
    if not 64 <= side <= 8192:
        raise ValueError(f"detect_size must be 'auto' or a long side in pixels (64-8192), got {detect_size!r}")
    return side


def merge_scales(passes: list[tuple[float, Faces]]) -> Faces:
    """One face per face from several passes [(scale, faces in image px)], the first pass the finest:
    each pass keeps the faces it sees at a size its anchors hold, then overlapping boxes are merged."""
    if len(passes) < 2:
        return passes[0][1] if passes else Faces.empty()
    kept = []
    for i, (scale, faces) in enumerate(passes):
        side = (faces.boxes[:, 2:] - faces.boxes[:, :2]).amax(1) * scale
        workable = torch.ones_like(side, dtype=torch.bool)
        if i < len(passes) - 1:
            workable &= side <= FINE_MAX_FACE
        if i > 0:
            workable &= side >= COARSE_MIN_FACE
        kept.append(faces[workable])
    return Faces.joined(kept)


def one_box_per_face(faces: Faces) -> Faces:
    """Best first, drop every face that overlaps a kept one (IoU > 0.3) or lies largely inside one, or
    that a kept one lies largely inside: never two boxes for one face."""
    if len(faces) < 2:
        return faces
    area = (faces.boxes[:, 2:] - faces.boxes[:, :2]).clamp(min=0).prod(1)
    order = torch.tensor(sorted(range(len(faces)), key=lambda i: (-float(faces.scores[i]), -float(area[i]))))
    faces, area = faces[order], area[order]
    iou = box_iou(faces.boxes, faces.boxes)
    inter = iou * (area[:, None] + area[None, :]) / (1 + iou)
    inside = inter / torch.minimum(area[:, None], area[None, :]).clamp(min=1e-9)
    same = (iou > SAME_FACE_IOU) | (inside > SAME_FACE_INSIDE)
    keep: list[int] = []
    for i in range(len(faces)):
        if not any(same[i, j] for j in keep):
            keep.append(i)
    return faces[torch.tensor(keep)]


class RetinaFaceDetector:
    """RetinaFace (either backbone) in torch, its batch norms folded into its convolutions."""

    def __init__(self, net: RetinaFace, device: torch.device, detect_size: int | str = "auto",
                 frames_per_batch: int = 4):
        self.info, self.threshold = net.info, RETINAFACE.threshold
        self.net = fold_batch_norms(net.eval()).to(device).requires_grad_(False)
        self.device = device
        self.detect_size = check_detect_size(detect_size)
        self.frames_per_batch = frames_per_batch

    @property
    def name(self) -> str:
        return f"RetinaFace {self.net.backbone}"

    @property
    def memory_bytes(self) -> int:
        """What its weights take on its device, as a restorer's (the nodes tell ComfyUI's memory manager)."""
        return weight_bytes(self.net)

    def working_bytes(self, height: int, width: int, frames: int = 1) -> int:
        """What detecting `frames` frames of height x width takes on the device beyond the weights, at its
        largest pass: the pass's input at its scale in float32 and what RetinaFace makes (counted:
        archs/working_memory.py). Decoding the boxes comes after the forward's maps are freed and takes
        less; frames already on the device are not counted (ComfyUI's are on the CPU)."""
        scales = detection_scales(height, width, self.detect_size)
        step = frames_per_pass(height, width, scales, min(frames, self.frames_per_batch))

        def pass_bytes(scale: float) -> int:
            shape = (step, 3, max(1, round(height * scale)), max(1, round(width * scale)))
            return math.prod(shape) * 4 + forward_bytes(self.net, shape)

        return max(map(pass_bytes, scales), default=0)

    def to(self, device: torch.device | str) -> "RetinaFaceDetector":
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    def detect(self, images: torch.Tensor, threshold: float = 0, nms_threshold: float = 0.4,
               top_k: int = 5000) -> list[Faces]:
        """One `Faces` per image (B,H,W,C float 0..1), in image pixels, best score first; scoring over
        `threshold` (0: the network's own, its spec's)."""
        images = check_frames(images[None] if images.ndim == 3 else images)
        threshold = threshold_for(self, threshold)
        scales = detection_scales(*images.shape[1:3], self.detect_size)
        step = frames_per_pass(*images.shape[1:3], scales, self.frames_per_batch)
        results = []
        with torch.inference_mode():
            for start in range(0, len(images), step):
                chunk = images[start:start + step]
                passes = [(scale, self._detect_at(chunk, scale, threshold, nms_threshold, top_k)) for scale in scales]
                results += [one_box_per_face(merge_scales([(s, found[i]) for s, found in passes]))
                            for i in range(len(chunk))]
        return results

    def _detect_at(self, images: torch.Tensor, scale: float, threshold: float, nms_threshold: float,
                   top_k: int) -> list[Faces]:
        height, width = images.shape[1:3]
        x = self.network_input(images, scale)
        offsets, scores, landmark_offsets = self.net(x)
        boxes, points = decode(offsets, landmark_offsets, prior_boxes(*x.shape[-2:], device=x.device))
        sx, sy = width / x.shape[-1], height / x.shape[-2]
        boxes = boxes * boxes.new_tensor([sx, sy, sx, sy])
        points = points * points.new_tensor([sx, sy])
        return [candidates(b, s, p, threshold, nms_threshold, top_k) for b, s, p in zip(boxes, scores, points)]

    def network_input(self, images: torch.Tensor, scale: float) -> torch.Tensor:
        """(B,3,h,w) BGR minus the mean, as RetinaFace was trained, at `scale`. The frames are resized
        before anything else, so a large frame is never copied at full size."""
        size = (max(1, round(images.shape[1] * scale)), max(1, round(images.shape[2] * scale)))
        if scale < 1 and images.device.type == "cpu" and images.dtype == torch.float32:
            images = shrink(images, size)  # (then at the size asked: the branches below leave it)
        x = images.to(self.device).permute(0, 3, 1, 2)
        x = (x[:, :3] if x.shape[1] >= 3 else x.expand(-1, 3, -1, -1)).float()
        if x.shape[2:] != size:
            # Shrinking averages areas: antialiased bilinear would first make a full-height copy of the frame.
            x = F.interpolate(x, size=size, mode="area") if scale < 1 else \
                F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = readable(x.flip(1))  # (flip first: it makes the copy the rest works in)
        return x.mul_(255).sub_(x.new_tensor(BGR_MEAN).view(1, 3, 1, 1))


def readable(x: torch.Tensor) -> torch.Tensor:
    """`x` (a copy, changed in place) clamped to 0..1, its non-finite pixels read as black (NaN, -Inf) or
    white (+Inf): one NaN would spread through every convolution that sees it and take the scores of the
    faces around it (11 of 20 faces found), so the frame is detected as a viewer shows it, with a warning."""
    finite = torch.isfinite(x)
    if not finite.all():
        log.warning("detection read %d non-finite value(s) (NaN or Inf) of the image as black or white",
                    int((~finite).sum()))
        x.nan_to_num_(nan=0.0, posinf=1.0, neginf=0.0)
    return x.clamp_(0, 1)


def shrink(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B,H,W,C) float32 CPU frames shrunk to `size` by OpenCV's area averaging: exact pixel areas, and
    5x faster than torch's (adaptive pooling, 28 ms for a 1080p frame to 1600 px)."""
    shrunk = torch.empty(len(images), *size, images.shape[-1])
    for frame, target in zip(images, shrunk):
        into = target.numpy().reshape(target.shape if target.shape[-1] > 1 else size)  # OpenCV's shape for it
        cv2.resize(frame.numpy(), size[::-1], dst=into, interpolation=cv2.INTER_AREA)
    return shrunk


class ScrfdDetector:
    """insightface's SCRFD (det_10g.onnx of buffalo_l, scrfd_*_bnkps.onnx), run through insightface."""

    def __init__(self, model, device: torch.device, detect_size: int | str = "auto"):
        """`model`: insightface's SCRFD over the file's session (see archs.onnx.SCRFD)."""
        path = model.model_file
        try:
            model.prepare(0 if device.type == "cuda" else -1, input_size=(COARSE_SIDE, COARSE_SIDE))
        except Exception as e:  # insightface and onnxruntime raise assorted types for bad files
            raise CheckpointError(path, f"is not a usable SCRFD model ({first_line(e)})") from None
        if not getattr(model, "use_kps", False):
            raise CheckpointError(path, "is an SCRFD model without landmarks (use a *_bnkps or det_10g file)")
        self.model, self.info, self.device, self.threshold = model, model.info, device, SCRFD.threshold
        self.detect_size = check_detect_size(detect_size)
        self.name = f"SCRFD {os.path.basename(path)}"

    def detect(self, images: torch.Tensor, threshold: float = 0, nms_threshold: float = 0.4,
               top_k: int = 5000) -> list[Faces]:
        images = check_frames(images[None] if images.ndim == 3 else images)
        self.model.det_thresh, self.model.nms_thresh = threshold_for(self, threshold), nms_threshold
        scales = detection_scales(*images.shape[1:3], self.detect_size)
        results = []
        for image in images:
            rgb = readable(as_rgb(image))
            bgr = np.ascontiguousarray((rgb * 255).round().to(torch.uint8).flip(-1).cpu().numpy()[0])
            passes = [(scale, self._detect_at(bgr, scale)) for scale in scales]
            faces = one_box_per_face(merge_scales(passes))
            results.append(faces[:top_k] if top_k < 5000 else faces)
        return results

    def _detect_at(self, bgr: np.ndarray, scale: float) -> Faces:
        # insightface letterboxes the image into input_size (multiples of 32) and maps back to image px
        size = tuple(max(32, int(np.ceil(side * scale / 32)) * 32) for side in (bgr.shape[1], bgr.shape[0]))
        boxes, points = self.model.detect(bgr, input_size=size)
        faces = Faces(torch.from_numpy(boxes[:, :4]).float(), torch.from_numpy(boxes[:, 4]).float(),
                      torch.from_numpy(points).float().reshape(-1, 5, 2))
        return faces[faces.scores.argsort(descending=True)]


def detector_handle(network, device: torch.device, detect_size: int | str = "auto",
                    rotations: str = "none") -> Detector:
    """The handle for a detector network: RetinaFace's outputs are decoded here, insightface's SCRFD
    decodes its own; with `rotations` other than "none", it also looks at the frames turned."""
    rotations = check_rotations(rotations)
    handle = RetinaFaceDetector(network, device, detect_size) if isinstance(network, RetinaFace) \
        else ScrfdDetector(network, device, detect_size)
    return handle if rotations == "none" else TurningDetector(handle, rotations)


def candidates(boxes, scores, points, threshold, nms_threshold, top_k) -> Faces:
    """The detections of one pass over threshold, after the reference's NMS, best first."""
    keep = (scores > threshold).nonzero().squeeze(1)
    keep = keep[scores[keep].argsort(descending=True)[:top_k]]
    keep = keep[nms(boxes[keep], scores[keep], nms_threshold)]
    return Faces(boxes[keep].cpu(), scores[keep].cpu(), points[keep].cpu())


# Rotations. Both detectors were trained on upright faces: past about 20 degrees of roll they miss faces
# (BENCHMARKS.md), and a face on its side or upside down is missed or found with landmarks not on it.
# Turned passes look at the frame turned by each of TURNS (counterclockwise, as seen): the right angles
# exactly (torch.rot90, no resampling), the diagonals resampled, since a face at 45 degrees is
# as far from 0 as from 90. Every face is within 22.5 degrees of one pass, which sees it upright.
ROTATIONS = ("none", "auto", "all")
TURNS = (90, 180, 270, 45, 135, 225, 315)
# A pass keeps the faces whose landmarks it sees rolled under TILTED degrees; a face rolled more is left
# to the pass that sees it upright. A face from a turned pass must score CONFIDENT or more: the turned
# passes see the frame seven more times, and took parts of upside-down faces for faces at up to 0.88 in
# our photos. Upright faces there score over 0.98 and roll under 15 degrees.
TILTED = 30.0
CONFIDENT = 0.95
TURNED_FRAMES = 4  # frames turned at a time: a turned copy of a whole video chunk would double its memory


def check_rotations(rotations) -> str:
    if rotations not in ROTATIONS:
        raise ValueError(f"rotations must be one of {', '.join(ROTATIONS)}, got {rotations!r}")
    return rotations


def turn_affine(height: int, width: int, angle: int) -> tuple[torch.Tensor, int, int]:
    """The (2,3) float64 affine taking frame pixels to the frame turned by `angle` degrees
    counterclockwise (OpenCV's pixel centres, as landmarks are), and the turned frame's height and width:
    the whole frame, on a canvas that fits it. At 90 degrees pixel (x, y) goes to (y, W - 1 - x), as
    torch.rot90 moves it."""
    radians = np.deg2rad(angle)
    cos, sin = round(float(np.cos(radians)), 12), round(float(np.sin(radians)), 12)
    turned_w = round(abs(cos) * width + abs(sin) * height)
    turned_h = round(abs(sin) * width + abs(cos) * height)
    linear = torch.tensor([[cos, sin], [-sin, cos]], dtype=torch.float64)
    centre = torch.tensor([(width - 1) / 2, (height - 1) / 2], dtype=torch.float64)
    turned_centre = torch.tensor([(turned_w - 1) / 2, (turned_h - 1) / 2], dtype=torch.float64)
    return torch.cat([linear, (turned_centre - linear @ centre)[:, None]], 1), turned_h, turned_w


def turn_frames(frames: torch.Tensor, angle: int) -> torch.Tensor:
    """(B,H,W,C) frames turned by `angle` degrees counterclockwise, as `turn_affine` maps their pixels:
    exactly at right angles, resampled bilinearly (black outside the frame) at others."""
    if angle % 90 == 0:
        return torch.rot90(frames, angle // 90, (1, 2))
    affine, height, width = turn_affine(*frames.shape[1:3], angle)
    return torch.stack([torch.from_numpy(cv2.warpAffine(frame.numpy(), affine.numpy(), (width, height),
                                                        flags=cv2.INTER_LINEAR)).reshape(height, width, 3)
                        for frame in as_rgb(frames).cpu()])


def turn_back(faces: Faces, affine: torch.Tensor) -> Faces:
    """Faces found in a turned frame, in the frame's pixels: landmarks mapped exactly; each box keeps its
    sides (swapped when the turn is nearer a quarter than a half) around its mapped centre."""
    back = torch.linalg.inv(torch.cat([affine, affine.new_tensor([[0, 0, 1]])]))[:2]
    to_frame = lambda points: (points.double() @ back[:, :2].T + back[:, 2]).float()
    sides = faces.boxes[:, 2:] - faces.boxes[:, :2]
    if abs(affine[0, 1]) > abs(affine[0, 0]):
        sides = sides.flip(1)
    centres = to_frame((faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2)
    return Faces(torch.cat([centres - sides / 2, centres + sides / 2], 1), faces.scores, to_frame(faces.landmarks))


def seen_upright(faces: Faces) -> torch.Tensor:
    """(N,) bool: faces whose eye line and eyes-to-mouth line are both rolled under TILTED degrees."""
    points = faces.landmarks
    eyes = points[:, 1] - points[:, 0]
    down = (points[:, 3] + points[:, 4] - points[:, 0] - points[:, 1]) / 2
    roll = torch.stack([torch.atan2(eyes[:, 1], eyes[:, 0]), torch.atan2(-down[:, 0], down[:, 1])])
    return (roll.abs().rad2deg() < TILTED).all(0)


def suggests_turned_faces(faces: Faces) -> bool:
    """Whether an upright pass's faces hint at faces at other angles: none at all, or one it sees rolled
    or scores under CONFIDENT (how faces at other angles come out of it)."""
    return len(faces) == 0 or bool((faces.scores < CONFIDENT).any() or not seen_upright(faces).all())


class TurningDetector:
    """A detector that also looks at each frame turned by TURNS: on every frame ("all"), or on the frames
    whose upright pass suggests faces at other angles ("auto"). Each face is kept once, from the pass
    that scores it best (IoU as `one_box_per_face`), in the frame's pixels: alignment then crops it
    upright and paste-back puts it back at its angle."""

    def __init__(self, detector: Detector, rotations: str):
        self.upright, self.rotations = detector, check_rotations(rotations)

    def __getattr__(self, name):  # name, info, device, detect_size...: the upright detector's
        if name == "upright":  # (not set yet: while unpickling)
            raise AttributeError(name)
        return getattr(self.upright, name)

    def to(self, device: torch.device | str) -> "TurningDetector":
        self.upright.to(device)
        return self

    def working_bytes(self, height: int, width: int, frames: int = 1) -> int:
        """The upright detector's, on the frames and on the largest turned canvas (at 45 degrees), which
        it sees TURNED_FRAMES at a time (SCRFD's: none, see working_bytes in faces/run_memory.py)."""
        working = getattr(self.upright, "working_bytes", None)
        if working is None:
            return 0
        _, turned_height, turned_width = turn_affine(height, width, 45)
        return max(working(height, width, frames), working(turned_height, turned_width, min(frames, TURNED_FRAMES)))

    def detect(self, images: torch.Tensor, *args, **kwargs) -> list[Faces]:
        if images.ndim == 3:
            images = images[None]
        found = self.upright.detect(images, *args, **kwargs)
        turned = [i for i, faces in enumerate(found) if self.rotations == "all" or suggests_turned_faces(faces)]
        for start in range(0, len(turned), TURNED_FRAMES):
            frames = turned[start:start + TURNED_FRAMES]
            passes = [[faces[seen_upright(faces)]] for faces in (found[i] for i in frames)]
            for angle in TURNS:
                affine = turn_affine(*images.shape[1:3], angle)[0]
                seen = self.upright.detect(turn_frames(images[frames], angle), *args, **kwargs)
                for kept, faces in zip(passes, seen):
                    kept.append(turn_back(faces[seen_upright(faces) & (faces.scores >= CONFIDENT)], affine))
            for i, kept in zip(frames, passes):
                found[i] = one_box_per_face(Faces.joined(kept))
        return found
