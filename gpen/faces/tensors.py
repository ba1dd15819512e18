"""ComfyUI IMAGE batches (B,H,W,C) as the pipeline works on them, and back to the caller's layout."""

from __future__ import annotations

import torch


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI images as (B,H,W,3) float in 0..1: grayscale is repeated, alpha dropped, range clamped."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be (B, H, W, C) with C in 1, 3, 4; got shape {tuple(images.shape)}")
    if images.shape[-1] == 1:
        images = images.expand(-1, -1, -1, 3)
    return images[..., :3].float().clamp(0, 1)


def match_channels(rgb: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """RGB (..., 3) back to the channels of `images` (..., C): grayscale from the luma of the result,
    alpha kept as it was; and to its dtype."""
    channels = images.shape[-1]
    if channels == 1:
        luma = torch.tensor([0.299, 0.587, 0.114], device=rgb.device)
        rgb = (rgb * luma).sum(-1, keepdim=True)
    elif channels == 4:
        rgb = torch.cat([rgb, images[..., 3:].to(rgb)], -1)
    return rgb.to(images.dtype) if images.dtype.is_floating_point else rgb
