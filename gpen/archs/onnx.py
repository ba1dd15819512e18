"""ONNX networks users keep, run by onnxruntime and recognised by their input and output shapes.

GPEN exports (the files ReActor and FaceFusion users keep) take NCHW RGB in [-1, 1] and return the
same, like the PyTorch model; many fix the batch dimension at 1, in which case faces are run one at
a time.

FaceFusion's face parsers and occluders:

FaceFusion's ONNX face parsers and occluders, run by onnxruntime and recognised by their shapes.

- Region parsers (bisenet_resnet_18.onnx, bisenet_resnet_34.onnx): one input (1 or N, 3, 512, 512),
  RGB normalised with the ImageNet mean/std; the first output holds the 19 face-region logits at
  512x512 (background, skin, brows, eyes, glasses, ears, earring, nose, mouth, lips, neck, necklace,
  cloth, hair, hat: facexlib's BiSeNet classes, in that order).
- Occluders (xseg_1.onnx, xseg_2.onnx, xseg_3.onnx, DeepFaceLab's XSeg): one input (N, 256, 256, 3),
  channels last, BGR in 0..1, the way FaceFusion feeds them; the output is the probability that the
  face shows, (N, 256, 256, 1) channels last (N,256,256 and N,1,256,256 are accepted too).

Both take crops as (N, H, W, 3) RGB float in 0..1 of any size, as torch tensors, and give their
results at the crops' size on the crops' device. FaceFusion blurs and thresholds these masks; here
they come back raw (clipped to 0..1): feathering is done where the faces are pasted back.

FaceFusion 2.x's face_parser.onnx has the region parsers' shapes but took RGB scaled to -1..1;
shapes cannot tell it apart, and it is fed the ImageNet normalisation of the 3.x parsers here.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from ..faces.masks import class_masks
from ..faces.restore import restore_crops
from ..files.weights import CheckpointError, ModelInfo, check_file, first_line
from .bisenet import IMAGENET_MEAN, IMAGENET_STD

ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Face sizes accepted from an export: the released GPEN runs 256 to 2048. A fixed input far bigger
# (a 97-byte file can declare 30000x30000) would take gigabytes on the first restore.
MIN_SIZE, MAX_SIZE = 64, 4096
# insightface's SCRFD exports: number of outputs -> whether they include the five landmarks.
SCRFD_OUTPUTS = {6: False, 9: True, 10: False, 15: True}


class OnnxGPEN:
    def __init__(self, path: str | os.PathLike, device: torch.device | str | None = None):
        path = Path(path)
        self.session = open_session(path, device)
        self.size = gpen_face_size(self.session, path)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.input_dtype = input_dtype(self.session)
        self.fixed_batch = inputs[0].shape[0] if isinstance(inputs[0].shape[0], int) else None
        self.providers = self.session.get_providers()
        self.info = ModelInfo(kind="GPEN", format="onnx", size=self.size, dtype=self.input_dtype.name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW RGB in [-1, 1] -> the same, like GPEN.forward."""
        batch = x.detach().cpu().numpy().astype(self.input_dtype)
        step = self.fixed_batch or len(batch)
        outs = [self.session.run([self.output_name], {self.input_name: batch[i:i + step]})[0]
                for i in range(0, len(batch), step)]
        return torch.from_numpy(np.concatenate(outs).astype(np.float32)).to(x.device)

    def restore(self, faces: torch.Tensor, batch_size: int = 4, on_batch=None) -> torch.Tensor:
        return restore_crops(self, self.size, faces, batch_size=batch_size, on_batch=on_batch)


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


def input_dtype(session) -> np.dtype:
    return np.dtype(ONNX_DTYPES.get(session.get_inputs()[0].type, np.float32))


def gpen_face_size(session, path: Path) -> int:
    """The face size S of a GPEN export (one input N,3,S,S and an output of the same shape), checked
    before anything runs."""
    inputs = session.get_inputs()
    shape = inputs[0].shape
    if len(inputs) != 1 or len(shape) != 4 or shape[1] != 3 or not isinstance(shape[2], int) or shape[2] != shape[3]:
        raise CheckpointError(path, f"is an ONNX model with input {[(i.name, i.shape) for i in inputs]}, "
                              "not a GPEN export (one input of shape N,3,S,S)")
    size = shape[2]
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise CheckpointError(path, f"is an ONNX model for {size}x{size} faces; GPEN exports run from {MIN_SIZE} "
                              f"to {MAX_SIZE} (the released GPEN: 256 to 2048)")
    output = session.get_outputs()[0].shape
    if len(output) != 4 or any(isinstance(d, int) and d != want for d, want in zip(output[1:], (3, size, size))):
        raise CheckpointError(path, f"is an ONNX model whose output is {output}, not a GPEN export "
                              f"(output N,3,{size},{size} like its input)")
    return size


