"""restore_faces: detect, select, align, restore and paste back every face of a batch of frames."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from .align import crop_faces
from .blend import GPEN_ERODE, GPEN_FEATHER, paste_faces
from .detection import Faces, box_iou
from .images import as_rgb, match_channels
from .restorer import check_strength

ORDERS = ("largest", "left-right", "top-bottom", "confidence")
MIN_DETECT_SIDE = 32  # below this RetinaFace's coarsest level has no cell; nothing is detected


class Cancelled(Exception):
    """Raised when the cancel hook asks to stop; nothing already returned is affected."""


@dataclass
class Restoration:
    images: torch.Tensor  # (B,H,W,C) like the input
    masks: torch.Tensor  # (B,H,W) the blend masks
    faces: list[Faces]  # per frame, the faces that were restored
    affines: torch.Tensor = field(repr=False)  # (N,2,3) image -> crop
    frames: torch.Tensor = field(repr=False)  # (N,) frame of each face

    @property
    def face_count(self) -> int:
        return sum(len(f) for f in self.faces)

    @property
    def summary(self) -> str:
        if not self.faces:
            return "no images"
        if self.face_count == 0:
            return "no face found; images returned unchanged"
        missing = sum(1 for f in self.faces if not len(f))
        text = f"restored {self.face_count} face(s) in {len(self.faces)} image(s)"
        return text + (f"; no face found in {missing} of them" if missing else "")


def select_faces(faces: Faces, min_size: float = 0, max_faces: int = 0, order: str = "largest",
                 indices: str | list[int] | None = None) -> Faces:
    """Faces of one frame kept by size, sorted, then picked by index ("0,2") and capped at max_faces."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    sides = torch.minimum(faces.boxes[:, 2] - faces.boxes[:, 0], faces.boxes[:, 3] - faces.boxes[:, 1])
    faces = faces[sides >= min_size]
    keys = {"largest": lambda f: -(f.boxes[:, 2] - f.boxes[:, 0]) * (f.boxes[:, 3] - f.boxes[:, 1]),
            "left-right": lambda f: f.boxes[:, 0], "top-bottom": lambda f: f.boxes[:, 1],
            "confidence": lambda f: -f.scores}
    faces = faces[keys[order](faces).argsort(stable=True)]
    if indices not in (None, "", []):
        wanted = parse_indices(indices) if isinstance(indices, str) else list(indices)
        faces = faces[torch.tensor([i for i in wanted if 0 <= i < len(faces)], dtype=torch.long)]
    return faces[:max_faces] if max_faces > 0 else faces


def parse_indices(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"face indices must be comma-separated numbers like '0,2', got {text!r}") from None


def smooth_landmarks(faces: list[Faces], sigma: float = 1.5, min_iou: float = 0.3) -> list[Faces]:
    """Steady landmarks across video frames: faces are linked frame to frame by box overlap, and
    each track's landmarks are fitted with Gaussian-weighted local lines over time (sigma in frames)."""
    if sigma <= 0 or len(faces) < 2:
        return faces
    tracks: list[list[tuple[int, int]]] = []  # (frame, face index) along each track
    open_tracks: dict[int, int] = {}  # face index in the previous frame -> track
    for t, frame_faces in enumerate(faces):
        matched: dict[int, int] = {}
        if t and len(frame_faces) and len(faces[t - 1]):
            iou = box_iou(faces[t - 1].boxes, frame_faces.boxes)
            while iou.numel() and iou.max() >= min_iou:
                prev, cur = divmod(int(iou.argmax()), iou.shape[1])
                matched[cur] = open_tracks[prev]
                iou[prev, :], iou[:, cur] = -1, -1
        open_tracks = {}
        for i in range(len(frame_faces)):
            track = matched.get(i)
            if track is None:
                track = len(tracks)
                tracks.append([])
            tracks[track].append((t, i))
            open_tracks[i] = track
    smoothed = [Faces(f.boxes, f.scores, f.landmarks.clone()) for f in faces]
    for track in tracks:
        times = torch.tensor([t for t, _ in track], dtype=torch.float64)
        points = torch.stack([faces[t].landmarks[i] for t, i in track]).double()
        for (t, i), p in zip(track, torch.einsum("ts,skd->tkd", local_linear_weights(times, sigma), points)):
            smoothed[t].landmarks[i] = p.to(faces[t].landmarks.dtype)
    return smoothed


def local_linear_weights(times: torch.Tensor, sigma: float) -> torch.Tensor:
    """(T,T) weights of a Gaussian-weighted straight-line fit around each time: steady motion passes
    through unchanged, even at the ends of a track, while jitter is averaged away."""
    d = times[None, :] - times[:, None]  # [t, s] = s - t
    w = torch.exp(-d.square() / (2 * sigma ** 2))
    s0, s1, s2 = w.sum(1, keepdim=True), (w * d).sum(1, keepdim=True), (w * d.square()).sum(1, keepdim=True)
    det = s0 * s2 - s1.square()
    linear = w * (s2 - s1 * d) / det.clamp(min=1e-12)
    return torch.where(det > 1e-9, linear, w / s0)


