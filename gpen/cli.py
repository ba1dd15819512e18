"""python -m gpen: command line of the GPEN library."""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpen", description="GPEN blind face restoration",
        epilog="Without a command, the arguments are restore's: python -m gpen --input x.jpg --output y.png "
               "--model_path GPEN-BFR-512.pth works as run_gpen-style instructions write it.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench.add_arguments(commands.add_parser("bench", help="time the GPEN forward pass, print a JSON table"))
    add_restore_arguments(commands.add_parser("restore", help="restore the faces in image and video files",
                                              description=RESTORE_DESCRIPTION))
    fetch = commands.add_parser("download", help="download catalogue models (GPEN-BFR-512, ..., or all)")
    fetch.add_argument("names", nargs="+", metavar="NAME")
    fetch.add_argument("--models-dir", help="models folder (default: ComfyUI's when the pack is in one)")
    info = commands.add_parser("info", help="say what a weight file is")
    info.add_argument("file")
    convert = commands.add_parser("convert", help="rewrite a GPEN checkpoint as .safetensors")
    convert.add_argument("input")
    convert.add_argument("output")
    convert.add_argument("--half", action="store_true", help="store float16 weights")
    convert.add_argument("--trust", action="store_true",
                         help="unpickle a .pth that holds Python objects besides tensors, keeping only the tensors; "
                              "this runs any code the file holds: only for files you trust")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] not in commands.choices and argv[0] not in ("-h", "--help"):
        argv = ["restore", *argv]  # run_gpen-style instructions name no command
    args = parser.parse_args(argv)
    if not getattr(args, "system_allocator", False):
        keep_freed_memory()
    from .checkpoint import CheckpointError
    from .download import DownloadError

    run = {"bench": bench.run, "info": run_info, "convert": run_convert, "restore": run_restore,
           "download": run_download}[args.command]
    try:
        return run(args)
    except (CheckpointError, DownloadError, OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


RESTORE_DESCRIPTION = """\
Restore the faces in image and video files (mp4, mov, mkv, webm, avi; photos and clips may be mixed).
Results are never written over an input (asking for that is refused before any work), and an
existing result is skipped, with a line saying so, unless --overwrite is given. Each result appears
whole or not at all (written to a temporary file beside it, then renamed), so Ctrl-C or a full disk
leaves what was there. One input and -o NAME.png (or NAME.mp4 for a clip) write that file; otherwise
results go under -o with the inputs' folder layout below their common folder, so same-named files
from different folders stay apart. Clips are streamed: decoded, restored and encoded a chunk at a
time, keeping their frame count, rate and time base, and copying their audio untouched."""


def add_restore_arguments(parser: argparse.ArgumentParser) -> None:
    from .blend import GPEN_ERODE, GPEN_FEATHER, MASK_SHAPES
    from .io import MAX_MEGAPIXELS
    from .pipeline import ORDERS

    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image or video files, folders or globs")
    parser.add_argument("-o", "--output", help="output folder (or file, for one input)")
    parser.add_argument("--input", dest="legacy_inputs", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--overwrite", action="store_true", help="replace results that exist (inputs never are)")
    parser.add_argument("--model", "--model_path", dest="model", help="catalogue name (GPEN-BFR-512) or a path")
    parser.add_argument("--size", type=int, choices=(256, 512, 1024, 2048), help="use GPEN-BFR-SIZE (when --model is not given)")
    parser.add_argument("--detector", default="retinaface_resnet50", help="catalogue name or path of the face detector")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default fp32; fp16 is faster on GPUs)")
    parser.add_argument("--face-batch", type=int, default=4, help="faces per GPEN pass")
    parser.add_argument("--aligned", action="store_true", help="inputs are already aligned face crops")
    parser.add_argument("--face_align", type=_yes_no, nargs="?", const=True, default=True, help=argparse.SUPPRESS)
    parser.add_argument("--models-dir", help="models folder (default: ComfyUI's when the pack is in one)")
    parser.add_argument("--max-megapixels", type=float, default=MAX_MEGAPIXELS,
                        help="refuse larger images from their header, before decoding (0: no limit; default %(default)g)")
    select = parser.add_argument_group("which faces")
    select.add_argument("--threshold", type=float, default=0.5, help="detection confidence (default %(default)g)")
    select.add_argument("--detect-size", default="auto",
                        help="auto: faces from ~16 px to the whole frame (close-ups, 2048 portraits); "
                             "or a long side in px to detect at, in one pass")
    select.add_argument("--min-size", type=float, default=0, help="skip faces smaller than this many pixels")
    select.add_argument("--max-faces", type=int, default=0, help="restore at most this many per image (0: all)")
    select.add_argument("--order", choices=ORDERS, default="largest", help="face order for --indices and --max-faces")
    select.add_argument("--indices", help="only these faces, counted in --order from 0: '0,2'")
    select.add_argument("--temporal-smoothing", type=float, default=0, metavar="SIGMA",
                        help="steady the landmarks over SIGMA frames: within each video file, and across the "
                             "image inputs, which are then frames of one video, in order")
    blend = parser.add_argument_group("blending")
    blend.add_argument("--strength", type=float, default=1.0, help="how much of the restored face replaces the original")
    blend.add_argument("--template", choices=("gpen", "ffhq"), default="gpen", help="alignment template")
    blend.add_argument("--mask-shape", choices=MASK_SHAPES, default="box", help="paste mask (default %(default)s)")
    blend.add_argument("--erode", type=float, default=GPEN_ERODE,
                       help="mask inset, a fraction of the crop (default GPEN's %(default).4f)")
    blend.add_argument("--feather", type=float, default=GPEN_FEATHER,
                       help="mask blur, a fraction of the crop (default GPEN's %(default).4f)")
    blend.add_argument("--color-correction", action="store_true", help="match the restored face's colours to the original")
    video = parser.add_argument_group("video files")
    video.add_argument("--codec", default="libx264",
                       help="video encoder (default %(default)s; webm files get libvpx-vp9): libx265, libvpx-vp9, ...")
    video.add_argument("--crf", type=float, default=16,
                       help="encoder quality, lower is better (default %(default)g: near-transparent H.264)")
    video.add_argument("--chunk", type=int, default=16,
                       help="frames restored together; memory holds about this many frames (default %(default)s)")
    cluster = parser.add_argument_group("on a Ray cluster (pip install .[cluster])")
    cluster.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                         help="run on Ray: 'local' (the default when no ADDRESS) starts one on this machine, "
                              "else a cluster's address (HEAD:6379, or auto); one actor per GPU, or per CPU slot "
                              "where there is none; inputs and outputs must be at the same paths on every node")
    cluster.add_argument("--ray-cpus-per-actor", type=int, default=1, metavar="N",
                         help="CPU slots per actor where the cluster has no GPU (default %(default)s); each runs twice as many torch threads")
    cluster.add_argument("--ray-actors", type=int, default=0, metavar="N",
                         help="at most N actors (default 0: as many as the GPUs or CPU slots)")
    cluster.add_argument("--ray-segment", type=float, default=60, metavar="SECONDS",
                         help="clips longer than this are split into segments of about this length, restored "
                              "in parallel and joined (default %(default)g; 0 never splits)")


