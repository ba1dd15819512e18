"""Alignment, paste-back and restore_faces end to end, with an identity restorer standing in for GPEN."""

import cv2
import numpy as np
import pytest
import torch

import gpen
import gpen.faces.restore
from gpen import PasteOptions, SelectOptions
from gpen.faces.align import GPEN_TEMPLATE, template_points
from gpen.faces.detect import Faces
from gpen.faces.paste import face_mask, soften
from gpen.faces.pipeline import smooth_landmarks
from tests.helpers import GreyRestorer, IdentityRestorer, psnr, random_gpen


def test_gpen_template_is_the_one_gpen_was_trained_with():
    expected = [[0.394611, 0.474383], [0.604356, 0.473223], [0.50015, 0.59367],
                [0.413984, 0.716461], [0.587678, 0.715501]]
    assert np.allclose(GPEN_TEMPLATE, expected, atol=1e-6)


@pytest.mark.parametrize("template", ["gpen", "ffhq"])
def test_crops_put_the_landmarks_on_the_template_like_cv2(solvay, reference_faces, template):
    landmarks = reference_faces["landmarks"][:4]
    crops, affines = gpen.crop_faces(solvay, landmarks, 256, template=template)
    assert crops.shape == (4, 256, 256, 3) and affines.shape == (4, 2, 3)
    on_crop = landmarks @ affines[:, :, :2].transpose(1, 2) + affines[:, None, :, 2]
    target = template_points(256, template).float()
    assert (on_crop.mean(1) - target.mean(0)).abs().max() < 1e-3  # least squares: centroids coincide
    assert (on_crop - target).norm(dim=-1).max() < 0.03 * 256
    image = solvay[0].numpy()
    for crop, affine in zip(crops, affines):
        expected = cv2.warpAffine(image, affine.double().numpy(), (256, 256), flags=cv2.INTER_CUBIC)
        assert np.abs(crop.numpy() - expected.clip(0, 1)).max() < 1e-3


def test_crops_of_a_batch_come_from_their_own_frames(solvay, reference_faces):
    frames = torch.cat([solvay, solvay.flip(2)])
    landmarks = reference_faces["landmarks"][:2]
    crops, _ = gpen.crop_faces(frames, landmarks, 128, frames=torch.tensor([0, 1]))
    alone, _ = gpen.crop_faces(frames[1:], landmarks[1:], 128)
    assert torch.equal(crops[1], alone[0])
    with pytest.raises(ValueError, match="frames must say"):
        gpen.crop_faces(frames, landmarks, 128)


def test_small_faces_are_softened_by_gpens_3x3_kernel():
    crops = torch.rand(2, 3, 16, 20)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    padded = torch.nn.functional.pad(crops, (1, 1, 1, 1), mode="reflect")
    assert torch.allclose(soften(crops), torch.nn.functional.conv2d(padded, kernel, groups=3), atol=1e-6)


def test_identity_restoration_gives_the_image_back(solvay, detector):
    result = gpen.restore_faces(solvay, IdentityRestorer(), detector)
    assert result.face_count == 29 and result.summary == ("restored 29 face(s) in 1 image(s); "
                                                             "faces cover ~78 px at the output (median of 29); "
                                                             "GPEN-BFR-256 fits them")  # not the 512 restorer
    assert psnr(result.images, solvay) >= 34
    away = result.masks[0] == 0
    assert away.float().mean() > 0.5 and torch.equal(result.images[0][away], solvay[0][away])
    assert result.masks.shape == (1, *solvay.shape[1:3]) and result.masks.max() <= 1


def test_faces_of_all_frames_are_restored_in_shared_batches(solvay, detector):
    restorer = IdentityRestorer()
    seen = []
    result = gpen.restore_faces(torch.cat([solvay, solvay]), restorer, detector, face_batch=16,
                                progress=lambda done, total: seen.append((done, total)))
    assert restorer.batches == [16, 16, 16, 10] and seen[-1] == (58, 58)
    assert result.info.frames.tolist() == [0] * 29 + [1] * 29


