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

CLASSES = ("background", "skin", "left brow", "right brow", "left eye", "right eye", "glasses", "left ear",
           "right ear", "earring", "nose", "mouth", "upper lip", "lower lip", "neck", "necklace", "cloth", "hair",
           "hat")
# Restored by default: the face itself. Kept from the original: background, earring, neck, necklace,
# cloth, hair and hat, which GPEN would repaint with hallucinated skin.
FACE_REGIONS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13)
REGION_PRESETS = {
    "face": FACE_REGIONS,
    "face without glasses": tuple(c for c in FACE_REGIONS if c != 6),  # rims stay as they were
    "face without ears": tuple(c for c in FACE_REGIONS if c not in (7, 8)),
    "face and hair": FACE_REGIONS + (17,),
}
PARSE_FEATHER = 0.01  # of the crop: the soft edge of a parse mask (5 px at 512)


def region_classes(regions: str | Iterable[int | str] | None = None) -> tuple[int, ...]:
    """Class indices from a preset name ("face"), names ("skin, nose") or indices; None is "face"."""
    if regions is None:
        return FACE_REGIONS
    if isinstance(regions, str):
        if regions in REGION_PRESETS:
            return REGION_PRESETS[regions]
        regions = [part.strip() for part in regions.split(",") if part.strip()]
    classes = []
    for region in regions:
        if isinstance(region, str) and region.isdigit():
            region = int(region)
        if isinstance(region, str):
            if region not in CLASSES:
                raise ValueError(f"unknown face region {region!r}: use a preset ({', '.join(REGION_PRESETS)}) "
                                 f"or classes from {', '.join(CLASSES)}")
            region = CLASSES.index(region)
        if not 0 <= int(region) < len(CLASSES):
            raise ValueError(f"face region {region} is not one of the {len(CLASSES)} classes (0-{len(CLASSES) - 1})")
        classes.append(int(region))
    return tuple(sorted(set(classes)))


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
