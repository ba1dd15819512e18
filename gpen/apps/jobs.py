"""The work of `python -m gpen restore`, apart from its arguments: plan the jobs, admit them from
their headers, load the models, and restore one file or clip. The CLI and Ray both run jobs through here."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from glob import glob
from pathlib import Path

import torch

from ..devices import resolve_device
from ..faces.detect import check_detect_size, check_rotations
from ..faces.options import MaskOptions, PasteOptions, SelectOptions, from_values
from ..faces.paste import check_output_size
from ..faces.pipeline import detect_faces, restore_faces, select_tracks
from ..faces.restore import restore_aligned
from ..files.catalogue import lookup, resolve
from ..files.images import IMAGE_SUFFIXES, check_image_size, read_image, write_image
from ..files.weights import CheckpointError
from ..loader import check_weights, load_detector, load_model, load_parser, load_upscaler
from .video import VIDEO_SUFFIXES, VideoInfo, check_video_options, probe_video, restore_video


@dataclass(frozen=True)
class Job:
    number: int  # from 1, in input order
    source: Path
    target: Path


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def expand_inputs(items: list[str], output: Path | None = None) -> tuple[list[Path], list[Path]]:
    """The image and video files the inputs name (files, folders with their subfolders, globs), and the
    folders named, below which results keep the files' paths. Within a folder, hidden subfolders, links
    to folders and the output folder (where results of earlier runs are) are left out, each named."""
    suffixes = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    files, folders = [], []
    for item in items:
        path = Path(item)
        if path.is_dir():
            folders.append(path)
            files += [f for f in files_below(path, output) if f.suffix.lower() in suffixes]
        elif path.is_file():
            files.append(path)
        elif matches := sorted(glob(item, recursive=True)):
            files += [Path(m) for m in matches if Path(m).suffix.lower() in suffixes]
        else:
            raise FileNotFoundError(f"{item}: no such file, folder or pattern")
    if not files:
        raise ValueError("no image or video files among the inputs")
    return files, folders


def files_below(folder: Path, output: Path | None) -> list[Path]:
    """The files in `folder` and its subfolders, in name order, a folder's own files first."""
    output_id = file_id(output) if output is not None and output.is_dir() else None
    found = []
    for top, subfolders, names in os.walk(folder):
        found += [Path(top, name) for name in sorted(names)]
        entered = []
        for name in sorted(subfolders):
            if why := skipped_folder(Path(top, name), output_id):
                print(f"{Path(top, name)}: skipped: {why}", file=sys.stderr, flush=True)
            else:
                entered.append(name)
        subfolders[:] = entered  # os.walk goes into these alone, in this order
    return found


def skipped_folder(path: Path, output_id: tuple[int, int] | None) -> str:
    """Why a subfolder of an input folder is left out, or '' to go into it."""
    if path.is_symlink():
        return "a link to a folder (name it as an input to restore what it holds)"
    if path.name.startswith("."):
        return "a hidden folder"
    if output_id is not None and file_id(path) == output_id:
        return "the output folder (-o)"
    return ""


def plan_jobs(files: list[Path], output: Path, folders: list[Path] = ()) -> list[Job]:
    """Where each result goes: `output` itself for one input and a file name of its kind (image or
    video), else under `output` at the input's path relative to the common folder of the inputs and
    the input `folders`. Refused, before any work, when `output` names a file that cannot hold the
    results, a result would land on an input or two results on one file."""
    unique: dict[tuple[int, int], Path] = {}
    for file in files:
        unique.setdefault(file_id(file), file)  # a file named twice (a folder and a glob) runs once
    files = list(unique.values())
    check_output_name(files, output)
    kind = VIDEO_SUFFIXES if files and is_video(files[0]) else IMAGE_SUFFIXES
    if len(files) == 1 and output.suffix.lower() in kind and not output.is_dir():
        jobs = [Job(1, files[0], output)]
    else:
        absolute = [Path(os.path.abspath(f)) for f in files]
        common = os.path.commonpath([a.parent for a in absolute] + [os.path.abspath(f) for f in folders])
        jobs = [Job(n, f, output / a.relative_to(common)) for n, (f, a) in enumerate(zip(files, absolute), 1)]
    inputs = {file_id(job.source) for job in jobs}
    targets: dict[str, Path] = {}
    for job in jobs:
        if job.target.exists() and file_id(job.target) in inputs:
            raise ValueError(f"{job.target} is an input; results never replace inputs: choose another -o")
        other = targets.setdefault(os.path.normcase(job.target.resolve()), job.source)
        if other != job.source:
            raise ValueError(f"{other} and {job.source} would both be written to {job.target}")
    return jobs


