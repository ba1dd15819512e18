"""Video files: restore every frame's faces while streaming, keeping the clip's timing, audio and subtitles.

    summary = gpen.restore_video("clip.mp4", "out/clip.mp4", model, detector, select=SelectOptions(temporal_sigma=2))
    print(summary)                        # 240 frames, 231 faces restored, 81.2 s

Frames are decoded, restored and encoded a chunk at a time (PyAV), so a clip of any length needs the
memory of a few dozen frames. `restore_frames` is the engine on its own: a generator over any
sequence of frames, for tools with frames from elsewhere. Landmark smoothing (`select.temporal_sigma`) looks
ahead and behind across chunk boundaries and gives what smoothing the whole clip at once gives.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..faces.options import MaskOptions, PasteOptions, SelectOptions
from ..faces.paste import check_output_size, output_size
from ..faces.pipeline import Selection, model_fit
from ..faces.restore import rerun_note, unrestored_note
from ..faces.stream import restore_frames, stream_reach
from ..files.atomic import atomic_file
from ..files.images import MAX_MEGAPIXELS

try:
    import fcntl
except ImportError:  # Windows: temporary files are not locked, and those of killed runs stay
    fcntl = None

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}  # FFmpeg's names
DEFAULT_CODEC = "libx264"
DEFAULT_CRF = 16
CRF_CODECS = ("libx264", "libx265", "libvpx-vp9", "libaom-av1", "libsvtav1")
USUAL_CODEC = {"webm": "libvpx-vp9"}  # where the default H.264 cannot go


@dataclass(frozen=True)
class VideoInfo:
    """What a video file holds, read without decoding a frame."""

    path: Path
    width: int  # as stored; frames are turned upright per the display rotation when decoded
    height: int
    frames: int  # video packets: the frames, for all but damaged files
    rate: Fraction  # frames per second
    time_base: Fraction
    timestamps: tuple[int, ...] = field(default=(), repr=False)  # of the frames, in order, in time_base
    codec: str = ""
    audio: tuple[str, ...] = ()  # codec of each audio stream
    other_streams: int = 0  # subtitles, data, attachments


@dataclass
class VideoSummary:
    """What restore_video did: `str(summary)` is the CLI's line."""

    source: Path
    target: Path
    frames: int = 0
    faces: int = 0  # faces restored, all frames
    unrestored: int = 0  # faces left as they were: the restorer's output was not finite
    rerun_fp32: int = 0  # faces run again in float32: not finite in fp16 or bf16
    seconds: float = 0.0
    selection: Selection = field(default_factory=Selection)
    notes: list[str] = field(default_factory=list)  # codec fallbacks, streams not copied
    face_px: list[float] = field(default_factory=list, repr=False)  # each face's crop side in output pixels
    restorer_size: int | None = None

    def __str__(self) -> str:
        notes = self.selection.notes() + self.notes
        if self.rerun_fp32:
            notes.append(rerun_note(self.rerun_fp32))
        if self.unrestored:
            notes.append(unrestored_note(self.unrestored))
        if self.restorer_size and (fit := model_fit(self.face_px, self.restorer_size)):
            notes.append(fit)
        if not self.faces and not self.selection.found:
            notes.insert(0, "no face found")
        return "; ".join([f"{self.frames} frames, {self.faces} faces restored, {self.seconds:.1f} s", *notes])

    def add(self, part: "VideoSummary") -> None:
        """Count in a segment of the same clip (restore_video with `span`)."""
        self.frames += part.frames
        self.faces += part.faces
        self.unrestored += part.unrestored
        self.rerun_fp32 += part.rerun_fp32
        self.face_px += part.face_px
        self.restorer_size = self.restorer_size or part.restorer_size
        self.selection.add(part.selection)
        self.notes += [note for note in part.notes if note not in self.notes]


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("video files need PyAV: pip install av") from None
    return av


# Reading.

