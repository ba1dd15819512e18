"""Writing GPEN's large feature maps into memory kept between calls, on the CPU.

At GPEN-512 and up, each forward pass makes feature maps of 32-512 MB. Asked for fresh each time,
glibc maps new pages for every one (blocks over 32 MiB never come from its heap), and faulting
those pages in cost about a third of the forward pass on the CPU. Here the maps go into a few
named blocks that a model keeps (one set per thread) and reuses, and convolutions write their
results straight into them, channel slices and strided phases included, with oneDNN's in-place
"add" convolution, the op PyTorch's own compiler fuses into on the CPU. Where that op is missing
(another build, another device), `conv_into` falls back to adding an ordinary conv2d's result.
"""

from __future__ import annotations

import math
import threading
import weakref
from functools import lru_cache

import torch
import torch.nn.functional as F

_held = threading.local()  # per thread: model -> Workspace (weakly, so a model's blocks go with it)


class Workspace:
    """Named blocks of memory, grown on demand, handed out as channels_last (B,C,H,W) views."""

    def __init__(self):
        self.blocks: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, int, int, int], like: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = shape
        count = math.prod(shape)
        block = self.blocks.get(name)
        if block is None or block.numel() < count or block.dtype != like.dtype or block.device != like.device:
            with torch.inference_mode(False):  # an ordinary tensor, writable in and out of inference mode
                block = self.blocks[name] = torch.empty(count, dtype=like.dtype, device=like.device)
        return block.as_strided(shape, (channels * height * width, 1, width * channels, channels))

    @property
    def bytes(self) -> int:
        return sum(block.numel() * block.element_size() for block in self.blocks.values())


def workspace(model: torch.nn.Module) -> Workspace:
    """The calling thread's workspace for `model` (made on first use)."""
    held = getattr(_held, "spaces", None)
    if held is None:
        held = _held.spaces = weakref.WeakKeyDictionary()
    if model not in held:
        held[model] = Workspace()
    return held[model]


def release(model: torch.nn.Module) -> None:
    """Free the calling thread's workspace for `model`."""
    getattr(_held, "spaces", {}).pop(model, None)


def usable(model: torch.nn.Module, x: torch.Tensor) -> bool:
    """The workspace path is for running on the CPU: its in-place writes are not differentiable,
    and a trace (ONNX export, TorchScript, torch.compile) should see the plain layers."""
    recording = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in model.parameters()))
    return x.device.type == "cpu" and not recording and not tracing()


def tracing() -> bool:
    """Whether a trace (ONNX export, TorchScript, torch.compile) is recording: it should see plain layers."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def conv_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int] = (0, 0),
              stride: int = 1, groups: int = 1) -> torch.Tensor:
    """out += conv2d(x, weight), written into out's own memory whatever its strides; returns out."""
    if out.device.type == "cpu" and fused_add_works(out.dtype):
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            out, x, weight, None, list(padding), [stride, stride], [1, 1], groups, "add", 1.0, None, [], None)
    return out.add_(F.conv2d(x, weight, None, stride, padding, groups=groups))


@lru_cache(maxsize=None)
def fused_add_works(dtype: torch.dtype) -> bool:
    """Whether this PyTorch's oneDNN in-place convolution exists and gives conv2d's result, into a
    strided destination, checked once per dtype on a small case."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise_", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 6, 6, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4, 8, 3, 3, generator=generator).to(dtype)
    out = torch.zeros(1, 8, 6, 6, dtype=dtype).contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            op.binary(out[:, 2:6], x, weight, None, [1, 1], [1, 1], [1, 1], 1, "add", 1.0, None, [], None)
            expected = F.conv2d(x.float(), weight.float(), padding=1)
    except (RuntimeError, NotImplementedError):
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    return (bool(torch.allclose(out[:, 2:6].float(), expected, atol=tolerance, rtol=tolerance))
            and not out[:, :2].any() and not out[:, 6:].any())
