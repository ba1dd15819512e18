"""python -m gpen: command line of the GPEN library."""

from __future__ import annotations

import argparse
import ctypes
import sys

from . import bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpen", description="GPEN blind face restoration")
    commands = parser.add_subparsers(dest="command", required=True)
    bench.add_arguments(commands.add_parser("bench", help="time the GPEN forward pass, print a JSON table"))
    add_restore_arguments(commands.add_parser("restore", help="restore the faces in image files"))
    fetch = commands.add_parser("download", help="download catalogue models (GPEN-BFR-512, ..., or all)")
    fetch.add_argument("names", nargs="+", metavar="NAME")
    fetch.add_argument("--models-dir", help="models folder (default: ComfyUI's when the pack is in one)")
    info = commands.add_parser("info", help="say what a weight file is")
    info.add_argument("file")
    convert = commands.add_parser("convert", help="rewrite a GPEN checkpoint as .safetensors")
    convert.add_argument("input")
    convert.add_argument("output")
    convert.add_argument("--half", action="store_true", help="store float16 weights")
    args = parser.parse_args(argv)
    if not getattr(args, "system_allocator", False):
        keep_freed_memory()
    from .checkpoint import CheckpointError
    from .download import DownloadError

    run = {"bench": bench.run, "info": run_info, "convert": run_convert, "restore": run_restore,
           "download": run_download}[args.command]
    try:
        return run(args)
    except (CheckpointError, DownloadError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


def add_restore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders or globs")
    parser.add_argument("-o", "--output", help="output folder (or file, for one input)")
    parser.add_argument("--input", dest="legacy_inputs", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--model", "--model_path", dest="model", help="catalogue name (GPEN-BFR-512) or a path")
    parser.add_argument("--size", type=int, choices=(256, 512, 1024, 2048), help="use GPEN-BFR-SIZE (when --model is not given)")
    parser.add_argument("--detector", default="retinaface_resnet50", help="catalogue name or path of the face detector")
    parser.add_argument("--strength", type=float, default=1.0, help="how much of the restored face replaces the original")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default fp32; fp16 is faster on GPUs)")
    parser.add_argument("--face-batch", type=int, default=4, help="faces per GPEN pass")
    parser.add_argument("--aligned", action="store_true", help="inputs are already aligned face crops")
    parser.add_argument("--face_align", type=_yes_no, nargs="?", const=True, default=True, help=argparse.SUPPRESS)
    parser.add_argument("--template", choices=("gpen", "ffhq"), default="gpen", help="alignment template")
    parser.add_argument("--models-dir", help="models folder (default: ComfyUI's when the pack is in one)")


def _yes_no(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def run_restore(args) -> int:
    import torch

    from .catalogue import resolve
    from .detection import load_detector
    from .io import read_image, write_image
    from .loader import load_model
    from .pipeline import restore_faces
    from .restorer import restore_aligned

    files = expand_inputs(args.inputs + args.legacy_inputs)
    if not args.output:
        raise ValueError("say where the results go: -o OUTPUT")
    aligned = args.aligned or not args.face_align
    model = load_model(resolve(args.model or f"GPEN-BFR-{args.size or 512}", "gpen", args.models_dir),
                       device=args.device, dtype=args.dtype)
    detector = None if aligned else load_detector(resolve(args.detector, "detector", args.models_dir), device=args.device)
    failures = 0
    for number, path in enumerate(files, 1):
        prefix = f"[{number}/{len(files)}] {path.name}"
        try:
            pixels, fmt = read_image(path)
            image = torch.from_numpy(pixels)[None]
            if aligned:
                result_image, summary = restore_aligned(model, image, args.strength, batch_size=1), "restored as one aligned face"
            else:
                result = restore_faces(image, model, detector, strength=args.strength, template=args.template,
                                       face_batch=args.face_batch, progress=_face_progress(prefix))
                result_image, summary = result.images, result.summary
            target = output_path(path, args.output, len(files))
            write_image(target, result_image[0].numpy(), fmt)
            print(f"{prefix}: {summary} -> {target}", flush=True)
        except (ValueError, OSError) as e:
            failures += 1
            print(f"{prefix}: failed: {e}", file=sys.stderr, flush=True)
    if failures:
        print(f"{failures} of {len(files)} file(s) failed", file=sys.stderr)
    return 1 if failures else 0


def expand_inputs(items: list[str]):
    from glob import glob
    from pathlib import Path

    from .io import IMAGE_SUFFIXES

    files = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        elif matches := sorted(glob(item, recursive=True)):
            files += [Path(m) for m in matches if Path(m).suffix.lower() in IMAGE_SUFFIXES]
        else:
            raise FileNotFoundError(f"{item}: no such file, folder or pattern")
    if not files:
        raise ValueError("no image files among the inputs")
    return files


def output_path(source, output: str, count: int):
    from pathlib import Path

    from .io import IMAGE_SUFFIXES

    out = Path(output)
    if count == 1 and out.suffix.lower() in IMAGE_SUFFIXES:
        return out
    return out / source.name


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
    from .loader import load_model

    model = load_model(args.file, device="cpu")
    for field, value in vars(model.info).items():
        if value is not None:
            print(f"{field}: {value}")
    return 0


def run_convert(args) -> int:
    import torch
    from safetensors.torch import save_file

    from .checkpoint import read_state_dict
    from .loader import build_gpen

    if not args.output.endswith(".safetensors"):
        raise ValueError(f"output must end in .safetensors, got {args.output}")
    model = build_gpen(read_state_dict(args.input), args.input)
    dtype = torch.float16 if args.half else torch.float32
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, args.output, metadata={"format": "pt", "arch": "GPEN", "size": str(model.size)})
    print(f"wrote {args.output}: GPEN-{model.size}, {len(state)} tensors, {str(dtype).removeprefix('torch.')}")
    return 0


def keep_freed_memory() -> None:
    """Stop glibc from unmapping large freed blocks, for this process only.

    Each feature map of a 512+ forward pass is tens of MB; by default glibc mmaps and unmaps every
    one, and refaulting those pages costs about a third of the run time on virtual machines. The
    library never does this by itself: it is a process-wide choice, made here for the CLI.
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
