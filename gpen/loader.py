"""A weight file -> a ready handle for its role, plus descriptors of what files are.

Like spandrel: the architecture is recognised from its state-dict keys (or an ONNX file's inputs and
outputs) and its hyperparameters are read from tensor shapes, never from the file name; see
files/registry.py. A file is checked against that architecture, built on the meta device, before
anything its size is allocated.

    load(path, role=None, *, device=None, dtype=None, **role_options)  -> a handle
    load_model(path, device, dtype)          -> a restorer (RestorerHandle)
    load_detector(path, device, detect_size, rotations) -> a face detector
    load_parser(path, device, dtype)         -> a face parser or occluder (ParserHandle)
    load_upscaler(path, device, dtype)       -> an image upscaler (UpscalerHandle)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .archs.spec import ROLES, ModelInfo
from .devices import resolve_device, resolve_dtype
from .faces.detect import detector_handle
from .faces.parse import ParserHandle
from .faces.restore import RestorerHandle
from .faces.upscale import UpscalerHandle
from .files import registry
from .files.weights import CheckpointError, read_state_dict, write_safetensors

DETECTOR_FILES = ("face detectors are detection_Resnet50_Final.pth, detection_mobilenet0.25_Final.pth "
                  "or an SCRFD .onnx")


def load(path: str | os.PathLike, role: str | None = None, *, device: torch.device | str | None = None,
         dtype: torch.dtype | str | None = None, **role_options):
    """The network in `path` as a handle for its role ("restorer", "detector", "parser" or "upscaler"; when given,
    a file of another role is refused with a CheckpointError saying what it holds).

    Torch networks run on `device` (default: CUDA when available, else the CPU) in `dtype` (default
    float32); ONNX ones through onnxruntime, on CUDA when asked for and offered. `role_options`:
    a detector's `detect_size` and `rotations` (see load_detector).
    """
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if role_options and role != "detector":
        raise TypeError(f"load() takes {', '.join(role_options)} only for a detector (role='detector')")
    device = resolve_device(device)
    spec, network = registry.load(path, role, device)
    if isinstance(network, torch.nn.Module) and spec.role != "detector":  # detectors keep float32, and move themselves
        network = network.to(device=device, dtype=resolve_dtype(dtype, device))
    if spec.role == "restorer":
        return RestorerHandle(network, spec)
    if spec.role == "parser":
        return ParserHandle(network, spec, name=f"{spec.name} {Path(path).name}")
    if spec.role == "upscaler":
        return UpscalerHandle(network, spec)
    return detector_handle(network, device, **role_options)


def load_model(path: str | os.PathLike, device: torch.device | str | None = None,
               dtype: torch.dtype | str | None = None) -> RestorerHandle:
    """A restorer from a GPEN .pth/.pt/.safetensors/.onnx (or a registered network's file).

    On `device` (default: CUDA when available, else CPU) with weights in `dtype` (default float32);
    `.size`, `.info`, `.network` and `restore(faces, batch_size=..., on_batch=..., cancel=...)`.
    """
    return load(path, "restorer", device=device, dtype=dtype)


def load_detector(path: str | os.PathLike, device: torch.device | str | None = None,
                  detect_size: int | str = "auto", rotations: str = "none"):
    """A face detector from a RetinaFace .pth (either backbone) or an insightface SCRFD .onnx.

    `detect_size`: "auto" finds faces from about 16 px to the whole frame (two passes on large frames,
    see FINE_SIDE and COARSE_SIDE), or a long side in pixels to detect at in one pass.
    `rotations`: "none" finds upright faces (rolled up to about 20 degrees); "all" also looks at every
    frame turned by 45-degree steps, finding faces at any angle at up to 8 times the cost; "auto" does
    so only on frames whose upright pass finds no face, or a tilted or doubtful one (see TurningDetector).
    """
    try:
        return load(path, "detector", device=device, detect_size=detect_size, rotations=rotations)
    except CheckpointError as e:
        raise CheckpointError(e.path, f"{e.problem}; {DETECTOR_FILES}") from None


def load_parser(path: str | os.PathLike, device: torch.device | str | None = None,
                dtype: torch.dtype | str | None = None) -> ParserHandle:
    """A face parser or occluder from parsing_parsenet.pth, parsing_bisenet.pth (any name: what a file
    is comes from its tensors) or FaceFusion's bisenet_resnet_*.onnx / xseg_*.onnx.

    Torch parsers run on `device` (default: CUDA when available) in `dtype` (default float32; fp16 and
    bf16 suit GPUs); ONNX ones through onnxruntime, on CUDA when it offers it.
    """
    return load(path, "parser", device=device, dtype=dtype)


def load_upscaler(path: str | os.PathLike, device: torch.device | str | None = None,
                  dtype: torch.dtype | str | None = None) -> UpscalerHandle:
    """An image upscaler from an ESRGAN / Real-ESRGAN file (RRDBNet in BasicSR's or the older ESRGAN
    layouts, e.g. RealESRGAN_x4plus.pth, 4x-UltraSharp.pth; SRVGGNetCompact, e.g. realesr-general-x4v3.pth).

    On `device` (default: CUDA when available, else CPU) with weights in `dtype` (default float32);
    `.scale`, `.info`, `.network` and `upscale(images, tile=..., overlap=..., progress=..., cancel=...)`.
    """
    return load(path, "upscaler", device=device, dtype=dtype)


def describe_weights(path: str | os.PathLike) -> ModelInfo:
    """What a weight file is (GPEN, a face detector, a face parser, another known network), checked
    as far as its architecture is known here, without building it; a CheckpointError otherwise."""
    return registry.describe_file(path)


def check_weights(path: str | os.PathLike, role: str) -> ModelInfo:
    """What a weight file is (describe_weights), refused with a CheckpointError unless it is a network of
    `role`: a file can be checked before any network is built, as a run that needs several does."""
    info = describe_weights(path)
    if info.role != role:
        hint = f"; {DETECTOR_FILES}" if role == "detector" else ""
        raise CheckpointError(path, f"holds {info.arch} weights, not {registry.with_article(role)}{hint}")
    return info


def convert_checkpoint(source: str | os.PathLike, target: str | os.PathLike, half: bool = False,
                       trust: bool = False, dtype: torch.dtype | str | None = None,
                       overwrite: bool = True) -> ModelInfo:
    """Rewrite a checkpoint as .safetensors, checked as load_model checks it, in `dtype` (fp32, fp16, bf16;
    `half` is fp16), by default as the source stores it: float16 and bfloat16 kept, any other as float32.

    `trust=True` unpickles a .pth that holds Python objects besides tensors (an args Namespace, say),
    running whatever code it holds, and keeps only the tensors: for files the user trusts.
    The target is written whole or not at all, with the permissions of any new file; never over the
    source, and over an existing file only with `overwrite` (else a FileExistsError before any work).
    """
    source, target = Path(source), Path(target)
    if target.suffix.lower() != ".safetensors":
        raise ValueError(f"{target}: the output must end in .safetensors")
    if target.exists() and source.exists() and target.samefile(source):
        raise ValueError(f"{target} is the input; results never replace inputs: choose another output")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: exists, not replaced")
    state = read_state_dict(source, trust=trust)
    model = registry.build(state, source, role="restorer")
    stored = getattr(torch, model.info.dtype)
    kept = stored if stored in (torch.float16, torch.bfloat16) else torch.float32
    dtype = resolve_dtype("fp16" if half else dtype) if half or dtype is not None else kept
    tensors = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    write_safetensors(tensors, target, metadata={"format": "pt", "arch": model.info.arch, "size": str(model.info.size)})
    return dataclasses.replace(model.info, format="safetensors", dtype=str(dtype).removeprefix("torch."))
