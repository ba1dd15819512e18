"""Face parsers for paste-back: which pixels of each crop show the face.

`load_parser(path)` gives ParseNet or BiSeNet (facexlib's parsing_parsenet.pth / parsing_bisenet.pth,
native torch) or FaceFusion's ONNX region parsers and occluders, each told apart by its tensors, all
in one `ParserHandle` that feeds each network as its spec says. Any object with `.size` and
`.logits(crops)` (19 classes) or `.masks(crops, regions)` works as a parser; `parse_faces` runs one
or several on crops and combines their masks by minimum.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol, runtime_checkable

import torch

from ..archs.spec import ArchSpec, network_input, resize
from .handle import NetworkHandle
from .masks import class_masks, feather_inside
from .options import CLASSES, PARSE_FEATHER, MaskOptions, region_classes


@runtime_checkable
class Parser(Protocol):
    """Says where crops (N,H,W,3 RGB in 0..1) show the face: (N,H,W) in 0..1."""

    size: int

    def masks(self, crops: torch.Tensor, regions: Iterable[int] | None = None) -> torch.Tensor: ...


class ParserHandle(NetworkHandle):
    """A face parser or occluder (a torch module or an ONNX runner) on crops of any size: resized to
    the network's size and back, fed and read as its spec's convention says.

    `.masks(crops, regions)`: (N,H,W), for region parsers 1 where the most likely class is one of
    `regions`, for occluders the probability that the face shows. `.logits(crops)`: region parsers'
    (N,19,H,W) class logits.
    """

    def __init__(self, network, spec: ArchSpec, name: str | None = None):
        super().__init__(network, spec)
        self.name = name or f"{self.info.arch} ({self.size} px)"

    @torch.inference_mode()
    def logits(self, crops: torch.Tensor) -> torch.Tensor:
        """(N,H,W,3) RGB in 0..1 -> (N,19,H,W) float32 logits, on the crops' device."""
        if self.spec.convention.output != "logits":
            raise TypeError(f"{self.name} gives the probability that the face shows, not class logits")
        return self._run(crops)

    @torch.inference_mode()
    def masks(self, crops: torch.Tensor, regions: Iterable[int] | None = None) -> torch.Tensor:
        """(N,H,W,3) RGB in 0..1 -> (N,H,W) float32 on the crops' device. `regions` (class indices, e.g.
        {1, 2, 3, 4, 5, 10, 11, 12, 13} for skin, brows, eyes, nose, mouth and lips) mean nothing to an occluder."""
        if self.spec.convention.output == "logits":
            return class_masks(self._run(crops), region_classes(regions))
        return self._run(crops)[:, 0].clamp(0, 1)

    def working_bytes(self, batch: int, crop_size: int | None = None) -> int:
        """NetworkHandle's, and the network's answer in float32 at its size and, given `crop_size`, at the
        crops' (19 logits a pixel for a region parser): 0 for onnxruntime's."""
        if not self.is_torch:
            return 0
        channels = len(CLASSES) if self.spec.convention.output == "logits" else 1
        return super().working_bytes(batch) + batch * channels * 4 * (self.size ** 2 + (crop_size or 0) ** 2)

    def _run(self, crops: torch.Tensor) -> torch.Tensor:
        """The network's answer at the crops' size: (N,C,H,W) logits or (N,1,H,W) probability."""
        check_crops(crops)
        n, height, width, _ = crops.shape
        convention = self.spec.convention
        channels = len(CLASSES) if convention.output == "logits" else 1
        if n == 0:
            return torch.zeros(0, channels, height, width, device=crops.device)
        x = resize(crops.to(self.device, torch.float32).permute(0, 3, 1, 2), (self.size, self.size)).to(self.dtype)
        y = self.spec.forward(self.network, network_input(x, convention)).float()
        if convention.output == "probability":  # one channel, last (the XSeg exports), first, or none
            y = y[..., 0] if y.dim() == 4 and y.shape[-1] == 1 else y[:, 0] if y.dim() == 4 else y
            y = y.clamp(0, 1)[:, None]
        return resize(y.to(crops.device), (height, width))

    def __repr__(self) -> str:
        return f"<{self.name} on {self.device}>"


def check_crops(crops: torch.Tensor) -> None:
    if not isinstance(crops, torch.Tensor) or crops.dim() != 4 or crops.shape[-1] != 3:
        shape = tuple(crops.shape) if hasattr(crops, "shape") else type(crops).__name__
        raise ValueError(f"face crops must be a (N, H, W, 3) RGB tensor in 0..1, not {shape}")


def parse_faces(parsers, crops: torch.Tensor, regions: str | Iterable[int | str] | None = None,
                feather: float = PARSE_FEATHER, batch_size: int = 4,
                on_batch: Callable[[int, int], None] | None = None,
                cancel: Callable[[], object] | None = None) -> torch.Tensor:
    """(N,S,S) masks of crops (N,S,S,3 RGB 0..1): 1 where every parser shows the face.

    `parsers` is one parser or several (a region parser with an occluder, or several occluders): their
    masks combine by minimum. Region parsers keep the classes in `regions` (default: the face, see
    options.FACE_REGIONS); occluders give their visible-face probability. Edges are feathered by
    `feather` x S, inside the mask. Faces go through in batches of `batch_size`; `on_batch(done, total)`
    follows them and may raise to cancel, as may `cancel()`, asked before each face's feathering.
    """
    MaskOptions(feather=feather)  # refused before any parsing
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
    return feather_inside(masks, feather, cancel)
