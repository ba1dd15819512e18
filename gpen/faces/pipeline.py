"""restore_faces: detect, select, align, restore and paste back every face of a batch of frames.

The stages are plain functions over batched tensors: `locate_faces` (detect, select, steady, align)
gives a `FaceInfo`, a restorer restores its crops, `paste_faces` blends them back. Frames are handled
one at a time where the whole batch would be copied, so memory stays near the input's own.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .align import FramesOn, cut_faces, face_affines, warp_faces
from .detect import Faces, threshold_for
from .masks import MasksOverTime
from .options import MaskOptions, PasteOptions, SelectOptions
from .parse import parse_faces
from .paste import Canvas, check_background, check_output_size, not_larger, paste_faces, paste_target, scale_affines
from .restore import as_restorer, finite_faces, rerun_note, unrestored_note
from .tensors import as_images, as_rgb, check_finite, like_given
from .tracks import choose_tracks, face_tracks, selects_tracks

GPEN_SIZES = (256, 512, 1024, 2048)
FIT = 1.5  # a restorer this many times larger or smaller than the faces at the output is worth a note
MIN_DETECT_SIDE = 32  # below this RetinaFace's coarsest level has no cell; nothing is detected
DETECT_CHUNK = 4  # frames detected between two looks at the cancel hook
CHANGED_FROM = "changed_from (the image before the swap)"
log = logging.getLogger("gpen")


class Cancelled(Exception):
    """Raised when the cancel hook asks to stop; nothing already returned is affected."""


# Why a face found was not restored, as the report says it (Selection.skipped_counts' keys).
BELOW_THRESHOLD, TOO_SMALL, NOT_SELECTED, NOT_CHANGED = "below threshold", "too small", "not selected", "not changed"
NOT_FINITE, MASKED_OUT = "left unrestored", "masked out"
OUTSIDE_SEGS = "outside the SEGS"  # faces no segment of the given SEGS holds (segs.locate_faces_in_segs)
REASONS = (BELOW_THRESHOLD, TOO_SMALL, NOT_SELECTED, NOT_CHANGED, OUTSIDE_SEGS, NOT_FINITE, MASKED_OUT)  # in order
BELOW_THRESHOLD_FLOOR = 0.3  # detections from here up to the threshold are reported as below it
MAX_RECORDS = 256  # skipped faces a Selection keeps the details of (all are counted)


@dataclass(frozen=True)
class FaceRecord:
    """A face found and skipped, for the report: its frame, detector score, box side (px) and why."""

    frame: int
    score: float
    size: float
    reason: str


@dataclass
class Selection:
    """What detection and selection made of the faces, for the summary."""

    found: int = 0  # faces detected, all frames
    too_small: int = 0  # of those, under min_size
    min_size: float = 0
    missing_indices: dict[int, int] = field(default_factory=dict)  # index asked for -> most faces any frame had
    compared: int | None = None  # faces compared with the image before a swap (changed_from)
    changed: int = 0  # of those, the ones that differ
    frames: int = 0  # frames selected from so far: the next one's number
    threshold: float = 0
    chosen_by: str = ""  # "max_faces 3", "indices 0,2": what not selected faces were left out by
    skipped: list[FaceRecord] = field(default_factory=list)  # the first MAX_RECORDS faces skipped
    skipped_counts: dict[str, int] = field(default_factory=dict)  # reason -> faces skipped for it

    def __post_init__(self):
        # A Selection read back from JSON (a Ray segment's record) has its records as dicts.
        self.skipped = [r if isinstance(r, FaceRecord) else FaceRecord(**r) for r in self.skipped]

    def add(self, other: "Selection") -> None:
        """Count in what `other` found in another part of the same sequence."""
        self.found += other.found
        self.too_small += other.too_small
        self.min_size = other.min_size or self.min_size
        for index, count in other.missing_indices.items():
            self.missing_indices[index] = max(self.missing_indices.get(index, 0), count)
        if other.compared is not None:
            self.compared = (self.compared or 0) + other.compared
            self.changed += other.changed
        self.threshold, self.chosen_by = other.threshold or self.threshold, other.chosen_by or self.chosen_by
        room = MAX_RECORDS - len(self.skipped)
        self.skipped += [replace(r, frame=r.frame + self.frames) for r in other.skipped[:max(room, 0)]]
        for reason, count in other.skipped_counts.items():
            self.skipped_counts[reason] = self.skipped_counts.get(reason, 0) + count
        self.frames += other.frames

    def skip(self, faces: Faces, reason: str, frame: int | torch.Tensor | None = None) -> None:
        """Record `faces` as skipped for `reason`, in `frame` (one, or one per face; by default the
        frame being selected)."""
        if not len(faces):
            return
        self.skipped_counts[reason] = self.skipped_counts.get(reason, 0) + len(faces)
        if not isinstance(frame, torch.Tensor):
            frame = torch.full((len(faces),), self.frames if frame is None else frame)
        frames = frame.tolist()
        room = MAX_RECORDS - len(self.skipped)
        for t, score, side in list(zip(frames, faces.scores.tolist(), box_sides(faces).tolist()))[:max(room, 0)]:
            self.skipped.append(FaceRecord(int(t), score, side, reason))

    def notes(self) -> list[str]:
        notes = [] if self.compared is None else [f"{self.changed} of {self.compared} faces changed"]
        if self.too_small:
            notes.append(f"{self.too_small} face(s) found smaller than min_size {self.min_size:g}")
        for index, count in sorted(self.missing_indices.items()):
            notes.append(f"indices {index}: only {count} face(s) found")
        return notes

    def reason_text(self, reason: str) -> str:
        """`reason` with the setting behind it: "below threshold 0.8", "not selected (max_faces 3)"."""
        detail = {BELOW_THRESHOLD: f" {self.threshold:g}", TOO_SMALL: f" (min_size {self.min_size:g})",
                  NOT_SELECTED: f" ({self.chosen_by})" if self.chosen_by else "",
                  NOT_CHANGED: " (changed_from)", NOT_FINITE: " (not finite)", MASKED_OUT: " (parser)"}
        return reason + detail.get(reason, "")


@dataclass
class FaceInfo:
    """Where each aligned crop comes from: what Detect and Crop Faces hands to Paste Faces Back, and
    what restore_faces reports. Crops are listed frame by frame, in each frame's selection order."""

    faces: list[Faces]  # per frame, the selected faces
    affines: torch.Tensor  # (N,2,3) image -> crop pixels
    frames: torch.Tensor  # (N,) frame of each crop
    crop_size: int
    image_size: tuple[int, int]  # (H, W)
    device: torch.device  # where crops were cut; pasting runs there too
    selection: Selection = field(default_factory=Selection)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def landmarks(self) -> torch.Tensor:
        return torch.cat([f.landmarks for f in self.faces]) if self.faces else torch.zeros(0, 5, 2)

    def faces_flat(self) -> Faces:
        """Every crop's face, in crop order."""
        if not self.faces:
            return Faces.empty()
        return Faces(*(torch.cat([getattr(f, name) for f in self.faces]) for name in ("boxes", "scores", "landmarks")))