def probe_video(path: str | os.PathLike, max_megapixels: float | None = MAX_MEGAPIXELS) -> VideoInfo:
    """The file's first video stream, checked before any work: a ValueError naming the file when it
    is not a video FFmpeg reads, holds no video, is damaged, has frames over `max_megapixels`, or has
    a variable frame rate. Reads every packet (not decoding them) to count frames and time them."""
    av = _av()

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    check_sample_tables(path)
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.FFmpegError as e:
        raise ValueError(f"{path}: not a video file FFmpeg can read ({_reason(e)})") from None
    with container:
        stream = _video_stream(container, path)
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise ValueError(f"{path}: the video stream has no frame size; the file is damaged")
        if max_megapixels and width * height / 1e6 > max_megapixels:
            raise ValueError(f"{path}: {width}x{height} frames are {width * height / 1e6:.0f} megapixels, "
                             f"over the {max_megapixels:g} MP limit (--max-megapixels raises it)")
        times = []
        try:
            for packet in container.demux(stream):
                if packet.size and not packet.is_discard:  # discarded: before an edit list's start
                    times.append(packet.pts if packet.pts is not None else packet.dts)
        except av.FFmpegError as e:
            raise ValueError(f"{path}: damaged video data after {len(times)} frames ({_reason(e)})") from None
        if not times:
            raise ValueError(f"{path}: the video stream holds no frames (the file is damaged or cut short)")
        time_base = Fraction(stream.time_base)
        times = sorted(t for t in times if t is not None)
        rate = _frame_rate(path, stream, times, time_base)
        _check_whole(path, stream, times, time_base, rate)
        audio = tuple(s.codec_context.codec.canonical_name for s in container.streams.audio)
        others = len(container.streams) - 1 - len(audio)
        return VideoInfo(path, width, height, len(times), rate, time_base, tuple(times),
                         stream.codec_context.codec.canonical_name, audio, others)


# MP4 and MOV files (ISO base media) describe their samples in run-length tables, so a few bytes can
# claim millions of them, and FFmpeg indexes each claimed sample (~70 bytes) as it opens the file:
# 12 bytes claiming 60 M samples cost 4-5 GB. The tables are checked first against what the file holds.
MAX_SAMPLES = 10_000_000  # per file: 46 hours at 60 fps, ~0.7 GB of FFmpeg's index
_BOXES_WITHIN = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"mvex", b"moof", b"traf", b"edts"}


def check_sample_tables(path: Path) -> None:
    """Refuse an MP4 or MOV file whose sample tables claim more samples than it can hold (each at
    least one byte, or the constant size its table gives) or more than MAX_SAMPLES, before FFmpeg
    indexes them. Only the boxes that describe samples are read, not the media; a file that does not
    parse as boxes from its start (Matroska, AVI) has none and passes."""
    size = path.stat().st_size
    claims: list[tuple[bytes, int, int]] = []  # (table, samples claimed, bytes they need)
    with open(path, "rb") as file:
        at = 0
        while at + 8 <= size:
            file.seek(at)
            header = file.read(16)
            length, kind = _box_header(header, size - at)
            if length is None:
                break
            if kind in (b"moov", b"moof"):
                file.seek(at)
                _sample_claims(file.read(length)[_header_size(header):], claims)
            at += length
    total = 0
    for table, samples, needed in claims:
        total += samples if table in (b"stsz", b"stz2", b"trun") else 0
        if needed > size:
            raise ValueError(f"{path}: its {table.decode()} table claims {samples} samples, more than its {size} "
                             f"bytes can hold; the file is damaged")
    if total > MAX_SAMPLES:
        raise ValueError(f"{path}: its tables claim {total} samples, over the {MAX_SAMPLES} a file may hold")


def _header_size(header: bytes) -> int:
    return 16 if int.from_bytes(header[:4], "big") == 1 else 8


def _box_header(header: bytes, left: int) -> tuple[int | None, bytes]:
    """(the box's length, None where it does not fit in `left` bytes, and its type)."""
    length, kind = int.from_bytes(header[:4], "big"), header[4:8]
    if length == 1:
        length = int.from_bytes(header[8:16], "big") if len(header) >= 16 else 0
    elif length == 0:
        length = left  # to the end of the file
    return (length if _header_size(header) <= length <= left else None), kind


def _sample_claims(data: bytes, claims: list) -> None:
    """Append (table, samples claimed, bytes they need) for each sample table among the boxes in `data`."""
    at = 0
    while at + 8 <= len(data):
        length, kind = _box_header(data[at:at + 16], len(data) - at)
        if length is None:
            return
        body = data[at + _header_size(data[at:at + 16]):at + length]
        if kind in _BOXES_WITHIN:
            _sample_claims(body, claims)
        elif len(body) >= 12:
            claims.append(_claim(kind, body))
        at += length


