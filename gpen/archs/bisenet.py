"""BiSeNet face parser (Yu et al. 2018) in the key layout of facexlib's parsing_bisenet.pth.

The released network is BiSeNet(num_class=19) with a ResNet-18 context path: 19 face regions
(background, skin, brows, eyes, glasses, ears, earring, nose, mouth, lips, neck, necklace, cloth,
hair, hat). The spatial path of the paper is replaced by ResNet's 1/8 feature map, as in facexlib.

Input convention: `BiSeNet.forward` takes NCHW RGB already normalised with the ImageNet mean and
standard deviation, exactly what facexlib feeds it; `imagenet_normalise` turns 0..1 RGB into that.
The output is the per-class logits at the input's size (facexlib's first output).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .spec import ArchSpec, ConfigError, Convention, check_parser_output, imagenet_normalise

# Keys that every BiSeNet file of this layout has and no other network here uses.
BISENET_KEYS = ("cp.resnet.conv1.weight", "cp.arm32.conv_atten.weight", "ffm.convblk.conv.weight",
                "conv_out.conv_out.weight")
SIZE = 512  # the faces it parses (and the size of its logits)


class ConvBNReLU(nn.Module):
    """Bias-free conv, batch norm, ReLU: the unit most of BiSeNet is built from."""

    def __init__(self, inp: int, out: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(inp, out, kernel, 1, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet-18's two-conv residual block; a 1x1 conv shortcut where the shape changes."""

    def __init__(self, inp: int, out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inp != out:
            self.downsample = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(residual + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18 without its classifier, giving the features at 1/8, 1/16 and 1/32 of the input."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inp = 64
        for i, (out, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], 1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(inp, out, stride), BasicBlock(out, out, 1)))
            inp = out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        at8 = self.layer2(self.layer1(x))
        at16 = self.layer3(at8)
        return at8, at16, self.layer4(at16)


def global_average(x: torch.Tensor) -> torch.Tensor:
    return x.mean((2, 3), keepdim=True)


class AttentionRefinement(nn.Module):
    """Reweights a feature map's channels by a sigmoid gate computed from its global average."""

    def __init__(self, inp: int, out: int):
        super().__init__()
        self.conv = ConvBNReLU(inp, out)
        self.conv_atten = nn.Conv2d(out, out, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature = self.conv(x)
        return feature * torch.sigmoid(self.bn_atten(self.conv_atten(global_average(feature))))


class ContextPath(nn.Module):
    """ResNet-18 plus a top-down path: global context added at 1/32, refined at 1/16, brought to 1/8.

    Returns ResNet's own 1/8 features (standing in for the paper's spatial path), the context at 1/8
    and the context at 1/16, all but the first with 128 channels.
    """

    def __init__(self):
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, kernel=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        at8, at16, at32 = self.resnet(x)
        # The global context is 1x1; broadcasting it is what the reference's nearest upsampling does.
        context32 = self.arm32(at32) + self.conv_avg(global_average(at32))
        # Nearest resizing to the exact sizes: with odd sizes the levels are not exactly 2x apart.
        context16 = self.conv_head32(F.interpolate(context32, size=at16.shape[-2:], mode="nearest"))
        context8 = self.conv_head16(F.interpolate(self.arm16(at16) + context16, size=at8.shape[-2:], mode="nearest"))
        return at8, context8, context16


class FeatureFusion(nn.Module):
    """Merges the spatial and context features, then boosts channels by a squeeze-excitation gate
    (the gated features are added to the ungated ones)."""

    def __init__(self, inp: int, out: int):
        super().__init__()
        self.convblk = ConvBNReLU(inp, out, kernel=1)
        self.conv1 = nn.Conv2d(out, out // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out // 4, out, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feature = self.convblk(torch.cat([spatial, context], 1))
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(global_average(feature)))))
        return feature * gate + feature


