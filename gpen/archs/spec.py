"""What a network is, said once, beside its code: how its files are recognised, its configuration
from tensor shapes (bounded before anything is allocated), its role and how it is called.

`ArchSpec` is read by files/registry.py (recognise, configure, build, describe) and by the handles
in faces/ (how to feed the network and read its answer). `ModelInfo` is what a loaded or described
file is, whatever its role.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

ROLES = ("restorer", "detector", "parser", "upscaler")
FORMATS = ("torch", "onnx")  # what `recognise` and `config` look at: a state dict, or an onnxruntime session
INPUTS = ("-1..1", "0..1", "imagenet", "bgr-minus-mean")
OUTPUTS = ("image", "logits", "probability", "detections")
BATCHES = ("any", "one-on-cpu", "file")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What a face parser may ask of memory for one face, checked when its file is read. The released parsers give
# 19 classes (CelebAMask-HQ's, the ones region masks name) at 512x512, and ParseNet's largest feature map is
# 128 channels at 512x512; these bounds are that with room (19 classes at 1024x1024 pass). A 167 KB ParseNet
# asked for 1024 classes at 2048x2048: 17 GB of logits a face.
MAX_PARSER_CLASSES = 32
MAX_PARSER_LOGITS = 32 * 1024 * 1024  # classes x output pixels: 128 MiB of float32 a face
MAX_PARSER_FEATURES = 2 * 128 * 512 * 512  # values of any one intermediate tensor: 256 MiB of float32 a face


class ConfigError(ValueError):
    """A configuration reader's refusal that says the whole problem: shown after the file's name as it is
    (other ValueErrors are shown as the file not fitting the network's layout, with the reason)."""


def check_parser_output(classes: int, height: int, width: int) -> None:
    """Refuse a face parser (ConfigError) whose class logits are none, or more than a face parser needs."""
    if classes < 1:
        raise ConfigError(f"is a face parser with {classes} classes: it can mark no face region")
    if classes > MAX_PARSER_CLASSES or classes * height * width > MAX_PARSER_LOGITS:
        mib = classes * height * width * 4 / 2**20
        raise ConfigError(f"is a face parser giving {classes} classes at {width}x{height}, {mib:.0f} MiB of logits a "
                          f"face: more than a face parser needs (at most {MAX_PARSER_CLASSES} classes and "
                          f"{MAX_PARSER_LOGITS * 4 // 2**20} MiB; the released ones give 19 at 512x512)")


@dataclass(frozen=True)
class Convention:
    """How a network is called: what it takes and what it gives."""

    input: str = "-1..1"  # "-1..1" or "0..1" RGB, "imagenet" (normalised by its mean and std), "bgr-minus-mean"
    colour: str = "rgb"  # channel order of the input: "rgb" or "bgr"
    layout: str = "nchw"  # of input and output: "nchw" or "nhwc" (channels last)
    output: str = "image"  # "image" (in the input's range), "logits" (per-class), "probability", "detections"
    size: int | None = None  # the face size it takes; None: read from the network (ArchSpec.face_size)
    template: str | None = None  # restorers: the face alignment it was trained on
    # "any": batches of what the caller asks; "one-on-cpu": a face at a time on the CPU (GPEN's fast path
    # folds styles into weights at batch 1); "file": an ONNX export's fixed batch dimension, else any.
    batch: str = "any"

    def __post_init__(self):
        for name, allowed in (("input", INPUTS), ("output", OUTPUTS), ("batch", BATCHES),
                              ("colour", ("rgb", "bgr")), ("layout", ("nchw", "nhwc"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Convention.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ArchSpec:
    """One network: how its files are told apart, configured, built and called."""

    name: str  # what ModelInfo.arch says, e.g. "GPEN", "RetinaFace face-detector"
    role: str  # "restorer", "detector", "parser" or "upscaler"
    # Whether a file is this network's: a state dict's keys (format "torch") or an onnxruntime
    # session's inputs and outputs ("onnx"). Cheap, and never raises.
    recognise: Callable[[object], bool]
    # The constructor's arguments from tensor or signature shapes; ValueError naming what is out of bounds.
    config: Callable[[object], dict]
    # torch: the network's class (or a function), called as build(**config) on the meta device;
    # onnx: called as build(session, **config), a tensor -> tensor runner.
    build: Callable[..., object]
    convention: Convention = Convention()
    format: str = "torch"
    face_size: Callable[[object], int] | None = None  # when the convention has no fixed size
    run: Callable[[object, torch.Tensor], torch.Tensor] | None = None  # how to call it, when not network(x)
    # A file's older key layout renamed to `build`'s names (may raise ConfigError), when a network has several.
    convert: Callable[[dict], dict] | None = None
    # ModelInfo fields besides arch, role and parameters, from the built network (torch) or the session (onnx).
    details: Callable[[object], dict] = lambda network: {}
    # Detectors: the score a face must pass unless the user sets one, measured per network (BENCHMARKS.md,
    # "Detector thresholds"): each scores on its own scale.
    threshold: float | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"{self.name}: role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.format not in FORMATS:
            raise ValueError(f"{self.name}: format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.role == "restorer" and self.convention.size is None and self.face_size is None:
            raise ValueError(f"{self.name}: a restorer says the face size it takes: Convention(size=...) or face_size")
        if self.role == "detector" and not (isinstance(self.threshold, float) and 0 < self.threshold < 1):
            raise ValueError(f"{self.name}: a detector says the score a face must pass by default, "
                             f"threshold in (0, 1); got {self.threshold!r}")

    def size_of(self, network) -> int | None:
        """The face size `network` (built from this spec) takes."""
        return self.convention.size if self.face_size is None else self.face_size(network)

    def forward(self, network, x: torch.Tensor) -> torch.Tensor:
        """The network's answer to an input prepared by `network_input`."""
        return network(x) if self.run is None else self.run(network, x)


def network_input(rgb: torch.Tensor, convention: Convention) -> torch.Tensor:
    """NCHW RGB in 0..1 -> what a network of this convention takes (range, channel order, layout)."""
    x = rgb.flip(1) if convention.colour == "bgr" else rgb
    if convention.input == "-1..1":
        x = x * 2 - 1
    elif convention.input == "imagenet":
        x = imagenet_normalise(x)
    elif convention.input == "bgr-minus-mean":
        raise ValueError("detectors take whole frames: faces/detect.py prepares them")
    return x.permute(0, 2, 3, 1) if convention.layout == "nhwc" else x


def imagenet_normalise(rgb: torch.Tensor) -> torch.Tensor:
    """NCHW RGB in 0..1 -> normalised with ImageNet's mean and standard deviation (BiSeNet's input)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb - mean) / std


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """NCHW float -> NCHW at `size`: bilinear, antialiased when shrinking; unchanged at its own size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


@dataclass(frozen=True)
class ModelInfo:
    """What a weight file holds."""

    arch: str  # the architecture's name: "GPEN", "RetinaFace face-detector", "ParseNet face-parser", "GFPGAN", ...
    format: str  # "pth", "safetensors" or "onnx"
    size: int | None = None  # GPEN's face size; None for other networks
    channel_multiplier: float | None = None  # None where the file does not say (ONNX)
    narrow: float | None = None
    style_dim: int | None = None
    n_mlp: int | None = None
    parameters: int | None = None
    dtype: str = "float32"  # as stored in the file
    detail: str | None = None  # e.g. "mobilenet0.25 backbone", "with landmarks"
    role: str | None = None  # "restorer", "detector", "parser", "upscaler"; None for networks known only by name
    scale: int | None = None  # an upscaler's enlargement

    def __str__(self) -> str:
        name = self.arch if self.size is None else f"{self.arch}-{self.size}"
        parts = [f"{name} ({self.format}, {self.dtype})"]
        if self.channel_multiplier is not None:
            parts.append(f"channel_multiplier {self.channel_multiplier:g}, narrow {self.narrow:g}")
        if self.detail:
            parts.append(self.detail)
        if self.parameters is not None:
            parts.append(f"{self.parameters / 1e6:.1f}M parameters")
        return ", ".join(parts)
