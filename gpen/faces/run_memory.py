"""What a run of the face pipeline (or of a part of it: a node) takes on its device beyond the weights: what
the nodes tell ComfyUI's memory manager (nodes/host.py), as its own nodes tell it a VAE decode's."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

FLOAT32 = 4


def run_working_bytes(frames: Sequence[int] | None = None, restorer=None, detector=None, parsers: Iterable = (),
                      face_batch: int = 4, crop_size: int | None = None) -> int:
    """The largest stage of the run (they run one after another) plus what stays on the device beside it, in
    bytes. `frames` is the (B,H,W,C) shape of the frames faces are found in and pasted into (None: a run on
    crops alone); crops are `crop_size` square (by default the restorer's size), `face_batch` at a time.

    Networks not given (None: not connected, or on another device) count nothing; with none, the run needs
    nothing on the device. Stages: detection (the detector's largest pass); restoration (the restorer's
    forward of a face batch, with the batch's crops in and out in float32); parsing (one parser at a time: its forward and its answer
    at the crops' size, with the batch's crops). Beside them: one frame with its paste mask in float32 (paste
    works on a frame's faces at a time; a frame is the most it moves). Each network counts its own
    (archs/working_memory.py); a caller's own detector, restorer or parser without `working_bytes`, and
    onnxruntime's, count nothing.

    Faces are cut, restored, parsed and pasted a face batch at a time (pipeline.paste_in_parts), so no stage
    holds more crops than a batch's. Left out: with masks steadied over time, the parse masks (and, parsing
    the restored faces, the restored faces) of the faces within the smoothing's reach of a batch along their
    tracks, made ahead (masks.MasksOverTime: how many is known only after detection); the float32 re-run of
    faces half precision broke (twice the weights and the forward, rare, and retried in halves on out of
    memory); the sampling coordinates of cutting and pasting (float64, ~16 MB at a time: align.SAMPLED_AT_ONCE,
    paste.PASTE_BAND); and the few copies of a face region that pasting makes."""
    parsers = list(parsers)
    if restorer is None and detector is None and not parsers:
        return 0  # no network on the device: nothing of the run's is there either
    crop = crop_size or getattr(restorer, "size", 0)
    crops = face_batch * 3 * crop ** 2 * FLOAT32
    stages = [0]
    if detector is not None and frames is not None:
        stages.append(working(detector, *frames[1:3], frames[0]))
    if restorer is not None:
        stages.append(working(restorer, face_batch) + 2 * crops)
    stages += [working(parser, face_batch, crop) + crops for parser in parsers]
    frame = math.prod(frames[1:3]) * (frames[3] + 1) * FLOAT32 if frames is not None else 0
    return max(stages) + frame


def working(handle, *args) -> int:
    count = getattr(handle, "working_bytes", None)
    return count(*args) if count is not None else 0
