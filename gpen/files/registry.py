"""The networks ComfyUI-GPEN runs, as a registry in the spirit of spandrel: every file, torch or
ONNX, is matched against the architectures' specs (archs.SPECS), which say how to recognise it, read
its configuration from tensor or signature shapes, and build it.

Loading goes through one path for every network: recognise, read the configuration (bounded), build
on the meta device and compare key for key and shape for shape, refuse non-finite weights, and only
then allocate and copy. A hostile file costs nothing. ONNX files are told from torch ones here, and
only here: by their suffix.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..archs import SPECS
from ..archs.onnx import describe_shapes, input_dtype
from ..archs.spec import ArchSpec, ConfigError, ModelInfo
from .foreign import load_spandrel_upscaler, spandrel_installed
from .weights import (
    CheckpointError,
    check_file,
    check_finite,
    check_layout,
    describe_other_network,
    first_line,
    read_state_dict,
)

# How each role is named where an ONNX file of another one is refused.
# What an ONNX file of one role is called when another was asked for, where it needs more than the name.
ONNX_WRONG_ROLE = {
    ("restorer", "parser"): "holds a GPEN restorer, not a face parser or occluder (a GPEN-{size} export: load it as "
                            "the restorer)",
    ("detector", "parser"): "holds an SCRFD face detector, not a face parser or occluder",
}
ONNX_ROLE_HINTS = {
    "restorer": "not a GPEN export (one input of shape N,3,S,S)",
    "detector": "not a face detector (insightface's SCRFD exports have 6, 9, 10 or 15 outputs)",
    "parser": "not a face parser or occluder: FaceFusion's region parsers take one input (1, 3, 512, 512) and "
              "give 19 channels at 512x512; its occluders take one input (N, 256, 256, 3) and give one "
              "channel at 256x256",
}


def is_onnx(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def load(path: str | os.PathLike, role: str | None = None,
         device: torch.device | str | None = None) -> tuple[ArchSpec, object]:
    """The spec and the built network (a torch module in float32 on the CPU, or an ONNX runner on
    `device` where onnxruntime offers it) of the weight file `path`, of `role` when given; its `.info`
    says what it is. A CheckpointError (or FileNotFoundError) naming the file otherwise."""
    if is_onnx(path):
        return build_session(open_session(Path(path), device), path, role)
    state = read_state_dict(path)
    if role == "upscaler" and not known(state):
        spec, net = load_spandrel_upscaler(state, path)
        net.info = info(spec, net, state, path)
        return spec, net
    spec, net, state = skeleton(state, path, role)
    return spec, fill(spec, net, state, path)


def describe_file(path: str | os.PathLike) -> ModelInfo:
    """What a weight file is, checked as far as its architecture is known, without building it."""
    if is_onnx(path):
        session = open_session(Path(path), "cpu")
        spec = identify_session(session, path)
        configure(spec, session, path)
        return session_info(spec, session)
    state = read_state_dict(path)
    if not known(state) and spandrel_installed():
        spec, net = load_spandrel_upscaler(state, path)
        return info(spec, net, state, path)
    return describe(state, path)


def known(state: dict[str, torch.Tensor]) -> bool:
    """Whether one of the registered specs recognises these weights."""
    return any(recognises(spec, state) for spec in specs("torch"))


def recognises(spec: ArchSpec, found) -> bool:
    """Whether a state dict or session is `spec`'s network. A test that fails on another network's
    tensors (a registered network's, say, indexing a key that is not there) says no."""
    try:
        return bool(spec.recognise(found))
    except Exception:
        return False


def identify(state: dict[str, torch.Tensor], path: str | os.PathLike, role: str | None = None) -> ArchSpec:
    """The architecture these weights are for (of `role`, when given), or a CheckpointError naming
    what they are instead."""
    for spec in specs("torch"):
        if recognises(spec, state):
            if role is not None and spec.role != role:
                raise CheckpointError(path, f"holds {spec.name} weights, not {with_article(role)}")
            return spec
    other = describe_other_network(state)
    if other is not None:
        raise CheckpointError(path, f"holds {other} weights" + (f", not {with_article(role)}" if role else ""))
    raise CheckpointError(path, "is not a network ComfyUI-GPEN knows (GPEN, RetinaFace, SCRFD, ParseNet, BiSeNet, "
                          f"GFPGAN, CodeFormer, ...); it starts with {', '.join(list(state)[:3])}")


def skeleton(state: dict[str, torch.Tensor], path: str | os.PathLike,
             role: str | None = None) -> tuple[ArchSpec, nn.Module, dict[str, torch.Tensor]]:
    """The network these weights are for, on the meta device (no memory), checked key for key and
    shape for shape against them, with finite weights; and the weights under its names."""
    spec = identify(state, path, role)
    try:
        if spec.convert is not None:
            state = spec.convert(state)
        config = spec.config(state)
    except ConfigError as e:
        raise CheckpointError(path, str(e)) from None
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(path, f"has {spec.name} keys but does not fit its layout ({first_line(e)})") from None
    with torch.device("meta"):
        net = spec.build(**config)
    check_layout(state, net, path, spec.name)
    check_finite(state, path)
    return spec, net, state


def build(state: dict[str, torch.Tensor], path: str | os.PathLike, role: str | None = None) -> nn.Module:
    """The network holding these weights, in float32 and eval mode, on the CPU, after `skeleton`'s
    checks; its `.info` says what it is."""
    spec, net, state = skeleton(state, path, role)
    return fill(spec, net, state, path)


def fill(spec: ArchSpec, net: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> nn.Module:
    # Allocated, not initialised: every parameter and buffer is in the state dict, and the strict copy
    # fills them all (widening float16 and bfloat16 to float32).
    net = net.to_empty(device="cpu")
    net.load_state_dict(state, strict=True)
    check_finite(net.state_dict(), path)  # float64 that overflows float32 shows only after the copy
    net.info = info(spec, net, state, path)
    return net.eval().requires_grad_(False)


def describe(state: dict[str, torch.Tensor], path: str | os.PathLike) -> ModelInfo:
    """What these weights are, checked as far as their architecture is known, without building them."""
    try:
        spec, net, state = skeleton(state, path)
    except CheckpointError:
        other = describe_other_network(state)
        if other is None or known(state):
            raise
        return ModelInfo(arch=other, format=weight_format(path), dtype=stored_dtype(state),
                         parameters=sum(t.numel() for t in state.values() if t.is_floating_point()))
    return info(spec, net, state, path)


def info(spec: ArchSpec, net: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> ModelInfo:
    """The descriptor of a network of `spec` holding `state`, read from file `path`."""
    return ModelInfo(arch=spec.name, role=spec.role, format=weight_format(path), dtype=stored_dtype(state),
                     parameters=sum(p.numel() for p in net.parameters()), **spec.details(net))


def open_session(path: Path, device: torch.device | str | None = None):
    """An onnxruntime session for `path`, on CUDA when asked for and available, else on the CPU."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(f"{path}: ONNX models need onnxruntime: pip install onnxruntime "
                          "(or onnxruntime-gpu for CUDA)") from None
    check_file(path)
    available = ort.get_available_providers()
    want_gpu = device is None or str(device) in ("auto", "gpu") or str(device).startswith("cuda")
    providers = [p for p in ("CUDAExecutionProvider",) if want_gpu and p in available] + ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for bad graphs
        raise CheckpointError(path, f"is not a usable ONNX model ({first_line(e)})") from None


def identify_session(session, path: str | os.PathLike, role: str | None = None) -> ArchSpec:
    """The architecture of an ONNX file (of `role`, when given), told by its inputs and outputs."""
    for spec in specs("onnx"):
        if recognises(spec, session):
            if role is not None and spec.role != role:
                wrong = ONNX_WRONG_ROLE.get((spec.role, role), "holds {name} weights, not a {role}")
                raise CheckpointError(path, wrong.format(name=spec.name, role=role, **spec.details(session)))
            return spec
    hint = ONNX_ROLE_HINTS.get(role, "not a network ComfyUI-GPEN knows (GPEN, SCRFD, FaceFusion's parsers)")
    raise CheckpointError(path, f"is an ONNX model with {describe_shapes(session)}, {hint}")


def build_session(session, path: str | os.PathLike, role: str | None = None) -> tuple[ArchSpec, object]:
    """The runner of an ONNX session, after its signature's checks; its `.info` says what it is."""
    spec = identify_session(session, path, role)
    config = configure(spec, session, path)
    try:
        runner = spec.build(session, **config)
    except ValueError as e:  # what its runner found, said in full
        raise CheckpointError(path, first_line(e)) from None
    except ImportError as e:
        raise ImportError(f"{path}: {e}") from None
    runner.info = session_info(spec, session)
    return spec, runner


def configure(spec: ArchSpec, session, path: str | os.PathLike) -> dict:
    """An ONNX network's configuration from its signature, its bounds checked before anything runs."""
    try:
        return spec.config(session)
    except ValueError as e:  # an ONNX signature's bounds, said in full
        raise CheckpointError(path, first_line(e)) from None


def session_info(spec: ArchSpec, session) -> ModelInfo:
    """The descriptor of an ONNX file of `spec`: what its signature says (`details` reads the session)."""
    return ModelInfo(arch=spec.name, role=spec.role, format="onnx", dtype=input_dtype(session).name,
                     **spec.details(session))


def with_article(role: str) -> str:
    return f"an {role}" if role[0] in "aeiou" else f"a {role}"


def specs(format: str) -> list[ArchSpec]:
    return [spec for spec in SPECS if spec.format == format]


def weight_format(path: str | os.PathLike) -> str:
    return "safetensors" if Path(path).suffix.lower() == ".safetensors" else "pth"


def stored_dtype(state: dict[str, torch.Tensor]) -> str:
    return str(next(iter(state.values())).dtype).removeprefix("torch.")