def check_output_name(files: list[Path], output: Path) -> None:
    """-o with an image or video file name is that one result: refused for several inputs, or for an
    input of the other kind, rather than made a folder of that name."""
    suffix = output.suffix.lower()
    if output.is_dir() or suffix not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        return
    named = "a video" if suffix in VIDEO_SUFFIXES else "an image"
    if len(files) > 1:
        raise ValueError(f"-o {output} names {named} file, but there are {len(files)} inputs: "
                         "give a folder for their results")
    if is_video(files[0]) != (suffix in VIDEO_SUFFIXES):
        kind = "a video" if is_video(files[0]) else "an image"
        raise ValueError(f"-o {output} names {named} file, but {files[0]} is {kind}: "
                         f"give {kind} file name ({files[0].suffix}) or a folder")


def file_id(path: Path) -> tuple[int, int]:
    """What makes two paths one file: links, '..' and case-insensitive names included."""
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def check_writable(folder: Path) -> None:
    """Create the output folder and a file in it now, rather than fail after the work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"{folder}: results cannot be written here ({e.strerror or e})") from None


def check_options(args) -> None:
    """Refuse bad option values once, with the library's messages, instead of failing every file."""
    restore_options(args)
    check_detect_size(args.detect_size)
    check_rotations(args.rotations)
    if not args.ray_segment >= 0:
        raise ValueError(f"--ray-segment must be 0 (never split) or a number of seconds, got {args.ray_segment:g}")
    if (args.changed_from or args.parser) and (args.aligned or not args.face_align):
        raise ValueError("--changed-from and --parser work on detected faces; aligned crops (--aligned) have none")
    if (args.upscaler or args.upscale_by != 1) and (args.aligned or not args.face_align):
        raise ValueError("--upscale and --upscaler enlarge whole images around their faces; aligned crops "
                         "(--aligned) are restored at GPEN's size")
    if args.changed_from and not Path(args.changed_from).exists():
        raise FileNotFoundError(f"--changed-from {args.changed_from}: no such file or folder")


def restore_options(args, changed_from=None, parsers=None, upscaler=None) -> tuple[SelectOptions, PasteOptions,
                                                                               MaskOptions]:
    """The restore options the flags give (faces/options.py), with the image before a swap, the parsers
    and the upscaler, loaded, where there are some."""
    values = vars(args)
    return (from_values(SelectOptions, values, changed_from=changed_from),
            from_values(PasteOptions, values, upscaler=upscaler), from_values(MaskOptions, values, parser=parsers))


def changed_from_file(job: Job, args) -> Path | None:
    """The image before the swap for this job's input: --changed-from itself when a file, else the
    file at the input's path (below the inputs' common folder) in that folder."""
    if not args.changed_from:
        return None
    before = Path(args.changed_from)
    if not before.is_dir():
        return before
    output = Path(args.output)
    return before / (job.target.relative_to(output) if job.target != output else job.source.name)


@functools.lru_cache(maxsize=1)  # loaded once per process, as the model is: the CLI's run, or a Ray worker
def load_parsers(names: tuple[str, ...], device: str, models_dir: str | None) -> list:
    return [load_parser(resolve(name, "parser", models_dir), device=device) for name in names]