def _claim(kind: bytes, body: bytes) -> tuple[bytes, int, int]:
    """(kind, samples, bytes needed) for one full box's body (version and flags first)."""
    word = [int.from_bytes(body[i:i + 4], "big") for i in range(4, min(len(body), 16) - 3, 4)]
    if kind == b"stsz":  # sample_size (0: a table of sizes follows), sample_count
        size, count = word[0], word[1]
        return kind, count, count * size if size else 20 + 4 * count  # the table itself is in the file
    if kind == b"stz2":  # field size in bits, sample_count
        count = word[1]
        return kind, count, 20 + (count * (word[0] & 0xFF) + 7) // 8
    if kind in (b"stts", b"ctts"):  # (sample count, value) runs
        entries = min(word[0], (len(body) - 8) // 8)
        runs = np.frombuffer(body[8:8 + 8 * entries], ">u4").reshape(-1, 2)
        count = int(runs[:, 0].sum(dtype=np.uint64))
        return kind, count, count  # each sample at least one byte
    if kind == b"trun":  # a fragment's samples
        return kind, word[0], word[0]
    return kind, 0, 0


def _video_stream(container, path: Path):
    streams = [s for s in container.streams.video if not s.disposition & 0x400]  # not cover art (attached_pic)
    if not streams:
        kinds = sorted({s.type for s in container.streams})
        raise ValueError(f"{path}: holds no video stream ({'only ' + ', '.join(kinds) if kinds else 'no streams'})")
    return streams[0]


def _frame_rate(path: Path, stream, times: list[int], time_base: Fraction) -> Fraction:
    """The constant frame rate, from the timestamps: refused when frames last different times.
    Containers that store milliseconds round each timestamp, so where a frame lasts several ticks one
    tick of difference is allowed; where it lasts one (AVI), a frame missing is a change of rate."""
    deltas = [b - a for a, b in zip(times, times[1:])]
    if deltas:
        typical = sorted(deltas)[len(deltas) // 2]
        if typical <= 0:
            raise ValueError(f"{path}: frames share timestamps; the file is damaged")
        tolerance = (1 if typical >= 3 else 0) + typical / 100
        if any(abs(d - typical) > tolerance for d in deltas):
            shortest, longest = (float(d * time_base * 1000) for d in (min(deltas), max(deltas)))
            raise ValueError(f"{path}: variable frame rate (frames last {shortest:.1f} to {longest:.1f} ms); "
                             f"only constant-frame-rate video is restored: convert it first, e.g. "
                             f"ffmpeg -i {path.name} -fps_mode cfr -r {float(1 / (typical * time_base)):.3g} "
                             f"cfr{path.suffix}")
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return Fraction(rate)
    if deltas:
        return 1 / (typical * time_base)
    raise ValueError(f"{path}: the video stream has no frame rate")


def _check_whole(path: Path, stream, times: list[int], time_base: Fraction, rate: Fraction) -> None:
    """Refuse a file cut short: its frames end well before the duration its header declares."""
    declared = None
    if stream.duration:
        declared = float(stream.duration * time_base)
    elif duration := stream.metadata.get("DURATION"):  # Matroska and WebM keep it per track, as text
        with contextlib.suppress(ValueError):
            hours, minutes, seconds = duration.split(":")
            declared = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    if declared is None or not times:
        return
    held = float((times[-1] - times[0]) * time_base + 1 / rate)
    if declared - held > max(3 / rate, 0.1):
        raise ValueError(f"{path}: cut short: its frames last {held:.2f} s of the {declared:.2f} s its header declares")


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error)


# FFmpeg colour spaces (AVColorSpace) as swscale's matrices, so frames go to RGB and back with one matrix.
_SWS_COLORSPACE = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9, 10: 9}


def _exact_conversions():
    """swscale flags for YUV <-> RGB without its default truncation, which darkens every frame by
    about one level on a round trip: rounded arithmetic, and full chroma interpolation from YUV."""
    from av.video.reformatter import Interpolation as I

    return I.BILINEAR | I.ACCURATE_RND | I.FULL_CHR_H_INT | I.FULL_CHR_H_INP, I.BILINEAR | I.ACCURATE_RND


