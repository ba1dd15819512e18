"""Upscalers on whole images: `UpscalerHandle` runs an upscaling network (RRDBNet, SRVGGNetCompact, ...)
on ComfyUI IMAGE batches, tile by tile so that memory is bounded by the tile, not by the image.

Each tile's core is run with `overlap` pixels of the image around it as context, and only the core's
output is kept: wherever a network sees no further than `overlap` pixels, the tiled result equals the
whole image's forward; beyond that the seams differ only by what the far context would have changed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F

from ..archs.spec import ArchSpec, network_input, resize
from .handle import NetworkHandle
from .options import MAX_TILE, MIN_TILE
from .tensors import as_rgb, match_channels

OVERLAP = 32  # context pixels around each tile by default (Real-ESRGAN pads 10): seams do not show
MAX_OUTPUT_SIDE = 65536  # pixels of an output side; a bigger one is a mistake, not an image


class UpscalerHandle(NetworkHandle):
    """An upscaling network with its spec. `.scale`: how many times it enlarges; `.network`: the module."""

    def __init__(self, network, spec: ArchSpec):
        super().__init__(network, spec)
        self.scale = int(network.scale)
        self.multiple = int(getattr(network, "multiple", 1))  # what the input's sides must be multiples of

    @torch.inference_mode()
    def upscale(self, images: torch.Tensor, tile: int = 512, overlap: int | None = None,
                progress: Callable[[int, int], None] | None = None,
                cancel: Callable[[], None] | None = None) -> torch.Tensor:
        """(B,H,W,C) float 0..1, C in 1, 3, 4 -> (B, H*scale, W*scale, C) clamped to 0..1, on the images' device.

        The network sees pieces of at most `tile` x `tile` pixels: a core and `overlap` pixels of context
        on each side (at most tile/4; by default 32, or tile/4 for smaller tiles). Grayscale is upscaled as RGB and returned as its luma; alpha is
        resized bilinearly. `progress(done, total)` follows the tiles; `cancel()`, asked before each
        tile, raises to stop.
        """
        overlap = min(OVERLAP, tile // 4) if overlap is None and isinstance(tile, int) else overlap
        check_tiling(tile, overlap)
        images = images if images.ndim != 3 else images[None]
        height, width = images.shape[1:3] if images.ndim == 4 else (0, 0)  # other shapes: as_rgb says what is wrong
        if max(height, width) * self.scale > MAX_OUTPUT_SIDE:  # before anything of their size is allocated
            raise ValueError(f"images of {width}x{height} would be {width * self.scale}x{height * self.scale} "
                             f"upscaled; at most {MAX_OUTPUT_SIDE} px a side")
        rgb = as_rgb(images)
        batch, height, width, _ = rgb.shape
        overlap = -(-overlap // self.multiple) * self.multiple  # rounded up: pieces start on the grid
        core = max((tile - 2 * overlap) // self.multiple, 1) * self.multiple
        # Sides padded to the network's multiple by repeating the edge, cut off again at the end.
        x = F.pad(rgb.permute(0, 3, 1, 2), (0, -width % self.multiple, 0, -height % self.multiple), mode="replicate")
        padded_h, padded_w = x.shape[-2:]
        s = self.scale
        out = torch.empty(batch, 3, padded_h * s, padded_w * s, device=images.device)
        cores = [(top, left) for top in range(0, padded_h, core) for left in range(0, padded_w, core)]
        done, total = 0, batch * len(cores)
        for i in range(batch):
            for top, left in cores:
                if cancel is not None:
                    cancel()
                bottom, right = min(top + core, padded_h), min(left + core, padded_w)
                up, lft = max(top - overlap, 0), max(left - overlap, 0)
                piece = x[i:i + 1, :, up:min(bottom + overlap, padded_h), lft:min(right + overlap, padded_w)]
                y = self.spec.forward(self.network, network_input(piece.to(self.device, self.dtype),
                                                                  self.spec.convention))
                out[i, :, top * s:bottom * s, left * s:right * s] = \
                    y[0, :, (top - up) * s:(bottom - up) * s, (left - lft) * s:(right - lft) * s].to(out)
                done += 1
                if progress is not None:
                    progress(done, total)
        result = out[:, :, :height * s, :width * s].clamp(0, 1).permute(0, 2, 3, 1)
        if images.shape[-1] == 4:
            alpha = resize(images[..., 3:].float().permute(0, 3, 1, 2), (height * s, width * s)).clamp(0, 1)
            return torch.cat([result, alpha.permute(0, 2, 3, 1).to(result)], -1).to(images.dtype)
        return match_channels(result, images)

    def __repr__(self) -> str:
        return f"<{self.info or self.spec.name} upscaler on {self.device}>"


def check_tiling(tile: int, overlap: int) -> None:
    if not isinstance(tile, int) or not MIN_TILE <= tile <= MAX_TILE:
        raise ValueError(f"tile must be {MIN_TILE} to {MAX_TILE} pixels, got {tile!r}")
    if not isinstance(overlap, int) or not 0 <= overlap <= tile // 4:
        raise ValueError(f"overlap must be 0 to tile/4 ({tile // 4} pixels for tile {tile}), got {overlap!r}")
