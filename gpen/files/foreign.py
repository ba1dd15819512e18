"""Upscalers of architectures ComfyUI-GPEN has no spec for, loaded through spandrel (ComfyUI's model
loader) where it is installed, as it is in every ComfyUI. spandrel stays optional: it needs
torchvision. The weights are read by files.weights as every other file's are (no pickled code runs);
spandrel only recognises them and builds its network from them.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..archs.spec import ArchSpec, Convention
from .weights import CheckpointError, first_line

PURPOSES = ("SR", "Restoration")  # whole-image networks; "FaceSR" ones (GFPGAN, CodeFormer) take aligned faces


class SpandrelUpscaler(nn.Module):
    """spandrel's ImageModelDescriptor as a module: forward(x), NCHW RGB 0..1 (a batch of one) -> 0..1 at
    `scale` times the size; the descriptor pads to its network's size requirements itself."""

    multiple = 1

    def __init__(self, descriptor):
        super().__init__()
        self.model = descriptor.model  # a registered child: .to() moves the descriptor's network with it
        self.descriptor, self.scale = descriptor, int(descriptor.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.descriptor(image[None]) for image in x])


def spandrel_installed() -> bool:
    try:
        import spandrel  # noqa: F401
    except ImportError:
        return False
    return True


def load_spandrel_upscaler(state: dict[str, torch.Tensor], path: str | os.PathLike) -> tuple[ArchSpec, nn.Module]:
    """The upscaler spandrel builds from these weights, and its spec; a CheckpointError
    naming the file when spandrel is not installed, does not know them, or knows them as something else."""
    try:
        import spandrel
    except ImportError:
        raise CheckpointError(path, "is not an upscaler ComfyUI-GPEN knows (RRDBNet/ESRGAN, SRVGGNetCompact); "
                                    "with spandrel installed (as in ComfyUI) any architecture it knows loads too; "
                                    f"it starts with {', '.join(list(state)[:3])}") from None
    try:
        descriptor = spandrel.ModelLoader("cpu").load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise CheckpointError(path, f"is not an upscaler ComfyUI-GPEN or spandrel knows; it starts with "
                                    f"{', '.join(list(state)[:3])}") from None
    except Exception as e:  # spandrel's architectures raise what their constructors raise on odd shapes
        raise CheckpointError(path, f"could not be built by spandrel ({first_line(e)})") from None
    name = descriptor.architecture.name
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose not in PURPOSES:
        raise CheckpointError(path, f"holds {name} weights ({getattr(descriptor, 'purpose', 'not an image model')}), "
                                    "not an upscaler")
    if (descriptor.input_channels, descriptor.output_channels) != (3, 3):
        raise CheckpointError(path, f"holds a {name} of {descriptor.input_channels} to {descriptor.output_channels} "
                                    "channels; upscalers here take and give RGB")
    spec = ArchSpec(f"{name} (spandrel)", "upscaler", recognise=lambda found: False, config=lambda state: {},
                    build=SpandrelUpscaler, convention=Convention(input="0..1"),
                    details=lambda net: {"scale": net.scale, "detail": f"{net.scale}x, built by spandrel"})
    return spec, SpandrelUpscaler(descriptor).eval().requires_grad_(False)