def test_cancel_stops_between_batches(solvay, detector):
    asked = []
    with pytest.raises(gpen.Cancelled):
        gpen.restore_faces(solvay, IdentityRestorer(), detector, face_batch=8,
                           cancel=lambda: asked.append(1) or len(asked) > 2)
    assert len(asked) == 3


def test_a_real_gpen_restores_every_face(solvay, detector):
    model = random_gpen(64, 1, 0.125)
    result = gpen.restore_faces(solvay[:, :300, :600], model, detector)
    assert result.face_count > 5 and result.images.shape == (1, 300, 600, 3)
    assert (result.images - solvay[:, :300, :600]).abs().amax() > 0.1


def test_an_image_without_faces_comes_back_unchanged(detector):
    sky = torch.linspace(0, 1, 200 * 300 * 3).reshape(1, 200, 300, 3)
    result = gpen.restore_faces(sky, IdentityRestorer(), detector)
    assert torch.equal(result.images, sky) and result.masks.abs().max() == 0
    assert result.summary == "no face found; images returned unchanged"


@pytest.mark.parametrize("images", [
    torch.zeros(0, 64, 64, 3),  # empty batch
    torch.rand(1, 8, 8, 3),  # tiny
    torch.rand(2, 1, 1, 3),
], ids=["empty", "tiny", "one-pixel"])
def test_degenerate_batches(detector, images):
    result = gpen.restore_faces(images, IdentityRestorer(), detector)
    assert torch.equal(result.images, images) and result.masks.shape == images.shape[:3]


def test_grayscale_and_rgba_keep_their_channels(solvay, detector):
    gray = solvay.mean(-1, keepdim=True)
    result = gpen.restore_faces(gray, IdentityRestorer(), detector)
    assert result.images.shape == gray.shape and result.face_count > 20
    rgba = torch.cat([solvay, torch.full_like(solvay[..., :1], 0.5)], -1)
    result = gpen.restore_faces(rgba, IdentityRestorer(), detector)
    assert result.images.shape == rgba.shape and torch.equal(result.images[..., 3], rgba[..., 3])


def test_out_of_range_and_float64_inputs(solvay, detector):
    loud = solvay.double() * 1.5 - 0.2
    result = gpen.restore_faces(loud, IdentityRestorer(), detector)
    assert result.images.dtype == torch.float64 and result.face_count > 0


def test_faces_cut_by_the_frame_edge_still_restore(solvay, detector, reference_faces):
    x0 = int(reference_faces["boxes"][0, 0] + 12)  # through the first face
    cut = solvay[:, :, x0:x0 + 300]
    result = gpen.restore_faces(cut, IdentityRestorer(), detector, select=SelectOptions(threshold=0.3))
    edge_faces = result.faces[0].boxes[:, 0] < 0
    assert edge_faces.any()
    assert psnr(result.images, cut) >= 34


def test_overlapping_faces_are_not_blended_twice():
    image = torch.full((1, 100, 100, 3), 0.5)
    affine = torch.tensor([[[1.0, 0, -10], [0, 1.0, -10]]]).repeat(2, 1, 1)
    restored = torch.stack([torch.ones(64, 64, 3), torch.zeros(64, 64, 3)])
    out, mask = gpen.paste_faces(image, restored, affine, torch.tensor([0, 0]), PasteOptions(smooth_small_faces=False))
    centre = out[0, 42, 42]
    assert mask[0, 42, 42] == 1 and (torch.equal(centre, torch.ones(3)) or torch.equal(centre, torch.zeros(3)))


def test_strength_and_mask_shapes():
    image = torch.zeros(1, 100, 100, 3)
    affine = torch.tensor([[[1.0, 0, -10], [0, 1.0, -10]]])
    white = torch.ones(1, 64, 64, 3)
    half, mask = gpen.paste_faces(image, white, affine, options=PasteOptions(strength=0.5, smooth_small_faces=False))
    assert torch.allclose(half[0, 42, 42], torch.full((3,), 0.5)) and mask[0, 42, 42] == 0.5
    box, ellipse = face_mask(64, "box"), face_mask(64, "ellipse")
    assert box[2, 2] < 0.01 and box[32, 32] > 0.99 and ellipse[8, 8] < 0.01 and ellipse[32, 32] > 0.99
    with pytest.raises(ValueError, match="mask shape"):
        face_mask(64, "star")