@dataclass
class Restoration:
    images: torch.Tensor  # like the input: same type (tensor or numpy), shape, dtype, range and device
    masks: torch.Tensor  # (B,H,W) the blend masks
    info: FaceInfo = field(repr=False)
    unrestored: int = 0  # faces left as they were: the restorer's output was not finite
    masked_out: int = 0  # faces left as they were: the face parser found none of the wanted regions
    timings: dict[str, float] = field(default_factory=dict)  # seconds each stage took
    restorer_size: int | None = None  # the restored crops' side
    left_as_was: dict[int, str] = field(default_factory=dict)  # crop -> why it was not pasted (NOT_FINITE, MASKED_OUT)
    rerun_fp32: int = 0  # faces the restorer ran again in float32: not finite in fp16 or bf16

    @property
    def output_face_px(self) -> torch.Tensor:
        """(N,) the side each face's aligned crop covers in the output's pixels."""
        scale = self.images.shape[-2] / self.info.image_size[1]
        return self.info.crop_size * scale / self.info.affines[:, :, :2].det().abs().sqrt()

    @property
    def faces(self) -> list[Faces]:
        return self.info.faces

    @property
    def face_count(self) -> int:
        return len(self.info) - self.unrestored - self.masked_out

    @property
    def summary(self) -> str:
        faces = self.info.faces
        if not faces:
            return "no images"
        notes = self.info.selection.notes()
        lead, notes = (notes[:1], notes[1:]) if self.info.selection.compared is not None else ([], notes)  # "3 of 29 faces changed"
        if self.rerun_fp32:
            notes.append(rerun_note(self.rerun_fp32))
        if self.unrestored:
            notes.append(unrestored_note(self.unrestored))
        if self.masked_out:
            notes.append(f"{self.masked_out} face(s) left as they were: the face parser found none of mask_regions in them")
        if not self.face_count:
            found = "no face found" if not self.info.selection.found else "no face restored"
            kept = "unchanged" if self.images.shape[-3:-1] == tuple(self.info.image_size) else "only enlarged"
            return "; ".join([*lead, found, *notes, f"images returned {kept}"])
        missing = sum(1 for f in faces if not len(f))
        text = f"restored {self.face_count} face(s) in {len(faces)} image(s)"
        fit = model_fit(self.output_face_px.tolist(), self.restorer_size or self.info.crop_size)
        return "; ".join([*lead, text, *([f"no face found in {missing} of them"] if missing else []), *notes,
                          *([fit] if fit else [])])

    @property
    def report(self) -> str:
        """The summary, then each face restored (crop index, detector score, box side in px) and each
        skipped, with why, frame by frame: what the nodes' summary output and the CLI show."""
        return face_report(self.info, self.summary, "restored", self.left_as_was)


