"""Values that used to crash the pipeline or quietly restore nothing: infinite or NaN settings, NaN pixels
and swap references, frames of the wrong shape, detect_size values that would take the server's memory,
and parse masks whose feathering took a minute a face and never listened to cancel."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

import gpen
from gpen import MaskOptions, PasteOptions, SelectOptions
from gpen.faces.detect import MAX_DETECT_PIXELS, detection_scales
from gpen.faces.masks import feather_inside
from gpen.faces.options import declared, surface_name
from gpen.faces.parse import parse_faces
from gpen.faces.paste import gaussian_blur
from tests.helpers import GreyRestorer, SplitParser

NUMBERS = [(group, field) for group in (SelectOptions, PasteOptions, MaskOptions) for field in declared(group)
           if isinstance(field.default, (int, float)) and not isinstance(field.default, bool)]


@pytest.mark.parametrize("group, field", NUMBERS, ids=[f"{g.__name__}.{f.name}" for g, f in NUMBERS])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_infinite_and_nan_settings_are_refused_by_name(group, field, value):
    """threshold or min_size inf kept no face without a word; feather, parse_feather or temporal smoothing
    inf crashed deep inside (a blur of infinite reach)."""
    with pytest.raises(ValueError, match=surface_name(field)):
        group(**{field.name: value})


def test_a_detector_refuses_a_threshold_no_score_can_pass(detector, solvay):
    for threshold in (math.nan, math.inf):
        with pytest.raises(ValueError, match="threshold must be 0 or more"):
            detector.detect(solvay[:, :64, :64], threshold=threshold)


def test_parse_faces_refuses_a_feather_with_no_size():
    crops = torch.rand(1, 32, 32, 3)
    for feather in (math.nan, math.inf, -0.1):
        with pytest.raises(ValueError, match="parse_feather must be 0 or more"):
            parse_faces(SplitParser(1, 0), crops, feather=feather)


def test_one_nan_pixel_does_not_hide_the_faces_around_it(detector, solvay, caplog):
    """Read through the network, one NaN took the scores of every face its receptive fields reached: 11 of
    these 20 faces were found. Detection reads it as black, and says so."""
    group = solvay[:, :400, :900]
    (clean,) = detector.detect(group)
    for value in (math.nan, math.inf, -math.inf):
        spoiled = group.clone()
        spoiled[0, 200, 450, 1] = value
        with caplog.at_level(logging.WARNING, logger="gpen"):
            (found,) = detector.detect(spoiled)
        assert len(found) == len(clean) == 20
        assert (found.boxes - clean.boxes).abs().max() < 2
        assert "non-finite value(s) (NaN or Inf) of the image as black or white" in caplog.text


@pytest.mark.parametrize("frames", [torch.rand(1, 64, 64, 2), torch.rand(1, 3, 64, 64), torch.rand(64, 64)],
                         ids=["two channels", "channels first", "no channels"])
def test_frames_of_the_wrong_shape_are_a_value_error(detector, frames):
    with pytest.raises(ValueError, match=r"must be a \(B, H, W, C\) float tensor in 0..1 with C in 1, 3, 4"):
        detector.detect(frames)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        gpen.crop_faces(frames, torch.full((1, 5, 2), 30.0), 32)


def test_a_swap_reference_with_nan_or_of_another_type_is_refused_by_name(detector, solvay):
    """NaN made every face count as unchanged: the image came back untouched, as if the swap changed nothing."""
    group = solvay[:, :300, :700]
    spoiled = group.clone()
    spoiled[0, 150, 350] = math.nan
    with pytest.raises(ValueError, match=r"changed_from \(the image before the swap\) holds NaN or infinite values"):
        gpen.restore_faces(group, GreyRestorer(), detector, select=SelectOptions(changed_from=spoiled))
    with pytest.raises(ValueError, match=r"changed_from \(the image before the swap\) must be .*; got torch.int32"):
        gpen.restore_faces(group, GreyRestorer(), detector, select=SelectOptions(changed_from=group.int()))
    as_bytes = gpen.restore_faces(group, GreyRestorer(), detector,
                                  select=SelectOptions(changed_from=(group * 255).round().byte()))
    assert as_bytes.summary.startswith("0 of 14 faces changed")  # uint8, as images may be, still compares


def test_a_detection_pass_sees_at_most_a_4k_frame_whatever_detect_size_asks():
    """detect_size 8192 asked RetinaFace to see 38 MP of a 1080p frame and 67 MP of a 64x64 one: 9 and
    16 GB with ResNet-50 (about 250 bytes a pixel). "auto", and sizes under the bound, are as they were."""
    for height, width in ((1080, 1920), (64, 64), (40, 9000)):
        (scale,) = detection_scales(height, width, 8192)
        assert height * width * scale ** 2 <= MAX_DETECT_PIXELS * 1.0001
    assert detection_scales(1080, 1920, 2048) == [2048 / 1920]
    assert detection_scales(1080, 1920) == [1600 / 1920, 640 / 1920]


class Seen(Exception):
    """Stops a detection pass once the network has been shown its input."""


def test_frames_are_detected_a_few_at_a_time_only_while_their_pixels_fit(shared):
    detector = gpen.load_detector(shared / "models" / "retinaface_mobilenet0.25.pth", device="cpu", detect_size=3840)
    inputs = []

    def look(x):
        inputs.append(tuple(x.shape))
        raise Seen

    detector.net.forward = look
    with pytest.raises(Seen):
        detector.detect(torch.zeros(3, 1080, 1920, 3))  # each frame is a 4K frame at detect_size 3840
    assert inputs == [(1, 3, 2160, 3840)]
    inputs.clear()
    with pytest.raises(Seen):
        detector.detect(torch.zeros(1, 64, 64, 3))
    assert inputs == [(1, 3, 2880, 2880)]  # not 3840x3840: 14.7 MP


def old_feather_inside(masks: torch.Tensor, feather: float) -> torch.Tensor:
    """The feathering as it was: a square erosion by max pooling (O(reach^2) a pixel), then the blur."""
    sigma = feather * masks.shape[-1]
    reach = max(1, math.ceil(3 * sigma))
    shrunk = -F.max_pool2d(-masks[:, None], 2 * reach + 1, stride=1, padding=reach)
    return gaussian_blur(shrunk, sigma)[:, 0].clamp(0, 1)


@pytest.mark.parametrize("feather", [0.004, 0.01, 0.05, 0.3])
def test_feathering_gives_the_masks_it_gave_before(feather):
    """Rows then columns of log2(reach) minimum passes are the square erosion exactly; the blur by two matrix
    products is the convolution's to float rounding (1e-6 here), and a pixel the parser kept out stays 0."""
    torch.manual_seed(0)
    masks = F.interpolate((torch.rand(3, 1, 12, 12) > 0.3).float(), size=(96, 96), mode="nearest")[:, 0]
    masks = masks * torch.rand(3, 96, 96).clamp(min=0.2)  # occluders give probabilities, not only 0 and 1
    before, after = old_feather_inside(masks, feather), feather_inside(masks, feather)
    assert (after - before).abs().max() <= 1e-6
    assert torch.equal(after == 0, before == 0)
    wide = masks[:, 16:80]  # crops from other packs need not be square
    assert (feather_inside(wide, feather) - old_feather_inside(wide, feather)).abs().max() <= 1e-6


def test_feathering_asks_cancel_before_each_face():
    asked = []

    def cancel():
        asked.append(len(asked))
        if len(asked) == 2:
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        parse_faces(SplitParser(1, 0), torch.rand(3, 64, 64, 3), feather=0.05, cancel=cancel)
    assert asked == [0, 1]  # the second face was never feathered
    assert parse_faces(SplitParser(1, 0), torch.rand(3, 64, 64, 3), feather=0.05, cancel=lambda: None).shape == (3, 64, 64)

