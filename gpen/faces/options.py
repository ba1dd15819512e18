"""The options of the face pipeline as small objects that check themselves: which faces, how they are
pasted back, and which of their pixels a face parser lets through.

Each field is declared once, with its default, its valid range or choices, its help text and how the
ComfyUI nodes show it (slider range, widget type); the nodes' widgets and the CLI's flags are built
from these declarations, so an option exists everywhere it should (tests/test_options.py checks).
Constructing an option object refuses a bad value, NaN and infinity included, with a message naming the option.

No torch here: `python -m gpen --help` builds its flags from this module.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

from ..files.images import MAX_MEGAPIXELS

ORDERS = ("largest", "left-right", "top-bottom", "confidence")
TEMPLATES = ("gpen", "ffhq")  # align.TEMPLATE_POINTS holds their landmarks
MASK_SHAPES = ("box", "ellipse")
SEGMENT_MASKS = MASK_SHAPES  # a SEGS segment's own mask around the face box (a face parser's replaces it)
PARSE_SOURCES = ("original", "restored")
# GPEN's paste mask at 512: a box 26 px in from the edge, blurred twice with sigma 4.
GPEN_ERODE = 26 / 512
GPEN_FEATHER = 4 * math.sqrt(2) / 512
PARSE_FEATHER = 0.01  # of the crop: the soft edge of a parse mask (5 px at 512)
CHANGE_THRESHOLD = 0.04  # see pipeline.changed_faces
MAX_UPSCALE = 8  # upscale_by's largest: a 1 MP photo becomes 64 MP
# An upscaler's tile, in input pixels. An x4 network's last layers hold 64 channels at 4x the tile's side:
# 4.3 GB of float32 at 1024.
MIN_TILE, MAX_TILE = 16, 1024
MASK_GEOMETRY = "erode must be in [0, 0.5) and feather >= 0, got {erode}, {feather}"  # one check of the two

# The 19 face-parsing classes, CelebAMask-HQ's, in the order facexlib's ParseNet and BiSeNet and
# FaceFusion's region parsers give them.
CLASSES = ("background", "skin", "left brow", "right brow", "left eye", "right eye", "glasses", "left ear",
           "right ear", "earring", "nose", "mouth", "upper lip", "lower lip", "neck", "necklace", "cloth", "hair",
           "hat")
# Restored by default: the face itself. Kept from the original: background, earring, neck, necklace,
# cloth, hair and hat, which GPEN would repaint with hallucinated skin.
FACE_REGIONS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13)
REGION_PRESETS = {
    "face": FACE_REGIONS,
    "face without glasses": tuple(c for c in FACE_REGIONS if c != 6),  # rims stay as they were
    "face without ears": tuple(c for c in FACE_REGIONS if c not in (7, 8)),
    "face and hair": FACE_REGIONS + (17,),
}


@dataclass(frozen=True)
class Spec:
    """What one option field is, beyond its default: for its check, its help and its widget."""

    help: str
    low: float | None = None  # the smallest valid value
    above: float | None = None  # every valid value is more than this
    high: float | None = None  # the largest
    below: float | None = None  # every valid value is less than this
    choices: tuple[str, ...] | None = None
    presets: tuple[str, ...] | None = None  # values the node offers, where others are valid too
    name: str | None = None  # the node input and CLI flag (--with-dashes), where not the field's name
    alias: str | None = None  # a second, shorter CLI flag
    slider: tuple[float, float, float | None] | None = None  # the node widget's min, max, step
    widget: str | None = None  # the node widget's type, where the default's type does not say it
    message: str | None = None  # the refusal, formatted with the object's fields, where it predates this module


def option(default: Any, help: str, **spec) -> Any:
    return field(default=default, metadata={"spec": Spec(help, **spec)})


def spec_of(f) -> Spec | None:
    return f.metadata.get("spec")


def surface_name(f) -> str:
    """The option's name on the nodes and the CLI (with dashes there)."""
    spec = spec_of(f)
    return spec.name if spec is not None and spec.name else f.name


def declared(options: type) -> list:
    """The fields of an options class that the surfaces show, in declaration order."""
    return [f for f in fields(options) if spec_of(f) is not None]


class Checked:
    """Option objects refuse bad values when made: choices, ranges, and NaN for every number."""

    def __post_init__(self) -> None:
        for f in declared(type(self)):
            spec, value = spec_of(f), getattr(self, f.name)
            if spec.choices is not None and value not in spec.choices:
                raise ValueError(self._refusal(spec, f, f"must be one of {', '.join(spec.choices)}, got {value!r}"))
            if isinstance(f.default, (int, float)) and not isinstance(f.default, bool) and not _within(value, spec):
                finite = " and finite" if _infinite(value) else ""
                raise ValueError(self._refusal(spec, f, f"must be {_range(spec)}{finite}, got {value}"))

    def _refusal(self, spec: Spec, f, text: str) -> str:
        if spec.message:
            return spec.message.format(**{g.name: getattr(self, g.name) for g in fields(self)})
        return f"{surface_name(f)} {text}"


