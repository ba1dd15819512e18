"""Video files: nothing lost, nothing unbounded.

Every packet of every audio (and subtitle) stream comes out of restore_video and join_segments, or
the summary says which did not; every frame's size is checked before it is converted; probing a file
costs memory in proportion to the file; killed runs leave nothing behind. Clips are made here with
PyAV, a few frames each, and a stand-in detector, so no shared data is needed.
"""

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from gpen.apps.video import VideoReader, join_segments, probe_video, restore_video
from tests.helpers import IdentityRestorer, mux_tone
from tests.test_video import OneFace, gpen_cli  # noqa: F401 (a fixture)

av = pytest.importorskip("av", reason="video needs PyAV (pip install av)")


def make_clip(path, frames=4, size=(64, 48), rate=25, codec="libx264", audio=("aac",), audio_after=0.0,
              subtitles=False, pix_fmt="yuv420p", sizes=None, fragmented=False):
    """`frames` frames of `codec` with, for each codec in `audio`, a stream of 1024-sample 48 kHz
    packets running `audio_after` seconds past the last frame (written after it, as a recorder
    that stops the camera first does); with `subtitles`, an ASS line. `sizes` gives frame i its own
    size (MJPEG packets, each a JPEG of its own); `fragmented`: a fragmented MP4 (moof boxes)."""
    out = av.open(str(path), "w", options={"movflags": "frag_keyframe+empty_moov"} if fragmented else {})
    video = out.add_stream(codec, rate=rate)
    video.width, video.height = size
    video.pix_fmt = "yuvj420p" if codec == "mjpeg" else pix_fmt
    sounds = []
    for name in audio:
        sound = out.add_stream(name, rate=48000)
        sound.layout = "stereo"
        sounds.append([sound, 0])
    text = out.add_stream("ass") if subtitles else None
    end = frames / rate + audio_after

    def mux_sound(until):
        for entry in sounds:
            entry[1] = mux_tone(out, entry[0], entry[1], until)

    for i in range(frames):
        width, height = sizes[i] if sizes else size
        level = (40 + 20 * i) % 256
        if sizes:
            import cv2

            jpeg = cv2.imencode(".jpg", np.full((height, width, 3), level, np.uint8))[1].tobytes()
            packet = av.Packet(jpeg)
            packet.stream, packet.pts, packet.dts, packet.time_base = video, i, i, Fraction(1, rate)
            out.mux(packet)
        else:
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), level, np.uint8), format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        mux_sound((i + 1) / rate)
    if text is not None:
        line = av.Packet(b"0,0,Default,,0,0,0,,hello")
        line.stream, line.pts, line.dts, line.duration = text, 0, 0, 1000
        line.time_base = Fraction(1, 1000)
        out.mux(line)
    if not sizes:
        out.mux(video.encode())
    mux_sound(end)
    for sound, _ in sounds:
        out.mux(sound.encode())
    out.close()
    return path


def packets(path, kind="audio") -> list[list[bytes]]:
    """The payload of each packet of each stream of `kind`, in order."""
    with av.open(str(path)) as container:
        streams = [s for s in container.streams if s.type == kind]
        found = {s.index: [] for s in streams}
        for packet in container.demux(*streams) if streams else ():
            if packet.size:
                found[packet.stream.index].append(bytes(packet))
        return list(found.values())


def audio_seconds(path) -> float:
    """Where the first audio stream's last packet ends."""
    with av.open(str(path)) as container:
        last = [p for p in container.demux(audio=0) if p.size][-1]
        return float((last.pts + last.duration) * last.time_base)


def restore(source, target, **options):
    return restore_video(source, target, IdentityRestorer(64), OneFace(), progress=False, **options)


# Audio and subtitles: every packet in comes out.

@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_a_four_frame_clip_keeps_all_its_audio(tmp_path, suffix):
    source = make_clip(tmp_path / f"clip{suffix}", frames=4)
    summary = restore(source, tmp_path / f"out{suffix}")
    assert summary.frames == 4 and len(packets(source)[0]) == 9  # 0.16 s of frames, 0.19 s of sound
    assert packets(tmp_path / f"out{suffix}") == packets(source)  # all of it, bit for bit


def test_audio_running_past_the_last_frame_is_kept_whole(tmp_path):
    source = make_clip(tmp_path / "clip.mkv", frames=50, codec="mjpeg", audio_after=0.5)
    restore(source, tmp_path / "out.mkv")
    assert audio_seconds(source) == pytest.approx(2.52, abs=0.03)
    assert audio_seconds(tmp_path / "out.mkv") == audio_seconds(source)
    assert packets(tmp_path / "out.mkv") == packets(source)


def test_every_audio_stream_goes_into_an_mp4(tmp_path):
    source = make_clip(tmp_path / "clip.mkv", frames=4, audio=("aac", "ac3", "libopus"))
    summary = restore(source, tmp_path / "out.mp4")
    assert [len(stream) for stream in packets(tmp_path / "out.mp4")] == [len(s) for s in packets(source)]
    assert packets(tmp_path / "out.mp4") == packets(source)
    assert "not copied" not in str(summary)


