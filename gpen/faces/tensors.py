"""ComfyUI IMAGE batches (B,H,W,C) as the pipeline works on them, and back to the caller's layout.

The API takes images as ComfyUI gives them (float tensors in 0..1), as image loaders give them (uint8
tensors or numpy arrays in 0..255) or as float numpy arrays: `as_images` makes the pipeline's float tensor
of any of these, `like_given` turns the result back into what was given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IMAGES = ("{name} must be a torch tensor or numpy array, float in 0..1 or uint8 in 0..255, shaped (B, H, W, C) or "
          "(H, W, C) with C = 1, 3 or 4")
FINITE_ROWS = 256  # rows looked at a time for NaN and Inf: the check's flags stay small beside the frame


@dataclass(frozen=True)
class Given:
    """What the caller's images were: the pipeline's result is given back in the same form."""

    numpy: bool
    dtype: torch.dtype  # uint8 or a float type
    batched: bool  # (B,H,W,C); else one (H,W,C) image


def as_images(images, name: str = "images") -> tuple[torch.Tensor, Given]:
    """Images of any accepted type -> (B,H,W,C) float in 0..1 (a float tensor as it is, not copied), and
    what they were; anything else is refused with what `images` (called `name` there) must be."""
    must = IMAGES.format(name=name)
    if not isinstance(images, (torch.Tensor, np.ndarray)):
        raise ValueError(f"{must}; got {type(images).__name__}")
    given = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if given.dtype != torch.uint8 and not given.dtype.is_floating_point:
        raise ValueError(f"{must}; got {given.dtype}")
    if given.ndim not in (3, 4) or given.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{must}; got shape {tuple(given.shape)}")
    kind = Given(isinstance(images, np.ndarray), given.dtype, given.ndim == 4)
    batch = given if kind.batched else given[None]
    return (batch.float().div_(255) if kind.dtype == torch.uint8 else batch), kind


def check_finite(images: torch.Tensor, name: str) -> None:
    """Refuse (B,H,W,C) images holding NaN or Inf, a few rows at a time."""
    for frame in images:
        for rows in frame.split(FINITE_ROWS):
            if not torch.isfinite(rows).all():
                raise ValueError(f"{name} holds NaN or infinite values")


def like_given(images: torch.Tensor, given: Given):
    """The pipeline's (B,H,W,C) float result as the caller's images were: uint8 rounded from 0..1, a numpy
    array for a numpy array, one image for one image."""
    images = images.clamp(0, 1).mul(255).round_().to(torch.uint8) if given.dtype == torch.uint8 else \
        images.to(given.dtype)
    images = images if given.batched else images[0]
    return images.cpu().numpy() if given.numpy else images


def check_frames(images) -> torch.Tensor:
    """`images` when they are a (B,H,W,C) float tensor with C = 1, 3 or 4 (what detectors take); a
    ValueError for anything else: 2 channels, channels first (B,3,H,W), uint8 0..255 read as 0..1."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4) \
            or not images.dtype.is_floating_point:
        shape = f"shape {tuple(images.shape)} {images.dtype}" if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"images must be a (B, H, W, C) float tensor in 0..1 with C in 1, 3, 4; got {shape}")
    return images


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
