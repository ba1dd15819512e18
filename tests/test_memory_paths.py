"""Paste-back works face by face and band by band, so that memory stays near the frame's own; these tests
check that it gives what pasting each face over the whole frame gives, and that the pieces stay small.
The memory itself is measured by `python -m gpen bench --pipeline --memory` (BENCHMARKS.md)."""

import gc
import math
import weakref

import pytest
import torch

import gpen
from gpen.faces import paste, pipeline
from gpen.faces.align import invert_affine, warp, warp_faces
from gpen.faces.detect import Faces
from gpen.faces.options import MaskOptions, PasteOptions
from gpen.faces.paste import MASK_TIE, face_mask, match_color, soften
from tests.helpers import SplitParser


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

    def recorded_warp(image, affine, height, width, mode="bicubic"):
        sizes.append(height * width)
        return warp(image, affine, height, width, mode)

    monkeypatch.setattr(paste, "warp", recorded_warp)
    image = torch.zeros(1, 700, 700, 3)
    white = torch.ones(1, 512, 512, 3)
    big = torch.tensor([similarity(512 / 650, 0, 20, 20)])  # the crop covers 650x650 pixels of the image

    out, masks = gpen.paste_faces(image, white, big)

    assert masks[0, 345, 345] > 0.99 and (out[0, 345, 345] > 0.99).all()
    assert max(sizes) <= paste.PASTE_BAND < 650 * 650


class ForgetfulRestorer:
    """Restores nothing (hands back copies of the crops), remembering the crops only weakly."""

    size = 64

    def __init__(self):
        self.crops = None
        self.seen = []  # copies of the crops it was given

    def restore(self, faces, batch_size=4, on_batch=None):
        self.crops = weakref.ref(faces)
        self.seen.append(faces.clone())
        return faces.clone()


def five_faces() -> Faces:
    """Five faces side by side in a 120x400 frame, at fractional landmark positions."""
    eyes_nose_mouth = torch.tensor([[40.0, 50], [60, 50], [50, 60], [42, 70], [58, 70]])
    landmarks = torch.stack([eyes_nose_mouth + torch.tensor([75.3 * i, 0.37 * i]) for i in range(5)])
    boxes = torch.stack([torch.tensor([30.0, 35, 70, 80]) + 75.3 * i * torch.tensor([1, 0, 1, 0]) for i in range(5)])
    return Faces(boxes, torch.full((5,), 0.99), landmarks)


@pytest.mark.parametrize("parser", [None, SplitParser(1, 17)], ids=["no parser", "parser"])
def test_restore_faces_lets_the_crops_go_before_pasting(monkeypatch, parser):
    """The restored crops are a second set as large as the crops: only one is held while pasting."""
    restorer, held_while_pasting = ForgetfulRestorer(), []

    def paste_and_look(*args, **kwargs):
        gc.collect()
        held_while_pasting.append(restorer.crops() is not None)
        return paste.paste_faces(*args, **kwargs)

    monkeypatch.setattr(pipeline, "paste_faces", paste_and_look)

    result = gpen.restore_faces(torch.rand(1, 120, 400, 3), restorer, None, faces=[five_faces()],
                                masks=MaskOptions(parser=parser))

    assert result.face_count == 5 and held_while_pasting == [False]


def test_the_parser_sees_the_very_crops_the_restorer_saw_a_batch_at_a_time():
    restorer, parser = ForgetfulRestorer(), SplitParser(1, 17)
    image = torch.rand(1, 120, 400, 3, generator=torch.Generator().manual_seed(1))

    gpen.restore_faces(image, restorer, None, faces=[five_faces()], masks=MaskOptions(parser=parser), face_batch=2)

    assert [len(crops) for crops in parser.seen] == [2, 2, 1]
    assert torch.equal(torch.cat(parser.seen), torch.cat(restorer.seen))


def test_restored_batches_are_written_over_the_crops_they_came_from(solvay, detector):
    """The restored faces never sit beside the whole set of crops on the device (GPEN-2048 on the 29 Solvay
    faces: 1.46 GB a set): each face batch is written over its crops once restored."""
    seen = []

    class Watching:
        size = 64

        def restore(self, faces, batch_size=4, on_batch=None):
            crops = faces._base  # the whole set of crops this batch is a view of
            seen.append(int((crops == 0.25).all(dim=(1, 2, 3)).sum()))  # batches already written over
            if on_batch is not None:
                on_batch(len(faces), len(faces))
            return torch.full_like(faces, 0.25)

    result = gpen.restore_faces(solvay, Watching(), detector, face_batch=8)
    assert result.face_count == 29 and seen == [0, 8, 16, 24]