def test_subtitles_are_kept_or_named_as_left_out(tmp_path):
    source = make_clip(tmp_path / "clip.mkv", frames=6, subtitles=True)
    restore(source, tmp_path / "out.mkv")
    assert packets(tmp_path / "out.mkv", "subtitle") == packets(source, "subtitle") == [[b"0,0,Default,,0,0,0,,hello"]]
    summary = restore(source, tmp_path / "out.mp4")
    assert "subtitle stream 1 (ass) not copied: mp4 files do not hold it" in str(summary)
    assert packets(tmp_path / "out.mp4") == packets(source)  # the audio still goes


def test_a_packet_the_muxer_refuses_is_counted_and_said(tmp_path, monkeypatch):
    from gpen.apps import video

    source = make_clip(tmp_path / "clip.mkv", frames=8)
    mux = video.StreamCopy.mux

    def refusing(self, packet):
        if self.read[packet.stream.index] == 6:  # its time set back to before the last packet's
            packet.dts = packet.pts = 0
        mux(self, packet)

    monkeypatch.setattr(video.StreamCopy, "mux", refusing)
    summary = restore(source, tmp_path / "out.mkv")
    total = len(packets(source)[0])
    assert f"audio stream 1 (aac): {total - 1} of {total} packets copied (Invalid argument)" in str(summary)
    assert len(packets(tmp_path / "out.mkv")[0]) == total - 1


def test_segments_joined_keep_audio_past_the_last_frame_and_subtitles(tmp_path):
    source = make_clip(tmp_path / "clip.mkv", frames=30, audio=("aac", "libopus"), audio_after=0.5, subtitles=True)
    parts = []
    for span in (range(0, 12), range(12, 30)):
        parts.append(tmp_path / "segments" / f"{span.start}.mkv")
        restore(source, parts[-1], span=span)
    assert join_segments(parts, source, tmp_path / "joined.mkv") == []
    assert packets(tmp_path / "joined.mkv") == packets(source)
    assert packets(tmp_path / "joined.mkv", "subtitle") == packets(source, "subtitle")
    assert "subtitle stream 1 (ass) not copied: mp4 files do not hold it" in \
        join_segments(parts, source, tmp_path / "joined.mp4")
    assert packets(tmp_path / "joined.mp4") == packets(source)


# Limits checked on what is really decoded.

def test_a_frame_size_change_mid_clip_is_refused_before_the_frame_is_converted(tmp_path):
    source = make_clip(tmp_path / "switch.mkv", frames=6, codec="mjpeg", size=(160, 120), audio=(),
                       sizes=[(160, 120)] * 4 + [(1600, 1200)] * 2)
    assert (probe_video(source).width, probe_video(source).height) == (160, 120)  # the header's size
    with VideoReader(source) as reader:
        frames = reader.frames()
        assert [tuple(next(frames).shape) for _ in range(4)] == [(120, 160, 3)] * 4
        with pytest.raises(ValueError, match=r"switch.mkv: frame 5 is 1600x1200, the clip's frames are 160x120; "
                                             r"a clip whose frame size changes is not restored"):
            next(frames)
    with pytest.raises(ValueError, match="frame 5 is 1600x1200"):
        restore(source, tmp_path / "out.mkv")
    assert sorted(os.listdir(tmp_path)) == ["switch.mkv"]  # no result, no temporary file


def test_cli_a_clip_changing_size_fails_one_line_and_the_others_go_on(gpen_cli, tmp_path, capsys):  # noqa: F811
    (tmp_path / "in").mkdir()
    make_clip(tmp_path / "in" / "a_switch.mkv", frames=6, codec="mjpeg", size=(160, 120), audio=(),
              sizes=[(160, 120)] * 4 + [(320, 240)] * 2)
    make_clip(tmp_path / "in" / "b_good.mkv", frames=4, size=(160, 120))
    assert gpen_cli(tmp_path / "in", "-o", tmp_path / "out") == 1
    captured = capsys.readouterr()
    (line,) = [line for line in captured.err.splitlines() if "failed:" in line]
    assert line.startswith("[1/2] a_switch.mkv: failed: ") and "frame 5 is 320x240" in line
    assert "[2/2] b_good.mkv: 4 frames" in captured.out
    assert sorted(os.listdir(tmp_path / "out")) == ["b_good.mkv"]