def test_colour_correction_pulls_a_tinted_face_back(solvay, reference_faces):
    crops, affines = gpen.crop_faces(solvay, reference_faces["landmarks"][:3], 256)
    tinted = (crops + torch.tensor([0.3, -0.1, 0.0])).clamp(0, 1)
    plain, masks = gpen.paste_faces(solvay, tinted, affines)
    corrected, _ = gpen.paste_faces(solvay, tinted, affines, options=PasteOptions(color_correction=True))
    face = masks[0] > 0.99
    error = lambda x: (x[0][face].mean(0) - solvay[0][face].mean(0)).abs().sum()
    assert error(corrected) < error(plain) / 3


def test_selection_by_size_order_index_and_count(solvay, detector):
    (faces,) = detector.detect(solvay)
    left_to_right = gpen.select_faces(faces, SelectOptions(order="left-right"))
    assert left_to_right.boxes[:, 0].tolist() == sorted(left_to_right.boxes[:, 0].tolist())
    largest = gpen.select_faces(faces, SelectOptions(order="largest", max_faces=3))
    areas = (faces.boxes[:, 2:] - faces.boxes[:, :2]).prod(1)
    assert len(largest) == 3 and torch.allclose((largest.boxes[:, 2:] - largest.boxes[:, :2]).prod(1),
                                                areas.sort(descending=True).values[:3])
    picked = gpen.select_faces(faces, SelectOptions(order="left-right", indices="0,2,99"))
    assert torch.equal(picked.boxes, left_to_right.boxes[[0, 2]])
    assert len(gpen.select_faces(faces, SelectOptions(min_size=1000))) == 0
    with pytest.raises(ValueError, match="comma-separated"):
        SelectOptions(indices="first")


def jitter(points: torch.Tensor) -> float:
    """Mean distance of each frame's landmarks from the midpoint of its neighbours'."""
    return float((points[1:-1] - (points[:-2] + points[2:]) / 2).norm(dim=-1).mean())


def test_temporal_smoothing_steadies_landmarks_of_a_moving_face():
    torch.manual_seed(0)
    steps = torch.arange(30, dtype=torch.float32)
    base = torch.tensor(GPEN_TEMPLATE) * 100
    truth = base[None] + torch.stack([steps * 2.0, steps * 0.5], -1)[:, None]  # drifting right and down
    noisy = truth + torch.randn_like(truth) * 1.5
    frames = [Faces(torch.tensor([[p[:, 0].min() - 20, p[:, 1].min() - 30, p[:, 0].max() + 20,
                                   p[:, 1].max() + 20]]), torch.ones(1), p[None]) for p in noisy]
    smoothed = torch.stack([f.landmarks[0] for f in smooth_landmarks(frames, sigma=2.0)])
    assert jitter(smoothed) < jitter(noisy) / 3
    assert (smoothed - truth)[3:-3].norm(dim=-1).mean() < (noisy - truth).norm(dim=-1).mean()


def test_temporal_smoothing_on_faces_the_detector_found_in_a_panning_shot(solvay, detector):
    from gpen.faces.align import warp

    steps = torch.arange(20, dtype=torch.float64)
    pan = torch.stack([steps * 1.37, steps * 0.53], -1)  # px per frame, sub-pixel on purpose
    affines = torch.tensor([[2.0, 0, -1120], [0, 2.0, -200]], dtype=torch.float64).repeat(20, 1, 1)
    affines[:, :, 2] += pan
    video = warp(solvay[0].permute(2, 0, 1), affines, 360, 480).permute(0, 2, 3, 1).contiguous()
    found = [gpen.select_faces(f, SelectOptions(order="left-right")) for f in detector.detect(video)]
    assert {len(f) for f in found} == {4}
    smoothed = smooth_landmarks(found, sigma=2.0)

    def track_errors(faces):
        points = torch.stack([f.landmarks for f in faces])  # (T, faces, 5, 2)
        off_track = points - pan[:, None, None].float()
        off_track = off_track - off_track.mean(0)
        return jitter(points), float(off_track.norm(dim=-1).mean())

    (jitter_before, error_before), (jitter_after, error_after) = track_errors(found), track_errors(smoothed)
    assert jitter_after < jitter_before / 3 and error_after < error_before




