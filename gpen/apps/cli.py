"""python -m gpen: command line of the GPEN library.

Building the parser imports no torch, so that `python -m gpen --help` answers at once: each command
imports its work (gpen.apps.jobs, .bench, .distributed, ...) when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..faces.options import MaskOptions, PasteOptions, SelectOptions, declared, spec_of, surface_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpen", description="GPEN blind face restoration",
        epilog="Without a command, the arguments are restore's: python -m gpen --input x.jpg --output y.png "
               "--model_path GPEN-BFR-512.pth works as run_gpen-style instructions write it.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_bench_arguments(commands.add_parser("bench", help="time the GPEN forward pass, print a JSON table"))
    add_restore_arguments(commands.add_parser("restore", help="restore the faces in image and video files",
                                              description=RESTORE_DESCRIPTION))
    fetch = commands.add_parser("download", help="download catalogue models (GPEN-BFR-512, ..., or all)")
    fetch.add_argument("names", nargs="+", metavar="NAME")
    fetch.add_argument("--models-dir", help=MODELS_DIR_HELP)
    info = commands.add_parser("info", help="say what a weight file is")
    info.add_argument("file")
    convert = commands.add_parser("convert", help="rewrite a GPEN checkpoint as .safetensors")
    convert.add_argument("input")
    convert.add_argument("output")
    convert.add_argument("--dtype", choices=("fp32", "fp16", "bf16"),
                         help="store the weights in this type (default: as the input stores them, float16 and "
                              "bfloat16 kept, any other as float32)")
    convert.add_argument("--half", action="store_const", dest="dtype", const="fp16", help="the same as --dtype fp16")
    convert.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (the input never is)")
    convert.add_argument("--trust", action="store_true",
                         help="unpickle a .pth that holds Python objects besides tensors, keeping only the tensors; "
                              "this runs any code the file holds: only for files you trust")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] not in commands.choices and argv[0] not in ("-h", "--help"):
        argv = ["restore", *argv]  # run_gpen-style instructions name no command
    args = parser.parse_args(argv)
    from ..files.download import DownloadError
    from ..files.weights import CheckpointError
    from .jobs import keep_freed_memory

    if not getattr(args, "system_allocator", False):
        keep_freed_memory()
    run = {"bench": run_bench, "info": run_info, "convert": run_convert, "restore": run_restore,
           "download": run_download}[args.command]
    try:
        status = run(args)
        sys.stdout.flush()  # here, where a closed pipe can be answered, not at exit
        return status
    except BrokenPipeError:  # the reader has gone (gpen info FILE | head -1): stop quietly, as a pipe's tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush is quiet too
        return 141  # 128 + SIGPIPE (13), the status of a tool that a closed pipe stopped
    except (CheckpointError, DownloadError, OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


MODELS_DIR_HELP = ("models folder (default: ComfyUI's when the pack is in one or COMFYUI_PATH names one; else "
                   "a checkout's models/; else, installed with pip, $XDG_DATA_HOME/comfyui-gpen/models, "
                   "by default ~/.local/share/comfyui-gpen/models)")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="model sizes (default: 512 on CPU, 256..2048 on a GPU)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    parser.add_argument("--dtypes", nargs="+", default=None, help="fp32 fp16 bf16 (default: fp32 on CPU, all on GPU)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="faces per forward pass")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up (the best is kept)")
    parser.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    parser.add_argument("--checkpoint", help="time this file instead of random weights")
    parser.add_argument("--system-allocator", action="store_true",
                        help="keep glibc's default of unmapping large freed blocks (see jobs.keep_freed_memory)")
    parser.add_argument("--pipeline", action="store_true",
                        help="time the whole face pipeline stage by stage instead (detect, crop, restore, paste)")
    parser.add_argument("--detector", default="retinaface_mobilenet0.25",
                        help="face detector for --pipeline: catalogue name (downloaded on first use) or path")
    parser.add_argument("--models-dir",
                        help="models folder for --detector (default: ComfyUI's when the pack is in one)")
    parser.add_argument("--image",
                        help="group photo for --pipeline (required); its largest face also makes the 1080p scene")
    parser.add_argument("--frames", type=int, default=1, help="frames per batch in --pipeline")
    parser.add_argument("--rotations", nargs="+", default=["none"],
                        help="detector rotations to time in --pipeline, a row each; other than none adds a scene, "
                             "the group photo turned 90 degrees")
    parser.add_argument("--memory", action="store_true",
                        help="with --pipeline: peak memory of restore_faces beyond its input on 6000x4000, 6000x6000 "
                             "and 10000x10000 frames made from --image and from a close-up of its largest face, with "
                             "and without a parse mask (stand-ins restore and parse: the pipeline alone is measured)")
    parser.add_argument("--upscaler", nargs="*", metavar="NAME_OR_PATH",
                        help="time upscalers instead, ours against the plain forward of the same weights: "
                             "rrdbnet (RealESRGAN_x4plus's layout), srvgg (realesr-general-x4v3's), or a file "
                             "(default: both)")
    parser.add_argument("--tile-size", type=int, nargs="+", default=[256],
                        help="with --upscaler: input tile sides, in pixels (default: 256)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="with --upscaler: rounds of ours and the plain forward, each in its own process")
    parser.add_argument("--acceptance", action="store_true",
                        help="the GPU acceptance check, in one command: parity of every network against the CPU and "
                             "in fp16/bf16, speed, memory, the OOM back-off, the face pipeline, a video and a Ray "
                             "actor on the GPU, and the goals; one table, and acceptance-<device>.json and .md in "
                             "--out (--image and --detector name the pipeline's photo and detector file)")
    parser.add_argument("--quick", action="store_true",
                        help="with --acceptance: the same checks at tiny sizes (--device cpu --quick: without a GPU)")
    parser.add_argument("--out", help="with --acceptance: folder for its JSON and markdown, rewritten after every "
                                      "check (default: here)")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="with --acceptance: checks that would start later than this are skip rows, the goals "
                             "still run (default: 360 s, none with --quick)")
    parser.add_argument("--sections", nargs="+", metavar="SECTION",
                        choices=("parity", "speed", "memory", "pipeline", "video", "compile"),
                        help="with --acceptance: only these sections, and the goals (e.g. a second run, for what "
                             "failed, in the same short GPU lease)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--forward", choices=("plain", "ours"), default="ours", help=argparse.SUPPRESS)


RESTORE_DESCRIPTION = """\
Restore the faces in image and video files (mp4, mov, mkv, webm, avi; photos and clips may be mixed).
Results are never written over an input (asking for that is refused before any work), and an
existing result is skipped, with a line saying so, unless --overwrite is given. Each result appears
whole or not at all (written to a temporary file beside it, then renamed), so Ctrl-C or a full disk
leaves what was there. One input and -o NAME.png (or NAME.mp4 for a clip) write that file (a file name
for several inputs, or of the other kind, is refused); otherwise results go under -o with the inputs'
folder layout below their common folder, so same-named files from different folders stay apart. A
folder is restored with its subfolders, except hidden ones, links and the -o folder, each named.
Clips are streamed: decoded, restored and encoded a chunk at a time, keeping their frame count, rate
and time base, and copying their audio untouched."""


def add_restore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="image or video files, folders (with their subfolders) or globs")
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
    select = parser.add_argument_group(
        "which faces", "--temporal-smoothing steadies landmarks within each video file, and across the image "
                       "inputs, which are then frames of one video, in order; with --parser, parse masks are "
                       "steadied within each --chunk of a video's frames")
    select.add_argument("--detect-size", default="auto",
                        help="auto: faces from ~16 px to the whole frame (close-ups, 2048 portraits); "
                             "or a long side in px to detect at, in one pass")
    select.add_argument("--rotations", default="none",
                        help="none: upright faces (rolled up to ~20 degrees); all: also faces on their side, upside "
                             "down or at any angle, looking at each frame turned in 45-degree steps (about 14x the "
                             "detection time); auto: turned only where the upright pass finds no face, or a tilted "
                             "or doubtful one")
    added: set[str] = set()
    _add_option_flags(select, SelectOptions, added)
    select.add_argument("--changed-from", metavar="PATH",
                        help="the image before a face swap: only the faces the swap changed are restored. A file "
                             "(for one input), or a folder holding the originals at the inputs' paths below their "
                             "common folder; not for video files")
    output = parser.add_argument_group("blending, and the output's size")
    _add_option_flags(output, PasteOptions, added)
    output.add_argument("--upscaler", metavar="NAME_OR_PATH",
                        help="upscaling network for the whole image, the faces then pasted in: catalogue name "
                             "(RealESRGAN_x4plus, RealESRGAN_x2plus, realesr-general-x4v3) or a path; its output is "
                             "resized to --upscale when that is given, else kept at the network's own scale")
    masks = parser.add_argument_group("face parsing: restore only the face's own pixels")
    masks.add_argument("--parser", action="append", metavar="NAME_OR_PATH",
                       help="face parser: catalogue name (parsing_bisenet, parsing_parsenet) or a path; give it twice "
                            "for a region parser and an occluder, their masks combined by minimum")
    _add_option_flags(masks, MaskOptions, added)
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


# Options the CLI leaves at their defaults, and why: tests/test_options.py lists them too.
NOT_FLAGS = {
    "smooth_small_faces": "GPEN's own softening of small faces; only the crops' coverage masks turn it off",
    "change_threshold": "the measured line between a face swap and noise (pipeline.changed_faces), not a taste",
}


def _add_option_flags(group, options: type, added: set[str]) -> None:
    """A flag for each option of `options` (faces/options.py): --name-with-dashes, its default, its choices,
    its help. Options that share a name (temporal_smoothing) share the flag: `added` holds the names so far."""
    for field in declared(options):
        name, spec = surface_name(field), spec_of(field)
        if name in NOT_FLAGS or name in added:
            continue
        added.add(name)
        flags = ["--" + n.replace("_", "-") for n in (name, spec.alias) if n]
        if isinstance(field.default, bool):
            group.add_argument(*flags, dest=name, action="store_true", help=spec.help)
            continue
        shown = "%(default)g" if isinstance(field.default, float) else "%(default)s"
        default = f" (default {shown})" if field.default != "" else ""
        group.add_argument(*flags, dest=name, type=type(field.default), default=field.default, choices=spec.choices,
                           help=f"{spec.help}{default}")


def _yes_no(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def run_restore(args) -> int:
    from .jobs import check_options, plan_run, restore_here

    if not args.output:
        raise ValueError("say where the results go: -o OUTPUT")
    check_options(args)
    if args.ray:
        from .distributed import import_ray

        import_ray()  # refused now, not after the planning, when Ray is not installed
    plan = plan_run(args, on_ray=bool(args.ray))
    if plan.jobs and args.ray:
        from .distributed import run_on_ray

        run_on_ray(plan.jobs, args, args.ray, plan.report, plan.videos)
    elif plan.jobs:
        restore_here(plan, args)
    return plan.report.exit_status()


def run_bench(args) -> int:
    if args.acceptance:
        from . import acceptance

        return acceptance.run(args)
    from . import bench

    return bench.run(args)


def run_download(args) -> int:
    from ..files.catalogue import catalogue, resolve

    entries = catalogue()
    names = list(entries) if args.names == ["all"] else args.names
    for name in names:
        entry = entries.get(name)
        if entry is None:
            raise ValueError(f"{name}: not in the catalogue ({', '.join(entries)}, or all)")
        print(f"{name}: {resolve(name, entry.role, args.models_dir)}")
    return 0


def run_info(args) -> int:
    from ..loader import describe_weights

    info = describe_weights(args.file)
    print(info)
    for field, value in vars(info).items():
        if value is not None:
            print(f"{field}: {value}")
    return 0


def run_convert(args) -> int:
    """As restore writes its results: never over the input, and an existing output kept unless --overwrite."""
    from ..loader import convert_checkpoint

    try:
        info = convert_checkpoint(args.input, args.output, dtype=args.dtype, trust=args.trust,
                                  overwrite=args.overwrite)
    except FileExistsError:
        print(f"skipped: {args.output} exists (--overwrite replaces it)", file=sys.stderr)
        return 0
    print(f"wrote {args.output}: {info}")
    return 0
