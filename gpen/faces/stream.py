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
from .pipeline import DETECT_CHUNK, Restoration, Selection, detect_faces, restore_faces, smooth_landmarks

SMOOTHING_REACH = 4  # Gaussian sigmas: weights beyond are under exp(-8) of the centre's


def smoothing_reach(sigma: float) -> int:
    """Frames each side whose landmarks change a frame's smoothed ones: ceil(4 sigma) + 1, 0 without smoothing."""
    return math.ceil(SMOOTHING_REACH * sigma) + 1 if sigma > 0 else 0


def restore_frames(frames: Iterable, model, detector, *, chunk: int = 16, select: SelectOptions = SelectOptions(),
                   paste: PasteOptions = PasteOptions(), masks: MaskOptions = MaskOptions(), face_batch: int = 4,
                   selection: Selection | None = None, span: range | None = None,
                   cancel: Callable[[], bool | None] | None = None) -> Iterator[Restoration]:
    """Restore a stream of frames: yields one `Restoration` per chunk of up to `chunk` consecutive
    frames, in order (its `images` float 0..1, its `faces` the landmarks used, its `face_count`).

    `frames` yields (H,W,3) frames or (n,H,W,3) batches, uint8 or float 0..1, numpy or torch, all of
    one size. With `select.temporal_sigma` each face's landmarks are steadied along its track as
    `smooth_landmarks` does over the whole sequence: frames are detected up to
    `smoothing_reach(sigma)` frames ahead of the chunk being restored, and only landmarks, not
    frames, are kept from behind it, so at most `chunk + smoothing_reach(sigma)` frames are held.
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
    temporal_sigma = select.temporal_sigma
    options = replace(select, temporal_sigma=0.0)  # detection selects; the stream steadies across chunks
    reach = smoothing_reach(temporal_sigma)
    begin, end = (span.start, span.stop) if span is not None else (0, math.inf)
    selection = selection if selection is not None else Selection()
    context = Selection()  # what detection found around the span, not counted
    pending: deque = deque()  # frames not restored yet; pending[0] is frame `first`
    found: list[Faces] = []  # selected, unsmoothed faces of frames kept_from .. detected - 1
    first = kept_from = detected = 0

    def detect_pending() -> None:
        nonlocal detected
        waiting = list(pending)[detected - first:]
        start = 0
        while start < len(waiting):  # batches end where the span does, so its counts are its own
            at = detected + start
            stop = int(min(len(waiting), start + DETECT_CHUNK, *(b - detected for b in (begin, end) if b > at)))
            batch = _as_float(waiting[start:stop])
            gathers = selection if begin <= at < end else context
            found.extend(detect_faces(batch, detector, options, selection=gathers, cancel=cancel))
            start = stop
        detected = first + len(pending)

    def restore_next(count: int) -> Restoration | None:
        nonlocal first, kept_from
        lo, hi = max(kept_from, first - reach), min(detected, first + count + reach)
        window = smooth_landmarks(found[lo - kept_from:hi - kept_from], temporal_sigma)
        faces = window[first - lo:first - lo + count]
        images = [pending.popleft() for _ in range(count)]
        wanted = slice(max(0, begin - first), int(max(0, min(count, end - first))))
        result = None
        if wanted.start < wanted.stop:
            result = restore_faces(_as_float(images[wanted]), model, detector, select=select, paste=paste, masks=masks,
                                   faces=faces[wanted], face_batch=face_batch, cancel=cancel)
        first += count
        drop = max(0, first - reach - kept_from)
        del found[:drop]
        kept_from += drop
        return result

    def next_count() -> int:  # chunks start where the span does
        return min(chunk, begin - first) if first < begin else chunk

    def restored(count: int) -> Iterator[Restoration]:
        result = restore_next(count)
        if result is not None:
            yield result

    stream = _each_frame(frames) if span is None else itertools.islice(_each_frame(frames), span.stop + reach)
    for frame in stream:
        at = first + len(pending)
        if at < begin - reach:  # too far ahead of the span to change its smoothing
            first = kept_from = detected = at + 1
            continue
        pending.append(frame)
        if len(pending) >= chunk + reach or first + len(pending) - detected >= DETECT_CHUNK:
            detect_pending()
        if detected - reach - first >= next_count():
            yield from restored(next_count())
    detect_pending()
    while pending:
        yield from restored(min(next_count(), len(pending)))


def _each_frame(frames: Iterable) -> Iterator:
    for item in frames:
        if item.ndim == 4:
            yield from item
        else:
            yield item


def _as_float(frames: list) -> torch.Tensor:
    batch = torch.stack([torch.as_tensor(f) for f in frames])
    return batch.float().div_(255) if batch.dtype == torch.uint8 else batch
