"""ParseNet, the face parser of PSFR-GAN (Chen et al. 2021) as facexlib ships it, in one file.

Parameter and buffer names follow facexlib's ParseNet (facexlib/parsing/parsenet.py) so that its
released parsing_parsenet.pth (ParseNet(in_size=512, out_size=512, parsing_ch=19)) loads with strict
key matching. The network is an hourglass of residual blocks:

    3x3 conv -> residual blocks that halve the size -> residual blocks at the bottleneck (added back
    to their input) -> residual blocks that double the size -> two 3x3 heads: 19 class logits per
    pixel, and a reconstructed RGB image.

Every convolution is 3x3 on a reflection-padded input. Inside the residual blocks the convolutions
are followed by batch norm (no conv bias then), the first of the two also by LeakyReLU(0.2); the
shortcut, the stem and the heads are plain biased convolutions. Upsampling is nearest-neighbour.

`model(x)` takes NCHW RGB in [-1, 1] (facexlib's preprocessing) and returns `(logits, image)`;
`model.parse(x)` returns only the logits, without computing the image head.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from .spec import MAX_PARSER_FEATURES, ArchSpec, ConfigError, Convention, check_parser_output

LRELU_SLOPE = 0.2

# Limits on what a file may make us build: the released network is 512 px, 256 channels wide and
# 10 blocks deep, 21.3M parameters. A file that asks for more than these is broken or hostile; so is one
# whose logits or feature maps take more memory than a face parser needs (archs/spec.py's bounds).
MAX_SIZE = 2048
MAX_CHANNELS = 2048
MAX_DEPTH = 64

# Keys every ParseNet state dict has, whatever its configuration.
MARKER_KEYS = ("encoder.0.conv2d.weight", "out_mask_conv.conv2d.weight", "out_img_conv.conv2d.weight")


class BatchNorm(nn.Module):
    """BatchNorm2d one level down: facexlib wraps its norms in a NormLayer, hence `norm.norm.*` keys."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class Conv(nn.Module):
    """3x3 convolution of a reflection-padded input (stride 2 to halve the size), then optionally
    batch norm and LeakyReLU. With batch norm the convolution has no bias, as in the released file."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool = False, norm: bool = False,
                 activate: bool = False):
        super().__init__()
        self.conv2d = nn.Conv2d(in_channels, out_channels, 3, stride=2 if downsample else 1, padding=1,
                                padding_mode="reflect", bias=not norm)
        self.norm = BatchNorm(out_channels) if norm else None
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2d(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activate:
            x = F.leaky_relu(x, LRELU_SLOPE, inplace=True)  # x is a fresh tensor here
        return x


class ResidualBlock(nn.Module):
    """conv-norm-LeakyReLU, conv-norm, plus a shortcut; `resample` "down" halves the size (in the
    second conv and the shortcut), "up" doubles it (nearest, before both branches)."""

    def __init__(self, in_channels: int, out_channels: int, resample: str | None = None):
        super().__init__()
        self.upsample = resample == "up"
        down = resample == "down"
        # facexlib's attribute name; an identity shortcut has no weights and so no module here.
        self.shortcut_func = None
        if resample is not None or in_channels != out_channels:
            self.shortcut_func = Conv(in_channels, out_channels, downsample=down)
        self.conv1 = Conv(in_channels, out_channels, norm=True, activate=True)
        self.conv2 = Conv(out_channels, out_channels, downsample=down, norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            # The reference upsamples separately in the shortcut and in conv1; once is the same.
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        shortcut = x if self.shortcut_func is None else self.shortcut_func(x)
        return shortcut + self.conv2(self.conv1(x))


class ParseNet(nn.Module):
    """facexlib's ParseNet. The defaults are those of the released parsing_parsenet.pth.

    The constructor takes facexlib's arguments: the encoder halves `in_size` down to `min_feat_size`
    and the decoder doubles that up to `out_size`; channels start at `base_ch`, double with each
    halving and halve with each doubling, always clipped to `ch_range`; `res_depth` blocks sit at the
    bottleneck; `parsing_ch` is the number of classes. Only the ratios of the sizes shape the network:
    it runs on any input whose sides are multiples of 2 ** (number of halvings), at least twice that
    (the reflection padding needs two pixels at the bottleneck).
    """

    def __init__(self, in_size: int = 512, out_size: int = 512, min_feat_size: int = 32, base_ch: int = 64,
                 parsing_ch: int = 19, res_depth: int = 10, ch_range: tuple[int, int] | list[int] = (32, 256)):
        super().__init__()
        check_config(in_size, out_size, min_feat_size, base_ch, parsing_ch, res_depth, ch_range)
        self.in_size, self.out_size, self.parsing_ch = in_size, out_size, parsing_ch
        low, high = ch_range

        def clip(channels: int) -> int:
            return max(low, min(channels, high))

        # Integer floor of log2, as facexlib's int(np.log2(...)) of these ratios.
        min_feat_size = min(in_size, min_feat_size)
        down_steps = (in_size // min_feat_size).bit_length() - 1
        up_steps = (out_size // min_feat_size).bit_length() - 1

        # `width` doubles and halves unclipped, as in facexlib; only the layers see it clipped.
        width = base_ch
        encoder: list[nn.Module] = [Conv(3, base_ch)]
        for _ in range(down_steps):
            encoder.append(ResidualBlock(clip(width), clip(width * 2), "down"))
            width *= 2
        body = [ResidualBlock(clip(width), clip(width)) for _ in range(res_depth)]
        decoder = []
        for _ in range(up_steps):
            decoder.append(ResidualBlock(clip(width), clip(width // 2), "up"))
            width //= 2
        self.encoder = nn.Sequential(*encoder)
        self.body = nn.Sequential(*body)
        self.decoder = nn.Sequential(*decoder)
        self.out_img_conv = Conv(clip(width), 3)
        self.out_mask_conv = Conv(clip(width), parsing_ch)
        self.info = None  # an archs.spec.ModelInfo once loaded from a file

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.encoder[0].conv2d.weight.dtype)
        features = self.encoder(x)
        return self.decoder(features + self.body(features))

    def parse(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW RGB in [-1, 1] -> (N, parsing_ch, H', W') class logits; H' = H * out_size / in_size."""
        return self.out_mask_conv(self.features(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NCHW RGB in [-1, 1] -> (class logits, reconstructed RGB image), facexlib's two outputs."""
        features = self.features(x)
        return self.out_mask_conv(features), self.out_img_conv(features)


def check_config(in_size: int, out_size: int, min_feat_size: int, base_ch: int, parsing_ch: int, res_depth: int,
                 ch_range: tuple[int, int] | list[int]) -> None:
    """Refuse configurations no ParseNet file has (ValueError), and those whose logits or feature maps take
    more memory than a face parser needs (ConfigError), before anything is built."""
    low, high = ch_range
    problems = []
    for name, value, limit in (("in_size", in_size, MAX_SIZE), ("out_size", out_size, MAX_SIZE),
                               ("min_feat_size", min_feat_size, MAX_SIZE), ("base_ch", base_ch, MAX_CHANNELS),
                               ("channel range start", low, MAX_CHANNELS),
                               ("channel range end", high, MAX_CHANNELS)):
        if not 1 <= value <= limit:
            problems.append(f"{name} {value} (1 to {limit})")
    if not 0 <= res_depth <= MAX_DEPTH:
        problems.append(f"res_depth {res_depth} (0 to {MAX_DEPTH})")
    if low > high:
        problems.append(f"channel range {low}..{high} runs backwards")
    if problems:
        raise ValueError(f"not a ParseNet this code builds: {', '.join(problems)}")
    check_parser_output(parsing_ch, out_size, out_size)
    channels, side = largest_features(in_size, out_size, min_feat_size, base_ch, ch_range)
    if channels * side * side > MAX_PARSER_FEATURES:
        raise ConfigError(f"is a ParseNet making {channels} channels at {side}x{side} in one layer, "
                          f"{channels * side * side * 4 / 2**20:.0f} MiB a face: more than a face parser needs "
                          f"(at most {MAX_PARSER_FEATURES * 4 // 2**20} MiB)")


def largest_features(in_size: int, out_size: int, min_feat_size: int, base_ch: int,
                     ch_range: tuple[int, int] | list[int]) -> tuple[int, int]:
    """(channels, side) of the largest feature map the network makes from an in_size input: blocks work at
    their input's size before halving (conv1) and at the doubled size after upsampling."""
    low, high = ch_range
    clip = lambda channels: max(low, min(channels, high))
    min_feat_size = min(in_size, min_feat_size)
    maps, width, side = [(base_ch, in_size)], base_ch, in_size
    for _ in range((in_size // min_feat_size).bit_length() - 1):
        maps.append((clip(width * 2), side))
        width, side = width * 2, side // 2
    for _ in range((out_size // min_feat_size).bit_length() - 1):
        maps.append((clip(width), side * 2))
        width, side = width // 2, side * 2
    return max(maps, key=lambda m: m[0] * m[1] ** 2)


def is_parsenet(state: dict[str, torch.Tensor]) -> bool:
    """Whether these are the keys of facexlib's ParseNet (any configuration)."""
    return all(key in state for key in MARKER_KEYS)


def parsenet_config(state: dict[str, torch.Tensor], in_size: int = 512) -> dict | None:
    """ParseNet's constructor arguments for a state dict, from its keys and tensor shapes.

    None when the keys are not ParseNet's; ValueError when they are but the shapes make no network
    this code builds (or one beyond the size limits). Fitting every key and shape is left to
    files.weights.check_layout against `ParseNet(**config)` built on the meta device.

    The weights fix the number of halvings and doublings but not the image size they were trained
    for (the network is fully convolutional): that is `in_size`, 512 for facexlib's released file,
    and `min_feat_size` and `out_size` follow from it. `ch_range` is the narrowest range that clips
    the channels as the file has them (for the released file [64, 256]; facexlib's [32, 256] builds
    the same network).
    """
    if not is_parsenet(state):
        return None
    stem = _shape(state, "encoder.0.conv2d.weight")
    mask_head = _shape(state, "out_mask_conv.conv2d.weight")
    if stem[1] != 3:
        raise ValueError(f"not a ParseNet this code builds: its first convolution takes {stem[1]} channels, not RGB")
    base_ch, parsing_ch = stem[0], mask_head[0]

    down_steps = _count_blocks(state, "encoder", start=1)
    res_depth = _count_blocks(state, "body")
    up_steps = _count_blocks(state, "decoder")
    if res_depth > MAX_DEPTH:
        raise ValueError(f"not a ParseNet this code builds: {res_depth} bottleneck blocks (at most {MAX_DEPTH})")
    if max(down_steps, up_steps) > MAX_SIZE.bit_length() - 1:
        raise ValueError(f"not a ParseNet this code builds: {down_steps} halvings and {up_steps} doublings "
                         f"(at most {MAX_SIZE.bit_length() - 1}, for sizes up to {MAX_SIZE})")
    if in_size % (1 << down_steps):
        raise ValueError(f"in_size {in_size} does not halve {down_steps} times, as these weights do")
    min_feat_size = in_size >> down_steps

    widths = [base_ch, mask_head[1]]
    for part, first, count in (("encoder", 1, down_steps), ("body", 0, res_depth), ("decoder", 0, up_steps)):
        for i in range(first, first + count):
            out_channels, in_channels, *_ = _shape(state, f"{part}.{i}.conv1.conv2d.weight")
            widths += [in_channels, out_channels]
    config = {"in_size": in_size, "out_size": min_feat_size << up_steps, "min_feat_size": min_feat_size,
              "base_ch": base_ch, "res_depth": res_depth, "ch_range": [min(widths), max(widths)],
              "parsing_ch": parsing_ch}
    check_config(**config)
    return config


def _shape(state: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """The shape of a 3x3 convolution weight in `state`; a ValueError naming the key otherwise."""
    tensor = state.get(key)
    if tensor is None:
        raise ValueError(f"not a ParseNet this code builds: {key} is missing")
    if tensor.dim() != 4 or tuple(tensor.shape[2:]) != (3, 3):
        raise ValueError(f"not a ParseNet this code builds: {key} has shape {tuple(tensor.shape)}, "
                         "not that of a 3x3 convolution")
    return tuple(tensor.shape)


def _count_blocks(state: dict[str, torch.Tensor], part: str, start: int = 0) -> int:
    """How many residual blocks `part` has, numbered from `start` without gaps."""
    pattern = re.compile(rf"{part}\.(\d{{1,9}})\.conv1\.conv2d\.weight")
    numbers = sorted(int(m[1]) for key in state if (m := pattern.fullmatch(key)))
    if numbers != list(range(start, start + len(numbers))):
        raise ValueError(f"not a ParseNet this code builds: its {part} blocks are numbered {_ranges(numbers)}, "
                         f"not {start} onwards without gaps")
    return len(numbers)


def _ranges(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:5]))
    return shown + (f" ... ({len(numbers)} blocks)" if len(numbers) > 5 else "")


# facexlib feeds ParseNet RGB in [-1, 1] and takes its first output (`parse` skips the image head).
SPEC = ArchSpec("ParseNet face-parser", "parser", is_parsenet, parsenet_config, ParseNet,
                convention=Convention(input="-1..1", output="logits"), run=lambda net, x: net.parse(x),
                face_size=lambda net: net.in_size, details=lambda net: {"size": net.in_size})