class SegmentationHead(nn.Module):
    """A 3x3 ConvBNReLU then a 1x1 classifier, giving class logits at the feature's resolution."""

    def __init__(self, inp: int, mid: int, num_class: int):
        super().__init__()
        self.conv = ConvBNReLU(inp, mid)
        self.conv_out = nn.Conv2d(mid, num_class, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """facexlib's BiSeNet face parser; parsing_bisenet.pth is BiSeNet(19).

    forward(x): x is NCHW RGB normalised with the ImageNet mean/std (see imagenet_normalise);
    returns (N, num_class, H, W) logits. With auxiliary=True it returns facexlib's three outputs:
    the main logits and the two deep-supervision heads' (from the context at 1/8 and 1/16), all
    at the input's size; those heads were for training and are skipped otherwise.
    """

    def __init__(self, num_class: int = 19):
        super().__init__()
        self.num_class = num_class
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = SegmentationHead(256, 256, num_class)
        self.conv_out16 = SegmentationHead(128, 64, num_class)
        self.conv_out32 = SegmentationHead(128, 64, num_class)

    def forward(self, x: torch.Tensor, auxiliary: bool = False):
        size = x.shape[-2:]
        spatial, context8, context16 = self.cp(x)
        logits = [self.conv_out(self.ffm(spatial, context8))]
        if auxiliary:
            logits += [self.conv_out16(context8), self.conv_out32(context16)]
        # All heads run at 1/8 or 1/16; the reference brings their logits to the input size this way.
        logits = [F.interpolate(out, size=size, mode="bilinear", align_corners=True) for out in logits]
        return tuple(logits) if auxiliary else logits[0]

    @torch.no_grad()
    def parse(self, rgb: torch.Tensor) -> torch.Tensor:
        """NCHW RGB in 0..1 -> (N, H, W) class index per pixel (long)."""
        weight = self.cp.resnet.conv1.weight
        return self(imagenet_normalise(rgb.to(device=weight.device, dtype=weight.dtype))).argmax(1)


def is_bisenet(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict has facexlib BiSeNet's keys (its shapes are checked by bisenet_config)."""
    return all(k in state for k in BISENET_KEYS)


def bisenet_config(state: dict[str, torch.Tensor]) -> dict:
    """BiSeNet's constructor arguments read from the tensor shapes: {"num_class": n}.

    The ResNet-18 context path and all widths are fixed in facexlib's architecture, so the number of
    classes (the classifiers' output channels) is all that varies; the three classifiers must agree.
    Raises ValueError for a state dict that is not BiSeNet's or whose classifiers do not fit.
    """
    if not is_bisenet(state):
        missing = [k for k in BISENET_KEYS if k not in state]
        raise ConfigError(f"not a BiSeNet face parser: missing {', '.join(missing)}")
    classifiers = {k: state.get(f"{k}.conv_out.weight") for k in ("conv_out", "conv_out16", "conv_out32")}
    widths = {"conv_out": 256, "conv_out16": 64, "conv_out32": 64}
    num_class = classifiers["conv_out"].shape[0] if classifiers["conv_out"].dim() == 4 else None
    for name, weight in classifiers.items():
        expected = (num_class, widths[name], 1, 1)
        if weight is None:
            raise ConfigError(f"BiSeNet without {name}.conv_out.weight")
        if num_class is None or tuple(weight.shape) != expected:
            raise ConfigError(f"BiSeNet's {name}.conv_out.weight is {tuple(weight.shape)}; expected "
                                  f"(classes, {widths[name]}, 1, 1) with the same classes for all three classifiers")
    check_parser_output(int(num_class), SIZE, SIZE)
    return {"num_class": int(num_class)}


SPEC = ArchSpec("BiSeNet face-parser", "parser", is_bisenet, bisenet_config, BiSeNet,
                convention=Convention(input="imagenet", output="logits", size=SIZE),
                details=lambda net: {"detail": f"{net.num_class} classes"})
