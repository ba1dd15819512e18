"""Face parsers for paste-back: which pixels of each crop show the face.

`load_parser(path)` gives ParseNet or BiSeNet (facexlib's parsing_parsenet.pth / parsing_bisenet.pth,
native torch) or FaceFusion's ONNX region parsers and occluders, each told apart by its tensors. Any
object with `.kind`, `.size` and `.logits(crops)` (19 classes) or `.masks(crops, regions)` works as a
parser; `parse_faces` runs one or several on crops and combines their masks by minimum.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .masks import PARSE_FEATHER, class_masks, feather_inside, region_classes


class TorchParser:
    """ParseNet or BiSeNet on crops of any size: resized to the network's size and back.

    `.logits(crops)`: (N,S,S,3) RGB in 0..1 -> (N,19,S,S); `.masks(crops, regions)`: (N,S,S), 1 where
    the most likely class is one of `regions`.
    """

    def __init__(self, net: torch.nn.Module, kind: str, size: int):
        self.net, self.kind, self.size = net, kind, size
        self.info = net.info
        self.name = f"{net.info.kind} ({size} px)"

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str) -> "TorchParser":
        self.net.to(device)
        return self

    @torch.inference_mode()
    def logits(self, crops: torch.Tensor) -> torch.Tensor:
        weight = next(self.net.parameters())
        height, width = crops.shape[1:3]
        x = crops.to(weight.device, torch.float32).permute(0, 3, 1, 2)
        if (height, width) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        x = x.to(weight.dtype)
        if self.kind == "parsenet":  # facexlib feeds ParseNet RGB in [-1, 1] and takes its first output
            logits = self.net.parse(x * 2 - 1)
        else:  # and BiSeNet RGB normalised with ImageNet's mean and std
            from ..archs.bisenet import imagenet_normalise

            logits = self.net(imagenet_normalise(x))
        logits = logits.float()
        if logits.shape[-2:] != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return logits.to(crops.device)

    def masks(self, crops: torch.Tensor, regions: Iterable[int] | None = None) -> torch.Tensor:
        return class_masks(self.logits(crops), region_classes(regions))


def parse_faces(parsers, crops: torch.Tensor, regions: str | Iterable[int | str] | None = None,
                feather: float = PARSE_FEATHER, batch_size: int = 4,
                on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(N,S,S) masks of crops (N,S,S,3 RGB 0..1): 1 where every parser shows the face.

    `parsers` is one parser or several (a region parser with an occluder, or several occluders): their
    masks combine by minimum. Region parsers keep the classes in `regions` (default: the face, see
    masks.FACE_REGIONS); occluders give their visible-face probability. Edges are feathered by
    `feather` x S, inside the mask. Faces go through in batches of `batch_size`; `on_batch(done, total)`
    follows them and may raise to cancel.
    """
    parsers = list(parsers) if isinstance(parsers, (list, tuple)) else [parsers]
    classes = region_classes(regions)
    masks = torch.ones(crops.shape[:3], device=crops.device)
    for start in range(0, len(crops), batch_size):
        batch = crops[start:start + batch_size]
        for parser in parsers:
            found = parser.masks(batch, classes) if hasattr(parser, "masks") else class_masks(parser.logits(batch), classes)
            masks[start:start + len(batch)] = torch.minimum(masks[start:start + len(batch)], found.to(masks.device))
        if on_batch is not None:
            on_batch(min(start + batch_size, len(crops)), len(crops))
    return feather_inside(masks, feather)