@functools.lru_cache(maxsize=1)
def load_upscaler_once(name: str, device: str, models_dir: str | None):
    return load_upscaler(resolve(name, "upscaler", models_dir), device=device)


def upscaler_for(args, detector):
    """The --upscaler network, on the detector's device (where the frames are pasted), or None without one."""
    if not args.upscaler:
        return None
    return load_upscaler_once(args.upscaler, str(getattr(detector, "device", "cpu")), args.models_dir)


def parsers_for(args, detector) -> list | None:
    """The --parser parsers, on the detector's device (where crops are cut), or None without one."""
    if not args.parser:
        return None
    return load_parsers(tuple(args.parser), str(getattr(detector, "device", "cpu")), args.models_dir)


def check_sequence(jobs: list[Job], detect: bool, max_megapixels: float) -> None:
    """--temporal-smoothing needs detected faces in frames of one size; checked from the headers."""
    if not detect:
        raise ValueError("--temporal-smoothing steadies detected faces; aligned crops have none to steady")
    sizes = {job.source: check_image_size(job.source, max_megapixels).upright_size for job in jobs}
    first = jobs[0].source
    for path, size in sizes.items():
        if size != sizes[first]:
            raise ValueError(f"--temporal-smoothing needs frames of one size: {first} is {sizes[first][0]}x"
                             f"{sizes[first][1]}, {path} is {size[0]}x{size[1]}")


class Report:
    """One line per file (results on stdout, failures on stderr), the counts, and the exit status."""

    def __init__(self, total: int):
        self.total, self.skipped, self.failed = total, 0, 0

    def prefix(self, job: Job) -> str:
        return f"[{job.number}/{self.total}] {job.source.name}"

    def done(self, job: Job, summary: str) -> None:
        """The summary's first line, then its details (Restoration.report's faces) indented below."""
        line, *details = summary.splitlines() or [""]
        print("\n    ".join([f"{self.prefix(job)}: {line} -> {job.target}", *details]), flush=True)

    def skip(self, job: Job, reason: str) -> None:
        self.skipped += 1
        print(f"{self.prefix(job)}: skipped: {reason}", flush=True)

    def fail(self, job: Job, error: Exception) -> None:
        self.failed += 1
        print(f"{self.prefix(job)}: failed: {error}", file=sys.stderr, flush=True)

    def exit_status(self) -> int:
        if self.skipped:
            print(f"{self.skipped} of {self.total} file(s) skipped: their results exist (--overwrite replaces them)",
                  file=sys.stderr)
        if self.failed:
            print(f"{self.failed} of {self.total} file(s) failed", file=sys.stderr)
        return 1 if self.failed else 0


def admit(jobs: list[Job], args, report: Report, detect: bool = True) -> tuple[list[Job], dict]:
    """The jobs to run: their result may be written and their image (and its result) is not too large, or
    their video readable, holding a video stream, of constant frame rate; and what was read of each video.
    Decided from names, headers and packets, before the models are loaded."""
    todo, videos = [], {}
    enlarged = replace(restore_options(args)[1], upscale_by=output_scale(args))
    for job in jobs:
        if job.target.exists() and not args.overwrite:
            report.skip(job, f"{job.target} exists (--overwrite replaces it)")
            continue
        try:
            if not is_video(job.source):
                width, height = check_image_size(job.source, args.max_megapixels).upright_size
                check_output_size((height, width), enlarged)
            elif not detect:
                raise ValueError(f"{job.source}: --aligned is for aligned face crops in image files, not video")
            elif args.changed_from:
                raise ValueError(f"{job.source}: --changed-from compares images; it does not take video files")
            else:
                info = videos[job] = probe_video(job.source, args.max_megapixels)
                check_output_size((info.height, info.width), enlarged)
        except (ValueError, OSError) as e:
            report.fail(job, e)
            continue
        todo.append(job)
    return todo, videos