def _within(value, spec: Spec) -> bool:
    # Infinity too: a threshold or min_size of inf keeps no face, a feather or smoothing of inf has no size.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return False
    return ((spec.low is None or value >= spec.low) and (spec.high is None or value <= spec.high)
            and (spec.below is None or value < spec.below) and (spec.above is None or value > spec.above))


def _infinite(value) -> bool:
    return isinstance(value, numbers.Real) and math.isinf(value)


def _range(spec: Spec) -> str:
    if spec.above is not None:
        return f"more than {spec.above:g} and at most {spec.high:g}"
    if spec.high is not None:
        return f"between {spec.low:g} and {spec.high:g}"
    return f"{spec.low:g} or more" if spec.below is None else f"in [{spec.low:g}, {spec.below:g})"


def parse_indices(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"face indices must be comma-separated numbers like '0,2', got {text!r}") from None


def region_classes(regions: str | Iterable[int | str] | None = None) -> tuple[int, ...]:
    """Class indices from a preset name ("face"), names ("skin, nose") or indices; None is "face"."""
    if regions is None:
        return FACE_REGIONS
    if isinstance(regions, str):
        if regions in REGION_PRESETS:
            return REGION_PRESETS[regions]
        regions = [part.strip() for part in regions.split(",") if part.strip()]
    classes = []
    for region in regions:
        if isinstance(region, str) and region.isdigit():
            region = int(region)
        if isinstance(region, str):
            if region not in CLASSES:
                raise ValueError(f"unknown face region {region!r}: use a preset ({', '.join(REGION_PRESETS)}) "
                                 f"or classes from {', '.join(CLASSES)}")
            region = CLASSES.index(region)
        if not 0 <= int(region) < len(CLASSES):
            raise ValueError(f"face region {region} is not one of the {len(CLASSES)} classes (0-{len(CLASSES) - 1})")
        classes.append(int(region))
    return tuple(sorted(set(classes)))


@dataclass(frozen=True)
class SelectOptions(Checked):
    """Which faces are restored, and how they are cut out."""

    # 0 asks for the detector's own default (ArchSpec.threshold), resolved where detection runs.
    threshold: float = option(0.0, "Minimum detector confidence for a face; 0: the detector's own default (RetinaFace "
                                   "0.95, SCRFD 0.5), which real faces pass and patterns, paintings and animals do "
                                   "not.", low=0, slider=(0.0, 1.0, 0.01))
    min_size: float = option(0.0, "Ignore faces whose box is smaller than this (pixels).", low=0,
                             slider=(0, 4096, None), widget="INT")
    max_faces: int = option(0, "Restore at most this many faces per frame (0: all): the first by number; on video "
                               "frames, the first-numbered tracks found in the frame.", low=0, slider=(0, 1000, None))
    order: str = option("largest", "How faces are numbered, from 0. On video frames, faces are followed as tracks, "
                                   "numbered by their median over the 7 frames each side (box side in 10% steps, "
                                   "left or top edge, score in 0.05 steps; ties left to right), so the same people "
                                   "keep their numbers.", choices=ORDERS)
    indices: str | list[int] | None = option(
        "", "Only these faces (on video frames, tracks), by number in that order, e.g. '0,2' (empty: all).")
    temporal_sigma: float = option(
        0.0, "For video frames: steadies landmarks (and, with a face parser, its masks) across frames "
             "(Gaussian width in frames; 0 is off).", low=0, name="temporal_smoothing", slider=(0.0, 10.0, 0.5))
    template: str = option("gpen", "gpen: the alignment GPEN was trained with; ffhq: facexlib's, as "
                                   "GFPGAN/CodeFormer use.", choices=TEMPLATES)
    # The frames before a face swap (one, or one per frame): only the faces the swap changed are kept.
    changed_from: Any = field(default=None, compare=False, repr=False)
    change_threshold: float = option(CHANGE_THRESHOLD, "How much a face must differ from the image before the "
                                     "swap to count as changed (see pipeline.changed_faces).", low=0, high=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.indices, str):
            parse_indices(self.indices)

    @property
    def wanted(self) -> list[int] | None:
        """The indices asked for, repeats dropped; None for all."""
        if self.indices in (None, "", []):
            return None
        return list(dict.fromkeys(parse_indices(self.indices) if isinstance(self.indices, str) else self.indices))


