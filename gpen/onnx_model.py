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


class OnnxGPEN:
    def __init__(self, path: str | os.PathLike, device: torch.device | str | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError(f"{path}: ONNX models need onnxruntime: pip install onnxruntime "
                              "(or onnxruntime-gpu for CUDA)") from None
        path = Path(path)
        check_file(path)
        available = ort.get_available_providers()
        want_gpu = device is None or str(device) in ("auto", "gpu") or str(device).startswith("cuda")
        providers = [p for p in ("CUDAExecutionProvider",) if want_gpu and p in available] + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad graphs
            raise CheckpointError(path, f"is not a usable ONNX model ({first_line(e)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape
        if len(inputs) != 1 or len(shape) != 4 or shape[1] != 3 or not isinstance(shape[2], int) or shape[2] != shape[3]:
            raise CheckpointError(path, f"is an ONNX model with input {[(i.name, i.shape) for i in inputs]}, "
                                  "not a GPEN export (one input of shape N,3,S,S)")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.input_dtype = ONNX_DTYPES.get(inputs[0].type, np.float32)
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.size = shape[2]
        self.providers = self.session.get_providers()
        self.info = ModelInfo(kind="GPEN", format="onnx", size=self.size,
                              dtype=np.dtype(self.input_dtype).name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW RGB in [-1, 1] -> the same, like GPEN.forward."""
        batch = x.detach().cpu().numpy().astype(self.input_dtype)
        step = self.fixed_batch or len(batch)
        outs = [self.session.run([self.output_name], {self.input_name: batch[i:i + step]})[0]
                for i in range(0, len(batch), step)]
        return torch.from_numpy(np.concatenate(outs).astype(np.float32)).to(x.device)

    def restore(self, faces: torch.Tensor, batch_size: int = 4, on_batch=None) -> torch.Tensor:
        return restore_crops(self, self.size, faces, batch_size=batch_size, on_batch=on_batch)
