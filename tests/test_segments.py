"""A long clip's segments on Ray (gpen/apps/segments.py): the folder one run holds at a time, and the
records that decide whether a segment left by an earlier run or attempt is reused or restored again."""

import argparse
import json
from types import SimpleNamespace

import pytest

av = pytest.importorskip("av", reason="video needs PyAV (pip install av)")

from gpen.apps import cli  # noqa: E402
from gpen.apps.jobs import Job  # noqa: E402
from gpen.apps.segments import Segment, SegmentFolder  # noqa: E402
from tests.helpers import IdentityRestorer  # noqa: E402
from tests.test_video import OneFace, make_clip  # noqa: E402


def worker_for(source, output):
    """Stands in for a Ray Worker: restores `source` into `output` with the CLI's defaults, returning
    the crops unchanged, one face a frame (model.batches counts what it restored)."""
    parser = argparse.ArgumentParser()
    cli.add_restore_arguments(parser)
    args = parser.parse_args([str(source), "-o", str(output)])
    return SimpleNamespace(model=IdentityRestorer(64), detector=OneFace(), args=args)


@pytest.fixture
def clip(tmp_path):
    return make_clip(tmp_path / "a.mp4", frames=12, audio=None)


def segment_of(clip, span: range, made: dict | None = None) -> Segment:
    """Frames `span` of `clip`, as a run with the settings `made` plans them."""
    job = Job(1, clip, clip.parent / "out" / clip.name)
    folder = SegmentFolder(job.target).path
    folder.mkdir(parents=True, exist_ok=True)
    return Segment(job, span, folder / f"{span.start:09d}-{span.stop:09d}.mp4", json.dumps(made or {"strength": 0.5}))


def test_a_segment_finished_by_an_earlier_run_is_not_restored_again(clip, tmp_path):
    segment = Segment(Job(1, clip, tmp_path / "out" / "a.mp4"), range(4, 12), tmp_path / "parts" / "4.mp4")
    worker = worker_for(clip, tmp_path / "out")
    first = segment.restore(worker, None)
    assert (first.frames, first.faces) == (8, 8) and segment.record.exists()
    worker.model = None  # restoring again would fail
    again = segment.restore(worker, None)
    assert again == first and isinstance(again.selection.missing_indices, dict)


def test_its_record_holds_the_settings_span_frame_count_size_and_hash(clip):
    segment = segment_of(clip, range(4, 12))
    segment.restore(worker_for(clip, segment.job.target.parent), None)
    record = json.loads(segment.record.read_text())
    assert record["made"] == {"strength": 0.5} and record["span"] == [4, 12] and record["frames"] == 8
    assert record["size"] == segment.path.stat().st_size and len(record["sha256"]) == 64
    assert record["summary"]["faces"] == 8


def flip_a_byte(segment):
    data = bytearray(segment.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.path.write_bytes(bytes(data))


def count_nine_frames(segment):
    record = json.loads(segment.record.read_text())
    segment.record.write_text(json.dumps(dict(record, frames=9)))


@pytest.mark.parametrize("damage, reason", [
    (flip_a_byte, "its file is not the one recorded"),
    (lambda s: s.path.write_bytes(s.path.read_bytes()[:-100]), "its file is not the one recorded"),
    (lambda s: s.path.unlink(), "not restored yet"),
    (lambda s: s.record.write_text("[]"), "its record cannot be read"),
    (lambda s: s.record.write_text("42"), "its record cannot be read"),
    (lambda s: s.record.write_text('"a string"'), "its record cannot be read"),
    (lambda s: s.record.write_bytes(s.record.read_bytes()[:50]), "its record cannot be read"),  # cut short
    (lambda s: s.record.write_bytes(b"\xff\xfe"), "its record cannot be read"),
    (lambda s: s.record.write_text("[" * 100_000 + "]" * 100_000), "its record cannot be read"),  # too deep
    (count_nine_frames, "its record counts 9 frames"),
])
def test_a_damaged_segment_or_record_is_restored_again_never_reused(clip, damage, reason):
    segment = segment_of(clip, range(4, 12))
    worker = worker_for(clip, segment.job.target.parent)
    first = segment.restore(worker, None)
    restored = len(worker.model.batches)
    damage(segment)
    with pytest.raises(ValueError, match=reason):
        segment.check()
    again = segment.restore(worker, None)  # not a failure, on this run or the next
    assert len(worker.model.batches) > restored and again.frames == first.frames == 8
    assert segment.check().frames == 8


def test_a_foreign_segment_or_one_made_another_way_is_restored_again(clip):
    worker = worker_for(clip, clip.parent / "out")
    segment, other = segment_of(clip, range(4, 12)), segment_of(clip, range(0, 4))
    segment.restore(worker, None)
    other.restore(worker, None)
    segment.path.write_bytes(other.path.read_bytes())  # another segment's file and record under its name
    segment.record.write_bytes(other.record.read_bytes())
    with pytest.raises(ValueError, match=r"its record is for frames \[0, 4\]"):
        segment.check()
    segment.restore(worker, None)
    assert segment.check().frames == 8
    stronger = segment_of(clip, range(4, 12), made={"strength": 1.0})  # the same frames at another strength
    with pytest.raises(ValueError, match="made with other settings or files"):
        stronger.check()
    restored = len(worker.model.batches)
    stronger.restore(worker, None)
    assert len(worker.model.batches) > restored and stronger.check().frames == 8


def test_a_run_holds_the_folder_and_clears_what_is_not_its_segments(clip):
    segments = [segment_of(clip, range(0, 6)), segment_of(clip, range(6, 12))]
    folder = SegmentFolder(segments[0].job.target)
    for name in ("000000000-000000006.mp4", "000000000-000000006.mp4.json", "000000000-000000004.mp4",
                 ".000000006-000000012.mp4.x1y2.part", "made-with.json"):  # another run's span, a killed one's
        (folder.path / name).write_bytes(b"from an earlier run")
    (folder.path / "stray").mkdir()
    folder.claim(segments, overwrite=False)
    assert sorted(p.name for p in folder.path.iterdir()) == ["000000000-000000006.mp4",
                                                            "000000000-000000006.mp4.json", "lock"]
    second = SegmentFolder(segments[0].job.target)  # another run on the same output, --overwrite or not
    with pytest.raises(ValueError, match=f"another run is restoring it into {segments[0].job.target} now"):
        second.claim(segments, overwrite=True)
    assert (folder.path / "000000000-000000006.mp4").read_bytes() == b"from an earlier run"  # not touched
    folder.lock.release()
    second.claim(segments, overwrite=True)  # once the first has ended
    assert [p.name for p in folder.path.iterdir()] == ["lock"]
    second.lock.release()


def test_a_file_or_link_where_the_folder_goes_is_refused_by_name_and_kept(clip, tmp_path):
    target = tmp_path / "out" / "a.mp4"
    target.parent.mkdir()
    folder = SegmentFolder(target)
    folder.path.write_text("my notes")
    with pytest.raises(ValueError, match=f"{folder.path} is in the way"):
        folder.claim([], overwrite=True)
    assert folder.path.read_text() == "my notes"
    folder.path.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    folder.path.symlink_to(elsewhere)
    with pytest.raises(ValueError, match="is in the way"):
        folder.claim([], overwrite=True)
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"]
