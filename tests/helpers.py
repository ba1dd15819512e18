"""Helpers the tests share: small random-weight networks."""

import torch

from gpen import GPEN


def random_gpen(size: int = 32, channel_multiplier: float = 1, narrow: float = 0.125, seed: int = 0) -> GPEN:
    """A small GPEN with every weight random, noise strengths and biases included."""
    torch.manual_seed(seed)
    model = GPEN(size, channel_multiplier=channel_multiplier, narrow=narrow).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if name.endswith(("noise.weight", "bias")):
            p.add_(torch.randn_like(p) * 0.2)
    return model


class IdentityRestorer:
    """Stands in for GPEN where only the geometry is under test: returns the crops unchanged."""

    def __init__(self, size: int = 512):
        self.size = size
        self.batches = []

    def restore(self, faces, batch_size=4, on_batch=None):
        for start in range(0, len(faces), batch_size):
            self.batches.append(len(faces[start:start + batch_size]))
            if on_batch is not None:
                on_batch(min(start + batch_size, len(faces)), len(faces))
        return faces.clone()


def psnr(a, b) -> float:
    return float(10 * torch.log10(1 / (a.float() - b.float()).square().mean()))


def box_iou(a, b):
    from gpen.pipeline import box_iou as iou

    return iou(a, b)