class VideoReader:
    """The frames of a video file's first video stream, decoded as they are asked for.

    `frames()` yields each frame as an (H,W,3) uint8 RGB tensor, turned upright per the stream's
    display rotation, and appends its timestamp to `pts` (the i-th frame gets the i-th of the stream's
    timestamps in order: AVI's are decoding times, out of order with B-frames); `frames(start)` begins
    at frame `start` (a seek to the keyframe before it); `chunks(n)` stacks them n at a time. With
    `keep_yuv`, each frame's own YUV 4:2:0 planes (upright) go to `originals`, so that a writer can
    keep them where nothing changed instead of converting RGB back. Every frame is checked to be of
    the clip's size before it is converted: a clip whose frame size changes is a ValueError. The
    other streams (audio, subtitles) are not read here: StreamCopy copies them.
    """

    def __init__(self, path: str | os.PathLike, max_megapixels: float | None = MAX_MEGAPIXELS,
                 info: VideoInfo | None = None, keep_yuv: bool = False):
        self.info = info or probe_video(path, max_megapixels)
        self.path = self.info.path
        self._open()
        self.pts: deque[int] = deque()
        self.keep_yuv = keep_yuv
        self.originals: deque[list[np.ndarray]] = deque()
        self.colorspace = self.color_range = self.color_primaries = self.color_trc = None  # from the first frame
        self.pix_fmt, self.bits = "", 8  # the first frame's pixel format and its bits per component
        self.rotation = 0
        self.decoded = 0  # the index of the next frame

    def _open(self) -> None:
        av = _av()

        self.container = av.open(str(self.path), metadata_errors="ignore")
        self.stream = _video_stream(self.container, self.path)
        self.stream.thread_type = "AUTO"

    def frames(self, start: int = 0) -> Iterator[torch.Tensor]:
        av = _av()

        step = max(1, round(1 / (self.info.rate * self.info.time_base)))  # ticks per frame
        times = self.info.timestamps
        to_rgb, _ = _exact_conversions()
        try:
            for n, frame in self._decoded(start):
                self.decoded = n + 1
                if (frame.width, frame.height) != (self.info.width, self.info.height):
                    raise ValueError(f"{self.path}: frame {n + 1} is {frame.width}x{frame.height}, the clip's "
                                     f"frames are {self.info.width}x{self.info.height}; a clip whose frame size "
                                     f"changes is not restored")
                if n < start:
                    continue
                if self.colorspace is None:
                    self.colorspace, self.color_range = frame.colorspace, frame.color_range
                    self.rotation = round(frame.rotation / 90) % 4 if frame.rotation else 0
                    self.color_primaries, self.color_trc = frame.color_primaries, frame.color_trc
                    self.pix_fmt, self.bits = frame.format.name, max(c.bits for c in frame.format.components)
                pts = times[n] if n < len(times) else (times[-1] if times else 0) + (n - len(times) + 1) * step
                colorspace = _SWS_COLORSPACE.get(self.colorspace)
                rgb = frame.to_ndarray(format="rgb24", src_colorspace=colorspace,
                                       src_color_range=self.color_range or None, interpolation=to_rgb)
                if self.keep_yuv:
                    yuv = frame if frame.format.name == "yuv420p" else frame.reformat(
                        format="yuv420p", src_colorspace=colorspace, dst_colorspace=colorspace,
                        src_color_range=self.color_range or None, dst_color_range=self.color_range or None,
                        interpolation=to_rgb)
                    self.originals.append([np.rot90(plane, self.rotation) for plane in _planes(yuv)])
                self.pts.append(pts)
                yield torch.from_numpy(np.ascontiguousarray(np.rot90(rgb, self.rotation)))
        except av.FFmpegError as e:
            raise ValueError(f"{self.path}: damaged video data at frame {self.decoded + 1} ({_reason(e)})") from None

    def _decoded(self, start: int) -> Iterator[tuple[int, object]]:
        """(index, decoded frame) in presentation order, from the keyframe at or before frame `start`.
        Where the decoder's first timestamp after the seek does not place that frame among the
        stream's, the file is read again from its first frame, counting."""
        if start > 0 and start < len(self.info.timestamps):
            self.container.seek(self.info.timestamps[start], stream=self.stream, backward=True)
            frames = self._decode()
            first = next(frames, None)
            place = {t: i for i, t in enumerate(self.info.timestamps)}
            n = place.get(first.pts) if first is not None else None
            if n is not None and n <= start:
                yield n, first
                for n, frame in enumerate(frames, n + 1):
                    yield n, frame
                return
            self.container.close()
            self._open()
        yield from enumerate(self._decode())

    def _decode(self) -> Iterator:
        for packet in self.container.demux(self.stream):
            yield from packet.decode()

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """(n,H,W,3) uint8 chunks of `size` frames (the last one shorter)."""
        batch = []
        for frame in self.frames():
            batch.append(frame)
            if len(batch) == size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Restoring.


# Writing.

