"""Devices and dtypes from what users type: auto, cpu, gpu, cuda:N; fp32, fp16, bf16."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


CUDA_HELP = "https://pytorch.org/get-started/locally/"


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
    """A torch dtype from a name; None is float32, and "auto" is float16 on a GPU (a restorer re-runs in float32
    the faces it overflows: faces/restore.py), float32 elsewhere. bfloat16 on a CUDA `device` without it is
    refused."""
    if dtype == "auto":
        return torch.float16 if device is not None and device.type == "cuda" else torch.float32
    if dtype is None:
        return torch.float32
    if not isinstance(dtype, torch.dtype):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype == torch.bfloat16 and device is not None and device.type == "cuda":
        check_bf16(device)
    return dtype


def check_bf16(device: torch.device) -> None:
    """Refuses a GPU without native bfloat16 (before Ampere, compute capability 8.0): there torch at best
    emulates it, which gains nothing over fp16."""
    with torch.cuda.device(device.index if device.index is not None else -1):  # -1: the current device
        supported = torch.cuda.is_bf16_supported(including_emulation=False)
    if not supported:
        raise ValueError(f"bf16 asked for, but {device} has no native bfloat16 (it needs a GPU of compute "
                         "capability 8.0, Ampere, or newer): use fp16 or fp32")