class BrokenRestorer(IdentityRestorer):
    """Gives NaN for every other face, as NaN weights or an fp16 overflow would."""

    def restore(self, faces, batch_size=4, on_batch=None):
        out = super().restore(faces, batch_size, on_batch)
        out[::2] = float("nan")
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_every_pixel_outside_the_masks_comes_back_bit_identical(solvay, detector, dtype):
    sky = torch.linspace(-0.2, 1.3, 568 * 1328 * 3).reshape(1, 568, 1328, 3)  # out of range on purpose
    frames = torch.cat([solvay * 1.2 - 0.1, sky]).to(dtype)
    result = gpen.restore_faces(frames, GreyRestorer(), detector)
    assert result.images.dtype == dtype and result.face_count == 29
    assert torch.equal(result.images[1], frames[1])  # the frame without faces, whole
    outside = result.masks == 0
    assert torch.equal(result.images[outside], frames[outside])
    inside = result.masks > 0.99
    assert (result.images[inside].float() - 0.5).abs().max() < 1e-2


def test_repeated_indices_restore_a_face_once_and_missing_ones_are_reported(solvay, detector):
    restorer = IdentityRestorer()
    result = gpen.restore_faces(solvay, restorer, detector, select=SelectOptions(indices=",".join(["0"] * 500)))
    assert result.face_count == 1 and sum(restorer.batches) == 1
    result = gpen.restore_faces(solvay, IdentityRestorer(), detector, select=SelectOptions(indices="999"))
    assert result.face_count == 0
    assert result.summary == "no face restored; indices 999: only 29 face(s) found; images returned unchanged"


def test_faces_under_min_size_are_reported():
    faces = Faces(torch.tensor([[0, 0, 40, 40.0]]), torch.ones(1), torch.zeros(1, 5, 2))
    selection = gpen.faces.pipeline.Selection()
    assert len(gpen.select_faces(faces, SelectOptions(min_size=256), selection)) == 0
    assert selection.notes() == ["1 face(s) found smaller than min_size 256"]


def test_faces_the_restorer_could_not_restore_are_left_alone_and_reported(solvay, detector, caplog):
    result = gpen.restore_faces(solvay, BrokenRestorer(), detector)
    assert result.face_count == 14 and result.images.isfinite().all()
    assert result.summary == ("restored 14 face(s) in 1 image(s); 15 face(s) left unrestored: the restorer's "
                              "output was not finite (NaN or Inf); faces cover ~78 px at the output (median of 29); "
                              "GPEN-BFR-256 fits them")
    assert "not finite" in caplog.text


def test_cancel_is_asked_during_detection(solvay, detector):
    asked = []
    with pytest.raises(gpen.Cancelled):
        gpen.restore_faces(solvay.expand(12, -1, -1, -1), IdentityRestorer(), detector,
                           cancel=lambda: asked.append(1) or len(asked) > 2)
    assert len(asked) == 3  # the batch start, then before each frame on the CPU: stopped before restoring


@pytest.mark.parametrize("shape", [(1, 32, 100000, 3), (1, 0, 0, 3), (3, 40, 5000, 1)])
def test_extreme_shapes_come_back_unchanged(detector, shape):
    images = torch.rand(shape)
    result = gpen.restore_faces(images, IdentityRestorer(), detector)
    assert torch.equal(result.images, images) and result.masks.shape == shape[:3]