class VideoWriter:
    """Encodes frames into `path` with the reader's timing and, with `copy_streams`, copies the
    source's other streams (audio, subtitles) packet for packet, in time with the frames."""

    def __init__(self, path: str | os.PathLike, reader: VideoReader, width: int, height: int,
                 codec: str = DEFAULT_CODEC, crf: float = DEFAULT_CRF, container: str | None = None,
                 copy_streams: bool = True):
        av = _av()

        self.path = Path(path)
        self.notes: list[str] = []
        kind = container or CONTAINERS.get(self.path.suffix.lower())
        # A segment's start is an MP4 edit list entry in the movie's timescale (milliseconds by default):
        # the clip's own timescale keeps it exact.
        options = {"movie_timescale": str(reader.info.time_base.denominator)} if kind in ("mp4", "mov") else {}
        self.container = av.open(str(self.path), "w", format=container, options=options)  # None: from the suffix
        self.copy = None
        try:
            self._add_video(reader, width, height, codec, crf)
            if copy_streams:
                self.copy = StreamCopy(reader.path, self.container)
                self.notes += self.copy.notes
        except BaseException:
            self.close()
            raise
        self.encoded = 0

    def _add_video(self, reader: VideoReader, width: int, height: int, codec: str, crf: float) -> None:
        av = _av()

        kind = self.container.format.name
        if av.Codec(codec, "w").canonical_name not in self.container.supported_codecs:
            usual = USUAL_CODEC.get(kind) or self.container.default_video_codec
            self.notes.append(f"video encoded with {usual}: {kind} files do not hold {codec}")
            codec = usual
        info = reader.info
        self.counts_frames = kind == "avi"  # AVI stores frames in sequence, one per 1/rate, no timestamps
        self.time_base = 1 / Fraction(info.rate) if self.counts_frames else info.time_base
        self.source_time_base = info.time_base
        options = {}
        if codec in CRF_CODECS:
            options["crf"] = f"{crf:g}"
            if codec in ("libvpx-vp9", "libaom-av1"):
                options["b"] = "0"  # constant quality, no bitrate cap
            if codec == "libvpx-vp9":
                options.update({"deadline": "good", "cpu-used": "4", "row-mt": "1"})
        elif crf != DEFAULT_CRF:
            self.notes.append(f"crf does not apply to {codec}")
        if kind == "avi" and codec in ("libx264", "libx265"):
            options["bf"] = "0"  # AVI stores no presentation times: B-frames would scramble them
        stream = self.container.add_stream(codec, rate=info.rate, options=options)
        stream.width, stream.height = width, height
        self.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        if self.pix_fmt != "yuv420p":
            self.notes.append(f"encoded as yuv444p: yuv420p needs an even frame size, not {width}x{height}")
        stream.pix_fmt = self.pix_fmt
        self.to_yuv = _exact_conversions()[1]
        stream.time_base = stream.codec_context.time_base = self.time_base
        self.colorspace, self.color_range = reader.colorspace, reader.color_range or 1
        context = stream.codec_context
        if reader.colorspace is not None:
            context.colorspace, context.color_range = reader.colorspace, self.color_range
            context.color_primaries, context.color_trc = reader.color_primaries, reader.color_trc
        self.video = stream

    def write(self, image: np.ndarray, pts: int, original: list[np.ndarray] | None = None,
              mask: np.ndarray | None = None) -> None:
        """One (H,W,3) uint8 RGB frame, at `pts` in the source's time base. Given the source frame's
        own YUV 4:2:0 planes and the (H,W) mask of what changed, pixels outside the mask keep the
        source's YUV values as they were, and the RGB frame's are blended in by the mask."""
        av = _av()

        if original is not None and mask is not None and self.pix_fmt == "yuv420p" and not mask.any():
            frame = _frame_from_planes(original, "yuv420p")
        else:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame = frame.reformat(format=self.pix_fmt, dst_colorspace=_SWS_COLORSPACE.get(self.colorspace),
                                   dst_color_range=self.color_range, interpolation=self.to_yuv)
            if original is not None and mask is not None and self.pix_fmt == "yuv420p":
                frame = _frame_from_planes(_blend_planes(original, _planes(frame), mask), "yuv420p")
        frame.pts = self.encoded if self.counts_frames else round(pts * self.source_time_base / self.time_base)
        frame.time_base = self.time_base
        if self.copy is not None:
            self.copy.mux_until(pts * self.source_time_base)
        self.container.mux(self.video.encode(frame))
        self.encoded += 1

    def finish(self) -> list[str]:
        """Flush the encoder and copy the rest of the other streams; returns notes on packets not copied."""
        self.container.mux(self.video.encode())
        notes = self.copy.finish() if self.copy is not None else []
        self.container.close()
        return notes

    def close(self) -> None:
        if self.copy is not None:
            self.copy.close()
        with contextlib.suppress(Exception):
            self.container.close()


class StreamCopy:
    """The streams of `source` other than its restored video (audio, subtitles, data), copied packet for
    packet into the output `container`, never re-encoded: `mux_until` copies those due by a time, in
    step with the video written there, and `finish` the rest, to the source's end. Packets read and
    written are counted per stream; `notes` name each stream the container cannot hold, and `finish`
    returns one for each stream whose packets did not all go, so nothing is dropped without a word."""

    def __init__(self, source: Path, container):
        av = _av()

        self.container = container
        self.input = av.open(str(source), metadata_errors="ignore")
        try:
            self.video = _video_stream(self.input, source)
            self.outputs, self.labels, self.notes = _copied_streams(self.input, self.video, container)
        except BaseException:
            self.input.close()
            raise
        self.read: Counter = Counter()
        self.written: Counter = Counter()
        self.refused: dict[int, str] = {}  # the muxer's reason for the first packet of a stream it refused
        self.damaged: str | None = None  # FFmpeg's reason where reading the source stopped early
        self.packets = self._demux()
        self.pending = None  # read, not yet due

    def _demux(self) -> Iterator:
        if not self.outputs:  # demux() with no stream would read them all
            return
        for packet in self.input.demux(*(self.input.streams[index] for index in self.outputs)):
            if packet.size:  # not the empty ones that end each stream
                self.read[packet.stream.index] += 1
                yield packet

    def mux_until(self, seconds: Fraction | None) -> None:
        """Copy the packets whose decoding time is at most `seconds`; all that are left with None."""
        av = _av()

        while True:
            if self.pending is None:
                try:
                    self.pending = next(self.packets, None)
                except av.FFmpegError as e:
                    self.damaged, self.packets = _reason(e), iter(())
                if self.pending is None:
                    return
            if seconds is not None and _decode_time(self.pending) > seconds:
                return
            packet, self.pending = self.pending, None
            index = packet.stream.index
            try:
                self.mux(packet)
            except av.FFmpegError as e:
                self.refused.setdefault(index, _reason(e))

    def mux(self, packet) -> None:
        index = packet.stream.index
        packet.stream = self.outputs[index]
        self.container.mux(packet)
        self.written[index] += 1

    def finish(self) -> list[str]:
        """Copy what is left; a note for each stream not copied whole."""
        self.mux_until(None)
        self.close()
        notes = []
        for index, label in self.labels.items():
            read, written = self.read[index], self.written[index]
            if written < read:
                notes.append(f"{label}: {written} of {read} packets copied ({self.refused[index]})")
            if self.damaged:
                notes.append(f"{label}: {written} packets copied; the source's data is damaged after them "
                             f"({self.damaged})")
        return notes

    def close(self) -> None:
        self.input.close()


