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
