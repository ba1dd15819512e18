"""Faces followed across video frames: tracks, and which tracks `max_faces`, `indices` and `order` choose.

On a single image those options pick faces; on frames of a video they pick tracks, so that the same people are
restored from frame to frame. Each frame's choice is made from the frames within TRACK_REACH of it alone, so a
batch, a stream restored chunk by chunk and a segment of a clip all choose alike from the same detections.
"""

from __future__ import annotations

import math

import torch

from .detect import Faces, box_iou

TRACK_REACH = 7  # frames each side of a frame whose faces decide which tracks it restores
BRIDGE = 4  # frames in a row a face may go undetected and keep its track (in the choice of tracks)
MIN_IOU = 0.3  # box overlap that links a face to the same face in the frame before
SIZE_STEP = 1.1  # faces whose sides differ by less count as about as large (order largest)
SCORE_STEP = 0.05  # scores closer than this count as about as sure (order confidence)
SMOOTHING_REACH = 4  # Gaussian sigmas: weights beyond are under exp(-8) of the centre's


def smoothing_reach(sigma: float) -> int:
    """Frames each side whose landmarks (or masks) change a frame's smoothed ones along a track: ceil(4 sigma) + 1,
    0 without smoothing."""
    return math.ceil(SMOOTHING_REACH * sigma) + 1 if sigma > 0 else 0


def face_tracks(faces: list[Faces], min_iou: float = MIN_IOU, bridge: int = 0) -> list[list[tuple[int, int]]]:
    """The same face across frames: (frame, face index) along each track, faces linked frame to frame
    by the largest box overlap above `min_iou`. With `bridge`, a face that matches nothing in the frame
    before is linked, the same way, to a track last seen up to `bridge` frames before that (a face the
    detector missed for a moment, or that was hidden), by its last box."""
    tracks: list[list[tuple[int, int]]] = []
    last_seen: dict[int, tuple[int, int]] = {}  # track -> (frame, face index) where it was last found
    for t, frame_faces in enumerate(faces):
        matched: dict[int, int] = {}  # face index -> track
        for seen in range(t - 1, t - 2 - bridge, -1):  # the frame before first, then those bridged
            waiting = [i for i in range(len(frame_faces)) if i not in matched]
            candidates = sorted((i, k) for k, (s, i) in last_seen.items() if s == seen)  # in that frame's order
            if not waiting or not candidates:
                continue
            before = faces[seen].boxes[[i for i, _ in candidates]]
            iou = box_iou(before, frame_faces.boxes[waiting]).cpu().numpy()
            while iou.size and iou.max() >= min_iou:
                row, column = divmod(int(iou.argmax()), iou.shape[1])
                matched[waiting[column]] = candidates[row][1]
                iou[row, :], iou[:, column] = -1, -1
        for i in range(len(frame_faces)):
            track = matched.get(i)
            if track is None:
                track = len(tracks)
                tracks.append([])
            tracks[track].append((t, i))
            last_seen[track] = (t, i)
        last_seen = {k: seen for k, seen in last_seen.items() if seen[0] >= t - bridge}
    return tracks


def selects_tracks(options) -> bool:
    """Whether `options` (SelectOptions) leave faces out by number: on video frames, that picks tracks."""
    return options.max_faces > 0 or options.wanted is not None


def ranked_tracks(faces: list[Faces], order: str) -> list[list[tuple[int, int]]]:
    """The tracks of `faces` (gaps of up to BRIDGE frames bridged) in `order`, each by the median over its
    frames of: the box's side (largest first), left edge, top edge, or score (highest first). Sides go in
    steps of SIZE_STEP and scores in steps of SCORE_STEP, so that faces about as large, or as sure, which
    jitter would reorder from frame to frame, are not told apart; those go left to right (by the median
    left edge; for left-right, top to bottom), then by where the track starts."""
    tracks = face_tracks(faces, bridge=BRIDGE)
    boxes = [f.boxes.float().cpu() for f in faces]
    left, top = [b[:, 0].tolist() for b in boxes], [b[:, 1].tolist() for b in boxes]
    side = [((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).clamp(min=1e-6).sqrt().tolist() for b in boxes]
    score = [f.scores.float().cpu().tolist() for f in faces]

    def median(track, values) -> float:  # the lower middle, as torch.median
        return sorted(values[t][i] for t, i in track)[(len(track) - 1) // 2]

    def key(track) -> tuple:
        first = track[0]
        if order == "left-right":
            return median(track, left), median(track, top), first
        if order == "top-bottom":
            return median(track, top), median(track, left), first
        if order == "largest":
            step = -round(math.log(median(track, side)) / math.log(SIZE_STEP))
        else:
            step = -round(median(track, score) / SCORE_STEP)
        return step, median(track, left), first

    return sorted(tracks, key=key)


def choose_tracks(faces: list[Faces], options, frames: range, missing: dict[int, int] | None = None
                  ) -> list[torch.Tensor]:
    """For each frame of `frames` (positions in `faces`, frames of one video in order, each sorted and
    sized as select_faces leaves them), the positions in that frame's faces of those `options` choose:
    the tracks among the faces within TRACK_REACH frames of it are ranked (ranked_tracks) and numbered
    from 0, so that a face missing from a few frames keeps its number; `options.indices` picks tracks by
    number, and of the picked tracks found in the frame, the first `options.max_faces` are kept, in that
    order. `missing` gathers the indices asked for beyond the tracks numbered (index -> most tracks any
    frame had), as Selection.missing_indices does."""
    wanted = options.wanted
    chosen = []
    for t in frames:
        lo = max(0, t - TRACK_REACH)
        tracks = ranked_tracks(faces[lo:t + TRACK_REACH + 1], options.order)
        if wanted is not None:
            if missing is not None:
                for i in wanted:
                    if i >= len(tracks):
                        missing[i] = max(missing.get(i, 0), len(tracks))
            tracks = [tracks[i] for i in wanted if 0 <= i < len(tracks)]
        here = [i for track in tracks for s, i in track if lo + s == t]
        chosen.append(torch.tensor(here[:options.max_faces] if options.max_faces > 0 else here, dtype=torch.long))
    return chosen