def _copied_streams(source, video, container) -> tuple[dict, dict, list[str]]:
    """Output streams in `container` for each stream of `source` but `video` that it holds ({input
    index: output stream}), their labels ("audio stream 1 (aac)"), and a note for each left out."""
    av = _av()

    outputs, labels, notes, numbers = {}, {}, [], Counter()
    kind = container.format.name
    for stream in source.streams:
        if stream.index == video.index:
            continue
        numbers[stream.type] += 1
        context = getattr(stream, "codec_context", None)
        name = context.codec.canonical_name if context is not None and context.codec else "unknown codec"
        label = f"{stream.type} stream {numbers[stream.type]} ({name})"
        if stream.type == "video":
            notes.append(f"{label} not copied: only the first video stream is restored")
        elif name not in container.supported_codecs:
            never = ", and audio is never re-encoded" if stream.type == "audio" else ""
            notes.append(f"{label} not copied: {kind} files do not hold it{never}")
        else:
            try:
                outputs[stream.index] = container.add_stream_from_template(stream)
                labels[stream.index] = label
            except (ValueError, TypeError, av.FFmpegError) as e:
                notes.append(f"{label} not copied ({_reason(e)})")
    return outputs, labels, notes


def _planes(frame) -> list[np.ndarray]:
    """The planes of a planar frame as (h,w) uint8 arrays, without their row padding."""
    return [np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width].copy() for p in frame.planes]


def _frame_from_planes(planes: list[np.ndarray], pix_fmt: str):
    av = _av()

    frame = av.VideoFrame(planes[0].shape[1], planes[0].shape[0], pix_fmt)
    for plane, data in zip(frame.planes, planes):
        rows = np.zeros((plane.height, plane.line_size), np.uint8)
        rows[:, :plane.width] = data
        plane.update(rows)
    return frame


