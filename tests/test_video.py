"""Video files: streaming restoration, timing and audio kept, smoothing across chunks, bad inputs.

Clips are made here with PyAV: a few dozen small frames panning over a picture, with a sine as audio.
Tests of timing and containers use a stand-in detector that finds one face per frame, so they need
no shared data; tests of real faces use the Solvay photo and the shared RetinaFace.
"""

import os
from fractions import Fraction

import numpy as np
import pytest
import torch

import gpen
from gpen import SelectOptions
from gpen.apps.video import VideoReader, VideoWriter, join_segments, probe_video, restore_video
from gpen.faces.detect import Faces
from gpen.faces.pipeline import detect_faces, select_tracks, smooth_landmarks
from gpen.faces.stream import restore_frames
from gpen.faces.tracks import smoothing_reach
from tests.helpers import GreyRestorer, IdentityRestorer, mux_tone, random_gpen

av = pytest.importorskip("av", reason="video needs PyAV (pip install av)")

AUDIO = {".mp4": "aac", ".mov": "aac", ".mkv": "libopus", ".webm": "libopus", ".avi": "pcm_s16le"}


def make_clip(path, picture=None, frames=24, size=(320, 240), rate=24, audio="aac", step=3, rotation=0, pts=None,
              gop=None):
    """A clip panning `step` px a frame over `picture` (H,W,3 uint8; a smooth random one if None),
    with a 440 Hz sine in `audio` muxed in time with the frames, as recorders interleave them;
    a keyframe every `gop` frames (the encoder's default if None)."""
    width, height = size
    if picture is None:  # smooth colours, as in a photograph
        import cv2

        rng = np.random.default_rng(0)
        small = rng.integers(0, 256, (height // 16 + 1, (width + step * frames) // 16 + 1, 3)).astype(np.uint8)
        picture = cv2.resize(small, (small.shape[1] * 16, small.shape[0] * 16), interpolation=cv2.INTER_CUBIC)
    codec = {".webm": "libvpx-vp9", ".avi": "mpeg4"}.get(path.suffix, "libx264")
    out = av.open(str(path), "w")
    video = out.add_stream(codec, rate=rate, options={"g": str(gop)} if gop else {})
    video.width, video.height, video.pix_fmt = width, height, "yuv420p"
    if rotation:
        video.set_display_rotation(rotation)
    sound = out.add_stream(audio, rate=48000) if audio else None
    if sound is not None:
        sound.layout = "stereo"
    samples = 0
    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture[:height, step * i:step * i + width, :3]),
                                           format="rgb24")
        frame.pts = i if pts is None else pts[i]
        out.mux(video.encode(frame))
        if sound is not None:
            samples = mux_tone(out, sound, samples, (frame.pts + 1) / rate)
    out.mux(video.encode())
    if sound is not None:
        out.mux(sound.encode())
    out.close()
    return path