def describe_onnx(path: str | os.PathLike) -> ModelInfo:
    """What an ONNX file is: an SCRFD face detector, a FaceFusion region parser or occluder (told by
    their shapes), or a GPEN export (checked like load_model does)."""
    from .onnx import describe_onnx_parser

    path = Path(path)
    session = open_session(path, "cpu")
    dtype = input_dtype(session).name
    parser = describe_onnx_parser(session)
    if parser is not None:
        return parser
    landmarks = SCRFD_OUTPUTS.get(len(session.get_outputs()))
    if landmarks is not None:
        detail = "with landmarks" if landmarks else "without landmarks (alignment needs them: use a *_bnkps or det_10g file)"
        return ModelInfo(kind="SCRFD face-detector", format="onnx", dtype=dtype, detail=detail)
    return ModelInfo(kind="GPEN", format="onnx", size=gpen_face_size(session, path), dtype=dtype)


PARSER_SIZE = 512
PARSER_CLASSES = 19
OCCLUDER_SIZE = 256


def fits(dim, want: int) -> bool:
    """Whether an ONNX dimension (an int, or a name/None where it is dynamic) can be `want`."""
    return not isinstance(dim, int) or dim == want


def is_fixed(dim, want: int) -> bool:
    return isinstance(dim, int) and dim == want


def is_region_parser(session) -> bool:
    """One input (1 or dynamic, 3, 512, 512) and a first output with 19 channels at 512x512."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or not outputs:
        return False
    shape, out = inputs[0].shape, outputs[0].shape
    return (len(shape) == 4 and fits(shape[0], 1) and is_fixed(shape[1], 3)
            and is_fixed(shape[2], PARSER_SIZE) and is_fixed(shape[3], PARSER_SIZE)
            and len(out) == 4 and fits(out[0], 1) and is_fixed(out[1], PARSER_CLASSES)
            and fits(out[2], PARSER_SIZE) and fits(out[3], PARSER_SIZE))


def is_occluder(session) -> bool:
    """One input (N, 256, 256, 3) channels last and a first output of one channel at 256x256:
    (N, 256, 256, 1) as the XSeg exports have it, or (N, 256, 256) or (N, 1, 256, 256)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or not outputs:
        return False
    shape, out = inputs[0].shape, list(outputs[0].shape)
    if not (len(shape) == 4 and fits(shape[0], 1) and is_fixed(shape[1], OCCLUDER_SIZE)
            and is_fixed(shape[2], OCCLUDER_SIZE) and is_fixed(shape[3], 3)):
        return False
    if len(out) == 4 and is_fixed(out[3], 1):
        out = out[:3]
    elif len(out) == 4 and is_fixed(out[1], 1):
        out = out[:1] + out[2:]
    return len(out) == 3 and fits(out[0], 1) and fits(out[1], OCCLUDER_SIZE) and fits(out[2], OCCLUDER_SIZE)


def describe_shapes(session) -> str:
    inputs = ", ".join(f"{i.name} {list(i.shape)}" for i in session.get_inputs())
    outputs = ", ".join(f"{o.name} {list(o.shape)}" for o in session.get_outputs())
    return f"inputs {inputs or 'none'}; outputs {outputs or 'none'}"


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """NCHW float -> NCHW at `size`: bilinear, antialiased when shrinking; unchanged at its own size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def check_crops(crops: torch.Tensor) -> None:
    if not isinstance(crops, torch.Tensor) or crops.dim() != 4 or crops.shape[-1] != 3:
        shape = tuple(crops.shape) if hasattr(crops, "shape") else type(crops).__name__
        raise ValueError(f"face crops must be a (N, H, W, 3) RGB tensor in 0..1, not {shape}")


class OnnxFaceNetwork:
    """What both kinds share: the session, its batch rule, and where results go."""

    kind: str
    size: int
    label: str  # what the file is, for messages and names
    fits: Callable  # whether a session has this kind's input and output shapes

    def __init__(self, path: str | os.PathLike, device: torch.device | str | None = None, session=None):
        path = Path(path)
        session = open_session(path, device) if session is None else session
        if not self.fits(session):
            raise CheckpointError(path, f"is not a {self.label} ({describe_shapes(session)})")
        self.path, self.session = path, session
        self.name = f"{self.label} {path.name}"
        self.info = describe_onnx_parser(session)
        inputs = session.get_inputs()
        self.input_name, self.output_name = inputs[0].name, session.get_outputs()[0].name
        self.input_dtype = input_dtype(session)
        # Exports with the batch fixed at 1 take one face per run; others take the whole batch.
        self.fixed_batch = inputs[0].shape[0] if isinstance(inputs[0].shape[0], int) else None
        self.providers = session.get_providers()
        on_cuda = "CUDAExecutionProvider" in self.providers and torch.cuda.is_available()
        # Where callers had best keep the crops; results always come back on the crops' own device.
        self.device = torch.device("cuda" if on_cuda else "cpu")

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=self.input_dtype)
        step = self.fixed_batch or len(batch)
        outs = [self.session.run([self.output_name], {self.input_name: batch[i:i + step]})[0]
                for i in range(0, len(batch), step)]
        return np.concatenate(outs).astype(np.float32)

    def __repr__(self) -> str:
        return f"<{self.name} on {', '.join(self.providers)}>"


class OnnxRegionParser(OnnxFaceNetwork):
    """FaceFusion's BiSeNet region parser (bisenet_resnet_18/34.onnx): 19 classes at 512x512."""

    kind = "bisenet-onnx"
    size = PARSER_SIZE
    classes = PARSER_CLASSES
    label = "FaceFusion region parser"
    fits = staticmethod(is_region_parser)

    @torch.no_grad()
    def logits(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) RGB in 0..1 -> (N, 19, H, W) float32 logits, on the crops' device."""
        check_crops(crops)
        n, h, w, _ = crops.shape
        if n == 0:
            return torch.zeros(0, self.classes, h, w, device=crops.device)
        rgb = resize(crops.float().permute(0, 3, 1, 2), (self.size, self.size))
        mean = torch.tensor(IMAGENET_MEAN, device=rgb.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=rgb.device).view(1, 3, 1, 1)
        logits = self.run(((rgb - mean) / std).cpu().numpy())
        return resize(torch.from_numpy(logits).to(crops.device), (h, w))

    def masks(self, crops: torch.Tensor, regions: Collection[int]) -> torch.Tensor:
        """(N, H, W) float: 1.0 where the most likely class is one of `regions` (class indices,
        e.g. {1, 2, 3, 4, 5, 10, 11, 12, 13} for skin, brows, eyes, nose, mouth and lips), else 0.0."""
        return class_masks(self.logits(crops), regions)


