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
    """A torch dtype from a name; None is float32, and "auto" the fastest that keeps the output (auto_dtype).
    bfloat16 on a CUDA `device` without it is refused."""
    if dtype == "auto":
        return auto_dtype(device)
    if dtype is None:
        return torch.float32
    if not isinstance(dtype, torch.dtype):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype == torch.bfloat16 and device is not None and device.type == "cuda":
        check_bf16(device)
    return dtype


def auto_dtype(device: torch.device | None) -> torch.dtype:
    """float16 on a GPU with tensor cores, float32 elsewhere (a restorer re-runs in float32 the faces float16
    overflows: faces/restore.py; `bench --acceptance` checks on a GPU that this is the fastest that passed).

    NVIDIA: tensor cores from compute capability 7.0 (Volta) make fp16 2-16x fp32; before, Pascal's consumer
    cards run fp16 at 1/64 of fp32 (the P100, 6.0, is fast at fp16 without tensor cores, but one rule is
    kept). ROCm reports its gfx version as the capability (gfx906: 9.0), not NVIDIA's scale: every GPU of
    a ROCm build runs fp16 at least at fp32's rate (packed, double rate, since Vega), so fp16 there."""
    if device is None or device.type != "cuda":
        return torch.float32
    if torch.version.hip is not None:
        return torch.float16
    major, _ = torch.cuda.get_device_capability(device)
    return torch.float16 if major >= 7 else torch.float32


def has_native_bf16(device: torch.device) -> bool:
    """Whether a CUDA `device` computes in bfloat16 itself (Ampere, compute capability 8.0, and later)."""
    with torch.cuda.device(device.index if device.index is not None else -1):  # -1: the current device
        return torch.cuda.is_bf16_supported(including_emulation=False)


def check_bf16(device: torch.device) -> None:
    """Refuses a GPU without native bfloat16: there torch at best emulates it, which gains nothing over fp16."""
    if not has_native_bf16(device):
        raise ValueError(f"bf16 asked for, but {device} has no native bfloat16 (it needs a GPU of compute "
                         "capability 8.0, Ampere, or newer): use fp16 or fp32")
