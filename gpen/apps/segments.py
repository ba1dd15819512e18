"""A long clip's segments while it is restored on Ray (see distributed.py).

They wait in a hidden folder beside the result, which one run at a time holds (a file lock inside
it): a second run on the same output is refused for that clip rather than deleting or reusing what
the first is writing. Each segment has a record beside it: what it was made with (the run's settings,
made_with), its span, frame count, size and sha256, and its summary. A segment is reused only where
its record and file check out against this run's plan, and checked again before it is joined; one
that does not is restored again, so nothing damaged, foreign or made another way ends up in a result.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import filelock

from ..faces.pipeline import Selection
from ..files.atomic import write_file_atomically
from ..files.download import file_sha256
from .jobs import restore_clip
from .video import VideoSummary

LOCK = "lock"  # the folder's lock file, held by the run that restores its segments


@dataclass(frozen=True)
class Segment:
    """Frames `span` of a long clip's job, restored into `path` beside the result, to be joined with
    the clip's other segments; `made` is the JSON of what decides its pixels (made_with)."""

    job: object
    span: range
    path: Path
    made: str = "{}"

    @property
    def record(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    @property
    def label(self) -> str:
        return f"{self.job.source.name} [{self.span.start}:{self.span.stop}]"

    def restore(self, worker, info) -> VideoSummary:
        """Its summary: the one recorded by an earlier run or attempt where the segment checks out,
        else restored (again) by `worker` and recorded."""
        try:
            return self.check()
        except ValueError:
            self.discard()
        summary = restore_clip(self.job, worker.model, worker.detector, worker.args, info, self.label, self.span,
                               self.path)
        record = {"made": json.loads(self.made), "span": [self.span.start, self.span.stop], "frames": summary.frames,
                  "size": self.path.stat().st_size, "sha256": file_sha256(self.path),
                  "summary": dataclasses.asdict(summary)}
        write_file_atomically(self.record, json.dumps(record, default=str).encode())
        return summary

    def check(self) -> VideoSummary:
        """Its recorded summary, or a ValueError saying why the segment is not this one as this run makes it."""
        if not self.record.is_file() or not self.path.is_file():
            raise ValueError("not restored yet")
        try:
            record = json.loads(self.record.read_bytes())
            summary = read_summary(record["summary"])
            made, span, frames, size, sha256 = (record[key] for key in ("made", "span", "frames", "size", "sha256"))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise ValueError("its record cannot be read") from None
        if made != json.loads(self.made):
            raise ValueError("it was made with other settings or files")
        if span != [self.span.start, self.span.stop]:
            raise ValueError(f"its record is for frames {span}")
        if frames != summary.frames or not 0 < frames <= len(self.span):
            raise ValueError(f"its record counts {frames} frames")
        if self.path.stat().st_size != size or file_sha256(self.path) != sha256:
            raise ValueError("its file is not the one recorded")
        return summary

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.record.unlink(missing_ok=True)


def read_summary(fields: dict) -> VideoSummary:
    """A segment's VideoSummary, from its record."""
    fields = dict(fields)
    chosen = dict(fields.pop("selection"))
    chosen["missing_indices"] = {int(k): v for k, v in chosen["missing_indices"].items()}
    return VideoSummary(**dict(fields, source=Path(fields["source"]), target=Path(fields["target"]),
                               selection=Selection(**chosen)))


def segment_folder(target: Path) -> Path:
    """Where a clip's segments wait to be joined: a hidden folder beside its result."""
    return target.with_name(f".{target.name}.segments")


class SegmentFolder:
    """A clip's segment folder, held by one run at a time."""

    def __init__(self, target: Path):
        self.target = target
        self.path = segment_folder(target)
        self.lock = filelock.FileLock(str(self.path / LOCK))

    def claim(self, segments: list[Segment], overwrite: bool) -> None:
        """Hold the folder for this run, and clear from it what is not one of `segments` (all with
        `overwrite`): other runs' spans, temporary files of a killed one. Where another run holds it,
        ValueError, not a wait: that run may take hours, and whether its result is then skipped or
        restored again (--overwrite) is better decided once it has ended."""
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_dir()):
            raise ValueError(f"{self.path} is in the way: the segments of {self.target.name} wait in a folder by "
                             "that name; move or remove it")
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire(timeout=0)
        except filelock.Timeout:
            raise ValueError(f"another run is restoring it into {self.target} now (it holds {self.lock.lock_file}); "
                             "run again once that one has ended") from None
        keep = {LOCK} if overwrite else {LOCK} | {name for s in segments for name in (s.path.name, s.record.name)}
        try:
            for entry in self.path.iterdir():
                if entry.name in keep:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        except OSError:
            self.lock.release()
            raise
