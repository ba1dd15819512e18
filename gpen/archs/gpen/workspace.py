"""Writing GPEN's large feature maps into memory kept between calls, on the CPU.

At GPEN-512 and up, each forward pass makes feature maps of 32-512 MB. Asked for fresh each time,
glibc maps new pages for every one (blocks over 32 MiB never come from its heap), and faulting
those pages in cost about a third of the forward pass on the CPU. Here the maps go into a few
named blocks that a model keeps (one set per thread) and reuses, and convolutions write their
results straight into them (`cpu_fast.conv_into`).
"""

from __future__ import annotations

import math
import threading
import weakref

import torch

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
