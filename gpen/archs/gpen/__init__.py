"""GPEN (Yang et al., CVPR 2021): the network (network.py, with its CPU fast path in winograd.py and
workspace.py) and what a GPEN state dict says about its configuration."""

from __future__ import annotations

import math
import re

import torch

from ..spec import ArchSpec, Convention
from .network import GPEN, channel_widths

GPEN_KEYS = ("generator.style.1.weight", "generator.input.input", "ecd0.0.0.weight", "final_linear.0.weight")


# What a GPEN file may ask to be built. The released ones are 256 to 2048 pixels (the reference
# defines no layer widths beyond 2048), narrow 0.5 or 1, channel_multiplier 1 or 2, style_dim 512
# and n_mlp 8; the bounds leave room for other trainings and none for a file that claims a huge network.
MIN_SIZE, MAX_SIZE = 16, 2048


CONFIG_LIMITS = {"narrow": 2, "channel_multiplier": 8, "style_dim": 1024, "n_mlp": 16}  # each above 0


MAX_CHANNELS = 1024


def infer_gpen_config(state: dict[str, torch.Tensor]) -> dict:
    """GPEN's constructor arguments from the shapes of its state dict."""
    encoders = {int(m.group(1)) for k in state if (m := re.match(r"ecd(\d+)\.", k))}
    fewest, most = int(math.log2(MIN_SIZE)) - 1, int(math.log2(MAX_SIZE)) - 1
    if not fewest <= len(encoders) <= most:
        raise ValueError(f"{len(encoders)} encoder layers (ecd0, ...); GPEN sizes {MIN_SIZE} to {MAX_SIZE} "
                         f"have {fewest} to {most}")
    size = 2 ** (len(encoders) + 1)
    narrow = state["generator.input.input"].shape[1] / 512
    if size >= 64:  # channel_multiplier only shapes the layers from 64x64 up
        channels_64 = state["generator.to_rgbs.3.conv.weight"].shape[2] // 2
        channel_multiplier = channels_64 / (256 * narrow)
    else:
        channel_multiplier = 1
    n_mlp = sum(1 for k in state if re.fullmatch(r"generator\.style\.\d+\.weight", k))
    return dict(size=size, style_dim=state["generator.style.1.weight"].shape[0], n_mlp=n_mlp,
                channel_multiplier=_tidy(channel_multiplier), narrow=_tidy(narrow))


def check_gpen_config(config: dict) -> None:
    """Refuse a configuration no GPEN training makes, before building anything from it."""
    for name, limit in CONFIG_LIMITS.items():
        if not 0 < config[name] <= limit:
            raise ValueError(f"{name} {config[name]} is outside 0..{limit}")
    widths = [c for res, c in channel_widths(config["channel_multiplier"], config["narrow"]).items()
              if res <= config["size"]]
    if not 1 <= min(widths) <= max(widths) <= MAX_CHANNELS:
        raise ValueError(f"layer widths {min(widths)} to {max(widths)} are outside 1..{MAX_CHANNELS}")


def _tidy(x: float) -> float:
    return int(x) if float(x).is_integer() else round(x, 6)


def gpen_config(state: dict[str, torch.Tensor]) -> dict:
    config = infer_gpen_config(state)
    check_gpen_config(config)
    return config


SPEC = ArchSpec("GPEN", "restorer", lambda state: all(k in state for k in GPEN_KEYS), gpen_config, GPEN,
                convention=Convention(input="-1..1", output="image", template="gpen", batch="one-on-cpu"),
                face_size=lambda net: net.size,
                details=lambda net: {k: getattr(net, k) for k in ("size", "channel_multiplier", "narrow",
                                                                  "style_dim", "n_mlp")})
