"""Paste-back works face by face and band by band, so that memory stays near the frame's own; these tests
check that it gives what pasting each face over the whole frame gives, and that the pieces stay small.
The memory itself is measured by `python -m gpen bench --pipeline --memory` (BENCHMARKS.md)."""

import math

import pytest
import torch

import gpen
from gpen.faces import align, paste
from gpen.faces.align import invert_affine, sample, warp, warp_faces
from gpen.faces.detect import Faces
from gpen.faces.options import MaskOptions, PasteOptions
from gpen.faces.pipeline import detect_faces
from gpen.archs.working_memory import LiveStorage
from gpen.faces.paste import MASK_TIE, face_mask, match_color, soften
from tests.helpers import ForgetfulRestorer, IdentityRestorer, SplitParser


def similarity(scale: float, angle: float, x: float, y: float) -> list[list[float]]:
    """An affine image -> crop pixels: the crop's origin at image (x, y), turned by `angle` degrees."""
    c, s = scale * math.cos(math.radians(angle)), scale * math.sin(math.radians(angle))
    return [[c, -s, -(c * x - s * y)], [s, c, -(s * x + c * y)]]


def pasted_over_whole_frames(images, restored, affines, frames, face_masks, options):
    """The paste as PasteOptions and paste_faces describe it, in the plainest way: all crops softened and
    colour-matched at once, then each face warped over its whole frame, taking the pixels where its
    mask beats the faces already there."""
    size = restored.shape[1]
    crops = soften(restored.permute(0, 3, 1, 2))  # every face here is small
    crops = match_color(crops, warp_faces(images, affines.double(), frames, size))
    out, masks = images.clone(), torch.zeros(images.shape[:3])
    box = face_mask(size, options.mask_shape, options.erode, options.feather)
    for crop, affine, frame, face in zip(crops, affines.double(), frames.tolist(), face_masks):
        to_frame = invert_affine(affine[None])
        height, width = images.shape[1:3]
        back = warp(crop, to_frame, height, width)[0].clamp(0, 1).permute(1, 2, 0)
        weight = warp(torch.minimum(box, face)[None], to_frame, height, width, "bilinear")[0, 0].clamp(0, 1)
        weight = weight * options.strength
        wins = weight > masks[frame] + MASK_TIE
        blended = images[frame] + (back - images[frame]) * weight[..., None]
        out[frame] = torch.where(wins[..., None], blended, out[frame])
        masks[frame] = torch.where(wins, weight, masks[frame])
    return out, masks


def test_pasting_in_bands_gives_what_pasting_over_whole_frames_gives(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 120, 160, 3, generator=generator)
    restored = torch.rand(4, 64, 64, 3, generator=generator)
    affines = torch.tensor([similarity(0.8, 0, 10, 5), similarity(0.7, 25, 50, 20),  # these two overlap
                            similarity(0.9, -10, 120, 70),  # cut by the frame's edge
                            similarity(0.6, 90, 100, -10)])  # in the second frame, turned
    frames = torch.tensor([0, 0, 0, 1])
    face_masks = torch.ones(4, 64, 64)
    face_masks[1, :, 40:] = 0  # a parser keeping the right of the face out
    options = PasteOptions(strength=0.8, color_correction=True)
    monkeypatch.setattr(paste, "PASTE_BAND", 300)  # a few rows at a time, even on this small frame

    out, masks = gpen.paste_faces(images, restored, affines, frames, options, face_masks=face_masks)

    expected, expected_masks = pasted_over_whole_frames(images, restored, affines, frames, face_masks, options)
    assert (expected_masks > 0.5).sum() > 4000  # the faces are pasted, and overlap
    assert torch.allclose(masks, expected_masks, atol=1e-6)
    assert torch.allclose(out, expected, atol=1e-5)
    untouched = expected_masks == 0
    assert torch.equal(out[untouched], images[untouched])


def test_a_large_face_is_pasted_a_band_at_a_time(monkeypatch):
    sizes = []

    def recorded_sample(image, inverse, height, width, mode="bicubic"):
        sizes.append(height * width)
        return sample(image, inverse, height, width, mode)

    monkeypatch.setattr(paste, "sample", recorded_sample)
    image = torch.zeros(1, 700, 700, 3)
    white = torch.ones(1, 512, 512, 3)
    big = torch.tensor([similarity(512 / 650, 0, 20, 20)])  # the crop covers 650x650 pixels of the image

    out, masks = gpen.paste_faces(image, white, big)

    assert masks[0, 345, 345] > 0.99 and (out[0, 345, 345] > 0.99).all()
    assert max(sizes) <= paste.PASTE_BAND < 650 * 650



