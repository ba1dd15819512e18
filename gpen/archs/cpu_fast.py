"""What the networks' CPU fast paths share (GPEN's, RRDBNet's, SRVGGNetCompact's): when such a path may
run, and convolutions that write into memory the caller chose, in place.

A fast path keeps its feature maps channels_last, the layout oneDNN's CPU convolutions take without a
reorder, and writes convolution results straight into the blocks it holds (channel slices and strided
phases included) with oneDNN's in-place "add" convolution, the op PyTorch's own compiler fuses into on
the CPU. Where that op is missing (another build, another device), `conv_into` falls back to adding an
ordinary conv2d's result.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F


def usable(model: torch.nn.Module, x: torch.Tensor) -> bool:
    """The fast paths are for running on the CPU: their in-place writes are not differentiable, and a
    trace (ONNX export, TorchScript, torch.compile) should see the plain layers."""
    recording = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in model.parameters()))
    return x.device.type == "cpu" and not recording and not plain_wanted()


_plain = threading.local()


@contextmanager
def plain_layers():
    """In this thread, networks run their plain layers on the CPU too, as they do on a GPU: so that what a
    GPU's forward allocates can be counted with real tensors here (working_memory.py)."""
    before = getattr(_plain, "on", False)
    _plain.on = True
    try:
        yield
    finally:
        _plain.on = before


def plain_wanted() -> bool:
    """Whether the plain layers are wanted: within `plain_layers()`, or while a trace (ONNX export,
    TorchScript, torch.compile) is recording, which should see them."""
    return (getattr(_plain, "on", False) or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling())


def empty_map(like: torch.Tensor, channels: int) -> torch.Tensor:
    """An uninitialised channels_last feature map of `channels` the size, dtype and device of `like`."""
    batch, _, height, width = like.shape
    return torch.empty(batch, channels, height, width, dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last)


def fill_bias_(out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Each channel of `out` set to its bias: where a fast path then adds its convolutions."""
    return out.copy_(bias.to(out.dtype).view(1, -1, 1, 1).expand(out.shape))


def conv_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int] = (0, 0),
              stride: int = 1, groups: int = 1, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out += conv2d(x, weight, bias), written into out's own memory whatever its strides; returns out."""
    if out.device.type == "cpu" and fused_add_works(out.dtype):
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            out, x, weight, bias, list(padding), [stride, stride], [1, 1], groups, "add", 1.0, None, [], None)
    return out.add_(F.conv2d(x, weight, bias, stride, padding, groups=groups))


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
    bias = torch.randn(4, generator=generator).to(dtype)
    out = torch.zeros(1, 8, 6, 6, dtype=dtype).contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            op.binary(out[:, 2:6], x, weight, bias, [1, 1], [1, 1], [1, 1], 1, "add", 1.0, None, [], None)
            expected = F.conv2d(x.float(), weight.float(), bias.float(), padding=1)
    except (RuntimeError, NotImplementedError):
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    return (bool(torch.allclose(out[:, 2:6].float(), expected, atol=tolerance, rtol=tolerance))
            and not out[:, :2].any() and not out[:, 6:].any())