def _blend_planes(original: list[np.ndarray], new: list[np.ndarray], mask: np.ndarray) -> list[np.ndarray]:
    """YUV 4:2:0 planes: the original where the mask is 0, the new ones where it is 1, mixed between."""
    h, w = mask.shape
    chroma_mask = mask.reshape(h // 2, 2, w // 2, 2).mean((1, 3))
    blended = []
    for old, fresh, m in zip(original, new, (mask, chroma_mask, chroma_mask)):
        old_f = old.astype(np.float32)
        mixed = np.rint(old_f + m * (fresh.astype(np.float32) - old_f)).astype(np.uint8)
        blended.append(np.where(m > 0, mixed, old))
    return blended


def restore_video(src: str | os.PathLike, dst: str | os.PathLike, model, detector, *, codec: str = DEFAULT_CODEC,
                  crf: float = DEFAULT_CRF, chunk: int = 16, select: SelectOptions = SelectOptions(),
                  paste: PasteOptions = PasteOptions(), masks: MaskOptions = MaskOptions(), face_batch: int = 4,
                  progress: bool | str = True, overwrite: bool = True,
                  max_megapixels: float | None = MAX_MEGAPIXELS, info: VideoInfo | None = None,
                  span: range | None = None, cancel: Callable[[], bool | None] | None = None) -> VideoSummary:
    """Restore every face of the video `src` into `dst` (its container from its suffix), streaming.

    Frame count, rate and time base are kept, the other streams (audio, subtitles) are copied packet
    for packet to the source's end (StreamCopy: the summary names what is not), and video is encoded
    with `codec` at `crf` (H.264 CRF 16, yuv420p, by default; a container that cannot hold the codec
    gets its usual one, and the summary says so). `dst` appears whole or not at all: the
    encoding goes to a temporary file beside it, renamed at the end and removed on any failure,
    Ctrl-C included. `progress` shows a bar (tqdm) with frames per second and ETA; a string labels it.
    `select`, `paste`, `masks`, `face_batch` and `cancel` are restore_frames' (faces/options.py).

    With `span`, only those frames of the clip are restored, into `dst` as a segment holding video
    alone, at the clip's timestamps, for `join_segments` to put together with the others and the
    audio: the frames around it are read as far as smoothing looks, so the segments of a clip
    together are the clip restored whole (masks smoothed within a chunk too, where each segment starts
    on a multiple of `chunk`).
    """
    av = _av()

    began = time.perf_counter()
    src, dst = Path(src), Path(dst)
    check_video_options(codec, crf, chunk)
    if paste.background is not None:
        raise ValueError("a background is one picture per frame, held in memory; a video is streamed: enlarge it "
                         "with upscale_by or an upscaler")
    summary = VideoSummary(src, dst)
    reader = VideoReader(src, max_megapixels, info, keep_yuv=True)
    try:
        check_output_size((reader.info.height, reader.info.width), paste)
    except ValueError as e:
        reader.close()
        raise ValueError(f"{src}: {e}") from None
    whole = span is None  # else a segment: video alone, for join_segments
    total = reader.info.frames
    span = range(total) if whole else span
    if not span or not 0 <= span.start < total:
        reader.close()
        where = "holds no frame" if not span else f"starts outside the clip's {total} frames (0:{total})"
        raise ValueError(f"{src}: span {span.start}:{span.stop} {where}")
    if span.stop > total:
        summary.notes.append(f"span {span.start}:{span.stop} runs past the clip's end: it has {total} frames, "
                             f"{span.start}:{total} restored")
        span = range(span.start, total)
    start = max(0, span.start - stream_reach(select))  # the first frame read
    lead = span.start - start  # frames read for smoothing alone, before the segment
    bar = None
    try:
        frames = reader.frames(start)
        first = next(frames, None)  # the first frame says the colour space, rotation and output size
        if first is None:
            raise ValueError(f"{src}: no frame could be decoded")
        with atomic_output(dst, overwrite) as (temp, container):
            writer = None
            try:
                height, width = output_size(first.shape[:2], paste)
                writer = VideoWriter(temp, reader, width, height, codec, crf, container, copy_streams=whole)
                summary.notes += writer.notes
                if reader.bits > 8:
                    summary.notes.append(f"{reader.bits}-bit source ({reader.pix_fmt}) written as 8-bit "
                                         f"{writer.pix_fmt}: frames are restored at 8 bits")
                if writer.pix_fmt != "yuv420p" or (height, width) != first.shape[:2]:  # no source planes to keep
                    reader.keep_yuv = False
                    reader.originals.clear()
                bar = _progress_bar(progress, len(span), src.name)
                for result in restore_frames(_prepend(first, frames), model, detector, chunk=chunk, select=select,
                                             paste=paste, masks=masks, face_batch=face_batch,
                                             selection=summary.selection, span=range(lead, len(span) + lead),
                                             cancel=cancel):
                    pixels = (result.images[..., :3].clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
                    blends = result.masks.float().cpu().numpy()
                    for _ in range(lead):  # read before the segment, for its smoothing
                        reader.pts.popleft()
                        if reader.keep_yuv:
                            reader.originals.popleft()
                    lead = 0
                    for image, mask in zip(pixels, blends):
                        original = reader.originals.popleft() if reader.keep_yuv else None
                        writer.write(image, reader.pts.popleft(), original, mask)
                    summary.frames += len(pixels)
                    summary.faces += result.face_count
                    summary.face_px += result.output_face_px.tolist()
                    summary.restorer_size = summary.restorer_size or result.restorer_size
                    summary.unrestored += result.unrestored
                    summary.rerun_fp32 += result.rerun_fp32
                    if bar is not None:
                        bar.update(len(pixels))
                summary.notes += writer.finish()
            except av.FFmpegError as e:
                if isinstance(e, OSError):
                    raise
                raise ValueError(f"{dst}: the video could not be encoded ({_reason(e)})") from None
            finally:
                if writer is not None:
                    writer.close()
        if summary.frames < len(span):
            summary.notes.append(f"{len(span) - summary.frames} of {len(span)} frames could not be decoded")
    finally:
        if bar is not None:
            bar.close()
        reader.close()
    summary.seconds = time.perf_counter() - began
    return summary


@contextlib.contextmanager
def atomic_output(dst: Path, overwrite: bool = True) -> Iterator[tuple[str, str | None]]:
    """(a temporary file beside `dst`, the FFmpeg container `dst`'s suffix names): see atomic_file.
    SIGTERM ends the block as Ctrl-C does, removing the file. The file is locked while it is written,
    so that the next run removes those a killed run left (SIGKILL, a power cut) and no other."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    container = CONTAINERS.get(dst.suffix.lower())  # named, so the temporary file need not end in .mp4
    suffix = ".part" if container else dst.suffix
    remove_left_behind(dst, suffix)
    with _terminate_as_interrupt(), atomic_file(dst, overwrite, suffix) as temp, _locked(temp):
        yield temp, container


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, a service or a scheduler stopping) raises KeyboardInterrupt, where it would
    otherwise end the process on the spot: only in the main thread (the only one signals reach), and
    only where no one else handles SIGTERM (a Ray worker, a server)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def interrupt(number, frame):
        raise KeyboardInterrupt(f"signal {number} (SIGTERM)")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _locked(temp: str) -> Iterator[None]:
    """An exclusive lock on the temporary file while it is written (none where there is no fcntl)."""
    if fcntl is None:
        yield
        return
    fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_left_behind(dst: Path, suffix: str = ".part") -> None:
    """Remove the temporary files (atomic_file's `.NAME.xxxxxxxx.part`) of runs writing `dst` that
    were killed: those no running writer locks."""
    if fcntl is None:
        return
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.[0-9a-f]{{8}}{re.escape(suffix)}")
    for entry in os.scandir(dst.parent):
        if not pattern.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(entry.path)
        except OSError:  # locked: a run is writing it
            pass
        finally:
            os.close(fd)


def join_segments(segments: list[Path], src: str | os.PathLike, dst: str | os.PathLike,
                  overwrite: bool = True) -> list[str]:
    """Put the segments of `src` restored by restore_video(span=...) together, in order, into `dst`
    with `src`'s other streams (audio, subtitles), as restore_video copies them: packets are copied,
    nothing is encoded again. `dst` appears whole or not at all. Returns notes on the streams `dst`'s
    container cannot hold and on packets not copied."""
    av = _av()

    src, dst = Path(src), Path(dst)
    with contextlib.ExitStack() as stack:
        inputs = [stack.enter_context(av.open(str(path))) for path in segments]
        temp, container = stack.enter_context(atomic_output(dst, overwrite))
        out = stack.enter_context(av.open(temp, "w", format=container))
        video = out.add_stream_from_template(inputs[0].streams.video[0])
        copy = StreamCopy(src, out)
        stack.callback(copy.close)
        original = copy.video
        video.codec_context.framerate = original.average_rate or original.guessed_rate  # Matroska keeps it per track
        pieces = [_moved(part.demux(video=0), {part.streams.video[0].index: video}) for part in inputs]
        for packet in _timed(itertools.chain(*pieces), counted=out.format.name == "avi"):
            copy.mux_until(_decode_time(packet))
            out.mux(packet)
        return copy.notes + copy.finish()


def _timed(packets: Iterator, counted: bool) -> Iterator:
    """The segments' video packets, timed for one stream. AVI counts frames (each segment counts
    from 0, and is written without B-frames); Matroska stores no decoding time for the packets
    before a segment's first frame is shown, and a muxer needs them to increase across the joins."""
    last = None
    for number, packet in enumerate(packets):
        if counted:
            packet.pts = packet.dts = number
        elif packet.dts is None and last is not None:
            packet.dts = last + 1  # still before its own time: a segment starts after the last one ends
        last = packet.dts if packet.dts is not None else last
        yield packet


def _moved(demuxed: Iterator, streams: dict) -> Iterator:
    """The packets, each moved to the output stream for its input stream's index."""
    for packet in demuxed:
        if packet.size:  # not the empty ones that end each stream
            packet.stream = streams[packet.stream.index]
            yield packet


def _decode_time(packet) -> Fraction:
    time = packet.dts if packet.dts is not None else packet.pts
    return Fraction(time or 0) * packet.time_base


def check_video_options(codec: str, crf: float, chunk: int) -> None:
    """Refuse an unknown encoder, a CRF out of range, or an empty chunk, before any work."""
    av = _av()

    try:
        encoder = av.Codec(codec, "w")
    except (ValueError, av.FFmpegError):
        raise ValueError(f"unknown video encoder {codec!r} (libx264, libx265, libvpx-vp9, libsvtav1, ...)") from None
    if encoder.type != "video":
        raise ValueError(f"{codec} is an {encoder.type} encoder, not a video one")
    if not 0 <= crf <= 63:
        raise ValueError(f"crf must be in [0, 63] (lower is better; 16 is near-transparent), got {crf:g}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 frame, got {chunk}")


def _prepend(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _progress_bar(progress: bool | str, total: int, label: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=progress if isinstance(progress, str) else label, unit="frame",
                file=sys.stderr, disable=None, dynamic_ncols=True, leave=False)