def test_a_2048_crop_is_cut_a_band_of_rows_at_a_time(monkeypatch):
    """A crop's float64 source coordinates take tens of bytes a pixel (over 100 MB for a 2048 crop at once):
    they are made SAMPLED_AT_ONCE output pixels at a time, which cuts the very same crop, into the crops' own
    memory (50 MB)."""
    frame = torch.rand(1, 1500, 1500, 3, generator=torch.Generator().manual_seed(0))
    affines = torch.tensor([similarity(2048 / 1400, 7, 40, 60)])

    def cut() -> tuple[torch.Tensor, int]:
        with torch.inference_mode(), LiveStorage() as live:
            crops = align.cut_faces(frame, affines, torch.tensor([0]), 2048)
        return crops, live.peak

    in_bands, banded_peak = cut()
    monkeypatch.setattr(align, "SAMPLED_AT_ONCE", 2048 * 2048)
    whole, whole_peak = cut()

    assert torch.equal(in_bands, whole) and 0.3 < in_bands.mean() < 0.7
    assert banded_peak - in_bands.untyped_storage().nbytes() < 32 * 2**20 < whole_peak - whole.untyped_storage().nbytes()

def faces_in_a_row(count: int = 5) -> Faces:
    """`count` faces side by side in a 120 x 75.3*count frame, at fractional landmark positions."""
    eyes_nose_mouth = torch.tensor([[40.0, 50], [60, 50], [50, 60], [42, 70], [58, 70]])
    landmarks = torch.stack([eyes_nose_mouth + torch.tensor([75.3 * i, 0.37 * i]) for i in range(count)])
    box = torch.tensor([30.0, 35, 70, 80])
    boxes = torch.stack([box + 75.3 * i * torch.tensor([1, 0, 1, 0]) for i in range(count)])
    return Faces(boxes, torch.full((count,), 0.99), landmarks)


@pytest.mark.parametrize("masks", [MaskOptions(), MaskOptions(parser=SplitParser(1, 17)),
                                   MaskOptions(parser=SplitParser(1, 17), source="restored")],
                         ids=["no parser", "parser on the originals", "parser on the restored"])
def test_restore_faces_holds_one_face_batch_of_crops_at_a_time(masks):
    """Faces are cut, restored, parsed and pasted a face batch at a time: the restorer is given crops cut for
    its batch alone, and by the next batch those crops and the faces it handed back are gone (GPEN-2048 on
    the 29 Solvay faces: 1.46 GB for every face's crops)."""
    restorer = ForgetfulRestorer()

    result = gpen.restore_faces(torch.rand(1, 120, 400, 3), restorer, None, faces=[faces_in_a_row()], masks=masks,
                                face_batch=2)

    assert result.face_count == 5
    assert restorer.held_bytes == [2 * 64 * 64 * 3 * 4, 2 * 64 * 64 * 3 * 4, 64 * 64 * 3 * 4]
    assert restorer.alive == [0, 0, 0]


def test_the_most_restore_faces_holds_does_not_grow_with_the_faces():
    """Counted on the tensors themselves (every storage made while it runs): 40 faces cropped at 256 px take
    30 MiB as crops, and as many restored; a run holds a face batch of them, the frame and its masks."""
    restorer = ForgetfulRestorer(256, remember=False)
    frame = torch.rand(1, 120, 3020, 3)  # 4 MiB

    with torch.inference_mode(), LiveStorage() as live:
        result = gpen.restore_faces(frame, restorer, None, faces=[faces_in_a_row(40)], face_batch=2)

    every_crop = 40 * 256 * 256 * 3 * 4
    assert result.face_count == 40
    assert live.peak < every_crop / 2


def test_the_parser_sees_the_very_crops_the_restorer_saw_a_batch_at_a_time():
    restorer, parser = ForgetfulRestorer(), SplitParser(1, 17)
    image = torch.rand(1, 120, 400, 3, generator=torch.Generator().manual_seed(1))

    gpen.restore_faces(image, restorer, None, faces=[faces_in_a_row()], masks=MaskOptions(parser=parser), face_batch=2)

    assert [len(crops) for crops in parser.seen] == [2, 2, 1]
    assert torch.equal(torch.cat(parser.seen), torch.cat(restorer.seen))



@pytest.mark.parametrize("masks", [MaskOptions(), MaskOptions(parser=SplitParser(1, 17)),
                                   MaskOptions(parser=SplitParser(1, 17), temporal_sigma=1.0)],
                         ids=["no parser", "parser", "parser steadied over time"])
def test_a_frame_goes_to_the_faces_device_once_however_many_batches_are_cut_from_it(monkeypatch, masks):
    """With frames on the CPU and networks on a GPU (ComfyUI's way) the frame a face batch is cut from, or a
    face's colours are matched against, is copied to the GPU: once for all its batches and faces, not again
    for each (a 6000x4000 frame is 288 MB). Counted here as the frames made into RGB planes on the device."""
    moved = []
    planes = align.rgb_planes
    monkeypatch.setattr(align, "rgb_planes", lambda image: moved.append(image.shape) or planes(image))

    result = gpen.restore_faces(torch.rand(1, 120, 400, 3), IdentityRestorer(64), None, faces=[faces_in_a_row()],
                                paste=PasteOptions(color_correction=True), masks=masks, face_batch=2)

    assert result.face_count == 5
    assert moved == [(120, 400, 3)]