def test_a_long_forward_on_the_cpu_is_cancelled_between_its_layers(solvay, detector, monkeypatch):
    monkeypatch.setattr(gpen.faces.restore, "CANCEL_CHECK_SECONDS", 0.0)
    asked = []
    with pytest.raises(gpen.Cancelled):
        gpen.restore_faces(solvay, random_gpen(64, 1, 0.125), detector, face_batch=29,
                           cancel=lambda: asked.append(1) or len(asked) > 12)
    assert len(asked) == 13  # one batch of all 29 faces, stopped inside its forward


def swap(image, crops, info, faces, source: int, tint=None):
    """A face swap as ReActor makes one: faces `faces` replaced by face `source`'s crop (optionally tinted),
    pasted with the pack's own functions inside an oval around the face."""
    new = crops[source].expand(len(faces), -1, -1, -1) if tint is None else (crops[faces] + torch.tensor(tint)).clamp(0, 1)
    pasted, _ = gpen.paste_faces(image, new, info.affines[faces], info.frames[faces],
                                 PasteOptions(mask_shape="ellipse", erode=0.2))
    return pasted


def test_after_a_swap_only_the_swapped_faces_are_restored(solvay, detector):
    crops, info = gpen.locate_faces(solvay, detector, 512)
    swapped_faces = torch.tensor([3, 11, 20])
    swapped = swap(solvay, crops, info, swapped_faces, source=0)
    result = gpen.restore_faces(swapped, GreyRestorer(), detector, select=SelectOptions(changed_from=solvay))
    assert result.summary.startswith("3 of 29 faces changed; restored 3 face(s) in 1 image(s); faces cover")
    restored_centres = result.faces[0].boxes[:, :2]
    assert torch.allclose(restored_centres.sort(0).values, info.faces[0].boxes[swapped_faces, :2].sort(0).values, atol=6)
    outside = result.masks == 0
    assert torch.equal(result.images[outside], swapped[outside])  # no other pixel changes


def test_a_slight_colour_change_is_not_a_changed_face(solvay, detector):
    crops, info = gpen.locate_faces(solvay, detector, 512)
    tinted = swap(solvay, crops, info, torch.tensor([5]), source=5, tint=[0.03, 0.0, -0.03])  # ~8/255, as a VAE shifts
    result = gpen.restore_faces(tinted, GreyRestorer(), detector, select=SelectOptions(changed_from=solvay))
    assert result.summary == "0 of 29 faces changed; no face restored; images returned unchanged"
    assert torch.equal(result.images, tinted)


def test_frames_where_nothing_changed_pass_through_whole(solvay, detector):
    crops, info = gpen.locate_faces(solvay, detector, 512)
    before = torch.cat([solvay, solvay, solvay])
    after = torch.cat([solvay, swap(solvay, crops, info, torch.tensor([8]), source=1), solvay])
    result = gpen.restore_faces(after, GreyRestorer(), detector, select=SelectOptions(changed_from=before))
    assert [len(f) for f in result.faces] == [0, 1, 0]
    assert torch.equal(result.images[0], solvay[0]) and torch.equal(result.images[2], solvay[0])
    one_for_all = SelectOptions(changed_from=solvay)  # one frame before the swap, for every frame
    single = gpen.restore_faces(after, GreyRestorer(), detector, select=one_for_all)
    assert [len(f) for f in single.faces] == [0, 1, 0]


def test_the_image_before_the_swap_must_match_in_size(solvay, detector):
    with pytest.raises(ValueError, match="before the swap is 1 frame\\(s\\) of 600x300, but the images are 1 frame\\(s\\) of 1328x568"):
        gpen.restore_faces(solvay, GreyRestorer(), detector, select=SelectOptions(changed_from=solvay[:, :300, :600]))