def _yes_no(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


@dataclass(frozen=True)
class Job:
    number: int  # from 1, in input order
    source: Path
    target: Path


def run_restore(args) -> int:
    from .loader import resolve_device

    if not args.output:
        raise ValueError("say where the results go: -o OUTPUT")
    check_options(args)
    ray_address = getattr(args, "ray", None)
    if ray_address:
        from .distributed import _ray

        _ray()  # refused now, not after the planning, when Ray is not installed
    device = None if ray_address else resolve_device(args.device)  # with --ray, each worker resolves its own
    jobs = plan_jobs(expand_inputs(args.inputs + args.legacy_inputs), Path(args.output))
    detect = args.face_align and not args.aligned
    if any(is_video(job.source) for job in jobs):
        from .video import check_video_options

        check_video_options(args.codec, args.crf, args.chunk)
    frames = [job for job in jobs if not is_video(job.source)]  # with --temporal-smoothing, one sequence
    if args.temporal_smoothing > 0 and len(frames) > 1:
        check_sequence(frames, detect, args.max_megapixels)
        if ray_address:
            raise ValueError("--temporal-smoothing over image inputs makes them one sequence, which --ray does not "
                             "split; run it without --ray (video files are smoothed within each file with --ray)")
    check_writable(Path(os.path.commonpath([job.target.parent for job in jobs])))
    report = Report(len(jobs))
    todo, videos = admit(jobs, args, report, detect)
    if ray_address:
        from .distributed import run_on_ray

        if todo:
            run_on_ray(todo, args, ray_address, report, videos)
        return report.exit_status()
    if todo:
        model, detector = load_models(args, device, detect)
        sequence = [job for job in todo if not is_video(job.source)]
        faces = detect_sequence(sequence, detector, args) if args.temporal_smoothing > 0 and len(sequence) > 1 else {}
        for job in todo:
            try:
                if is_video(job.source):
                    report.done(job, str(restore_clip(job, model, detector, args, videos[job], report.prefix(job))))
                    continue
                progress = _face_progress(report.prefix(job))
                report.done(job, restore_file(job, model, detector, args, faces.get(job), progress))
            except (ValueError, OSError) as e:
                report.fail(job, e)
    return report.exit_status()


def is_video(path: Path) -> bool:
    from .video import VIDEO_SUFFIXES

    return path.suffix.lower() in VIDEO_SUFFIXES


def expand_inputs(items: list[str]) -> list[Path]:
    from glob import glob

    from .io import IMAGE_SUFFIXES
    from .video import VIDEO_SUFFIXES

    suffixes = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    files = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
        elif path.is_file():
            files.append(path)
        elif matches := sorted(glob(item, recursive=True)):
            files += [Path(m) for m in matches if Path(m).suffix.lower() in suffixes]
        else:
            raise FileNotFoundError(f"{item}: no such file, folder or pattern")
    if not files:
        raise ValueError("no image or video files among the inputs")
    return files


def plan_jobs(files: list[Path], output: Path) -> list[Job]:
    """Where each result goes: `output` itself for one input and a file name of its kind (image or
    video), else under `output` at the input's path relative to the inputs' common folder. Refused,
    before any work, when a result would land on an input or two results on one file."""
    from .io import IMAGE_SUFFIXES
    from .video import VIDEO_SUFFIXES

    unique: dict[tuple[int, int], Path] = {}
    for file in files:
        unique.setdefault(file_id(file), file)  # a file named twice (a folder and a glob) runs once
    files = list(unique.values())
    kind = VIDEO_SUFFIXES if files and is_video(files[0]) else IMAGE_SUFFIXES
    if len(files) == 1 and output.suffix.lower() in kind and not output.is_dir():
        jobs = [Job(1, files[0], output)]
    else:
        absolute = [Path(os.path.abspath(f)) for f in files]
        common = os.path.commonpath([a.parent for a in absolute])
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
    from .blend import face_mask
    from .detection import check_detect_size
    from .pipeline import parse_indices
    from .restorer import check_strength

    check_strength(args.strength)
    check_detect_size(args.detect_size)
    face_mask(8, args.mask_shape, args.erode, args.feather)
    parse_indices(args.indices or "")
    if not args.ray_segment >= 0:
        raise ValueError(f"--ray-segment must be 0 (never split) or a number of seconds, got {args.ray_segment:g}")


def check_sequence(jobs: list[Job], detect: bool, max_megapixels: float) -> None:
    """--temporal-smoothing needs detected faces in frames of one size; checked from the headers."""
    from .io import check_image_size

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
        print(f"{self.prefix(job)}: {summary} -> {job.target}", flush=True)

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
    """The jobs to run: their result may be written and their image is not too large, or their
    video readable, holding a video stream, of constant frame rate; and what was read of each video.
    Decided from names, headers and packets, before any model is loaded."""
    from .io import check_image_size

    todo, videos = [], {}
    for job in jobs:
        if job.target.exists() and not args.overwrite:
            report.skip(job, f"{job.target} exists (--overwrite replaces it)")
            continue
        try:
            if not is_video(job.source):
                check_image_size(job.source, args.max_megapixels)
            elif not detect:
                raise ValueError(f"{job.source}: --aligned is for aligned face crops in image files, not video")
            else:
                from .video import probe_video

                videos[job] = probe_video(job.source, args.max_megapixels)
        except (ValueError, OSError) as e:
            report.fail(job, e)
            continue
        todo.append(job)
    return todo, videos


def load_models(args, device, detect: bool):
    """The GPEN model and, unless the inputs are aligned crops, the face detector."""
    from .catalogue import resolve
    from .detection import load_detector
    from .loader import load_model

    path = resolve(args.model or f"GPEN-BFR-{args.size or 512}", "gpen", args.models_dir)
    model = load_model(path, device=device, dtype=args.dtype)
    if args.size and model.size != args.size:
        raise ValueError(f"--size {args.size}, but {path.name} is a GPEN-{model.size} model")
    detector = load_detector(resolve(args.detector, "detector", args.models_dir), device=device,
                              detect_size=args.detect_size) if detect else None
    return model, detector


def selection(args) -> dict:
    return dict(threshold=args.threshold, min_size=args.min_size, max_faces=args.max_faces, order=args.order,
                indices=args.indices)


def detect_sequence(jobs: list[Job], detector, args) -> dict:
    """Every frame's faces, with landmarks steadied over the whole sequence. Frames are read one at
    a time and only their landmarks kept, so a long sequence needs no more memory than one frame."""
    import torch

    from .io import read_image
    from .pipeline import detect_faces, smooth_landmarks

    print(f"finding the faces in {len(jobs)} frames to steady them over {args.temporal_smoothing:g} frames", flush=True)
    found = []
    for job in jobs:
        image = torch.from_numpy(read_image(job.source, args.max_megapixels)[0])[None]
        found += detect_faces(image, detector, **selection(args))
    return dict(zip(jobs, smooth_landmarks(found, args.temporal_smoothing)))


def restore_file(job: Job, model, detector, args, faces=None, progress=None) -> str:
    """Read, restore and write one file; returns what was done."""
    import torch

    from .io import read_image, write_image
    from .pipeline import restore_faces
    from .restorer import restore_aligned

    pixels, fmt = read_image(job.source, args.max_megapixels)
    image = torch.from_numpy(pixels)[None]
    if detector is None:
        restored, summary = restore_aligned(model, image, args.strength, batch_size=1), "restored as one aligned face"
    else:
        result = restore_faces(image, model, detector, **selection(args), faces=None if faces is None else [faces],
                               template=args.template, strength=args.strength, mask_shape=args.mask_shape,
                               erode=args.erode, feather=args.feather, color_correction=args.color_correction,
                               face_batch=args.face_batch, progress=progress)
        restored, summary = result.images, result.summary
    write_image(job.target, restored[0].numpy(), fmt, overwrite=args.overwrite)
    return summary


def restore_clip(job: Job, model, detector, args, info, label: str, span: range | None = None,
                 target: Path | None = None):
    """Restore one video file, streaming, into job.target (or frames `span` alone, into the segment
    file `target`); returns its VideoSummary."""
    from .video import restore_video

    return restore_video(job.source, target or job.target, model, detector, codec=args.codec, crf=args.crf,
                         chunk=args.chunk, temporal_sigma=args.temporal_smoothing, progress=label,
                         overwrite=args.overwrite or span is not None, max_megapixels=args.max_megapixels,
                         info=info, span=span, **selection(args), template=args.template,
                         strength=args.strength, mask_shape=args.mask_shape, erode=args.erode,
                         feather=args.feather, color_correction=args.color_correction,
                         face_batch=args.face_batch)


def _face_progress(prefix: str):
    def show(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{prefix}: face {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)
    return show


def run_download(args) -> int:
    from .catalogue import catalogue, resolve

    entries = catalogue()
    names = list(entries) if args.names == ["all"] else args.names
    for name in names:
        entry = entries.get(name)
        if entry is None:
            raise ValueError(f"{name}: not in the catalogue ({', '.join(entries)}, or all)")
        print(f"{name}: {resolve(name, entry.kind, args.models_dir)}")
    return 0


def run_info(args) -> int:
    from .loader import describe_weights

    info = describe_weights(args.file)
    print(info)
    for field, value in vars(info).items():
        if value is not None:
            print(f"{field}: {value}")
    return 0


def run_convert(args) -> int:
    from .loader import convert_checkpoint

    info = convert_checkpoint(args.input, args.output, half=args.half, trust=args.trust)
    print(f"wrote {args.output}: {info}")
    return 0


def keep_freed_memory() -> None:
    """Stop glibc from unmapping large freed blocks, for this process only.

    By default glibc maps and unmaps every block over 32 MiB, and refaulting those pages is slow on
    virtual machines. GPEN's own forward no longer needs this (it keeps its large maps in a
    workspace, gpen/workspace.py); the pipeline around it (detection, crops, paste-back) still makes
    such blocks. The library never does this by itself: it is a process-wide choice, made here for the CLI.
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
