"""GPEN exported to ONNX (the files ReActor and FaceFusion users keep), run by onnxruntime.

Those exports take NCHW RGB in [-1, 1] and return the same, like the PyTorch model; many fix the
batch dimension at 1, in which case faces are run one at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, ModelInfo, check_file, first_line
from .restorer import restore_crops

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
    from .onnx_parsers import describe_onnx_parser

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
