"""Per-face masks in crop coordinates, (N,S,S) in 0..1, 1 where the restored face may replace the
original: face regions from parser logits, feathering that stays inside them, and combination.

The 19 classes are CelebAMask-HQ's, in the order facexlib's ParseNet and BiSeNet and FaceFusion's
region parsers give them.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from .paste import gaussian_blur


def class_masks(logits: torch.Tensor, classes: Iterable[int]) -> torch.Tensor:
    """(N,C,S,S) logits -> (N,S,S) float: 1 where the most likely class is one of `classes`."""
    found = logits.argmax(1)
    return torch.isin(found, torch.tensor(sorted(set(classes)), device=found.device)).float()


def feather_inside(masks: torch.Tensor, feather: float) -> torch.Tensor:
    """Soften the edges of (N,S,S) masks by a Gaussian of `feather` x S, after shrinking them by the
    blur's reach: where a mask was 0 it stays exactly 0 (hair, a hand in front of the face), and the
    soft edge lies inside what it allowed."""
    sigma = feather * masks.shape[-1]
    if sigma <= 0 or not len(masks):
        return masks
    reach = max(1, math.ceil(3 * sigma))
    shrunk = -F.max_pool2d(-masks[:, None], 2 * reach + 1, stride=1, padding=reach)
    return gaussian_blur(shrunk, sigma)[:, 0].clamp(0, 1)


def smooth_over_time(masks: torch.Tensor, tracks: list[torch.Tensor], sigma: float) -> torch.Tensor:
    """Steady each face's masks over the frames of its track: a Gaussian average over time (sigma in
    frames), never above the frame's own mask, so a region that flickers into the mask for a frame or
    two is held back while whatever the parser or occluder kept out of this frame stays out.
    `tracks` hold indices into `masks`, in time order."""
    if sigma <= 0:
        return masks
    smoothed = masks.clone()
    for track in tracks:
        if len(track) < 2:
            continue
        steps = torch.arange(len(track), dtype=torch.float32, device=masks.device)
        weights = torch.exp(-(steps[:, None] - steps[None, :]).square() / (2 * sigma ** 2))
        weights = weights / weights.sum(1, keepdim=True)
        index = track.to(masks.device)
        smoothed[index] = torch.minimum(torch.einsum("ts,shw->thw", weights, masks[index]), masks[index])
    return smoothed
