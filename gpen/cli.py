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

    try:
        return {"bench": bench.run, "info": run_info, "convert": run_convert}[args.command](args)
    except (CheckpointError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


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
