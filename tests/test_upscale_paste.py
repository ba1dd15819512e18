"""Restore and upscale: faces found in the image, pasted into the same picture at a larger size
(PasteOptions.background, or the image enlarged by PasteOptions.upscale_by)."""

import math
import re

import cv2
import numpy as np
import pytest
import torch

import gpen
from gpen import PasteOptions
from gpen.apps.video import probe_video
from gpen.faces.align import GPEN_TEMPLATE
from gpen.faces.detect import Faces
from gpen.faces.paste import resize_frames
from gpen.faces.pipeline import model_fit
from gpen.files.images import read_image, write_image
from tests import test_cli
from tests.helpers import IdentityRestorer
from tests.test_cli import gpen64  # noqa: F401 (a fixture)
from tests.test_nodes import load_models, models_dir, pack  # noqa: F401 (fixtures)
from tests.test_video import audio_packets, make_clip


def blobs(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A picture of sharp Gaussian dots (1,H,W,3) sampled at pixel centres: the same picture at any size,
    as resizing an ideal source would give it."""
    generator = torch.Generator().manual_seed(seed)
    centres, amounts = torch.rand(400, 2, generator=generator, dtype=torch.float64), \
        torch.rand(3, 400, generator=generator, dtype=torch.float64)
    sigma = 0.012  # of the side: 1.5 px at 128, still sampled well there

    def along(n, c):
        return torch.exp(-((torch.arange(n, dtype=torch.float64) + 0.5) / n - c[:, None]).square() / (2 * sigma ** 2))

    image = torch.einsum("kh,ck,kw->hwc", along(height, centres[:, 1]), amounts, along(width, centres[:, 0]))
    return (image / image.amax()).float()[None]


def one_face(size: float, x: float, y: float) -> list[Faces]:
    """A face whose crop covers `size` pixels from (x, y), as a detector would have found it."""
    landmarks = torch.tensor(GPEN_TEMPLATE, dtype=torch.float32) * size + torch.tensor([x, y])
    return [Faces(torch.tensor([[x, y, x + size, y + size]]), torch.ones(1), landmarks[None])]


def restore(images, faces, **paste):
    return gpen.restore_faces(images, IdentityRestorer(256), None, faces=faces, paste=PasteOptions(**paste))


def shift_between(moved: np.ndarray, still: np.ndarray) -> float:
    """How far `moved` lies from `still` (two grey pictures), in pixels: the shift that best maps one onto
    the other, by least squares on the gradients (Lucas-Kanade), refined a few times."""
    still = still.astype(np.float32)
    shift = np.zeros(2)
    ys, xs = np.mgrid[:still.shape[0], :still.shape[1]].astype(np.float32)
    for _ in range(5):
        shifted = cv2.remap(still, (xs - shift[0]).astype(np.float32), (ys - shift[1]).astype(np.float32),
                            cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        dy, dx = np.gradient(shifted)
        inner = (slice(4, -4), slice(4, -4))  # away from the borders the shift brings in
        gradients = np.stack([dx[inner].ravel(), dy[inner].ravel()], 1)
        step, *_ = np.linalg.lstsq(gradients, (shifted - moved)[inner].ravel(), rcond=None)
        shift += step
    return float(np.hypot(*shift))


def test_a_background_gives_the_output_its_size_and_its_pixels_outside_the_masks():
    images, background = blobs(96, 128), blobs(240, 320, seed=1)  # 2.5x, another picture to tell them apart
    result = restore(images, one_face(80, 30, 8), background=background)
    assert result.images.shape == background.shape and result.masks.shape == background.shape[:3]
    outside = result.masks == 0
    assert torch.equal(result.images[outside], background[outside]) and outside.float().mean() < 0.9
    assert result.face_count == 1


def test_upscale_by_enlarges_the_image_with_lanczos_and_pastes_into_it():
    images = blobs(96, 128)
    result = restore(images, one_face(80, 30, 8), upscale_by=1.5)
    assert result.images.shape == (1, 144, 192, 3) and result.masks.shape == (1, 144, 192)
    enlarged = cv2.resize(images[0].numpy(), (192, 144), interpolation=cv2.INTER_LANCZOS4).clip(0, 1)
    outside = result.masks[0] == 0
    assert np.array_equal(result.images[0][outside].numpy(), enlarged[outside.numpy()])


@pytest.mark.parametrize("scale", [2, 3.5, 4])
def test_a_pasted_face_registers_to_the_background_within_half_an_output_pixel(scale):
    images = blobs(128, 128)
    side = round(128 * scale)
    background = blobs(side, side)
    result = restore(images, one_face(100, 14, 10), background=background)
    inside = (result.masks[0] > 0.99).nonzero()
    (y0, x0), (y1, x1) = inside.amin(0).tolist(), inside.amax(0).tolist()
    pasted, expected = (picture[0, y0:y1, x0:x1].mean(-1).numpy() for picture in (result.images, background))
    error = shift_between(pasted, expected)
    print(f"registration error at {scale}x: {error:.3f} output px")
    assert error < 0.5
    assert abs(shift_between(pasted, np.roll(expected, 1, axis=1)) - 1) < 0.25  # the measure sees a pixel


@pytest.mark.parametrize("background, refusal", [
    (blobs(96, 150), "background is 150x96, the images 128x64: background must have their aspect"),
    (blobs(32, 64), "background is 64x32, the images 128x64: background must be the same picture at a larger"),
    (blobs(128, 256).expand(2, -1, -1, -1), "background has 2 frame(s) but the images have 1"),
])
def test_a_background_that_is_not_the_image_larger_is_refused_by_name(background, refusal):
    with pytest.raises(ValueError, match=re.escape(refusal)) as refused:
        restore(blobs(64, 128), one_face(40, 40, 10), background=background)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("upscale_by", [math.nan, 0, 9])
def test_upscale_by_out_of_range_is_refused_by_name(upscale_by):
    with pytest.raises(ValueError, match=r"^upscale_by must be more than 0 and at most 8, got") as refused:
        PasteOptions(upscale_by=upscale_by)
    assert "\n" not in str(refused.value)


def test_a_background_and_an_upscale_are_not_both_taken():
    with pytest.raises(ValueError, match="background and upscale 2 both make the larger picture: give one"):
        PasteOptions(background=blobs(64, 64), upscale_by=2)


def test_resize_frames_keeps_channels_dtype_and_a_flat_picture():
    grey = torch.full((2, 10, 12, 1), 0.25, dtype=torch.float16)
    for size in ((25, 30), (5, 6)):  # enlarged (Lanczos) and shrunk (pixel areas)
        resized = resize_frames(grey, size)
        assert resized.shape == (2, *size, 1) and resized.dtype == torch.float16
        assert torch.equal(resized, torch.full_like(resized, 0.25))


def test_paste_faces_back_takes_the_image_at_twice_the_size(pack):  # noqa: F811
    images, background = blobs(96, 128), blobs(192, 256)
    crops, info = gpen.locate_faces(images, None, 256, faces=one_face(80, 30, 8))
    image, mask, _ = pack.NODE_CLASS_MAPPINGS["GPENPasteFacesBack"]().paste(
        background, crops, info, strength=1.0, mask_shape="box", feather=0.01, erode=0.05, color_correction=False)
    assert image.shape == background.shape and mask.shape == background.shape[:3]
    same = restore(images, one_face(80, 30, 8), background=background, feather=0.01, erode=0.05)
    assert torch.equal(image, same.images) and torch.equal(mask, same.masks)
    with pytest.raises(ValueError, match="the faces were found in"):
        pack.NODE_CLASS_MAPPINGS["GPENPasteFacesBack"]().paste(
            blobs(100, 256), crops, info, strength=1.0, mask_shape="box", feather=0.01, erode=0.05,
            color_correction=False)


def test_the_all_in_one_node_restores_into_a_background_or_upscales(pack, models_dir, solvay):  # noqa: F811
    model, detector = load_models(pack)
    photo = solvay[:, :200, :400]
    options = dict(face_batch=8, threshold=0.5, min_size=0, max_faces=2, order="largest", indices="",
                   temporal_smoothing=0.0, strength=1.0, mask_shape="box", feather=0.02, erode=0.05,
                   color_correction=False)
    node = pack.NODE_CLASS_MAPPINGS["GPENFaceRestore"]()
    background = resize_frames(photo, (400, 800))
    image, mask, _ = node.restore(photo, model, detector, **options, background=background)
    assert image.shape == (1, 400, 800, 3) and mask.shape == (1, 400, 800) and mask.amax() > 0.99
    assert torch.equal(image[mask == 0], background[mask == 0])
    image, mask, _ = node.restore(photo, model, detector, **options, upscale_by=1.5)
    assert image.shape == (1, 300, 600, 3) and mask.shape == (1, 300, 600) and mask.amax() > 0.99


def test_small_faces_are_softened_by_their_size_in_the_output():
    """A face 40 px wide in the image (a crop of 80) is softened as GPEN does; enlarged 4x it is 160 px
    wide where it is pasted, and pasted as restored."""
    images, faces = blobs(96, 128), one_face(80, 30, 8)
    for upscale_by, softened in ((1, True), (4, False)):
        plain = restore(images, faces, upscale_by=upscale_by, smooth_small_faces=False).images
        assert torch.equal(restore(images, faces, upscale_by=upscale_by).images, plain) != softened


def test_the_cli_upscales_a_photo(shared, gpen64, tmp_path):  # noqa: F811
    photo = tmp_path / "photo.png"
    write_image(photo, read_image(shared / "images" / "solvay_1927.png")[0][:200, :400, :3])
    done = test_cli.restore(shared, gpen64, photo, "-o", tmp_path / "out", "--max-faces", 2, "--upscale", 2)
    assert done.returncode == 0, done.stderr
    assert read_image(tmp_path / "out" / "photo.png")[0].shape == (400, 800, 3)


def test_a_background_is_refused_for_a_video_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="a background is one picture per frame, held in memory; a video is streamed"):
        gpen.restore_video(tmp_path / "absent.mp4", tmp_path / "out.mp4", None, None,
                           paste=PasteOptions(background=blobs(64, 64)))
    assert not (tmp_path / "out.mp4").exists()


@pytest.fixture(scope="module")
def upscaler(shared):
    return gpen.load_upscaler(shared / "fixtures" / "srvgg_x4_random.pth", device="cpu")


def test_an_upscaler_makes_the_background_at_its_own_scale_or_the_one_asked(upscaler):
    images, faces = blobs(48, 64), one_face(40, 12, 4)
    own = restore(images, faces, upscaler=upscaler)
    network = upscaler.upscale(images)
    assert own.images.shape == (1, 192, 256, 3) and own.masks.amax() > 0.99
    assert torch.equal(own.images[own.masks == 0], network[own.masks == 0])
    asked = restore(images, faces, upscaler=upscaler, upscale_by=2.5)  # 4x, then resized down to 2.5x
    assert asked.images.shape == (1, 120, 160, 3)
    assert torch.equal(asked.images[asked.masks == 0], resize_frames(network, (120, 160))[asked.masks == 0])


def test_an_output_over_max_megapixels_is_refused_before_any_work():
    class Untouchable:  # a detector and a restorer that must not be reached
        size = 512

        def __getattr__(self, name):
            raise AssertionError(f"{name} was reached")

    with pytest.raises(ValueError, match=r"^the output would be 2048x1536, 3 megapixels, over max_megapixels 2"):
        gpen.restore_faces(blobs(192, 256), Untouchable(), Untouchable(), paste=PasteOptions(upscale_by=8,
                                                                                           max_megapixels=2))


@pytest.mark.parametrize("tile", [8, 4096, 1.5])
def test_a_huge_or_odd_tile_is_refused_by_name(tile):
    with pytest.raises(ValueError, match=r"^tile must be between 16 and 1024, got"):
        PasteOptions(tile=tile)


def test_the_summary_says_which_gpen_fits_the_faces_at_the_output():
    assert model_fit([735], 2048) == "faces cover ~735 px at the output; GPEN-BFR-1024 fits them"
    assert model_fit([300, 1500, 1400], 512) == "faces cover ~1400 px at the output (median of 3); GPEN-BFR-1024 fits them"
    assert model_fit([4500], 2048) == "faces cover ~4500 px at the output, more than GPEN-BFR-2048, the largest, restores"
    assert model_fit([600], 512) is None and model_fit([40], 256) is None and model_fit([], 512) is None
    images = blobs(96, 128)
    result = gpen.restore_faces(images, IdentityRestorer(256), None, faces=one_face(64, 30, 8),
                                paste=PasteOptions(upscale_by=4))  # the crop covers 64 px, 256 at the output
    assert "at the output" not in result.summary
    result = gpen.restore_faces(images, IdentityRestorer(1024), None, faces=one_face(64, 30, 8),
                                paste=PasteOptions(upscale_by=4))
    assert result.summary == "restored 1 face(s) in 1 image(s); faces cover ~256 px at the output; GPEN-BFR-256 fits them"


def test_the_cli_upscales_a_folder_and_a_clip_with_audio_through_an_upscaler(shared, gpen64, tmp_path):  # noqa: F811
    inputs = tmp_path / "in"
    inputs.mkdir()
    photo = np.ascontiguousarray(read_image(shared / "images" / "solvay_1927.png")[0][:200, :400, :3])
    write_image(inputs / "a.png", photo)
    write_image(inputs / "b.jpg", photo[:, ::-1])
    clip = make_clip(inputs / "clip.mp4", (photo * 255).round().astype(np.uint8), frames=6, size=(320, 200))
    upscaler_file = shared / "fixtures" / "srvgg_x4_random.pth"
    done = test_cli.restore(shared, gpen64, inputs, "-o", tmp_path / "out", "--upscaler", upscaler_file,
                            "--upscale", 2, "--tile", 64)
    assert done.returncode == 0, done.stderr
    for name in ("a.png", "b.jpg"):
        assert read_image(tmp_path / "out" / name)[0].shape == (400, 800, 3)
    assert len(re.findall(r"at the output \(median of \d+\); GPEN-BFR-256 fits them", done.stdout)) == 3  # not GPEN-64
    restored = probe_video(tmp_path / "out" / "clip.mp4")
    assert (restored.width, restored.height, restored.frames) == (640, 400, 6)
    assert audio_packets(tmp_path / "out" / "clip.mp4") == audio_packets(clip)
    done = test_cli.restore(shared, gpen64, inputs / "a.png", "-o", tmp_path / "native.png", "--upscaler", upscaler_file)
    assert done.returncode == 0, done.stderr
    assert read_image(tmp_path / "native.png")[0].shape == (800, 1600, 3)  # the network's own 4x


def test_the_cli_refuses_an_output_too_large_and_a_wrong_upscaler_before_any_work(shared, gpen64, tmp_path):  # noqa: F811
    photo = tmp_path / "photo.png"
    write_image(photo, np.zeros((300, 400, 3), np.uint8))
    absent = tmp_path / "absent-model.pth"  # never loaded: the refusals come first
    done = test_cli.run_gpen("restore", photo, "-o", tmp_path / "out", "--model", absent, "--upscale", 8,
                             "--max-megapixels", 5)
    assert done.returncode == 1 and not (tmp_path / "out" / "photo.png").exists()
    assert "photo.png: failed: the output would be 3200x2400, 8 megapixels, over max_megapixels 5" in done.stderr
    done = test_cli.run_gpen("restore", photo, "-o", tmp_path / "out", "--model", absent, "--upscaler", gpen64)
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {gpen64}: holds GPEN weights, not an upscaler (--upscaler)"
    done = test_cli.run_gpen("restore", photo, "-o", tmp_path / "out", "--model", absent, "--tile", 5000)
    assert done.returncode == 1 and done.stderr.strip() == "error: tile must be between 16 and 1024, got 5000"
