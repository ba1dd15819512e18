"""load_model: any GPEN file users have -> a ready restorer, plus a descriptor of what was loaded.

Like spandrel: the architecture is recognised from its state-dict keys and its hyperparameters are
read from tensor shapes, never from the file name. A file is checked against that architecture,
built on the meta device, before anything its size is allocated.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .archs.gpen.network import GPEN
from .archs.onnx import OnnxOccluder, OnnxRegionParser, is_occluder, is_region_parser, not_a_parser, open_session
from .devices import resolve_device, resolve_dtype
from .faces.detect import RetinaFaceDetector, ScrfdDetector
from .faces.parse import TorchParser
from .files import registry
from .files.weights import CheckpointError, ModelInfo, check_file, read_state_dict, write_safetensors


def build_gpen(state: dict[str, torch.Tensor], path: str | os.PathLike = "<state dict>") -> GPEN:
    """A GPEN network holding these weights (in float32), or a CheckpointError saying why not."""
    return registry.build(state, path, role="restorer")


def load_model(path: str | os.PathLike, device: torch.device | str | None = None,
               dtype: torch.dtype | str | None = None):
    """Load a GPEN restorer from .pth/.pt/.safetensors/.onnx.

    Returns a `GPEN` module (or an `OnnxGPEN` for .onnx) in eval mode on `device` (default: CUDA when
    available, else CPU) with weights in `dtype` (default float32). Both have `.size`, `.info` and
    `restore(faces, batch_size=...)`.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from .archs.onnx import OnnxGPEN

        return OnnxGPEN(path, device=device)
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    model = build_gpen(read_state_dict(path), path)
    return model.to(device=device, dtype=dtype)


def describe_weights(path: str | os.PathLike) -> ModelInfo:
    """What a weight file is (GPEN, a face detector, a face parser, another known network), checked
    as far as its architecture is known here, without building it; a CheckpointError otherwise."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from .archs.onnx import describe_onnx

        return describe_onnx(path)
    return registry.describe(read_state_dict(path), path)


def convert_checkpoint(source: str | os.PathLike, target: str | os.PathLike, half: bool = False,
                       trust: bool = False) -> ModelInfo:
    """Rewrite a GPEN checkpoint as .safetensors (float16 with `half`), checked as load_model checks it.

    `trust=True` unpickles a .pth that holds Python objects besides tensors (an args Namespace, say),
    running whatever code it holds, and keeps only the tensors: for files the user trusts.
    The target is written whole or not at all, with the permissions of any new file.
    """
    source, target = Path(source), Path(target)
    if target.suffix.lower() != ".safetensors":
        raise ValueError(f"{target}: the output must end in .safetensors")
    state = read_state_dict(source, trust=trust)
    model = build_gpen(state, source)
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    write_safetensors(tensors, target, metadata={"format": "pt", "arch": "GPEN", "size": str(model.size)})
    return dataclasses.replace(model.info, format="safetensors", dtype=str(dtype).removeprefix("torch."))


def load_onnx_parser(path: str | os.PathLike, device: torch.device | str | None = None):
    """A FaceFusion region parser or occluder, told apart by its input and output shapes (never its
    name), on CUDA when asked for and onnxruntime has it, else on the CPU.

    Raises CheckpointError naming the file and what it holds instead (a GPEN restorer, an SCRFD
    detector, or the shapes found) when it is neither.
    """
    path = Path(path)
    session = open_session(path, device)
    if is_region_parser(session):
        return OnnxRegionParser(path, session=session)
    if is_occluder(session):
        return OnnxOccluder(path, session=session)
    raise CheckpointError(path, not_a_parser(session, path))


def load_detector(path: str | os.PathLike, device: torch.device | str | None = None,
                  detect_size: int | str = "auto"):
    """A face detector from a RetinaFace .pth (either backbone) or an insightface SCRFD .onnx.

    `detect_size`: "auto" finds faces from about 16 px to the whole frame (two passes on large frames,
    see FINE_SIDE and COARSE_SIDE), or a long side in pixels to detect at in one pass.
    """
    from .devices import resolve_device

    path, device = Path(path), resolve_device(device)
    if path.suffix.lower() == ".onnx":
        check_file(path)
        return ScrfdDetector(path, device, detect_size)
    try:
        net = registry.build(read_state_dict(path), path, role="detector")
    except CheckpointError as e:
        raise CheckpointError(path, f"{e.problem}; face detectors are detection_Resnet50_Final.pth, "
                              "detection_mobilenet0.25_Final.pth or an SCRFD .onnx") from None
    return RetinaFaceDetector(net, device, detect_size)


def load_parser(path: str | os.PathLike, device: torch.device | str | None = None,
                dtype: torch.dtype | str | None = None):
    """A face parser or occluder from parsing_parsenet.pth, parsing_bisenet.pth (any name: what a file
    is comes from its tensors) or FaceFusion's bisenet_resnet_*.onnx / xseg_*.onnx.

    Torch parsers run on `device` (default: CUDA when available) in `dtype` (default float32; fp16 and
    bf16 suit GPUs); ONNX ones through onnxruntime, on CUDA when it offers it.
    """
    from .devices import resolve_device, resolve_dtype
    from .files.weights import read_state_dict

    path = Path(path)
    device = resolve_device(device)
    if path.suffix.lower() == ".onnx":
        from .load import load_onnx_parser

        return load_onnx_parser(path, device)
    from .archs.parsenet import ParseNet
    from .files import registry

    net = registry.build(read_state_dict(path), path, role="parser")
    kind, size = ("parsenet", net.in_size) if isinstance(net, ParseNet) else ("bisenet", 512)
    return TorchParser(net.to(device, resolve_dtype(dtype, device)), kind, size)
