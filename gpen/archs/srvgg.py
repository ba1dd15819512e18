"""SRVGGNetCompact, Real-ESRGAN's small upscaler (realesr-general-x4v3.pth, realesr-animevideov3.pth),
in Real-ESRGAN's key layout.

A plain stack of 3x3 convs with PReLU activations at the input's resolution; the last conv gives
`upscale`² times the output channels, which a pixel shuffle turns into the enlarged image, added to
the input enlarged by nearest-neighbour: the network learns the residual.

forward(x): NCHW in 0..1 (the training range; not clamped) -> NCHW at `upscale` times the size.
`plain_forward` is the architecture as the reference computes it; on the CPU (float32, not recording
autograd nor tracing) `forward` gives the same by `fast_forward`: channels_last maps, two of them made
once for the whole stack, each conv written into one by oneDNN's in-place "add" convolution
(cpu_fast.py) and activated in place.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn import functional as F

from . import cpu_fast
from .cpu_fast import conv_into, empty_map, fill_bias_
from .spec import ArchSpec, ConfigError, Convention

# Beyond what any training makes: a file claiming more is refused before anything is built.
MAX_FEATURES = 1024
MAX_CONVS = 256
MAX_UPSCALE = 8
MAX_CHANNELS = 4  # gray, RGB or RGBA images
BODY_KEY = re.compile(r"body\.(\d+)\.(weight|bias)")


class SRVGGNetCompact(nn.Module):
    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_conv: int = 16,
                 upscale: int = 4, act_type: str = "prelu"):
        super().__init__()
        if act_type != "prelu":
            raise ValueError(f"SRVGGNetCompact here has PReLU activations (the released files'), not {act_type}")
        self.num_in_ch, self.num_out_ch, self.num_feat, self.num_conv = num_in_ch, num_out_ch, num_feat, num_conv
        self.upscale = self.scale = upscale
        self.multiple = 1  # any input size
        layers = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        layers.append(nn.Conv2d(num_feat, num_out_ch * upscale ** 2, 3, 1, 1))
        self.body = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and cpu_fast.usable(self, x):
            return fast_forward(self, x)
        return self.plain_forward(x)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return F.pixel_shuffle(out, self.upscale) + F.interpolate(x, scale_factor=self.upscale, mode="nearest")


def fast_forward(net: SRVGGNetCompact, x: torch.Tensor) -> torch.Tensor:
    """SRVGGNetCompact.plain_forward on the CPU: the convs at num_feat channels go back and forth
    between two maps, each activated in place with the other (read by the conv, then free) as scratch."""
    x = x.contiguous(memory_format=torch.channels_last)
    *convs, last = net.body[::2]
    maps = [empty_map(x, net.num_feat) for _ in range(2)]
    out = x
    for i, (conv, activation) in enumerate(zip(convs, net.body[1::2])):
        out = prelu_(conv_into(fill_bias_(maps[i % 2], conv.bias), out, conv.weight, (1, 1)), activation.weight,
                     maps[(i + 1) % 2])
    out = F.pixel_shuffle(last(out), net.upscale)
    return out.add_(F.interpolate(x, scale_factor=net.upscale, mode="nearest")).contiguous()


def prelu_(x: torch.Tensor, slope: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """F.prelu(x, slope) in place on a channels_last map, as x + (slope - 1) * min(x, 0): two passes over
    (pixels, channels) rows, where F.prelu makes a new map and is slow on channels_last. Rounding
    differs from slope * x by about an ulp of x."""
    rows, negative = (t.permute(0, 2, 3, 1).view(-1, t.shape[1]) for t in (x, scratch))
    rows.addcmul_(torch.clamp_max(rows, 0, out=negative), slope - 1)
    return x


def is_srvgg(state: dict[str, torch.Tensor]) -> bool:
    """Whether every key is a "body.N.weight" or "body.N.bias", with a PReLU's weight at body.1."""
    return "body.0.weight" in state and "body.1.weight" in state and all(BODY_KEY.fullmatch(k) for k in state)


def srvgg_config(state: dict[str, torch.Tensor]) -> dict:
    """SRVGGNetCompact's constructor arguments from the tensor shapes, bounded."""
    first = state["body.0.weight"].shape
    last_index = max(int(BODY_KEY.fullmatch(k)[1]) for k in state)
    last = state[f"body.{last_index}.weight"].shape
    if state["body.1.weight"].dim() != 1:
        raise ConfigError("SRVGGNetCompact without PReLU activations (relu and leaky relu leave no weights to tell "
                          "them apart by); only PReLU ones load here")
    num_feat, num_channels, num_conv = first[0], first[1], last_index // 2 - 1
    upscale = math.isqrt(last[0] // num_channels) if num_channels and last[0] % num_channels == 0 else 0
    for name, value, most in (("num_feat", num_feat, MAX_FEATURES), ("num_conv", num_conv, MAX_CONVS),
                              ("channels", num_channels, MAX_CHANNELS), ("upscale", upscale, MAX_UPSCALE)):
        if not 1 <= value <= most:
            raise ConfigError(f"SRVGGNetCompact with {name} {value}; 1 to {most} load here")
    if last[0] != num_channels * upscale ** 2:
        raise ConfigError(f"SRVGGNetCompact whose last conv gives {last[0]} channels, not {num_channels} times a "
                          "square upscale")
    return {"num_in_ch": int(num_channels), "num_out_ch": int(num_channels), "num_feat": int(num_feat),
            "num_conv": num_conv, "upscale": upscale, "act_type": "prelu"}


SPEC = ArchSpec("SRVGGNetCompact (Real-ESRGAN)", "upscaler", is_srvgg, srvgg_config, SRVGGNetCompact,
                convention=Convention(input="0..1"),
                details=lambda net: {"scale": net.scale, "detail": f"{net.scale}x, {net.num_conv} convs, "
                                                                   f"{net.num_feat} features"})