MAX_LISTED = 6  # faces listed in one line of a report; the rest are counted
MAX_FRAME_LINES = 8  # frames given a line of their own in a report


def face_report(info: FaceInfo, headline: str, verb: str = "restored",
                left_as_was: dict[int, str] | None = None) -> str:
    """`headline`, then a line for each frame with faces: the faces `verb` ("face 3 0.998 212px": crop
    index, detector score, box side) and those skipped, by reason ("2 too small (min_size 64): ...").
    A batch gets a line of totals first, and lines for its first MAX_FRAME_LINES such frames only."""
    left_as_was = left_as_was or {}
    selection = info.selection
    groups: dict[int, dict[str, list[str]]] = {}  # frame -> verb or reason -> faces
    faces = info.faces_flat()
    for k, (t, score, side) in enumerate(zip(info.frames.tolist(), faces.scores.tolist(), box_sides(faces).tolist())):
        groups.setdefault(t, {}).setdefault(left_as_was.get(k, verb), []).append(f"face {k} {score:.3f} {side:.0f}px")
    for r in sorted(selection.skipped, key=lambda r: (r.frame, -r.score)):
        groups.setdefault(r.frame, {}).setdefault(r.reason, []).append(f"{r.score:.3f} {r.size:.0f}px")
    order = (verb, *REASONS)
    text = lambda group: group if group == verb else selection.reason_text(group)
    lines = [headline]
    if len(info.faces) > 1:
        counts = {verb: len(info) - len(left_as_was), **selection.skipped_counts}
        for reason in left_as_was.values():
            counts[reason] = counts.get(reason, 0) + 1
        lines.append(f"{len(info.faces)} frames: " + ", ".join(f"{counts[g]} {text(g)}" for g in order if g in counts))
    return "\n".join(lines + frame_lines(groups, order, len(info.faces) == 1, "faces", text))


def listed(items: list[str]) -> str:
    """Items of a report line: the first MAX_LISTED, and how many more."""
    more = len(items) - MAX_LISTED
    return ", ".join(items[:MAX_LISTED]) + (f", ... and {more} more" if more > 0 else "")


def frame_lines(groups: dict[int, dict[str, list[str]]], order: tuple[str, ...], one_image: bool, what: str,
                text: Callable[[str], str] = str) -> list[str]:
    """A report's line for each frame of `groups` (frame -> group -> items), the first MAX_FRAME_LINES frames
    only: "frame 3: " ("image: " for `one_image`), then each group in `order` it has, counted, named by
    `text(group)`, and its items listed; then how many more frames with `what` there are."""
    frames = sorted(groups)
    lines = [("image: " if one_image else f"frame {t}: ") +
             "; ".join(f"{len(groups[t][g])} {text(g)}: {listed(groups[t][g])}" for g in order if g in groups[t])
             for t in frames[:MAX_FRAME_LINES]]
    if len(frames) > MAX_FRAME_LINES:
        lines.append(f"... and {len(frames) - MAX_FRAME_LINES} more frame(s) with {what}")
    return lines


def box_sides(faces: Faces) -> torch.Tensor:
    """(N,) each face box's shorter side, px."""
    return torch.minimum(faces.boxes[:, 2] - faces.boxes[:, 0], faces.boxes[:, 3] - faces.boxes[:, 1])


