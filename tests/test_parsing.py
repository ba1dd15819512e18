"""Occlusion- and region-aware paste-back: parsers loaded by their tensors, masks that keep hair,
hats and occluders bit-identical, several parsers combined, masks steadied over video frames."""

import math
import shutil

import pytest
import torch

import gpen
from gpen import MaskOptions, SelectOptions
from gpen.faces.align import warp
from gpen.faces.masks import MasksOverTime, feather_inside, smooth_over_time
from gpen.faces.options import FACE_REGIONS, REGION_PRESETS, region_classes
from gpen.faces.parse import parse_faces
from gpen.faces.tracks import smoothing_reach
from gpen.loader import load_parser
from tests.helpers import GreyRestorer, SplitParser


class HandOnLeft:
    """An occluder that sees something in front of the left third of every face."""

    size = 256

    def masks(self, crops, regions=None):
        n, s = crops.shape[:2]
        visible = torch.ones(n, s, s)
        visible[:, :, : s // 3] = 0
        return visible


def in_image(crop_mask: torch.Tensor, affines: torch.Tensor, frames: torch.Tensor, shape) -> torch.Tensor:
    """Where a crop-space indicator (S,S) lands in each frame (B,H,W), for every face."""
    from gpen.faces.align import invert_affine

    out = torch.zeros(shape[:3])
    for affine, frame in zip(affines, frames.tolist()):
        back = warp(crop_mask[None], invert_affine(affine.double())[None].float(), *shape[1:3], mode="nearest")[0, 0]
        out[frame] = torch.maximum(out[frame], back)
    return out


def test_parsers_are_loaded_by_their_tensors_not_their_names(shared, tmp_path):
    shutil.copy(shared / "fixtures" / "parsenet_random_64.pth", tmp_path / "face_model.pth")
    parsenet = load_parser(tmp_path / "face_model.pth", device="cpu")
    bisenet = load_parser(shared / "fixtures" / "bisenet_random_fp16.pth", device="cpu", dtype="bf16")
    assert (parsenet.info.arch, parsenet.size, bisenet.info.arch, bisenet.size) == (
        "ParseNet face-parser", 512, "BiSeNet face-parser", 512)
    crops = torch.rand(2, 96, 96, 3)
    assert parsenet.logits(crops).shape == bisenet.logits(crops).shape == (2, 19, 96, 96)
    masks = bisenet.masks(crops, FACE_REGIONS)
    assert masks.shape == (2, 96, 96) and set(masks.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(gpen.CheckpointError, match="holds GPEN weights, not a parser"):
        load_parser(shared / "fixtures" / "gpen_random_64.pth")


def test_region_presets_names_and_indices():
    assert region_classes() == FACE_REGIONS == REGION_PRESETS["face"]
    assert 17 in region_classes("face and hair") and 6 not in region_classes("face without glasses")
    assert region_classes("skin, nose") == region_classes([1, "10"]) == (1, 10)
    with pytest.raises(ValueError, match="unknown face region 'beard'"):
        region_classes("skin, beard")


def test_hair_stays_bit_identical_and_the_face_is_restored(solvay, detector):
    parser = SplitParser(17, 1, rows=True)
    result = gpen.restore_faces(solvay, GreyRestorer(), detector, select=SelectOptions(max_faces=1),
                                masks=MaskOptions(parser=parser))  # no neighbours
    assert result.face_count == 1 and len(parser.seen) == 1
    size = 512
    hair = torch.zeros(size, size)
    hair[: size // 2 - 12] = 1  # the top half, less the feather's reach and the warp's support
    in_hair = in_image(hair, result.info.affines, result.info.frames, solvay.shape) > 0
    assert in_hair.sum() > 1000
    assert result.masks[in_hair].max() == 0 and torch.equal(result.images[in_hair], solvay[in_hair])
    plain = gpen.restore_faces(solvay, GreyRestorer(), detector, select=SelectOptions(max_faces=1))
    assert (plain.masks[in_hair] > 0.99).float().mean() > 0.5  # without the parser the hair was painted
    skin = torch.zeros(size, size)
    skin[size // 2 + 40: size - 60, 60:-60] = 1
    in_skin = in_image(skin, result.info.affines, result.info.frames, solvay.shape) > 0
    assert (result.masks[in_skin] > 0.99).float().mean() > 0.9


def test_an_occluder_and_a_parser_combine_by_minimum():
    crops = torch.rand(3, 64, 64, 3)
    masks = parse_faces([SplitParser(17, 1, rows=True), HandOnLeft()], crops, feather=0)
    expected = torch.zeros(64, 64)
    expected[32:, 21:] = 1  # skin below the hair, right of the hand
    assert torch.equal(masks, expected.expand(3, -1, -1))


def test_feathering_stays_inside_the_mask():
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 32:96] = 1
    soft = feather_inside(mask, 0.02)
    assert soft[mask == 0].max() == 0  # never outside
    assert soft[0, 64, 64] == pytest.approx(1, abs=1e-5) and 0 < soft[0, 36, 64] < 1  # soft edge inside


def test_faces_are_parsed_in_the_restore_batches(solvay, detector):
    parser = SplitParser(17, 1, rows=True)
    gpen.restore_faces(solvay, GreyRestorer(), detector, masks=MaskOptions(parser=parser), face_batch=8)
    assert [len(seen) for seen in parser.seen] == [8, 8, 8, 5]


def test_parse_source_restored_parses_what_the_restorer_made(solvay, detector):
    parser = SplitParser(17, 1, rows=True)
    gpen.restore_faces(solvay[:, :300, :500], GreyRestorer(), detector,
                       masks=MaskOptions(parser=parser, source="restored"))
    assert all(torch.all(seen == 0.5) for seen in parser.seen)
    with pytest.raises(ValueError, match="parse_source"):
        MaskOptions(parser=parser, source="both")


def test_masks_are_steadied_along_tracks_without_growing():
    masks = torch.ones(5, 8, 8)
    masks[2] = 0  # a frame where the parse flickered off: it stays off
    masks[3, :4] = 1
    flicker_on = torch.zeros(5, 8, 8)
    flicker_on[2] = 1  # one frame where a region flickered on: held back
    steady = smooth_over_time(masks, [torch.arange(5)], sigma=1.0)
    assert torch.all(steady <= masks) and steady[2].max() == 0
    held = smooth_over_time(flicker_on, [torch.arange(5)], sigma=1.0)
    assert held[2].max() < 0.5



def test_masks_steadied_a_part_at_a_time_are_the_gaussian_average_within_reach_of_each_track():
    """30 frames with two faces each, one track of 30 and two tracks of 15 (the second face lost at frame 15):
    each mask is its track's Gaussian average over the frames within smoothing_reach (sigma 1.2: 6 each side),
    never above its own, whether asked for all at once or a part at a time while made 3 at a time."""
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(60, 6, 6, generator=generator)
    tracks = [list(range(0, 60, 2)), list(range(1, 30, 2)), list(range(31, 60, 2))]
    sigma, reach = 1.2, smoothing_reach(1.2)
    expected = torch.empty_like(masks)
    for track in tracks:
        for step, face in enumerate(track):
            near = [(other, math.exp(-(step - s) ** 2 / (2 * sigma ** 2))) for s, other in enumerate(track)
                    if abs(step - s) <= reach]
            average = sum(weight * masks[other] for other, weight in near) / sum(weight for _, weight in near)
            expected[face] = torch.minimum(average, masks[face])
    made, held = [], []

    def make(part):
        made.append((part.start, part.stop))
        return masks[part]

    steadied = MasksOverTime(make, 60, tracks, sigma, batch=3)
    in_parts = []
    for start in range(0, 60, 4):
        in_parts.append(steadied[start:start + 4])
        held.append(len(steadied.own))

    assert reach == 6
    assert torch.allclose(torch.cat(in_parts), expected, atol=1e-6)
    assert torch.allclose(smooth_over_time(masks, tracks, sigma), expected, atol=1e-6)
    assert made == [(start, start + 3) for start in range(0, 60, 3)]  # each made once, in batches from the first
    assert max(held) <= 4 + 2 * 2 * reach + 3 and held[-1] == 0  # a part, its tracks' reach each side, a batch

def test_video_masks_follow_each_face(solvay, detector):
    frames = solvay[:, :300, :500].expand(3, -1, -1, -1).contiguous()
    result = gpen.restore_faces(frames, GreyRestorer(), detector,
                                masks=MaskOptions(parser=SplitParser(17, 1, rows=True), temporal_sigma=1.0))
    assert torch.allclose(result.masks[0], result.masks[1], atol=1e-6) and result.face_count > 0


def test_faces_the_parser_finds_no_face_in_are_left_alone_and_counted(solvay, detector):
    background_only = SplitParser(0, 0)
    result = gpen.restore_faces(solvay, GreyRestorer(), detector, masks=MaskOptions(parser=background_only))
    assert torch.equal(result.images, solvay) and result.face_count == 0
    assert result.summary == ("no face restored; 29 face(s) left as they were: the face parser found none of "
                              "mask_regions in them; images returned unchanged")