@pytest.mark.parametrize("color_correction", [False, True])
def test_a_video_frame_goes_to_the_faces_device_once_for_cutting_and_again_for_colour_correction(monkeypatch,
                                                                                                  color_correction):
    """On a video a face batch spans frames: its cut moves each of its frames, and colour correction, which comes
    after the restore, moves them again (one frame is kept on the device, not a batch's)."""
    moved = []
    planes = align.rgb_planes
    monkeypatch.setattr(align, "rgb_planes", lambda image: moved.append(image.shape) or planes(image))

    result = gpen.restore_faces(torch.rand(12, 120, 100, 3), IdentityRestorer(64), None, faces=[faces_in_a_row(1)] * 12,
                                paste=PasteOptions(color_correction=color_correction), face_batch=4)

    assert result.face_count == 12
    assert len(moved) == (24 if color_correction else 12)

@pytest.mark.parametrize("source", ["original", "restored"])
def test_masks_steadied_over_a_video_hold_the_faces_their_smoothing_reaches_not_every_face(source):
    """Steadying parse masks along 40 frames holds, beside what the same run without it holds, the masks (and,
    parsing the restored faces, the restored faces) of the frames within the smoothing's reach of a batch:
    10 of 40 faces' worth at most here, where every face's mask and restored face come to 40 MB."""
    frames = torch.rand(40, 120, 100, 3)

    def most_held(sigma: float) -> int:
        masks = MaskOptions(parser=SplitParser(1, 17, remember=False), source=source, temporal_sigma=sigma)
        with torch.inference_mode(), LiveStorage() as live:
            result = gpen.restore_faces(frames, ForgetfulRestorer(256, remember=False), None,
                                        faces=[faces_in_a_row(1)] * 40, masks=masks, face_batch=2)
        assert result.face_count == 40
        return live.peak

    every_face = 40 * 256 * 256 * 4 * (1 + 3)  # a mask and a restored face each
    assert most_held(1.0) - most_held(0.0) < every_face / 4

@pytest.fixture(scope="module")
def two_group_frames(solvay, detector) -> tuple[torch.Tensor, list[Faces]]:
    """The Solvay photo and the same moved 5 px right, with their 29 faces each."""
    (faces,) = detect_faces(solvay, detector)
    moved = Faces(faces.boxes + torch.tensor([5.0, 0, 5, 0]), faces.scores, faces.landmarks + torch.tensor([5.0, 0]))
    return torch.cat([solvay, solvay.roll(5, 2)]), [faces, moved]


@pytest.mark.parametrize("masks", [MaskOptions(), MaskOptions(parser=SplitParser(1, 17)),
                                   MaskOptions(parser=SplitParser(1, 0, rows=True), source="restored",
                                               temporal_sigma=1.0)],
                         ids=["no parser", "parser", "parser on the restored, steadied over time"])
def test_the_face_batch_changes_nothing_of_the_result(two_group_frames, masks):
    """Overlapping faces take the strongest mask, colours are matched face by face: pasting a batch at a
    time gives, bit for bit, what pasting all 58 faces at once gives."""
    frames, faces = two_group_frames
    paste = PasteOptions(color_correction=True, strength=0.9)
    one, all_at_once = (gpen.restore_faces(frames, IdentityRestorer(64), None, faces=faces, paste=paste, masks=masks,
                                           face_batch=face_batch) for face_batch in (1, 64))

    assert one.face_count == all_at_once.face_count == 58
    assert torch.equal(one.images, all_at_once.images) and torch.equal(one.masks, all_at_once.masks)


def test_a_band_warped_whole_gives_what_a_band_narrowed_to_its_winning_columns_gives(monkeypatch, two_group_frames):
    """On a GPU a band's face is warped over the whole band (finding the columns it wins would wait for the GPU a
    face at a time); where it does not win the frame is kept all the same. The masks are the same bit for bit,
    the faces to float rounding (the crop is sampled from another origin), the rest of the frames bit for bit."""
    frames, faces = two_group_frames
    options = dict(faces=faces, paste=PasteOptions(color_correction=True), masks=MaskOptions(parser=SplitParser(1, 17)))
    narrowed = gpen.restore_faces(frames, IdentityRestorer(64), None, **options)
    monkeypatch.setattr(paste, "NARROWED_ON", ())

    whole = gpen.restore_faces(frames, IdentityRestorer(64), None, **options)

    assert whole.face_count == 58 and torch.equal(whole.masks, narrowed.masks)
    assert torch.allclose(whole.images, narrowed.images, rtol=0, atol=1e-6)
    untouched = whole.masks == 0
    assert torch.equal(whole.images[untouched], frames[untouched])