class OnnxOccluder(OnnxFaceNetwork):
    """FaceFusion's occluder (xseg_1/2/3.onnx, DeepFaceLab's XSeg): the visible-face probability."""

    kind = "occluder"
    size = OCCLUDER_SIZE
    label = "FaceFusion occluder"
    fits = staticmethod(is_occluder)

    @torch.no_grad()
    def masks(self, crops: torch.Tensor, regions: Collection[int] | None = None) -> torch.Tensor:
        """(N, H, W, 3) RGB in 0..1 -> (N, H, W) float32 probability that the face shows there,
        on the crops' device. `regions` is ignored (an occluder has none)."""
        check_crops(crops)
        n, h, w, _ = crops.shape
        if n == 0:
            return torch.zeros(0, h, w, device=crops.device)
        # The occluder sees what FaceFusion gives it: BGR, 0..1, channels last.
        bgr = resize(crops.float().flip(-1).permute(0, 3, 1, 2), (self.size, self.size))
        probability = torch.from_numpy(self.run(bgr.permute(0, 2, 3, 1).cpu().numpy()))
        if probability.dim() == 4:  # one channel, last (the XSeg exports) or first
            probability = probability[..., 0] if probability.shape[-1] == 1 else probability[:, 0]
        probability = probability.clamp(0, 1).to(crops.device)[:, None]
        return resize(probability, (h, w))[:, 0].clamp(0, 1)


def not_a_parser(session, path: Path) -> str:
    """What an ONNX file that is neither a parser nor an occluder holds, in words."""
    if len(session.get_outputs()) in SCRFD_OUTPUTS:
        return "holds an SCRFD face detector, not a face parser or occluder"
    try:
        size = gpen_face_size(session, path)
    except CheckpointError:
        return (f"is an ONNX model with {describe_shapes(session)}, not a face parser or occluder: FaceFusion's "
                f"region parsers take one input (1, 3, {PARSER_SIZE}, {PARSER_SIZE}) and give {PARSER_CLASSES} "
                f"channels at {PARSER_SIZE}x{PARSER_SIZE}; its occluders take one input (N, {OCCLUDER_SIZE}, "
                f"{OCCLUDER_SIZE}, 3) and give one channel at {OCCLUDER_SIZE}x{OCCLUDER_SIZE}")
    return f"holds a GPEN restorer, not a face parser or occluder (a GPEN-{size} export: load it as the restorer)"


def describe_onnx_parser(session) -> ModelInfo | None:
    """A ModelInfo for a FaceFusion region parser or occluder session, None for anything else."""
    if is_region_parser(session):
        return ModelInfo(kind="FaceFusion region parser", format="onnx", dtype=input_dtype(session).name,
                         detail=f"{PARSER_CLASSES} face regions at {PARSER_SIZE}x{PARSER_SIZE}")
    if is_occluder(session):
        return ModelInfo(kind="FaceFusion occluder", format="onnx", dtype=input_dtype(session).name,
                         detail=f"visible-face probability at {OCCLUDER_SIZE}x{OCCLUDER_SIZE}")
    return None