def claiming(path, samples):
    """Rewrite the MP4 at `path` so that its sample tables claim `samples` samples of one byte each
    (12 bytes each in stsz, stts and stsc; in a fragmented one, 8 in the fragment's trun) though the
    file holds 4 frames."""

    def rebuild(data):
        out, at = b"", 0
        while at < len(data):
            size, kind = struct.unpack(">I4s", data[at:at + 8])
            body = data[at + 8:at + size]
            if kind in (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf"):
                body = rebuild(body)
            elif kind == b"trun":  # flags: a data offset, then nothing per sample (the defaults apply)
                body = b"\x00\x00\x00\x01" + struct.pack(">I", samples) + body[8:12]
            elif kind == b"stsz":
                body = body[:4] + struct.pack(">II", 1, samples)
            elif kind == b"stts":
                body = body[:4] + struct.pack(">III", 1, samples, 512)
            elif kind == b"stsc":
                body = body[:4] + struct.pack(">IIII", 1, 1, samples, 1)
            elif kind == b"stss":
                body = body[:4] + struct.pack(">I", 0)
            out += struct.pack(">I4s", 8 + len(body), kind) + body
            at += size
        return out

    path.write_bytes(rebuild(path.read_bytes()))
    return path


PEAK_MEMORY = textwrap.dedent("""
    import resource, sys
    from gpen.apps.video import probe_video
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        probe_video(sys.argv[1])
    except ValueError as e:
        print(e)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)  # MB
""")


@pytest.mark.parametrize("fragmented", [False, True], ids=["tables", "fragments"])
def test_a_tiny_mp4_claiming_millions_of_samples_is_refused_in_bounded_memory(tmp_path, fragmented):
    """FFmpeg indexes every sample an MP4's tables claim (35-70 bytes each) as it opens the file: these
    1.6 KB claiming 6 M samples took 210-415 MB more to probe (60 M: 4 GB and 52 s) before the tables
    were checked."""
    source = claiming(make_clip(tmp_path / "claims.mp4", audio=(), fragmented=fragmented), 6_000_000)
    assert source.stat().st_size < 2000
    run = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(source)], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], check=True)
    message, grown = run.stdout.splitlines()
    assert message.startswith(f"{source}: its ") and "table claims 6000000 samples, more than its " in message
    assert int(grown) < 50


def test_sample_tables_within_the_file_pass(tmp_path):
    source = claiming(make_clip(tmp_path / "clip.mp4", frames=4, audio=()), 4)  # the truth, told in the same form
    assert probe_video(source).width == 64


# Runs that are stopped.

SLOW_RUN = textwrap.dedent("""
    import sys, time
    from gpen.apps.video import restore_video
    from tests.helpers import IdentityRestorer
    from tests.test_video import OneFace

    class Slow(IdentityRestorer):
        def restore(self, faces, *args, **kwargs):
            time.sleep(0.2)
            return super().restore(faces, *args, **kwargs)

    try:
        restore_video(sys.argv[1], sys.argv[2], Slow(64), OneFace(), progress=False, chunk=2)
    except KeyboardInterrupt:
        print("interrupted")
        sys.exit(130)
""")


def test_sigterm_ends_a_run_as_ctrl_c_does_leaving_nothing(tmp_path):
    source = make_clip(tmp_path / "clip.mp4", frames=60)
    (tmp_path / "out").mkdir()
    run = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(source), str(tmp_path / "out" / "clip.mp4")],
                           cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, text=True)
    for _ in range(600):  # until the encoding has begun
        if os.listdir(tmp_path / "out") or run.poll() is not None:
            break
        time.sleep(0.05)
    assert [name.endswith(".part") for name in os.listdir(tmp_path / "out")] == [True]
    run.send_signal(signal.SIGTERM)
    assert run.wait(60) == 130 and run.stdout.read() == "interrupted\n"
    assert os.listdir(tmp_path / "out") == []


def test_temporary_files_of_killed_runs_are_removed_by_the_next(tmp_path):
    import fcntl

    source = make_clip(tmp_path / "clip.mkv", frames=4)
    out = tmp_path / "out"
    out.mkdir()
    killed = out / ".clip.mkv.0123abcd.part"  # left by a run killed with SIGKILL
    running = out / ".clip.mkv.89abcdef.part"  # being written by a run still going
    others = [out / ".clip.mkv.notes.part", out / ".other.mkv.0123abcd.part", out / "clip.mkv.0123abcd.part"]
    for path in [killed, running, *others]:
        path.write_bytes(b"partial")
    with open(running, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        restore(source, out / "clip.mkv")
    assert sorted(os.listdir(out)) == sorted(["clip.mkv", running.name, *(path.name for path in others)])


# What the summary says.

def test_ten_bit_frames_written_as_eight_bits_are_said(tmp_path):
    source = make_clip(tmp_path / "ten.mkv", frames=4, pix_fmt="yuv420p10le", audio=())
    summary = restore(source, tmp_path / "out.mkv")
    assert "10-bit source (yuv420p10le) written as 8-bit yuv420p: frames are restored at 8 bits" in str(summary)
    assert "-bit source" not in str(restore(make_clip(tmp_path / "eight.mkv", frames=4, audio=()),
                                            tmp_path / "eight_out.mkv"))


def test_a_span_past_the_clips_end_says_so(tmp_path):
    source = make_clip(tmp_path / "clip.mkv", frames=24, audio=())
    summary = restore(source, tmp_path / "tail.mkv", span=range(20, 40))
    assert summary.frames == 4
    assert "span 20:40 runs past the clip's end: it has 24 frames, 20:24 restored" in str(summary)
    assert "could not be decoded" not in str(summary)
    with pytest.raises(ValueError, match=r"clip.mkv: span 30:40 starts outside the clip's 24 frames \(0:24\)"):
        restore(source, tmp_path / "none.mkv", span=range(30, 40))