def model_fit(face_px: list[float], size: int) -> str | None:
    """A note when a restorer of `size` is more than FIT times larger or smaller than the faces' aligned crops
    at the output (`face_px`, their sides in output pixels; the median counts), naming the GPEN that fits."""
    if not face_px:
        return None
    median = sorted(face_px)[len(face_px) // 2]
    if 1 / FIT <= median / size <= FIT:
        return None
    best = min(GPEN_SIZES, key=lambda n: abs(math.log(median / n)))
    faces = f"faces cover ~{median:.0f} px at the output" + (f" (median of {len(face_px)})" if len(face_px) > 1 else "")
    if best != size:
        return f"{faces}; GPEN-BFR-{best} fits them"
    return f"{faces}, more than GPEN-BFR-{size}, the largest, restores" if median > size else None


def select_faces(faces: Faces, options: SelectOptions = SelectOptions(), selection: Selection | None = None) -> Faces:
    """Faces of one frame kept by size (`min_size`), sorted (`order`), then picked by index (`indices`,
    "0,2"; repeats dropped) and capped at `max_faces`. `selection`, when given, counts what was left
    out, for the summary."""
    selection = selection if selection is not None else Selection()
    selection.found += len(faces)
    selection.min_size = options.min_size
    sides = box_sides(faces)
    selection.too_small += int((sides < options.min_size).sum())
    selection.skip(faces[sides < options.min_size], TOO_SMALL)
    faces = faces[sides >= options.min_size]
    keys = {"largest": lambda f: -(f.boxes[:, 2] - f.boxes[:, 0]) * (f.boxes[:, 3] - f.boxes[:, 1]),
            "left-right": lambda f: f.boxes[:, 0], "top-bottom": lambda f: f.boxes[:, 1],
            "confidence": lambda f: -f.scores}
    faces = faces[keys[options.order](faces).argsort(stable=True)]
    wanted = options.wanted
    chosen = torch.ones(len(faces), dtype=torch.bool)
    if wanted is not None:
        for i in wanted:
            if not 0 <= i < len(faces):
                selection.missing_indices[i] = max(selection.missing_indices.get(i, 0), len(faces))
        picked = torch.tensor([i for i in wanted if 0 <= i < len(faces)], dtype=torch.long)
        chosen[:] = False
        chosen[picked[:options.max_faces] if options.max_faces > 0 else picked] = True
        faces, left = faces[picked], faces[~chosen]
    else:
        chosen[options.max_faces if options.max_faces > 0 else len(faces):] = False
        left = faces[~chosen]
    selection.chosen_by = chosen_by(options)
    selection.skip(left, NOT_SELECTED)
    selection.frames += 1
    return faces[:options.max_faces] if options.max_faces > 0 else faces


def smooth_landmarks(faces: list[Faces], sigma: float = 1.5, min_iou: float = 0.3) -> list[Faces]:
    """Steady landmarks across video frames: faces are linked frame to frame by box overlap, and
    each track's landmarks are fitted with Gaussian-weighted local lines over time (sigma in frames)."""
    if sigma <= 0 or len(faces) < 2:
        return faces
    smoothed = [Faces(f.boxes, f.scores, f.landmarks.clone()) for f in faces]
    for track in face_tracks(faces, min_iou):
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


def detect_faces(images: torch.Tensor, detector, options: SelectOptions = SelectOptions(), *,
                 selection: Selection | None = None, cancel: Callable[[], bool | None] | None = None) -> list[Faces]:
    """The faces to restore in each frame: detected a few frames at a time (asking `cancel` between),
    selected (on several frames, max_faces and indices choose tracks: select_tracks), and steadied across
    frames (`options.temporal_sigma`). Frames too small to hold a face have none."""
    if images.ndim == 3:
        images = images[None]
    if min(images.shape[1:3]) < MIN_DETECT_SIDE:
        return [Faces.empty() for _ in range(len(images))]
    found, threshold = [], threshold_for(detector, options.threshold)
    # On a GPU frames are detected a few at a time; on the CPU, where that gains nothing, one by one.
    chunk = DETECT_CHUNK if torch.device(getattr(detector, "device", "cpu")).type == "cuda" else 1
    for start in range(0, len(images), chunk):
        check_cancel(cancel)
        # Detected down to the floor, so that the report can name what the threshold left out: the faces
        # over the threshold are the same (NMS and merging let a box suppress only weaker ones).
        found += detector.detect(images[start:start + chunk], threshold=min(threshold, BELOW_THRESHOLD_FLOOR))
    by_track = len(found) > 1 and selects_tracks(options)  # on video frames, max_faces and indices pick tracks
    each_frame = replace(options, max_faces=0, indices="") if by_track else options
    faces = [select_faces(over_threshold(f, threshold, selection), each_frame, selection) for f in found]
    if not by_track:
        return smooth_landmarks(faces, options.temporal_sigma)
    return select_tracks(faces, options, selection, first=selection.frames - len(faces) if selection else 0)


def chosen_by(options: SelectOptions) -> str:
    """What chose the faces, for the summary: "indices 0,2, max_faces 2"."""
    return ", ".join([*([f"indices {options.indices}"] if options.wanted is not None else []),
                      *([f"max_faces {options.max_faces}"] if options.max_faces > 0 else [])])


def select_tracks(faces: list[Faces], options: SelectOptions, selection: Selection | None = None,
                  frames: range | None = None, first: int = 0) -> list[Faces]:
    """The faces of `frames` (all by default) of a video's faces, those select_faces keeps without max_faces
    and indices (one `Faces` per frame): with max_faces or indices, those of the tracks they choose, in
    their tracks' order (tracks.choose_tracks); landmarks steadied (`options.temporal_sigma`). Each frame's
    choice and smoothing look only at the frames around it (stream.stream_reach), so any stretch of `faces`
    reaching that far around `frames` gives the same faces. `selection` records the faces left out, position
    t of `faces` as its frame `first + t`."""
    frames = range(len(faces)) if frames is None else frames
    smoothed = smooth_landmarks(faces, options.temporal_sigma)
    if not selects_tracks(options):
        return smoothed[frames.start:frames.stop]
    selection = selection if selection is not None else Selection()
    selection.chosen_by = chosen_by(options)
    chosen = []
    for t, keep in zip(frames, choose_tracks(faces, options, frames, selection.missing_indices)):
        left = torch.ones(len(faces[t]), dtype=torch.bool)
        left[keep] = False
        selection.skip(faces[t][left], NOT_SELECTED, first + t)
        chosen.append(smoothed[t][keep])
    return chosen


def over_threshold(faces: Faces, threshold: float, selection: Selection | None = None) -> Faces:
    """The faces scoring over `threshold`; `selection`, when given, records the others as below it."""
    over = faces.scores > threshold
    if selection is not None:
        selection.threshold = threshold
        selection.skip(faces[~over], BELOW_THRESHOLD)
    return faces[over]


def locate_faces(images: torch.Tensor, detector, crop_size: int, options: SelectOptions = SelectOptions(), *,
                 faces: list[Faces] | None = None, device: torch.device | str | None = None,
                 cancel: Callable[[], bool | None] | None = None, timings: dict | None = None
                 ) -> tuple[torch.Tensor, FaceInfo]:
    """Aligned crops (N,S,S,3 float32 on `device`) of the faces of every frame, and where they came from:
    find_faces, then every face cut out (restore_faces cuts them a face batch at a time instead)."""
    images = as_images(images)[0]
    info = find_faces(images, detector, crop_size, options, faces=faces, device=device, cancel=cancel, timings=timings)
    with _stage(timings, "crop", info.device):
        return cut_faces(images, info.affines, info.frames, crop_size, info.device), info


def find_faces(images: torch.Tensor, detector, crop_size: int, options: SelectOptions = SelectOptions(), *,
               faces: list[Faces] | None = None, device: torch.device | str | None = None,
               cancel: Callable[[], bool | None] | None = None, timings: dict | None = None,
               face_batch: int = 4) -> FaceInfo:
    """Where the faces of every frame are, and how each is cut out at `crop_size` (FaceInfo; the crops
    themselves are cut by cut_faces through its affines).

    Detection, cropping and (later) pasting run on one device: the detector's unless `device` says.
    `faces` (one `Faces` per frame) skips detection; otherwise `options` select them (detect_faces),
    and they are aligned on `options.template`. With `options.changed_from` (the frames before a face
    swap), only faces that differ from it are kept (see `changed_faces`), compared `face_batch` at a time.
    """
    images, changed_from = as_images(images)[0], options.changed_from
    if changed_from is not None:
        # NaN there would make every face "not changed", and the image come back untouched without a word.
        changed_from = as_images(changed_from, CHANGED_FROM)[0]
        check_finite(changed_from, CHANGED_FROM)
        check_same_frames(images, changed_from)
    device = torch.device(device or getattr(detector, "device", images.device))
    selection = Selection()
    if faces is None:
        with _stage(timings, "detect", device):
            faces = detect_faces(images, detector, options, selection=selection, cancel=cancel)
    elif len(faces) != len(images):
        raise ValueError(f"faces must hold one entry per frame: {len(faces)} for {len(images)} frames")
    frames = torch.cat([torch.full((len(f),), t, dtype=torch.long) for t, f in enumerate(faces)]) if faces \
        else torch.zeros(0, dtype=torch.long)
    info = FaceInfo(faces, torch.zeros(0, 2, 3), frames, crop_size, tuple(images.shape[1:3]), device, selection)
    info.affines = face_affines(info.landmarks, crop_size, options.template)
    if changed_from is None:
        return info

    def difference(part: slice) -> torch.Tensor:
        crops = cut_faces(images, info.affines[part], info.frames[part], crop_size, device)
        return changed_faces(crops, changed_from, info.affines[part], info.frames[part])

    with _stage(timings, "compare", device):
        keep = (gathered(len(info), face_batch, difference) > options.change_threshold).cpu()
    selection.compared, selection.changed = len(keep), int(keep.sum())
    selection.skip(info.faces_flat()[~keep], NOT_CHANGED, info.frames[~keep])
    return keep_faces(info, keep)


def gathered(count: int, batch_size: int, batch: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """What `batch(part)` gives for each part of `count` items, `batch_size` at a time, in one tensor (made at
    the first part's shape and device, so that the parts are never held twice). Empty when `count` is 0."""
    found = torch.zeros(0)
    for part in parts(count, batch_size):
        answer = batch(part)
        found = answer.new_empty(count, *answer.shape[1:]) if part.start == 0 else found
        found[part] = answer
    return found


def parts(count: int, batch_size: int) -> list[slice]:
    """`count` items `batch_size` at a time."""
    return [slice(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def check_face_batch(face_batch: int) -> None:
    if face_batch < 1:
        raise ValueError(f"face_batch must be 1 or more, got {face_batch}")


def changed_faces(crops: torch.Tensor, originals: torch.Tensor, affines: torch.Tensor,
                  frames: torch.Tensor) -> torch.Tensor:
    """(N,) how much each aligned crop (N,S,S,3) differs from the same crop of `originals` (the frames
    before a face swap: as many as the crops' frames, or one for all): the mean absolute difference,
    0..1, of the two crops averaged over 16x16-pixel cells (at 512), in the face's core (eyes to chin).

    Measured on the 29 Solvay faces: a face swapped for another scores 0.087 or more; JPEG at
    quality 30 at most 0.010, Gaussian noise of 8/255 0.011, a 0.5x resize round trip 0.023, a
    brightness shift of 4/255 0.016, a colour shift of 10/255 (VAE-like) 0.027. CHANGE_THRESHOLD, 0.04,
    lies between; faces under ~30 px resized by a third or less can reach it.
    """
    size = crops.shape[1]
    own = frames if len(originals) > 1 else torch.zeros_like(frames)
    before = warp_faces(originals, affines, own, size, crops.device)
    cell = max(1, size // 32)
    difference = (F.avg_pool2d(crops.permute(0, 3, 1, 2), cell) - F.avg_pool2d(before.clamp(0, 1), cell)).abs().mean(1)
    cells = difference.shape[-1]
    core = difference[:, int(cells * 0.38):int(cells * 0.78), int(cells * 0.33):int(cells * 0.67)]
    return core.mean((1, 2))


def check_same_frames(images: torch.Tensor, changed_from: torch.Tensor) -> None:
    if changed_from.shape[1:3] != images.shape[1:3] or len(changed_from) not in (1, len(images)):
        raise ValueError(f"the image before the swap is {len(changed_from)} frame(s) of "
                         f"{changed_from.shape[2]}x{changed_from.shape[1]}, but the images are {len(images)} "
                         f"frame(s) of {images.shape[2]}x{images.shape[1]}: it must have their size, and one "
                         "frame or as many as they have")


def keep_faces(info: FaceInfo, keep: torch.Tensor) -> FaceInfo:
    """`info` with only the crops where `keep` (N,) is True."""
    keep = keep.cpu()
    offsets = _face_offsets(info.faces)
    faces = [f[keep[offsets[t]:offsets[t] + len(f)]] for t, f in enumerate(info.faces)]
    return FaceInfo(faces, info.affines[keep], info.frames[keep], info.crop_size, info.image_size, info.device,
                    info.selection)


def restore_faces(images: torch.Tensor, model, detector, *, select: SelectOptions = SelectOptions(),
                  paste: PasteOptions = PasteOptions(), masks: MaskOptions = MaskOptions(),
                  faces: list[Faces] | None = None, face_batch: int = 4,
                  progress: Callable[[int, int], None] | None = None,
                  cancel: Callable[[], bool | None] | None = None) -> Restoration:
    """Restore every face in a batch of frames (B,H,W,C float 0..1; C = 1, 3 or 4), or in images of another
    accepted type (tensors.as_images: uint8, numpy, one (H,W,C) image), given back in the type they came in.

    `model` is a restorer (load_model's handle, a registered network, or any object with `.size` and
    `restore(faces, batch_size, on_batch)`, asked between batches whether to cancel);
    `detector` has `detect(images, threshold)`. `select` says which faces (on several frames, which face
    tracks; with `changed_from`, only those a face swap changed), `paste` how they are blended back,
    `masks` which of their pixels (with a face parser): see faces/options.py. Faces from all frames are
    restored together in batches of `face_batch`; `progress(done, total)` follows them and `cancel()` is
    asked between detection chunks and face batches (return True, or raise, to stop: Cancelled is raised).

    Every pixel outside the paste masks comes back bit-identical, in the input's dtype, channels and
    device; frames without faces come back whole. The result's `summary` says what was done and what
    was left out, its `timings` each stage's seconds. `faces` (one `Faces` per frame, from
    `detect_faces`) skips detection and selection, for callers that detect a longer sequence first
    (smoothing landmarks across all of it) and restore it in parts.

    With `paste.background` (the same frames at a larger size) or `paste.upscale_by`, faces are found and
    cut out in `images` and pasted into the larger frames: see paste_faces.
    """
    images, given = as_images(images)
    check_background(images, paste.background)
    check_output_size(images.shape[1:3], paste)
    check_face_batch(face_batch)
    check_cancel(cancel)
    restorer = as_restorer(model)
    trained_on = getattr(restorer, "template", None)
    if trained_on is not None and trained_on != select.template:
        log.warning("%s was trained on faces aligned to the %s template; cutting them to %s as asked (template)",
                    restorer.info.arch if restorer.info else restorer.spec.name, trained_on, select.template)
    timings: dict[str, float] = {}
    info = find_faces(images, detector, restorer.size, select, faces=faces, cancel=cancel, timings=timings,
                      face_batch=face_batch)
    reruns = []
    frames = FramesOn(images, info.device)  # cutting and colour correction share one frame's copy on the device

    def restore(part: slice, crops: torch.Tensor | None = None) -> torch.Tensor:
        """The restored faces of `part`, from their crops (cut here unless given)."""
        crops = cut(frames, info, part, timings) if crops is None else crops

        def on_batch(done: int, total: int) -> None:
            if progress is not None:
                progress(part.start + done, len(info))
            check_cancel(cancel)

        with _stage(timings, "restore", info.device):
            return restorer.restore(crops, batch_size=face_batch, on_batch=on_batch, on_rerun=reruns.append,
                                    cancel=cancel and (lambda: check_cancel(cancel))).to(info.device)

    result = paste_in_parts(images, info, restore, paste, masks, face_batch=face_batch, cancel=cancel,
                            timings=timings, frames=frames)
    return replace(result, images=like_given(result.images, given), rerun_fp32=sum(reruns))


def paste_restored(images: torch.Tensor, restored: torch.Tensor, info: FaceInfo, paste: PasteOptions = PasteOptions(),
                   masks: MaskOptions = MaskOptions(), *, crops: torch.Tensor | None = None, face_batch: int = 4,
                   progress: Callable[[int, int], None] | None = None,
                   cancel: Callable[[], bool | None] | None = None, timings: dict | None = None) -> Restoration:
    """Paste restored crops (N,S,S,C, in `info`'s order, any size) back into the frames `info` was made
    from: the second half of restore_faces, for restorers run apart (the modular nodes).

    With a face parser (`masks.parser`), each face takes the restored pixels only where the parser shows
    the `masks.regions` and no occluder covers it; elsewhere the original stays, bit for bit.
    `masks.source` "original" parses the crops before restoration (`crops`, or cut again from `images`),
    "restored" the restored faces, as facexlib does; `masks.temporal_sigma` steadies the masks along each
    face's track. A face whose restored pixels are not finite (NaN or Inf), or in which the parser finds
    none of the regions, is left as it was, and the summary says so. Faces are parsed and pasted
    `face_batch` at a time: `progress(done, total)` follows the pasting and `cancel()` is asked between batches.
    A `timings` dict receives the stages' seconds (and becomes the result's). `images` may be the frames at
    a larger size (same aspect): the faces are pasted there, through their affines scaled to it. With
    `paste.upscaler`, the frames are enlarged here (its tiles asked `cancel()` too).
    """
    if len(restored) != len(info):
        raise ValueError(f"{len(restored)} restored crops for {len(info)} detected faces")
    check_face_batch(face_batch)
    return paste_in_parts(images, info, lambda part, _: restored[part], paste, masks, crops=crops,
                          face_batch=face_batch, progress=progress, cancel=cancel, timings=timings)


def paste_in_parts(images: torch.Tensor, info: FaceInfo,
                   restored_of: Callable[[slice, torch.Tensor | None], torch.Tensor], paste: PasteOptions,
                   masks: MaskOptions, *, crops: torch.Tensor | None = None, face_batch: int = 4,
                   progress: Callable[[int, int], None] | None = None,
                   cancel: Callable[[], bool | None] | None = None, timings: dict | None = None,
                   frames: FramesOn | None = None) -> Restoration:
    """paste_restored with the restored faces of each part of `info` from `restored_of(part, crops)` (`crops`:
    the part's crops when they were cut for the parser already, else None), a face batch at a time: a part's
    crops, parse masks and restored faces are let go once it is pasted, so the device holds one batch of them,
    not every face's (GPEN-2048 on the 29 Solvay faces: 1.46 GB a set). Masks steadied over time
    (`masks.temporal_sigma`) are made ahead, as far as the part's tracks reach (MasksOverTime), with the
    restored faces they were made from when they parse those. The parser looks at the crops before
    they are restored (a restorer may write over what it is given). `frames`: `images` on `info.device`, when
    the caller cuts from them too."""
    images, given = as_images(images)
    if paste.upscaler is not None:
        with _stage(timings, "upscale", info.device):
            background = paste_target(images, paste, cancel=cancel and (lambda: check_cancel(cancel)))
        paste = replace(paste, background=background, upscaler=None, upscale_by=1.0)
    affines = info.affines
    if tuple(images.shape[1:3]) != tuple(info.image_size):
        wrong = not_larger(info.image_size, images.shape[1:3])
        if wrong:
            raise ValueError(f"image is {tuple(images.shape[1:3])} but the faces were found in "
                             f"{tuple(info.image_size)} frames: as those frames enlarged it {wrong}")
        affines = scale_affines(info.affines.to(torch.float64), info.image_size, images.shape[1:3])
    located = replace(info, affines=affines)
    if frames is None or frames.images is not images:
        frames = FramesOn(images, info.device)

    def originals(part: slice) -> torch.Tensor:
        return crops[part] if crops is not None else cut(frames, located, part, timings)

    def restored_rgb(part: slice, crops: torch.Tensor | None = None) -> torch.Tensor:
        restored = restored_of(part, crops)
        return restored if restored.shape[-1] == 3 else as_rgb(restored)  # crops from other packs: grey, RGBA

    def parsed(faces: torch.Tensor) -> torch.Tensor:
        with _stage(timings, "parse", info.device):
            return parse_faces(masks.parser, faces, masks.regions, masks.feather, batch_size=face_batch,
                               cancel=cancel and (lambda: check_cancel(cancel)))

    steadied = None  # masks steadied over time, made ahead of the part pasted
    restored_ahead: dict[int, torch.Tensor] = {}  # parts' restored faces parsed before their paste, by first face

    def looked_at(part: slice) -> torch.Tensor:
        if masks.source == "original":
            return originals(part)
        restored_ahead[part.start] = restored_rgb(part)
        return restored_ahead[part.start]

    if masks.parser is not None and masks.temporal_sigma > 0:
        offsets = _face_offsets(info.faces)
        tracks = [[offsets[t] + i for t, i in track] for track in face_tracks(info.faces)]
        steadied = MasksOverTime(lambda part: parsed(looked_at(part)), len(info), tracks, masks.temporal_sigma,
                                 face_batch)
    canvas = Canvas(images, paste, frames)
    left_as_was: dict[int, str] = {}
    restorer_size = None
    for part in parts(len(info), face_batch):
        part_masks = steadied[part] if steadied is not None else None
        part_crops = None
        if masks.parser is not None and part_masks is None and masks.source == "original":
            part_crops = originals(part)
            part_masks = parsed(part_crops)
        restored = restored_ahead.pop(part.start, None)
        restored = restored_rgb(part, part_crops) if restored is None else restored
        del part_crops  # restored: let go before pasting
        restorer_size = restored.shape[1]
        if masks.parser is not None and part_masks is None:
            part_masks = parsed(restored)
        finite = finite_faces(restored)
        shown = finite if part_masks is None else finite & (part_masks.flatten(1).amax(1) > 0).to(finite.device)
        finite, shown = torch.stack([finite, shown]).cpu()  # one copy from the device a batch
        kept = shown.nonzero().flatten()
        if len(kept) < len(shown):
            restored = restored[kept.to(restored.device)]
            part_masks = part_masks[kept.to(part_masks.device)] if part_masks is not None else None
        with _stage(timings, "paste", info.device):
            canvas.paste(restored, affines[part][kept], info.frames[part][kept], crop_size=info.crop_size,
                         face_masks=part_masks, device=info.device)
        left_as_was |= {part.start + k: NOT_FINITE for k in (~finite).nonzero().flatten().tolist()}
        left_as_was |= {part.start + k: MASKED_OUT for k in (finite & ~shown).nonzero().flatten().tolist()}
        del restored, part_masks  # before the next part is cut
        if progress is not None:
            progress(part.stop, len(info))
        if part.stop < len(info):  # a run done is not thrown away
            check_cancel(cancel)
    unrestored = sum(1 for why in left_as_was.values() if why == NOT_FINITE)
    if unrestored:
        log.warning("%s", unrestored_note(unrestored))
    return Restoration(like_given(canvas.out, given), canvas.masks, info, unrestored, len(left_as_was) - unrestored,
                       timings if timings is not None else {}, restorer_size=restorer_size,
                       left_as_was=dict(sorted(left_as_was.items())))


def cut(images: torch.Tensor | FramesOn, info: FaceInfo, part: slice, timings: dict | None = None) -> torch.Tensor:
    """The crops of faces `part` of `info`, cut from `images` (the frames its affines map from) on its device."""
    with _stage(timings, "crop", info.device):
        return cut_faces(images, info.affines[part], info.frames[part], info.crop_size, info.device)


def face_areas(images: torch.Tensor, crops: torch.Tensor, info: FaceInfo) -> torch.Tensor:
    """(B,H,W) the area of each frame the located faces cover: GPEN's paste mask of each crop."""
    _, areas = paste_faces(images[..., :1], crops, info.affines, info.frames, PasteOptions(smooth_small_faces=False),
                           device=info.device)
    return areas


def _face_offsets(faces: list[Faces]) -> list[int]:
    """Where each frame's faces start in the flat list of crops."""
    counts = [len(f) for f in faces]
    return [sum(counts[:t]) for t in range(len(counts))]


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


def check_cancel(cancel) -> None:
    if cancel is not None and cancel():
        raise Cancelled("face restoration was cancelled")
