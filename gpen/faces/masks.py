"""Per-face masks in crop coordinates, (N,S,S) in 0..1, 1 where the restored face may replace the
original: face regions from parser logits, feathering that stays inside them, and combination.

The 19 classes are CelebAMask-HQ's, in the order facexlib's ParseNet and BiSeNet and FaceFusion's
region parsers give them.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from .options import MaskOptions
from .tracks import smoothing_reach


def class_masks(logits: torch.Tensor, classes: Iterable[int]) -> torch.Tensor:
    """(N,C,S,S) logits -> (N,S,S) float: 1 where the most likely class is one of `classes`."""
    found = logits.argmax(1)
    return torch.isin(found, torch.tensor(sorted(set(classes)), device=found.device)).float()


def feather_inside(masks: torch.Tensor, feather: float,
                   cancel: Callable[[], object] | None = None) -> torch.Tensor:
    """Soften the edges of (N,H,W) masks by a Gaussian of `feather` x W, after shrinking them by the
    blur's reach: where a mask was 0 it stays exactly 0 (hair, a hand in front of the face), and the
    soft edge lies inside what it allowed. Faces are done one at a time, `cancel()` asked before each
    (it raises to stop)."""
    MaskOptions(feather=feather)  # refuses what it refuses
    sigma = feather * masks.shape[-1]
    if sigma <= 0 or not len(masks):
        return masks
    reach = max(1, math.ceil(3 * sigma))
    down, across = (blur_matrix(side, sigma, masks.device) for side in masks.shape[1:])
    soft = torch.empty_like(masks)
    for i, mask in enumerate(masks):
        if cancel is not None:
            cancel()
        shrunk = min_filter(min_filter(mask, reach, 0), reach, 1)  # a square's minimum, by rows then columns
        soft[i] = (down @ shrunk.float() @ across).clamp_(0, 1)
    return soft


def blur_matrix(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """(size, size) B, symmetric, such that B_H @ x @ B_W is paste.gaussian_blur(x, sigma) of an HxW x (its
    taps, zero beyond the edges). Two matrix products cost the same at any sigma: a parse mask's blur reaches
    hundreds of pixels (feather 0.1 of a 2048 crop: a 1229-tap convolution, a minute a face), and at the crop
    sizes restorers give (up to 2048) the products are faster than the convolution at any feather."""
    radius = max(1, int(3 * sigma + 0.5))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-taps.square() / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    position = torch.arange(size, device=device)
    offset = position[:, None] - position[None, :]
    return torch.where(offset.abs() <= radius, kernel[(offset + radius).clamp(0, 2 * radius)], 0.0)


def min_filter(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """The minimum of `x` over a window of `radius` each side along `dim`, the window cut at the edges
    (what max_pool2d of -x with that padding gives): minima over windows of 1, 2, 4, ... are combined,
    two overlapping ones per pixel, so it costs log2(radius) passes instead of 2 x radius + 1."""
    length = x.shape[dim]
    radius = min(radius, length - 1)
    if radius <= 0:
        return x
    pad = x.new_full((*x.shape[:dim], radius, *x.shape[dim + 1:]), math.inf)
    window, span, minima = 2 * radius + 1, 1, torch.cat([pad, x, pad], dim)
    while 2 * span <= window:
        n = minima.shape[dim]
        minima = torch.minimum(minima.narrow(dim, 0, n - span), minima.narrow(dim, span, n - span))
        span *= 2
    return torch.minimum(minima.narrow(dim, 0, length), minima.narrow(dim, window - span, length))


def smooth_over_time(masks: torch.Tensor, tracks: list, sigma: float) -> torch.Tensor:
    """`masks` (N,S,S) steadied along `tracks` (each a list or tensor of indices into `masks`, in time order):
    MasksOverTime on masks already made."""
    if sigma <= 0 or not len(masks):
        return masks
    return MasksOverTime(lambda part: masks[part], len(masks), tracks, sigma, len(masks))[0:len(masks)]


class MasksOverTime:
    """The masks of a run's faces (N, in the flat order of its crops) steadied over the frames of each face's
    track: a Gaussian average over time (sigma in frames, the frames within smoothing_reach), never above the
    frame's own mask, so a region that flickers into the mask for a frame or two is held back while whatever
    the parser or occluder kept out of this frame stays out. `tracks` hold indices into the N faces, in time
    order; a face in none keeps its own mask.

    Asked for parts in order (`steadied[part]`), it makes the faces' own masks with `make(part)`, `batch` faces
    at a time from the first, as far ahead as the part's tracks reach, and lets each go once no face still to
    come needs it: a video holds the masks of the faces within the reach of a batch, not every face's."""

    def __init__(self, make: Callable[[slice], torch.Tensor], count: int, tracks: list, sigma: float, batch: int):
        self.make, self.count, self.batch = make, count, batch
        reach = smoothing_reach(sigma)
        self.window = {face: ([face], [1.0]) for face in range(count)}  # the faces a face's mask averages, weighed
        for track in tracks:
            track = [int(face) for face in track]
            for step, face in enumerate(track):
                near = range(max(0, step - reach), min(len(track), step + reach + 1))
                weights = [math.exp(-(other - step) ** 2 / (2 * sigma ** 2)) for other in near]
                self.window[face] = ([track[other] for other in near], [weight / sum(weights) for weight in weights])
        first = [min(faces) for faces, _ in (self.window[face] for face in range(count))]
        self.keep_from = [count] * (count + 1)  # faces before keep_from[i] are needed by none from face i on
        for face in range(count - 1, -1, -1):
            self.keep_from[face] = min(first[face], self.keep_from[face + 1])
        self.made, self.own = 0, {}

    def __getitem__(self, part: slice) -> torch.Tensor:
        needed = max((max(self.window[face][0]) for face in range(part.start, part.stop)), default=part.start - 1)
        while self.made <= needed:
            ahead = slice(self.made, min(self.made + self.batch, self.count))
            self.own |= dict(zip(range(ahead.start, ahead.stop), self.make(ahead)))
            self.made = ahead.stop
        steadied = torch.stack([self.steadied(face) for face in range(part.start, part.stop)])
        for face in [face for face in self.own if face < self.keep_from[part.stop]]:
            del self.own[face]
        return steadied

    def steadied(self, face: int) -> torch.Tensor:
        faces, weights = self.window[face]
        own = self.own[face]
        if len(faces) == 1:
            return own
        average = torch.zeros_like(own, dtype=torch.float32)
        for other, weight in zip(faces, weights):  # weights as numbers: nothing copied to a GPU and waited for
            average.add_(self.own[other], alpha=weight)
        return torch.minimum(average, own)
