"""RetinaFace (Deng et al. 2019) with the MobileNet-0.25 or ResNet-50 backbone, in the key layout of
biubug6/Pytorch_Retinaface and facexlib (detection_mobilenet0.25_Final.pth, detection_Resnet50_Final.pth).

The network returns, for every prior box, box offsets, face/background logits and five landmark
offsets; decoding and NMS live in faces/detect.py.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .spec import ArchSpec, Convention

# Prior boxes: two anchor sizes per pyramid level, strides 8, 16, 32.
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCES = (0.1, 0.2)


def conv_bn(inp: int, oup: int, kernel: int = 3, stride: int = 1, leaky: float | None = 0.0,
            groups: int = 1) -> nn.Sequential:
    layers = [nn.Conv2d(inp, oup, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(oup)]
    if leaky is not None:
        layers.append(nn.LeakyReLU(leaky, inplace=True))
    return nn.Sequential(*layers)


def conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    """Depthwise-separable block of MobileNet v1 (six layers, as in the checkpoints)."""
    dw, pw = conv_bn(inp, inp, 3, stride, 0.1, groups=inp), conv_bn(inp, oup, 1, 1, 0.1)
    return nn.Sequential(*dw, *pw)


class MobileNetV1(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(conv_bn(3, 8, 3, 2, 0.1), conv_dw(8, 16, 1), conv_dw(16, 32, 2),
                                    conv_dw(32, 32, 1), conv_dw(32, 64, 2), conv_dw(64, 64, 1))
        self.stage2 = nn.Sequential(conv_dw(64, 128, 2), *(conv_dw(128, 128, 1) for _ in range(5)))
        self.stage3 = nn.Sequential(conv_dw(128, 256, 2), conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c2 = self.stage1(x)
        c3 = self.stage2(c2)
        return [c2, c3, self.stage3(c3)]


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv)."""

    def __init__(self, inp: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.downsample = None
        if stride != 1 or inp != width * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inp, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inp = 64
        for i, (blocks, width, stride) in enumerate([(3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)], 1):
            layers = [Bottleneck(inp, width, stride)] + [Bottleneck(width * 4, width, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            inp = width * 4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int):
        super().__init__()
        leaky = 0.1 if out_channels <= 64 else 0.0
        self.output1, self.output2, self.output3 = (conv_bn(c, out_channels, 1, 1, leaky) for c in in_channels)
        self.merge1 = conv_bn(out_channels, out_channels, 3, 1, leaky)
        self.merge2 = conv_bn(out_channels, out_channels, 3, 1, leaky)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        out1, out2, out3 = self.output1(features[0]), self.output2(features[1]), self.output3(features[2])
        out2 = self.merge2(out2 + F.interpolate(out3, size=out2.shape[-2:], mode="nearest"))
        out1 = self.merge1(out1 + F.interpolate(out2, size=out1.shape[-2:], mode="nearest"))
        return [out1, out2, out3]


class SSH(nn.Module):
    """Single-stage headless context module: parallel 3x3, 5x5 and 7x7 receptive fields."""

    def __init__(self, channels: int):
        super().__init__()
        leaky = 0.1 if channels <= 64 else 0.0
        self.conv3X3 = conv_bn(channels, channels // 2, leaky=None)
        self.conv5X5_1 = conv_bn(channels, channels // 4, leaky=leaky)
        self.conv5X5_2 = conv_bn(channels // 4, channels // 4, leaky=None)
        self.conv7X7_2 = conv_bn(channels // 4, channels // 4, leaky=leaky)
        self.conv7x7_3 = conv_bn(channels // 4, channels // 4, leaky=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c5 = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(c5), self.conv7x7_3(self.conv7X7_2(c5))], 1))


class Head(nn.Module):
    """A 1x1 conv predicting `values` numbers for each of the two anchors at every position."""

    def __init__(self, channels: int, values: int):
        super().__init__()
        self.conv1x1 = nn.Conv2d(channels, 2 * values, 1)
        self.values = values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.values)


class RetinaFace(nn.Module):
    BACKBONES = {"mobilenet0.25": (MobileNetV1, [64, 128, 256], 64), "resnet50": (ResNet50, [512, 1024, 2048], 256)}

    def __init__(self, backbone: str = "mobilenet0.25"):
        super().__init__()
        body, in_channels, channels = self.BACKBONES[backbone]
        self.backbone = backbone
        self.body = body()
        self.fpn = FPN(in_channels, channels)
        self.ssh1, self.ssh2, self.ssh3 = SSH(channels), SSH(channels), SSH(channels)
        self.ClassHead = nn.ModuleList(Head(channels, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(Head(channels, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(Head(channels, 10) for _ in range(3))

    @staticmethod
    def backbone_of(state: dict[str, torch.Tensor]) -> str | None:
        if "body.stage1.0.0.weight" in state:
            return "mobilenet0.25"
        if "body.layer1.0.conv1.weight" in state:
            return "resnet50"
        return None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: BGR minus (104, 117, 123), NCHW -> box offsets, face probability, landmark offsets."""
        features = [ssh(f) for ssh, f in zip((self.ssh1, self.ssh2, self.ssh3), self.fpn(self.body(x)))]
        boxes = torch.cat([head(f) for head, f in zip(self.BboxHead, features)], 1)
        scores = torch.cat([head(f) for head, f in zip(self.ClassHead, features)], 1).softmax(-1)[..., 1]
        landmarks = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features)], 1)
        return boxes, scores, landmarks


def fold_batch_norms(net: nn.Module) -> nn.Module:
    """For inference (net in eval mode): each BatchNorm after a convolution folded into that
    convolution's weight and bias, and replaced by an identity. The separate normalisations took a
    fifth of mobilenet0.25's CPU time. Convolution and norm pair up in a Sequential or by name
    (conv1 and bn1)."""
    for module in list(net.modules()):
        children = dict(module.named_children())
        for name, conv in children.items():
            if not isinstance(conv, nn.Conv2d):
                continue
            if isinstance(module, nn.Sequential):
                following = list(children)[list(children).index(name) + 1:]
                norm_name = following[0] if following else None
            else:
                norm_name = "bn" + name.removeprefix("conv") if name.startswith("conv") else None
            norm = children.get(norm_name)
            if isinstance(norm, nn.BatchNorm2d):
                setattr(module, name, fuse_conv_bn_eval(conv, norm))
                setattr(module, norm_name, nn.Identity())
    return net


def prior_boxes(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """(P, 4) centre-size priors in pixels, in the order the heads emit them."""
    priors = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = torch.meshgrid((torch.arange(rows, device=device) + 0.5) * step,
                                (torch.arange(cols, device=device) + 0.5) * step, indexing="ij")
        for_level = [torch.stack([cx, cy, torch.full_like(cx, s), torch.full_like(cx, s)], -1) for s in sizes]
        priors.append(torch.stack(for_level, 2).reshape(-1, 4))
    return torch.cat(priors)


def decode(offsets: torch.Tensor, landmark_offsets: torch.Tensor, priors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box offsets (..., P, 4) and landmark offsets (..., P, 10) -> xyxy boxes and (..., P, 5, 2) points."""
    centre, size = priors[:, :2], priors[:, 2:]
    box_centre = centre + offsets[..., :2] * VARIANCES[0] * size
    box_size = size * torch.exp(offsets[..., 2:] * VARIANCES[1])
    boxes = torch.cat([box_centre - box_size / 2, box_centre + box_size / 2], -1)
    points = centre[:, None] + landmark_offsets.unflatten(-1, (5, 2)) * VARIANCES[0] * size[:, None]
    return boxes, points


SPEC = ArchSpec("RetinaFace face-detector", "detector", lambda state: RetinaFace.backbone_of(state) is not None,
                lambda state: {"backbone": RetinaFace.backbone_of(state)}, RetinaFace,
                convention=Convention(input="bgr-minus-mean", colour="bgr", output="detections"),
                details=lambda net: {"detail": f"{net.backbone} backbone"},
                # Measured with mobilenet0.25 (scripts/measure_thresholds.py, BENCHMARKS.md): in every photo, shrunk,
                # enlarged and upscaled, real faces of 24 px or more score 0.957 or more, false ones at most 0.932.
                # facexlib uses 0.97 with resnet50 (unmeasured here), GPEN's demo 0.9.
                threshold=0.95)
