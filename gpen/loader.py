"""load_model: any GPEN file users have -> a ready restorer, plus a descriptor of what was loaded.

Like spandrel: the architecture is recognised from its state-dict keys and its hyperparameters are
read from tensor shapes, never from the file name. A file is checked against that architecture,
built on the meta device, before anything its size is allocated.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import torch

from . import registry
from .checkpoint import ModelInfo, read_state_dict, write_safetensors
from .model import GPEN, channel_widths

GPEN_KEYS = ("generator.style.1.weight", "generator.input.input", "ecd0.0.0.weight", "final_linear.0.weight")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# What a GPEN file may ask to be built. The released ones are 256 to 2048 pixels (the reference
# defines no layer widths beyond 2048), narrow 0.5 or 1, channel_multiplier 1 or 2, style_dim 512
# and n_mlp 8; the bounds leave room for other trainings and none for a file that claims a huge network.
MIN_SIZE, MAX_SIZE = 16, 2048
CONFIG_LIMITS = {"narrow": 2, "channel_multiplier": 8, "style_dim": 1024, "n_mlp": 16}  # each above 0
MAX_CHANNELS = 1024
CUDA_HELP = "https://pytorch.org/get-started/locally/"


def infer_gpen_config(state: dict[str, torch.Tensor]) -> dict:
    """GPEN's constructor arguments from the shapes of its state dict."""
    encoders = {int(m.group(1)) for k in state if (m := re.match(r"ecd(\d+)\.", k))}
    fewest, most = int(math.log2(MIN_SIZE)) - 1, int(math.log2(MAX_SIZE)) - 1
    if not fewest <= len(encoders) <= most:
        raise ValueError(f"{len(encoders)} encoder layers (ecd0, ...); GPEN sizes {MIN_SIZE} to {MAX_SIZE} "
                         f"have {fewest} to {most}")
    size = 2 ** (len(encoders) + 1)
    narrow = state["generator.input.input"].shape[1] / 512
    if size >= 64:  # channel_multiplier only shapes the layers from 64x64 up
        channels_64 = state["generator.to_rgbs.3.conv.weight"].shape[2] // 2
        channel_multiplier = channels_64 / (256 * narrow)
    else:
        channel_multiplier = 1
    n_mlp = sum(1 for k in state if re.fullmatch(r"generator\.style\.\d+\.weight", k))
    return dict(size=size, style_dim=state["generator.style.1.weight"].shape[0], n_mlp=n_mlp,
                channel_multiplier=_tidy(channel_multiplier), narrow=_tidy(narrow))


def check_gpen_config(config: dict) -> None:
    """Refuse a configuration no GPEN training makes, before building anything from it."""
    for name, limit in CONFIG_LIMITS.items():
        if not 0 < config[name] <= limit:
            raise ValueError(f"{name} {config[name]} is outside 0..{limit}")
    widths = [c for res, c in channel_widths(config["channel_multiplier"], config["narrow"]).items()
              if res <= config["size"]]
    if not 1 <= min(widths) <= max(widths) <= MAX_CHANNELS:
        raise ValueError(f"layer widths {min(widths)} to {max(widths)} are outside 1..{MAX_CHANNELS}")


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
        from .onnx_model import OnnxGPEN

        return OnnxGPEN(path, device=device)
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    model = build_gpen(read_state_dict(path), path)
    return model.to(device=device, dtype=dtype)


def describe_weights(path: str | os.PathLike) -> ModelInfo:
    """What a weight file is (GPEN, a face detector, a face parser, another known network), checked
    as far as its architecture is known here, without building it; a CheckpointError otherwise."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from .onnx_model import describe_onnx

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


def resolve_device(device: torch.device | str | None) -> torch.device:
    """A torch device from a name ("auto": CUDA when there is one); a one-line ValueError for a CUDA
    device this torch cannot give."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device("cuda" if device == "gpu" else device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        check_cuda(device)
    return device


def check_cuda(device: torch.device) -> None:
    if torch.version.cuda is None and torch.version.hip is None:  # ROCm builds answer to "cuda" too
        raise ValueError(f"device {device} asked for, but this torch ({torch.__version__}) is built without CUDA; "
                         f"install a CUDA build of torch (choose one at {CUDA_HELP}) or use the CPU")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"device {device} asked for, but torch {torch.__version__} finds no GPU; "
                         "check the driver (nvidia-smi), or use the CPU")
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {device} asked for, but torch finds {count} GPU(s): cuda:0 to cuda:{count - 1}")


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | None = None) -> torch.dtype:
    """A torch dtype from a name; None is float32, and "auto" is float16 on a GPU, float32 elsewhere."""
    if dtype == "auto":
        return torch.float16 if device is not None and device.type == "cuda" else torch.float32
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _tidy(x: float) -> float:
    return int(x) if float(x).is_integer() else round(x, 6)
