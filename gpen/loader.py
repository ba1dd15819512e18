"""load_model: any GPEN file users have -> a ready restorer, plus a descriptor of what was loaded.

Like spandrel: the architecture is recognised from its state-dict keys and its hyperparameters are
read from tensor shapes, never from the file name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, ModelInfo, describe_other_network, first_line, read_state_dict
from .model import GPEN

GPEN_KEYS = ("generator.style.1.weight", "generator.input.input", "ecd0.0.0.weight", "final_linear.0.weight")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}



def infer_gpen_config(state: dict[str, torch.Tensor]) -> dict:
    """GPEN's constructor arguments from the shapes of its state dict."""
    encoders = {int(m.group(1)) for k in state if (m := re.match(r"ecd(\d+)\.", k))}
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


def build_gpen(state: dict[str, torch.Tensor], path: str | os.PathLike = "<state dict>") -> GPEN:
    """A GPEN network holding these weights (in float32), or a CheckpointError saying why not."""
    if not all(k in state for k in GPEN_KEYS):
        other = describe_other_network(state)
        if other:
            raise CheckpointError(path, f"holds {other} weights, not GPEN; GPEN files are named like GPEN-BFR-512.pth")
        sample = ", ".join(list(state)[:3])
        raise CheckpointError(path, f"is not a GPEN checkpoint: none of GPEN's keys ({GPEN_KEYS[0]}, …) found; "
                              f"it starts with {sample}")
    try:
        config = infer_gpen_config(state)
        model = GPEN(**config)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(path, f"has GPEN keys but does not fit the GPEN FullGenerator layout ({first_line(e)})") from None
    return model


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
    state = read_state_dict(path)
    model = build_gpen(state, path)
    model.info = ModelInfo(
        kind="GPEN", format="safetensors" if path.suffix.lower() == ".safetensors" else "pth",
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(next(iter(state.values())).dtype).removeprefix("torch."),
        **{k: getattr(model, k) for k in ("size", "channel_multiplier", "narrow", "style_dim", "n_mlp")})
    return model.to(device=resolve_device(device), dtype=resolve_dtype(dtype)).eval().requires_grad_(False)


def resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cuda" if device == "gpu" else device)


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