def output_scale(args) -> float:
    """How many times larger than its input each result is: --upscale, else the --upscaler's own scale
    (read from its file, without building it), else 1."""
    if args.upscale_by != 1 or not args.upscaler:
        return args.upscale_by
    return check_model(find_model(args.upscaler, "upscaler", args.models_dir), "upscaler", "--upscaler").scale


@dataclass
class Plan:
    """What a restore run will do, decided from the options, names and headers before any model is loaded."""

    jobs: list[Job]  # admitted: to be restored
    videos: dict[Job, VideoInfo]  # what was read of each clip
    report: Report
    detect: bool  # False for aligned crops
    device: torch.device | None  # None on Ray: each worker resolves its own


def plan_run(args, on_ray: bool = False) -> Plan:
    """Plan `python -m gpen restore`'s jobs and admit them, refusing bad options and outputs first."""
    device = None if on_ray else resolve_device(args.device)
    files, folders = expand_inputs(args.inputs + args.legacy_inputs, Path(args.output))
    jobs = plan_jobs(files, Path(args.output), folders)
    detect = args.face_align and not args.aligned
    if any(is_video(job.source) for job in jobs):
        check_video_options(args.codec, args.crf, args.chunk)
    frames = [job for job in jobs if not is_video(job.source)]  # with --temporal-smoothing, one sequence
    if args.temporal_smoothing > 0 and len(frames) > 1:
        check_sequence(frames, detect, args.max_megapixels)
        if on_ray:
            raise ValueError("--temporal-smoothing over image inputs makes them one sequence, which --ray does not "
                             "split; run it without --ray (video files are smoothed within each file with --ray)")
    check_writable(Path(os.path.commonpath([job.target.parent for job in jobs])))
    report = Report(len(jobs))
    todo, videos = admit(jobs, args, report, detect)
    return Plan(todo, videos, report, detect, device)


def restore_here(plan: Plan, args) -> None:
    """Restore the plan's jobs in this process, one after the other, telling its report of each."""
    model, detector = load_models(args, plan.device, plan.detect)
    sequence = [job for job in plan.jobs if not is_video(job.source)]
    smoothed = args.temporal_smoothing > 0 and len(sequence) > 1
    faces = detect_sequence(sequence, detector, args) if smoothed else {}
    for job in plan.jobs:
        try:
            if is_video(job.source):
                clip = restore_clip(job, model, detector, args, plan.videos[job], plan.report.prefix(job))
                plan.report.done(job, str(clip))
            else:
                progress = _face_progress(plan.report.prefix(job))
                plan.report.done(job, restore_file(job, model, detector, args, faces.get(job), progress))
        except BrokenPipeError:  # stdout's reader has gone, not the job: the CLI stops quietly
            raise
        except (ValueError, OSError) as e:
            plan.report.fail(job, e)


def load_models(args, device, detect: bool):
    """The GPEN model and, unless the inputs are aligned crops, the face detector. Every model the run
    names (parsers and upscaler too) is found, downloaded when missing, then checked to be readable and
    of its kind, before any is loaded: a missing or wrong detector costs no GPEN load."""
    wanted = [(args.model or f"GPEN-BFR-{args.size or 512}", "restorer", "--model")]
    wanted += [(args.detector, "detector", "--detector")] * detect
    wanted += [(name, "parser", "--parser") for name in args.parser or ()]
    wanted += [(args.upscaler, "upscaler", "--upscaler")] * bool(args.upscaler)
    paths = [find_model(name, role, args.models_dir) for name, role, _ in wanted]  # all there before any is read
    info = [check_model(path, role, flag) for path, (_, role, flag) in zip(paths, wanted)]
    if args.size and info[0].size != args.size:
        raise ValueError(f"--size {args.size}, but {paths[0].name} is a GPEN-{info[0].size} model")
    model = load_model(paths[0], device=device, dtype=args.dtype)
    detector = load_detector(paths[1], device=device, detect_size=args.detect_size,
                             rotations=args.rotations) if detect else None
    return model, detector


SMALL_DETECTOR = "retinaface_mobilenet0.25"