@dataclass(frozen=True)
class PasteOptions(Checked):
    """How restored faces are blended back into their frames, and what those frames are: the images, or
    the same pictures larger (a background, the images upscaled by a network or by Lanczos)."""

    strength: float = option(1.0, "How much of the restored face replaces the original (GPEN's alpha).",
                             low=0, high=1, slider=(0.0, 1.0, 0.05))
    mask_shape: str = option("box", "box: GPEN's feathered square; ellipse: an oval around the face.",
                             choices=MASK_SHAPES, message=f"mask shape must be one of {', '.join(MASK_SHAPES)}, got "
                                                          "{mask_shape!r}")
    feather: float = option(GPEN_FEATHER, "Softness of the mask edge, as a fraction of the face crop.", low=0,
                            slider=(0.0, 0.2, 0.001), message=MASK_GEOMETRY)
    erode: float = option(GPEN_ERODE, "How far the mask stays inside the crop edge, as a fraction of it.", low=0,
                          below=0.5, slider=(0.0, 0.45, 0.005), message=MASK_GEOMETRY)
    color_correction: bool = option(False, "Match the restored face's colours to the original (mean and std in Lab).")
    smooth_small_faces: bool = option(True, "Soften faces under 100 px as GPEN does, where a restored face "
                                            "would look over-sharp.")
    # The same frames at a larger size (one per frame, any scale, same aspect): the faces are pasted into it.
    background: Any = field(default=None, compare=False, repr=False)
    upscale_by: float = option(1.0, "Scale of the output: the image is enlarged (Lanczos, no model) and the faces "
                                    "are pasted in at up to the restorer's own detail (1: the image's size).",
                               above=0, high=MAX_UPSCALE, alias="upscale", slider=(0.25, MAX_UPSCALE, 0.05))
    # An upscaling network (load_upscaler): the images it enlarges, resized to upscale_by when that is not
    # 1, are the frames the faces are pasted into.
    upscaler: Any = field(default=None, compare=False, repr=False)
    tile: int = option(512, "Side of the pieces the upscaler enlarges at a time, in input pixels: memory is "
                            "bounded by the tile, not by the image.", low=MIN_TILE, high=MAX_TILE)
    max_megapixels: float = option(MAX_MEGAPIXELS, "Largest image read or made, in megapixels (0: no "
                                   "limit): inputs over it are refused from their header, before decoding, and "
                                   "upscaled outputs before any work.", low=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.background is not None and (self.upscale_by != 1 or self.upscaler is not None):
            given = f"upscale {self.upscale_by:g}" if self.upscale_by != 1 else "an upscaler"
            raise ValueError(f"background and {given} both make the larger picture: give one")


@dataclass(frozen=True)
class MaskOptions(Checked):
    """Which pixels of each face take the restored ones: with a face parser, only the face itself."""

    # One parser (load_parser), or several (a region parser and occluders): their masks combine by minimum.
    parser: Any = field(default=None, compare=False)
    regions: str | tuple = option(
        "face", "Which parts of the face take the restored pixels (with a face parser). face: skin, brows, eyes, "
                "glasses, ears, nose, mouth and lips; hair, hat, neck, earrings, clothes and background keep the "
                "original. 'without glasses' keeps the rims, 'without ears' the ears, 'and hair' adds hair.",
        name="mask_regions", presets=tuple(REGION_PRESETS))
    source: str = option("original", "What the face parser looks at: original, the face before restoration (sees a "
                                     "hand or a microphone in front of it); restored, GPEN's face (as facexlib does).",
                         choices=PARSE_SOURCES, name="parse_source")
    feather: float = option(PARSE_FEATHER, "Softness of the parse mask's edge, as a fraction of the face crop; the "
                                           "soft edge stays inside the mask.", low=0, name="parse_feather",
                            slider=(0.0, 0.1, 0.001))
    temporal_sigma: float = option(0.0, "Steadies the parse masks along each face's track over video frames "
                                        "(Gaussian width in frames; 0 is off).", low=0, name="temporal_smoothing")

    def __post_init__(self) -> None:
        super().__post_init__()
        region_classes(self.regions)


@dataclass(frozen=True)
class SegmentOptions(Checked):
    """How faces become the Impact Pack's SEGS: each segment's crop region and mask, as Impact's detectors make them."""

    crop_factor: float = option(3.0, "Each segment's crop region: the face box enlarged this many times about its "
                                     "centre, kept inside the image (the Impact Pack's crop_factor).", low=1,
                                high=100, slider=(1.0, 100.0, 0.1))
    dilation: int = option(10, "Grow (or, below 0, shrink) each segment's mask by this many pixels.", low=-512,
                           high=512, slider=(-512, 512, 1))
    drop_size: int = option(10, "Leave out faces whose box is not wider and taller than this (pixels).", low=1,
                            high=8192, slider=(1, 8192, 1))
    segment_mask: str = option("box", "Each segment's mask: the face box, or an ellipse inside it; with a face "
                                      "parser connected, the parser's mask of mask_regions instead.",
                               choices=SEGMENT_MASKS)
    feather: float = option(0.1, "Softness of each segment mask's edge when pasting, as a fraction of the mask's "
                                 "shorter side, inside the mask and its crop region: a box mask's hard edge would "
                                 "cut GPEN's blend where it is near full, a seam. 0: the masks as they are.", low=0,
                            high=0.5, slider=(0.0, 0.5, 0.01))


def from_values(options: type, values: dict, **more) -> Any:
    """An options object from values named as the nodes and the CLI name them (a node's inputs, the CLI's
    parsed flags); an option missing from `values` keeps its default, `more` gives fields by their own name."""
    given = {f.name: values[surface_name(f)] for f in declared(options) if surface_name(f) in values}
    return options(**given, **more)