def timing(path):
    """(frames decoded, frame rate, time base, frame timestamps) of a file's video."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stamps = [frame.pts for frame in container.decode(stream)]
        return len(stamps), Fraction(stream.average_rate), Fraction(stream.time_base), stamps


def audio_packets(path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(audio=0) if p.size]


class OneFace:
    """Stands in for a detector: one face in the middle of every frame (none at a threshold over 1)."""

    def __init__(self):
        self.shapes = []  # of each batch looked at

    def detect(self, images, threshold=0.5):
        self.shapes.append(tuple(images.shape))
        h, w = images.shape[1:3]
        cx, cy = w / 2, h / 2
        marks = torch.tensor([[[cx - 20, cy - 15], [cx + 20, cy - 15], [cx, cy + 5], [cx - 15, cy + 25],
                               [cx + 15, cy + 25]]])
        if threshold > 1:
            return [Faces.empty() for _ in range(len(images))]
        return [Faces(torch.tensor([[cx - 40, cy - 50, cx + 40, cy + 50]]), torch.ones(1), marks)
                for _ in range(len(images))]


@pytest.fixture(scope="module")
def picture(solvay):
    return (solvay[0, ..., :3] * 255).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def fast_detector(shared):
    return gpen.load_detector(shared / "models" / "retinaface_mobilenet0.25.pth", device="cpu", detect_size=640)


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv", ".webm", ".avi"])
def test_frames_rate_time_base_and_audio_packets_are_kept(tmp_path, suffix):
    source = make_clip(tmp_path / f"clip{suffix}", audio=AUDIO[suffix])
    summary = restore_video(source, tmp_path / "out" / source.name, IdentityRestorer(64), OneFace(), progress=False)
    assert (summary.frames, summary.faces) == (24, 24)
    frames, rate, time_base, stamps = timing(tmp_path / "out" / source.name)
    if suffix == ".avi":  # AVI stores no timestamps: FFmpeg reads H.264 in AVI one frame late, pts = dts + 1
        stamps = [t - 1 for t in stamps]
    assert (frames, rate, time_base, stamps) == timing(source)
    assert audio_packets(tmp_path / "out" / source.name) == audio_packets(source)  # remuxed, bit for bit
    assert sorted(os.listdir(tmp_path / "out")) == [source.name]  # no temporary file left
    if suffix == ".webm":
        assert "video encoded with libvpx-vp9: webm files do not hold libx264" in str(summary)


def test_frames_outside_the_faces_come_back_at_high_quality(tmp_path):
    source = make_clip(tmp_path / "clip.mp4", audio=None)
    summary = restore_video(source, tmp_path / "out.mp4", IdentityRestorer(64), OneFace(), progress=False,
                            select=SelectOptions(threshold=2))
    assert str(summary).startswith("24 frames, 0 faces restored, ") and str(summary).endswith(" s; no face found")
    with av.open(str(source)) as a, av.open(str(tmp_path / "out.mp4")) as b:
        assert b.streams.video[0].codec_context.pix_fmt == "yuv420p"
        before = np.stack([f.to_ndarray(format="rgb24") for f in a.decode(video=0)]).astype(float)
        after = np.stack([f.to_ndarray(format="rgb24") for f in b.decode(video=0)]).astype(float)
    # Where nothing changed the source's own YUV planes are encoded, so the loss is one generation of
    # CRF 16 (~0.9 levels here); through RGB and back, blurred chroma and rounding would add ~1.5 more.
    assert np.abs(after - before).mean() < 1.2
    assert abs((after - before).mean()) < 0.1  # and no drift in brightness


def test_codec_and_quality_are_options(tmp_path):
    source = make_clip(tmp_path / "clip.mkv", audio=None)
    small = restore_video(source, tmp_path / "small.mkv", IdentityRestorer(64), OneFace(), progress=False, crf=40)
    vp9 = restore_video(source, tmp_path / "vp9.mkv", IdentityRestorer(64), OneFace(), progress=False,
                        codec="libvpx-vp9")
    assert (tmp_path / "small.mkv").stat().st_size < (tmp_path / "vp9.mkv").stat().st_size
    assert small.frames == vp9.frames == 24 and probe_video(tmp_path / "vp9.mkv").codec == "vp9"
    with pytest.raises(ValueError, match="unknown video encoder 'h266'"):
        restore_video(source, tmp_path / "x.mkv", IdentityRestorer(64), OneFace(), codec="h266")
    with pytest.raises(ValueError, match="aac is an audio encoder"):
        restore_video(source, tmp_path / "x.mkv", IdentityRestorer(64), OneFace(), codec="aac")


def test_audio_a_container_cannot_hold_is_left_out_and_said(tmp_path):
    source = make_clip(tmp_path / "clip.mp4", audio="aac")
    summary = restore_video(source, tmp_path / "clip.webm", IdentityRestorer(64), OneFace(), progress=False)
    assert "audio stream 1 (aac) not copied: webm files do not hold it, and audio is never re-encoded" in str(summary)
    assert probe_video(tmp_path / "clip.webm").audio == ()


def test_a_rotated_phone_clip_is_restored_upright(tmp_path):
    source = make_clip(tmp_path / "phone.mp4", frames=4, audio=None, rotation=90)
    detector = OneFace()
    restore_video(source, tmp_path / "out.mp4", IdentityRestorer(64), detector, progress=False)
    assert detector.shapes[0][1:3] == (320, 240)  # faces are looked for in the upright frame
    with av.open(str(tmp_path / "out.mp4")) as out:
        frame = next(out.decode(video=0))
        assert (frame.width, frame.height, frame.rotation) == (240, 320, 0)


def test_the_reader_decodes_chunk_by_chunk(tmp_path):
    source = make_clip(tmp_path / "long.mkv", frames=60, size=(64, 48), audio=None, step=1)
    with VideoReader(source) as reader:
        chunks = reader.chunks(16)
        first = next(chunks)
        assert first.shape == (16, 48, 64, 3) and first.dtype == torch.uint8
        assert reader.decoded == 16  # not the whole clip
        assert [len(c) for c in chunks] == [16, 16, 12]
        assert list(reader.pts) == list(probe_video(source).timestamps)


class Counted:
    """Frames handed out one at a time, counting how many have been taken."""

    def __init__(self, count, size=(160, 200)):
        self.count, self.size, self.taken = count, size, 0

    def __iter__(self):
        for i in range(self.count):
            self.taken += 1
            yield torch.full((*self.size, 3), i % 256, dtype=torch.uint8)


@pytest.mark.parametrize("sigma", [0, 2.0])
def test_at_most_chunk_and_reach_frames_are_held(sigma):
    frames, chunk = Counted(100), 8
    reach = smoothing_reach(sigma)  # 9 frames each side for sigma 2
    restored, held = 0, []
    for result in restore_frames(frames, IdentityRestorer(32), OneFace(), chunk=chunk,
                                 select=SelectOptions(temporal_sigma=sigma)):
        assert 1 <= len(result.images) <= chunk and result.images.dtype == torch.float32
        assert result.images[0, 0, 0, 0] * 255 == pytest.approx(restored % 256)  # in order (a corner: no face)
        restored += len(result.images)
        held.append(frames.taken - restored + len(result.images))  # frames taken and not yet handed back
    assert restored == 100 and max(held) <= chunk + reach


def test_streamed_landmarks_equal_whole_clip_smoothing(picture, fast_detector):
    """Frames pan 3 px a frame over the Solvay photo (several faces); chunks of 6 frames put 4 chunk
    boundaries in 30 frames. Streaming with look-ahead gives whole-clip smoothing; smoothing chunk
    by chunk would not."""
    frames = [torch.from_numpy(np.ascontiguousarray(picture[10:250, 3 * t:3 * t + 400])) for t in range(30)]
    found = detect_faces(torch.stack(frames).float() / 255, fast_detector)  # every face; max_faces picks tracks
    raw = select_tracks(found, SelectOptions(max_faces=4))
    whole = select_tracks(found, SelectOptions(max_faces=4, temporal_sigma=1.5))  # as detect_faces would give
    streamed = [faces for result in restore_frames(iter(frames), IdentityRestorer(64), fast_detector, chunk=6,
                                                   select=SelectOptions(max_faces=4, temporal_sigma=1.5))
                for faces in result.faces]
    assert [len(f) for f in streamed] == [len(f) for f in whole] and min(len(f) for f in whole) == 4
    gap = max(float((s.landmarks - w.landmarks).abs().max()) for s, w in zip(streamed, whole))
    assert gap < 0.05
    assert max(float((r.landmarks - w.landmarks).abs().max()) for r, w in zip(raw, whole)) > 0.5  # it smooths
    chunked = [f for start in range(0, 30, 6) for f in smooth_landmarks(raw[start:start + 6], 1.5)]
    assert max(float((c.landmarks - w.landmarks).abs().max()) for c, w in zip(chunked, whole)) > 0.1


class CountingDetector:
    """A detector that counts the frames it is shown."""

    def __init__(self, detector):
        self.detector, self.frames = detector, 0

    def __getattr__(self, name):
        return getattr(self.detector, name)

    def detect(self, images, *args, **kwargs):
        self.frames += len(images)
        return self.detector.detect(images, *args, **kwargs)


def test_segments_restore_as_the_whole_clip_does(picture, fast_detector):
    """A long clip cut into segments (on Ray, each can go to another worker): each reads the
    frames around it only as far as smoothing reaches, restores its own frames alone, and together
    they give the landmarks of the whole clip restored in one stream."""
    frames = [torch.from_numpy(np.ascontiguousarray(picture[10:250, 3 * t:3 * t + 400])) for t in range(30)]
    options = dict(chunk=6, select=SelectOptions(max_faces=4, temporal_sigma=1.5))
    results = list(restore_frames(iter(frames), IdentityRestorer(64), fast_detector, **options))
    whole = [faces for result in results for faces in result.faces]
    restored = torch.cat([result.images for result in results])
    reach = smoothing_reach(1.5)
    segments = []
    for span in (range(0, 11), range(11, 20), range(20, 30)):
        detector, taken = CountingDetector(fast_detector), []

        def counted():
            for frame in frames:
                taken.append(1)
                yield frame

        results = list(restore_frames(counted(), IdentityRestorer(64), detector, span=span, **options))
        images = torch.cat([result.images for result in results])
        assert (images - restored[span.start:span.stop]).abs().max() < 1 / 255  # its frames, no others
        assert len(taken) == min(30, span.stop + reach)  # read no further than smoothing reaches
        assert detector.frames == min(30, span.stop + reach) - max(0, span.start - reach)  # earlier ones skipped
        segments += [faces for result in results for faces in result.faces]
    assert [len(f) for f in segments] == [len(f) for f in whole]
    assert max(float((s.landmarks - w.landmarks).abs().max()) for s, w in zip(segments, whole)) < 0.05


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".avi"])
def test_the_reader_starts_at_any_frame(tmp_path, suffix):
    source = make_clip(tmp_path / f"clip{suffix}", frames=30, size=(64, 48), audio=None, step=1, gop=7)
    with VideoReader(source) as reader:
        every, stamps = list(reader.frames()), list(reader.pts)
    for start in (1, 7, 12, 29):
        with VideoReader(source) as reader:
            later = list(reader.frames(start))
            assert list(reader.pts) == stamps[start:]
        assert len(later) == 30 - start and all(torch.equal(a, b) for a, b in zip(later, every[start:]))


@pytest.mark.parametrize("suffix, silent", [(s, False) for s in (".mp4", ".mov", ".mkv", ".webm", ".avi")]
                         + [(".mp4", True), (".mkv", True)], ids=lambda v: {True: "silent", False: "audio"}.get(v, v))
def test_segments_joined_are_the_clip_restored_whole(tmp_path, suffix, silent):
    source = make_clip(tmp_path / f"clip{suffix}", frames=30, audio=None if silent else AUDIO[suffix], step=2, gop=8)
    options = dict(progress=False, select=SelectOptions(temporal_sigma=1), chunk=4, crf=0)  # x264 at CRF 0 is lossless
    restore_video(source, tmp_path / f"whole{suffix}", GreyRestorer(64), OneFace(), **options)
    parts = []
    for span in (range(0, 11), range(11, 20), range(20, 30)):
        part = tmp_path / "segments" / f"{span.start}{suffix}"
        summary = restore_video(source, part, GreyRestorer(64), OneFace(), span=span, **options)
        assert (summary.frames, summary.faces) == (len(span), len(span))
        with av.open(str(part)) as segment:
            assert not segment.streams.audio  # the clip's audio is copied once, whole, when joining
        parts.append(part)
    with pytest.raises(ValueError, match="span 5:5 holds no frame"):
        restore_video(source, tmp_path / "segments" / f"empty{suffix}", GreyRestorer(64), OneFace(), span=range(5, 5),
                      **options)
    assert join_segments(parts, source, tmp_path / f"joined{suffix}") == []
    joined, whole = tmp_path / f"joined{suffix}", tmp_path / f"whole{suffix}"
    assert timing(joined) == timing(whole)
    if silent:
        with av.open(str(joined)) as result:
            assert not result.streams.audio
    else:
        assert audio_packets(joined) == audio_packets(source)
    if suffix != ".webm":  # VP9 at CRF 0 is not lossless
        with av.open(str(joined)) as a, av.open(str(whole)) as b:
            assert all(np.array_equal(x.to_ndarray(), y.to_ndarray()) for x, y in zip(a.decode(video=0),
                                                                                       b.decode(video=0)))
    assert sorted(os.listdir(tmp_path)) == sorted(["clip" + suffix, "segments", "whole" + suffix, "joined" + suffix])


def test_restore_video_with_gpen_and_real_faces(tmp_path, picture, fast_detector):
    source = make_clip(tmp_path / "solvay.mp4", picture, frames=12, size=(400, 240))
    summary = restore_video(source, tmp_path / "out" / "solvay.mp4", random_gpen(32), fast_detector,
                            progress=False, select=SelectOptions(max_faces=2, temporal_sigma=1), chunk=5)
    assert (summary.frames, summary.faces) == (12, 24)
    assert str(summary).startswith("12 frames, 24 faces restored, ")
    assert timing(tmp_path / "out" / "solvay.mp4")[0] == 12


def test_ctrl_c_while_encoding_leaves_nothing(tmp_path, monkeypatch):
    source = make_clip(tmp_path / "clip.mp4")
    write = VideoWriter.write

    def interrupted(self, *frame):
        if self.encoded == 10:
            raise KeyboardInterrupt
        write(self, *frame)

    monkeypatch.setattr(VideoWriter, "write", interrupted)
    (tmp_path / "out").mkdir()
    with pytest.raises(KeyboardInterrupt):
        restore_video(source, tmp_path / "out" / "clip.mp4", IdentityRestorer(64), OneFace(), progress=False)
    assert os.listdir(tmp_path / "out") == []


def test_an_existing_result_is_kept_when_overwrite_is_false(tmp_path):
    source = make_clip(tmp_path / "clip.mkv", audio=None, frames=4)
    (tmp_path / "out.mkv").write_bytes(b"earlier")
    with pytest.raises(FileExistsError):
        restore_video(source, tmp_path / "out.mkv", IdentityRestorer(64), OneFace(), progress=False, overwrite=False)
    assert (tmp_path / "out.mkv").read_bytes() == b"earlier"
    assert sorted(os.listdir(tmp_path)) == ["clip.mkv", "out.mkv"]


def bad_clips(folder):
    """Each kind of bad input, and the message it gets."""
    folder.mkdir()
    (folder / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    whole = make_clip(folder / "whole.mkv", audio=None).read_bytes()
    (folder / "whole.mkv").unlink()
    (folder / "cut.mkv").write_bytes(whole[:int(len(whole) * 0.9)])
    with av.open(str(folder / "sound.mkv"), "w") as out:  # audio only
        sound = out.add_stream("libopus", rate=48000)
        wave = np.zeros((1, 960 * 10), np.float32)
        chunk = av.AudioFrame.from_ndarray(wave, format="flt", layout="mono")
        chunk.sample_rate = 48000
        out.mux(sound.encode(chunk))
        out.mux(sound.encode())
    make_clip(folder / "vfr.mkv", audio=None, pts=[t + t // 4 for t in range(24)])  # a frame dropped every 4
    return {"noise.mp4": "not a video file FFmpeg can read (Invalid data found when processing input)",
            "cut.mkv": "cut short: its frames last",
            "sound.mkv": "holds no video stream (only audio)",
            "vfr.mkv": "variable frame rate (frames last 4"}  # 41-42 ms, and 83 where a frame is missing


def test_bad_inputs_are_refused_with_the_file_named(tmp_path):
    for name, message in bad_clips(tmp_path / "bad").items():
        with pytest.raises(ValueError) as refused:
            probe_video(tmp_path / "bad" / name)
        assert str(refused.value).startswith(f"{tmp_path / 'bad' / name}: {message}")


# The command line, run in this process on clips and photos.

@pytest.fixture
def gpen_cli(monkeypatch, shared, small_checkpoint):
    """python -m gpen restore with the small random GPEN and the shared detector; returns the exit status."""
    from gpen.apps import cli, jobs

    monkeypatch.setattr(jobs, "keep_freed_memory", lambda: None)
    detector = shared / "models" / "retinaface_mobilenet0.25.pth"
    return lambda *args: cli.main(["restore", *map(str, args), "--model", str(small_checkpoint),
                                   "--detector", str(detector), "--detect-size", "640"])


def test_cli_restores_photos_and_clips_in_one_call(gpen_cli, tmp_path, picture, capsys):
    from gpen.files.images import write_image

    (tmp_path / "in").mkdir()
    make_clip(tmp_path / "in" / "clip.mp4", picture, frames=8, size=(400, 240))
    write_image(tmp_path / "in" / "photo.png", picture[:240, :400] / 255)
    assert gpen_cli(tmp_path / "in", "-o", tmp_path / "out", "--max-faces", 1, "--temporal-smoothing", 1,
                    "--crf", 20, "--chunk", 3) == 0
    out = capsys.readouterr().out
    assert "[1/2] clip.mp4: 8 frames, 8 faces restored, " in out and f"GPEN-BFR-256 fits them -> {tmp_path / 'out' / 'clip.mp4'}" in out
    assert "[2/2] photo.png: restored 1 face(s) in 1 image(s)" in out
    assert timing(tmp_path / "out" / "clip.mp4") == timing(tmp_path / "in" / "clip.mp4")
    assert audio_packets(tmp_path / "out" / "clip.mp4") == audio_packets(tmp_path / "in" / "clip.mp4")
    assert gpen_cli(tmp_path / "in" / "clip.mp4", "-o", tmp_path / "out") == 0
    assert f"clip.mp4: skipped: {tmp_path / 'out' / 'clip.mp4'} exists (--overwrite replaces it)" in \
        capsys.readouterr().out


def test_cli_bad_clips_fail_one_line_each_and_the_rest_complete(gpen_cli, tmp_path, picture, capsys):
    messages = bad_clips(tmp_path / "in")
    make_clip(tmp_path / "in" / "good.mov", picture, frames=4, size=(400, 240))
    assert gpen_cli(tmp_path / "in", "-o", tmp_path / "out", "--max-faces", 1) == 1
    captured = capsys.readouterr()
    for name, message in messages.items():
        (line,) = [line for line in captured.err.splitlines() if f"] {name}: failed: " in line]
        assert f"{tmp_path / 'in' / name}: {message}" in line
    assert "good.mov: 4 frames, 4 faces restored" in captured.out
    assert "4 of 5 file(s) failed" in captured.err
    assert sorted(os.listdir(tmp_path / "out")) == ["good.mov"]


def test_cli_ctrl_c_leaves_no_partial_clip(gpen_cli, tmp_path, picture, capsys, monkeypatch):
    source = make_clip(tmp_path / "clip.webm", picture, frames=8, size=(400, 240), audio="libopus")
    write = VideoWriter.write

    def interrupted(self, *frame):
        if self.encoded == 3:
            raise KeyboardInterrupt
        write(self, *frame)

    monkeypatch.setattr(VideoWriter, "write", interrupted)
    assert gpen_cli(source, "-o", tmp_path / "out", "--max-faces", 1) == 130
    assert capsys.readouterr().err.endswith("cancelled\n") and os.listdir(tmp_path / "out") == []


def test_cli_refuses_aligned_for_clips_and_bad_video_options(gpen_cli, tmp_path, capsys):
    source = make_clip(tmp_path / "clip.mp4", frames=2, audio=None)
    assert gpen_cli(source, "-o", tmp_path / "out", "--aligned") == 1
    assert "--aligned is for aligned face crops in image files, not video" in capsys.readouterr().err
    assert gpen_cli(source, "-o", tmp_path / "out", "--crf", 99) == 1
    assert capsys.readouterr().err == \
        "error: crf must be in [0, 63] (lower is better; 16 is near-transparent), got 99\n"
