"""RRDBNet, ESRGAN's generator (Wang et al. 2018), in the key layout of BasicSR and Real-ESRGAN
(RealESRGAN_x4plus.pth, RealESRGAN_x2plus.pth, and most community ESRGAN models).

A trunk of residual-in-residual dense blocks at the input's resolution, then two nearest-neighbour
2x steps, each followed by a conv: the network always enlarges 4x. Scale 2 and 1 models take the
input pixel-unshuffled by 2 or 4 (4 or 16 times the channels at a half or a quarter of the size),
so that the same 4x body gives 2x or 1x.

Files in the older ESRGAN layouts (the original repository's "model.0", "model.1.sub.N.RDB1.conv1.0",
... as 4x-UltraSharp has it, and its later "RRDB_trunk.N.RDB1.conv1", "trunk_conv", "upconv1", ...)
hold the same network under other names: `rrdbnet_names` renames them.

forward(x): NCHW in 0..1 (the training range; not clamped) -> NCHW at `scale` times the size.
`plain_forward` is the architecture as the reference computes it; on the CPU (float32, not recording
autograd nor tracing) `forward` gives the same by `fast_forward`: channels_last maps made once for the
whole trunk, the dense blocks' concatenations never made, and biases, residual sums and the 0.2
residual scales folded into oneDNN's in-place "add" convolution (cpu_fast.py).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from . import cpu_fast
from .cpu_fast import conv_into, empty_map, fill_bias_
from .spec import ArchSpec, ConfigError, Convention

# Beyond what any training makes: a file claiming more is refused before anything is built.
MAX_FEATURES = 1024
MAX_GROWTH = 1024
MAX_BLOCKS = 256
MAX_CHANNELS = 4  # gray, RGB or RGBA images
UNSHUFFLE = {4: 1, 2: 2, 1: 4}  # scale -> the input's pixel-unshuffle factor

# Keys of each layout by which a file is recognised.
BASICSR_KEYS = ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_last.weight")
OLD_KEYS = ("model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight")
TRUNK_KEYS = ("conv_first.weight", "RRDB_trunk.0.RDB1.conv1.weight", "trunk_conv.weight", "conv_last.weight")
# The later ESRGAN layout's names for the convs outside the trunk.
TRUNK_NAMES = {"trunk_conv": "conv_body", "upconv1": "conv_up1", "upconv2": "conv_up2", "HRconv": "conv_hr"}
# The oldest layout's convs after the trunk, by index in its nn.Sequential at 4x.
OLD_TAIL = ("conv_up1", "conv_up2", "conv_hr", "conv_last")


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block's input and every earlier conv's output; the last one's
    output, scaled by 0.2, is added to the input."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        for i in range(1, 5):
            setattr(self, f"conv{i}", nn.Conv2d(num_feat + (i - 1) * num_grow_ch, num_grow_ch, 3, 1, 1))
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(lrelu(conv(torch.cat(features, 1))))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Three dense blocks in a row, their result scaled by 0.2 and added to the input."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, scale: int = 4, num_feat: int = 64,
                 num_block: int = 23, num_grow_ch: int = 32):
        super().__init__()
        if scale not in UNSHUFFLE:
            raise ValueError(f"RRDBNet scale must be one of {', '.join(map(str, UNSHUFFLE))}, got {scale}")
        self.scale, self.num_in_ch, self.num_out_ch = scale, num_in_ch, num_out_ch
        self.num_feat, self.num_block, self.num_grow_ch = num_feat, num_block, num_grow_ch
        self.unshuffle = UNSHUFFLE[scale]
        self.multiple = self.unshuffle  # what the input's sides must be multiples of
        self.conv_first = nn.Conv2d(num_in_ch * self.unshuffle ** 2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and cpu_fast.usable(self, x):
            return fast_forward(self, x)
        return self.plain_forward(x)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)  # hence `multiple`
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in (self.conv_up1, self.conv_up2):
            feat = lrelu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(lrelu(self.conv_hr(feat)))


def fast_forward(net: RRDBNet, x: torch.Tensor) -> torch.Tensor:
    """RRDBNet.plain_forward on the CPU, the trunk's feature maps made once for all its blocks."""
    if net.unshuffle > 1:
        x = F.pixel_unshuffle(x, net.unshuffle)
    x = x.contiguous(memory_format=torch.channels_last)
    trunk, first, second, feat = (empty_map(x, net.num_feat) for _ in range(4))
    grown = [empty_map(x, net.num_grow_ch) for _ in range(4)]
    conv_into(fill_bias_(feat, net.conv_first.bias), x, net.conv_first.weight, (1, 1))
    trunk.copy_(feat)
    for rrdb in net.body:
        dense_block_into(rrdb.rdb1, trunk, grown, first.copy_(trunk), 0.2)
        dense_block_into(rrdb.rdb2, first, grown, second.copy_(first), 0.2)
        # rdb3's result (second + 0.2 conv5) is wanted only as trunk + 0.2 times it: made in trunk's place.
        dense_block_into(rrdb.rdb3, second, grown, trunk.add_(second, alpha=0.2), 0.2 * 0.2)
    conv_into(feat, trunk, net.conv_body.weight, (1, 1), bias=net.conv_body.bias)
    for conv in (net.conv_up1, net.conv_up2):
        feat = F.leaky_relu_(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
    return net.conv_last(F.leaky_relu_(net.conv_hr(feat), 0.2)).contiguous()


def dense_block_into(block: ResidualDenseBlock, x: torch.Tensor, grown: list[torch.Tensor], out: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """out += scale * the block's conv5 result, conv1-4 writing their activations into `grown`. The
    reference's growing concatenation is never made: each conv takes the maps one by one, each with
    its slice of the weight, adding into its output (a strided channel slice would be copied whole)."""
    parts = [x]
    for conv, into in zip((block.conv1, block.conv2, block.conv3, block.conv4), grown):
        F.leaky_relu_(conv_parts_into(fill_bias_(into, conv.bias), parts, conv.weight), 0.2)
        parts.append(into)
    return conv_parts_into(out, parts, block.conv5.weight * scale, block.conv5.bias * scale)


def conv_parts_into(out: torch.Tensor, parts: list[torch.Tensor], weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """out += the 3x3 convolution, with bias, of the parts' channels one after another by weight."""
    start = 0
    for part in parts:
        conv_into(out, part, weight[:, start:start + part.shape[1]], (1, 1), bias=bias if start == 0 else None)
        start += part.shape[1]
    return out


def is_rrdbnet(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict has RRDBNet's keys, in BasicSR's layout or an older ESRGAN one."""
    return any(all(k in state for k in keys) for keys in (BASICSR_KEYS, OLD_KEYS, TRUNK_KEYS))


def rrdbnet_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict under BasicSR's names, whatever ESRGAN layout it came in."""
    if all(k in state for k in OLD_KEYS):
        return old_names(state)
    if all(k in state for k in TRUNK_KEYS):
        return {trunk_name(key): t for key, t in state.items()}
    return state


def trunk_name(key: str) -> str:
    key = re.sub(r"^RRDB_trunk\.(\d+)\.RDB(\d)\.", r"body.\1.rdb\2.", key)
    module, _, rest = key.partition(".")
    return f"{TRUNK_NAMES.get(module, module)}.{rest}"


def old_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The oldest layout (one nn.Sequential: a conv, the trunk with its closing conv, then upsample,
    conv, activation per 2x step, a conv, an activation, the last conv) under BasicSR's names."""
    tail = sorted({int(k.split(".")[1]) for k in state if re.fullmatch(r"model\.\d+\.weight", k)} - {0})
    if len(tail) != len(OLD_TAIL):
        raise ConfigError(f"an ESRGAN of the oldest layout with {len(tail) - 2} upsampling steps; "
                          "only 4x ones (two steps) load here")
    names = {0: "conv_first", **dict(zip(tail, OLD_TAIL))}
    renamed = {}
    for key, t in state.items():
        if match := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(\w+)", key):
            key = "body.{}.rdb{}.conv{}.{}".format(*match.groups())
        elif match := re.fullmatch(r"model\.1\.sub\.\d+\.(\w+)", key):
            key = f"conv_body.{match[1]}"
        elif (match := re.fullmatch(r"model\.(\d+)\.(\w+)", key)) and int(match[1]) in names:
            key = f"{names[int(match[1])]}.{match[2]}"
        renamed[key] = t  # anything else is left for the layout check to name
    return renamed


def rrdbnet_config(state: dict[str, torch.Tensor]) -> dict:
    """RRDBNet's constructor arguments from the tensor shapes (BasicSR's names), bounded."""
    first, grow, last = (state[k].shape for k in ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_last.weight"))
    num_feat, num_grow_ch, num_out_ch = first[0], grow[0], last[0]
    num_block = len({k.split(".")[1] for k in state if k.startswith("body.")})
    for name, value, most in (("num_feat", num_feat, MAX_FEATURES), ("num_grow_ch", num_grow_ch, MAX_GROWTH),
                              ("num_block", num_block, MAX_BLOCKS), ("output channels", num_out_ch, MAX_CHANNELS)):
        if not 1 <= value <= most:
            raise ConfigError(f"RRDBNet with {name} {value}; 1 to {most} load here")
    # The input takes as many channels as the output gives, pixel-unshuffled below scale 4.
    scale = next((s for s, factor in UNSHUFFLE.items() if first[1] == num_out_ch * factor ** 2), None)
    if scale is None:
        raise ConfigError(f"RRDBNet whose conv_first takes {first[1]} channels for {num_out_ch} out: neither "
                          f"{num_out_ch} (4x), {num_out_ch * 4} (2x) nor {num_out_ch * 16} (1x)")
    return {"num_in_ch": int(num_out_ch), "num_out_ch": int(num_out_ch), "scale": scale, "num_feat": int(num_feat),
            "num_block": num_block, "num_grow_ch": int(num_grow_ch)}


SPEC = ArchSpec("RRDBNet (ESRGAN)", "upscaler", is_rrdbnet, rrdbnet_config, RRDBNet,
                convention=Convention(input="0..1"), convert=rrdbnet_names,
                details=lambda net: {"scale": net.scale, "detail": f"{net.scale}x, {net.num_block} block"
                                     f"{'s' * (net.num_block != 1)}, {net.num_feat} features"})