def detect_faces(images: torch.Tensor, detector, *, threshold: float = 0.5, min_size: float = 0,
                 max_faces: int = 0, order: str = "largest", indices: str | None = None,
                 temporal_sigma: float = 0.0) -> list[Faces]:
    """The faces to restore in each frame: detected, selected, and steadied across frames."""
    found = detector.detect(as_rgb(images), threshold=threshold)
    faces = [select_faces(f, min_size, max_faces, order, indices) for f in found]
    return smooth_landmarks(faces, temporal_sigma)


def faces_to_crop(faces: list[Faces]) -> tuple[torch.Tensor, torch.Tensor]:
    """All frames' landmarks (N,5,2) and the frame of each face (N,), ready for crop_faces."""
    landmarks = torch.cat([f.landmarks for f in faces]) if faces else torch.zeros(0, 5, 2)
    frames = torch.cat([torch.full((len(f),), t, dtype=torch.long) for t, f in enumerate(faces)]) if faces \
        else torch.zeros(0, dtype=torch.long)
    return landmarks, frames


def restore_faces(images: torch.Tensor, model, detector, *, threshold: float = 0.5, min_size: float = 0,
                  max_faces: int = 0, order: str = "largest", indices: str | None = None,
                  template: str = "gpen", strength: float = 1.0, mask_shape: str = "box",
                  erode: float = GPEN_ERODE, feather: float = GPEN_FEATHER, color_correction: bool = False,
                  smooth_small_faces: bool = True, temporal_sigma: float = 0.0, face_batch: int = 4,
                  faces: list[Faces] | None = None, progress: Callable[[int, int], None] | None = None,
                  cancel: Callable[[], bool | None] | None = None, timings: dict | None = None) -> Restoration:
    """Restore every face in a batch of frames (B,H,W,C float 0..1; C = 1, 3 or 4).

    `model` is any restorer with `.size` and `restore(faces, batch_size, on_batch)` (a GPEN model);
    `detector` has `detect(images, threshold)`. Faces from all frames are restored together in
    batches of `face_batch`; `progress(done, total)` follows them and `cancel()` is asked between
    batches (return True, or raise, to stop: Cancelled is raised). Frames without faces come back
    unchanged; the result's `summary` says so. A `timings` dict receives each stage's seconds.
    `faces` (one `Faces` per frame, from `detect_faces`) skips detection and selection, for callers that
    detect a longer sequence first (smoothing landmarks across all of it) and restore it in parts.
    """
    check_strength(strength)
    # Crops and paste-back run where the detector runs (the GPU when there is one); results come home.
    rgb = as_rgb(images).to(getattr(detector, "device", images.device))
    batch, height, width = rgb.shape[:3]
    if batch == 0 or min(height, width) < MIN_DETECT_SIDE:
        return _unchanged(images, [Faces.empty() for _ in range(batch)])
    _check_cancel(cancel)
    if faces is None:
        with _stage(timings, "detect", rgb.device):
            faces = detect_faces(rgb, detector, threshold=threshold, min_size=min_size, max_faces=max_faces,
                                 order=order, indices=indices, temporal_sigma=temporal_sigma)
    elif len(faces) != batch:
        raise ValueError(f"faces must hold one entry per frame: {len(faces)} for {batch} frames")
    if not any(len(f) for f in faces):
        return _unchanged(images, faces)
    landmarks, frames = faces_to_crop(faces)
    with _stage(timings, "crop", rgb.device):
        crops, affines = crop_faces(rgb, landmarks, model.size, frames, template=template)

    def on_batch(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)
        _check_cancel(cancel)

    with _stage(timings, "restore", rgb.device):
        restored = model.restore(crops, batch_size=face_batch, on_batch=on_batch)
    with _stage(timings, "paste", rgb.device):
        pasted, masks = paste_faces(rgb, restored, affines, frames, strength=strength, mask_shape=mask_shape,
                                    erode=erode, feather=feather, color_correction=color_correction,
                                    smooth_small_faces=smooth_small_faces)
        pasted = match_channels(pasted.to(images.device), images)
    return Restoration(pasted, masks.to(images.device), faces, affines, frames)


@contextmanager
def _stage(timings: dict | None, name: str, device: torch.device):
    if timings is None:
        yield
        return
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    yield
    sync()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _check_cancel(cancel) -> None:
    if cancel is not None and cancel():
        raise Cancelled("face restoration was cancelled")


def _unchanged(images: torch.Tensor, faces: list[Faces]) -> Restoration:
    shape = images.shape if images.ndim == 4 else (1, *images.shape)
    return Restoration(images.reshape(shape).clone(), torch.zeros(shape[:3]), faces,
                       torch.zeros(0, 2, 3), torch.zeros(0, dtype=torch.long))