def test_where_two_faces_overlap_fully_one_of_them_takes_every_pixel():
    image = torch.full((1, 200, 200, 3), 0.5)
    nearly_the_same = torch.tensor([[[1.3, 0.2, -30], [-0.2, 1.3, -25]], [[1.3, 0.2, -30.013], [-0.2, 1.3, -24.987]]])
    faces = torch.stack([torch.ones(128, 128, 3), torch.zeros(128, 128, 3)])
    out, masks = gpen.paste_faces(image, faces, nearly_the_same, torch.tensor([0, 0]),
                                  PasteOptions(smooth_small_faces=False))
    inside = masks[0] > 0.999
    assert inside.sum() > 5000 and (out[0][inside] > 0.99).all()  # float rounding lets no black spot through


def test_the_two_halves_give_what_restore_faces_gives(solvay, detector):
    """locate_faces, any restorer, then paste_restored (the modular nodes' chain): the crops are cut
    again from the image for the parser, and a face restored as NaN is left as it was."""
    from gpen import MaskOptions
    from tests.helpers import SplitParser

    masks = MaskOptions(parser=SplitParser(17, 1, rows=True))
    whole = gpen.restore_faces(solvay, GreyRestorer(), detector, masks=masks)
    crops, info = gpen.locate_faces(solvay, detector, 512)
    halves = gpen.paste_restored(solvay, GreyRestorer().restore(crops), info, masks=masks)
    assert torch.equal(halves.images, whole.images) and torch.equal(halves.masks, whole.masks)
    broken = GreyRestorer().restore(crops)
    broken[:2] = float("nan")
    result = gpen.paste_restored(solvay, broken, info)
    assert result.unrestored == 2 and result.face_count == 27 and result.images.isfinite().all()
    with pytest.raises(ValueError, match="28 restored crops for 29 detected faces"):
        gpen.paste_restored(solvay, broken[1:], info)


def test_a_stream_takes_no_changed_from(solvay, detector):
    with pytest.raises(ValueError, match="restore_frames takes no changed_from"):
        next(gpen.restore_frames(iter(solvay), IdentityRestorer(), detector, select=SelectOptions(changed_from=solvay)))


def faces_at(landmarks: torch.Tensor) -> list[Faces]:
    """The faces of one frame, each at `landmarks` (N, K, 2), in a box of 20-80 px."""
    return [Faces(torch.tensor([[20.0, 20, 80, 80]]).expand(len(landmarks), -1), torch.ones(len(landmarks)), landmarks)]


EYES_NOSE_MOUTH = torch.tensor([[[40.0, 45], [60, 45], [50, 55], [43, 65], [57, 65]]])


def test_a_restorer_that_gives_another_count_of_faces_is_refused_not_pasted_short():
    class DropsOne(IdentityRestorer):
        def restore(self, faces, batch_size=4, on_batch=None):
            return super().restore(faces, batch_size, on_batch)[1:]

    with pytest.raises(ValueError, match=r"the restorer gave \(1, 64, 64, 3\) for 2 faces"):
        gpen.restore_faces(torch.rand(1, 100, 100, 3), DropsOne(64), None,
                           faces=faces_at(EYES_NOSE_MOUTH.expand(2, -1, -1)))


def test_faces_given_with_landmarks_of_another_shape_are_refused_by_name():
    with pytest.raises(ValueError, match=r"landmarks must be \(N, 5, 2\), got shape \(1, 68, 2\)"):
        gpen.restore_faces(torch.rand(1, 100, 100, 3), IdentityRestorer(64), None, faces=faces_at(torch.rand(1, 68, 2)))


@pytest.mark.parametrize("face_batch", [0, -1])
def test_a_face_batch_under_one_is_refused(face_batch):
    image, faces = torch.rand(1, 100, 100, 3), faces_at(EYES_NOSE_MOUTH)
    with pytest.raises(ValueError, match="face_batch must be 1 or more"):
        gpen.restore_faces(image, IdentityRestorer(64), None, faces=faces, face_batch=face_batch)
    crops, info = gpen.locate_faces(image, None, 64, faces=faces)
    with pytest.raises(ValueError, match="face_batch must be 1 or more"):
        gpen.paste_restored(image, crops, info, face_batch=face_batch)
