"""Restoring a stream of frames a chunk at a time, with landmark smoothing that looks across chunks."""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import replace
from typing import Callable, Iterable, Iterator

import torch

from .detect import Faces
from .options import MaskOptions, PasteOptions, SelectOptions
from .pipeline import DETECT_CHUNK, Restoration, Selection, detect_faces, restore_faces, select_tracks
from .tensors import as_images
from .tracks import TRACK_REACH, selects_tracks, smoothing_reach

def stream_reach(select: SelectOptions) -> int:
    """Frames each side whose faces change what a frame restores: smoothing's reach, and with max_faces or
    indices at least TRACK_REACH, the frames that choose its tracks."""
    return max(smoothing_reach(select.temporal_sigma), TRACK_REACH if selects_tracks(select) else 0)


def restore_frames(frames: Iterable, model, detector, *, chunk: int = 16, select: SelectOptions = SelectOptions(),
                   paste: PasteOptions = PasteOptions(), masks: MaskOptions = MaskOptions(), face_batch: int = 4,
                   selection: Selection | None = None, span: range | None = None,
                   cancel: Callable[[], bool | None] | None = None) -> Iterator[Restoration]:
    """Restore a stream of frames: yields one `Restoration` per chunk of up to `chunk` consecutive
    frames, in order (its `images` float 0..1, its `faces` the landmarks used, its `face_count`).

    `frames` yields (H,W,3) frames or (n,H,W,3) batches, uint8 or float 0..1, numpy or torch, all of
    one size. With `select.temporal_sigma` each face's landmarks are steadied along its track as
    `smooth_landmarks` does over the whole sequence, and with `select.max_faces` or `indices` tracks
    are chosen as select_tracks chooses them over the whole sequence: frames are detected up to
    `stream_reach(select)` frames ahead of the chunk being restored, and only landmarks, not
    frames, are kept from behind it, so at most `chunk + stream_reach(select)` frames are held.
    `span` restores and yields only the frames at those positions of the stream (one segment of a
    long clip, restored as restoring it whole would): the frames within that reach of it are
    detected for the smoothing alone, earlier ones skipped, and the stream is read no further.
    The options are restore_faces' (`masks.temporal_sigma` steadies masks within each chunk; a stream
    has no `select.changed_from`); `selection` gathers what detection found and left out (in the span).
    """
    if select.changed_from is not None:
        raise ValueError("changed_from compares a batch of images with the images before a face swap; "
                         "restore_frames takes no changed_from: restore such frames with restore_faces")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 frame, got {chunk}")
    if detector is None:
        raise ValueError("restore_frames needs a face detector")
    selection = selection if selection is not None else Selection()
    restore_options = dict(paste=paste, masks=masks, face_batch=face_batch)
    engine = FrameStream(model, detector, chunk, span, selection, select, restore_options, cancel)
    stream = _each_frame(frames) if span is None else itertools.islice(_each_frame(frames), span.stop + engine.reach)
    for frame in stream:
        if (result := engine.push(frame)) is not None:
            yield result
    yield from engine.finish()


class FrameStream:
    """restore_frames' state between frames: the frames not restored yet, the faces detected in them
    and before them (as far back as smoothing and the choice of tracks look), and where each of those
    starts in the stream.

    Frames come in with push(); a chunk is restored as soon as the frames `reach` beyond it are
    detected, so that smoothing and the choice of tracks see what they would see over the whole stream;
    finish() restores the rest.
    """

    def __init__(self, model, detector, chunk: int, span: range | None, selection: Selection, select: SelectOptions,
                 restore_options: dict, cancel: Callable[[], bool | None] | None = None):
        self.model, self.detector, self.cancel = model, detector, cancel
        self.chunk, self.sigma, self.reach = chunk, select.temporal_sigma, stream_reach(select)
        self.begin, self.end = (span.start, span.stop) if span is not None else (0, math.inf)
        # Detection keeps faces by size; the stream chooses tracks and steadies landmarks across chunks.
        self.select, self.detect_options = select, replace(select, temporal_sigma=0.0, max_faces=0, indices="")
        self.restore_options = restore_options  # restore_faces': paste, masks, face_batch
        self.selection = selection  # what detection found and left out in the span
        self.context = Selection()  # what detection found around the span, not counted
        self.pending: deque = deque()  # frames not restored yet; pending[0] is frame `first`
        self.found: list[Faces] = []  # faces kept by size, unsmoothed, of frames kept_from .. detected - 1
        self.first = self.kept_from = self.detected = 0

    def push(self, frame) -> Restoration | None:
        """Take the stream's next frame; returns the chunk that this lets be restored, if any."""
        at = self.first + len(self.pending)
        if at < self.begin - self.reach:  # too far ahead of the span to change its smoothing
            self.first = self.kept_from = self.detected = at + 1
            return None
        self.pending.append(frame)
        if len(self.pending) >= self.chunk + self.reach or at + 1 - self.detected >= DETECT_CHUNK:
            self.detect_pending()
        if self.detected - self.reach - self.first >= self.next_count():
            return self.restore_next(self.next_count())
        return None

    def finish(self) -> Iterator[Restoration]:
        """The chunks left once the stream has ended."""
        self.detect_pending()
        while self.pending:
            result = self.restore_next(min(self.next_count(), len(self.pending)))
            if result is not None:
                yield result

    def next_count(self) -> int:
        """Frames in the next chunk: chunks start where the span does."""
        return min(self.chunk, self.begin - self.first) if self.first < self.begin else self.chunk

    def detect_pending(self) -> None:
        """Detect the faces of the pending frames not detected yet, DETECT_CHUNK frames a batch."""
        waiting = list(self.pending)[self.detected - self.first:]
        start = 0
        while start < len(waiting):  # batches end where the span does, so its counts are its own
            at = self.detected + start
            bounds = (b - self.detected for b in (self.begin, self.end) if b > at)
            stop = int(min(len(waiting), start + DETECT_CHUNK, *bounds))
            gathers = self.selection if self.begin <= at < self.end else self.context
            self.found.extend(detect_faces(_as_float(waiting[start:stop]), self.detector, self.detect_options,
                                           selection=gathers, cancel=self.cancel))
            start = stop
        self.detected = self.first + len(self.pending)

    def restore_next(self, count: int) -> Restoration | None:
        """Restore the next `count` frames (those of them in the span: None when there are none) with
        their tracks chosen and landmarks smoothed among the faces around them, then forget what no later
        chunk needs."""
        lo, hi = max(self.kept_from, self.first - self.reach), min(self.detected, self.first + count + self.reach)
        window = self.found[lo - self.kept_from:hi - self.kept_from]
        images = [self.pending.popleft() for _ in range(count)]
        wanted = slice(max(0, self.begin - self.first), int(max(0, min(count, self.end - self.first))))
        frames = range(self.first - lo + wanted.start, self.first - lo + wanted.stop)  # in the window
        result = None
        if wanted.start < wanted.stop:
            faces = select_tracks(window, self.select, self.selection, frames, first=lo - self.begin)
            result = restore_faces(_as_float(images[wanted]), self.model, self.detector, select=self.select,
                                   faces=faces, cancel=self.cancel, **self.restore_options)
        self.first += count
        drop = max(0, self.first - self.reach - self.kept_from)
        del self.found[:drop]
        self.kept_from += drop
        return result


def _each_frame(frames: Iterable) -> Iterator:
    for item in frames:
        if getattr(item, "ndim", None) == 4:
            yield from item
        else:
            yield item


def _as_float(frames: list) -> torch.Tensor:
    return torch.cat([as_images(frame)[0] for frame in frames])