def find_model(name: str, role: str, models_dir: str | None) -> Path:
    """The file of a catalogue name (downloaded on first use) or a path. A detector that cannot be had
    is answered with the small one, which is enough for most photos and quick to fetch."""
    try:
        return resolve(name, role, models_dir)
    except FileNotFoundError as e:
        small = lookup(SMALL_DETECTOR)
        if role != "detector" or lookup(name) == small:
            raise
        raise FileNotFoundError(f"{str(e).rstrip('.')}; or use the {small.approx_mb} MB detector: --detector "
                                f"{small.name} (python -m gpen download {small.name} fetches it)") from None


def check_model(path: Path, role: str, flag: str):
    """What the file given by `flag` holds, refused unless it is a network of `role`."""
    try:
        return check_weights(path, role)
    except CheckpointError as e:
        raise CheckpointError(e.path, f"{e.problem} ({flag})") from None


def detect_sequence(jobs: list[Job], detector, args) -> dict:
    """Every frame's faces, with landmarks steadied over the whole sequence and, with --max-faces or
    --indices, face tracks chosen as on video. Frames are read one at a time and only their landmarks
    kept, so a long sequence needs no more memory than one frame."""
    print(f"finding the faces in {len(jobs)} frames to steady them over {args.temporal_smoothing:g} frames", flush=True)
    select = restore_options(args)[0]
    each_frame = replace(select, temporal_sigma=0.0, max_faces=0, indices="")  # tracks are chosen below
    found = []
    for job in jobs:
        image = torch.from_numpy(read_image(job.source, args.max_megapixels)[0])[None]
        found += detect_faces(image, detector, each_frame)
    return dict(zip(jobs, select_tracks(found, select)))


def restore_file(job: Job, model, detector, args, faces=None, progress=None) -> str:
    """Read, restore and write one file; returns what was done."""
    pixels, fmt = read_image(job.source, args.max_megapixels)
    image = torch.from_numpy(pixels)[None]
    if detector is None:
        notes = []
        restored = restore_aligned(model, image, args.strength, batch_size=1, notes=notes)
        summary = "; ".join(["restored as one aligned face", *notes])
    else:
        before = changed_from_file(job, args)
        before = None if before is None else torch.from_numpy(read_image(before, args.max_megapixels)[0])[None]
        select, paste, masks = restore_options(args, before, parsers_for(args, detector), upscaler_for(args, detector))
        result = restore_faces(image, model, detector, select=select, paste=paste, masks=masks,
                               faces=None if faces is None else [faces], face_batch=args.face_batch, progress=progress)
        restored, summary = result.images, result.report
    write_image(job.target, restored[0].numpy(), fmt, overwrite=args.overwrite)
    return summary


def restore_clip(job: Job, model, detector, args, info, label: str, span: range | None = None,
                 target: Path | None = None):
    """Restore one video file, streaming, into job.target (or frames `span` alone, into the segment
    file `target`); returns its VideoSummary."""
    select, paste, masks = restore_options(args, parsers=parsers_for(args, detector),
                                           upscaler=upscaler_for(args, detector))
    return restore_video(job.source, target or job.target, model, detector, codec=args.codec, crf=args.crf,
                         chunk=args.chunk, select=select, paste=paste, masks=masks, face_batch=args.face_batch,
                         progress=label, overwrite=args.overwrite or span is not None,
                         max_megapixels=args.max_megapixels, info=info, span=span)


def _face_progress(prefix: str):
    def show(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{prefix}: face {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)
    return show


def keep_freed_memory() -> None:
    """Stop glibc from unmapping large freed blocks, for this process only.

    By default glibc maps and unmaps every block over 32 MiB, and refaulting those pages is slow on
    virtual machines. GPEN's own forward no longer needs this (it keeps its large maps in a
    workspace, gpen/archs/gpen/workspace.py); the pipeline around it (detection, crops, paste-back)
    still makes such blocks. The library never does this by itself: it is a process-wide choice, made
    by the programs, the CLI and its Ray workers.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2 ** 30)
