"""Pasting restored crops back into their frames under a soft mask, as GPEN's face_enhancement does.

Each face touches only the part of its frame its crop covers. Overlapping faces are merged as GPEN
merges them: a pixel takes the face whose mask is strongest there, never a blend of blends.
"""

from __future__ import annotations

import functools

import cv2
import torch
import torch.nn.functional as F

from .align import FramesOn, frames_of, invert_affine, sample
from .options import GPEN_ERODE, GPEN_FEATHER, PasteOptions
from .tensors import as_images, as_rgb, like_given, match_channels

MASK_TIE = 1e-4  # weights closer than this are a tie (float rounding), and one this small changes nothing
SMALL_FACE = 100  # px: GPEN softens restored faces smaller than this, which would look over-sharp
PASTE_BAND = 2 ** 18  # frame pixels pasted at a time: a large face's sampling grids would outweigh the frame
# Devices where a band is narrowed to the columns its face wins before the face is warped. Finding them reads
# the device: on a GPU that would be a wait a band, and warping the whole band costs less there.
NARROWED_ON = ("cpu",)


@functools.lru_cache(maxsize=8)  # the same few masks serve every face and frame; callers never modify it
def face_mask(size: int, shape: str = "box", erode: float = GPEN_ERODE, feather: float = GPEN_FEATHER) -> torch.Tensor:
    """(size, size) soft mask in crop space; erode and feather are fractions of the crop size."""
    PasteOptions(mask_shape=shape, erode=erode, feather=feather)  # refuses what they refuse
    coords = torch.arange(size, dtype=torch.float32)
    margin = erode * size
    if shape == "box":
        inside = (coords >= margin) & (coords <= size - 1 - margin)
        mask = (inside[:, None] & inside[None, :]).float()
    else:
        centre, radius = (size - 1) / 2, size / 2 - margin
        dy, dx = (coords[:, None] - centre) / (radius * 1.1), (coords[None, :] - centre) / radius
        mask = ((dx.square() + dy.square()) <= 1).float()
    return gaussian_blur(mask[None, None], feather * size)[0, 0]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N,C,H,W), zero beyond the edges (like GPEN's mask blur)."""
    if sigma <= 0:
        return x
    radius = max(1, int(3 * sigma + 0.5))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-taps.square() / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    channels = x.shape[1]
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), padding=(radius, 0), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), padding=(0, radius), groups=channels)


def soften(crops: torch.Tensor) -> torch.Tensor:
    """GPEN's 3x3 [1 2 1]^2/16 smoothing for small faces, on (N,C,S,S), edges mirrored. By rows and
    columns with additions: a 3-channel depthwise convolution goes through oneDNN's 16-channel blocks."""
    x = F.pad(crops, (1, 1, 1, 1), mode="reflect")
    rows = torch.add(x[..., :-2, :], x[..., 2:, :]).add_(x[..., 1:-1, :], alpha=2)
    return torch.add(rows[..., :-2], rows[..., 2:]).add_(rows[..., 1:-1], alpha=2).div_(16)


def paste_faces(images: torch.Tensor, restored: torch.Tensor, affines: torch.Tensor,
                frames: torch.Tensor | None = None, options: PasteOptions = PasteOptions(), *,
                crop_size: int | None = None, face_masks: torch.Tensor | None = None,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend restored crops (N,S,S,3) back into images (B,H,W,C; C = 1, 3 or 4) through their affines (N,2,3).

    `crop_size` is the size the affines were made for, when the restored crops have another.
    `face_masks` (N,S,S) in crop coordinates (from a face parser, 1 where the face shows) are combined
    with the box mask by minimum: where one is 0 the original stays, bit for bit. The work
    runs on `device` (default: the crops'), one frame's face region at a time. Returns the images in
    their own channels, dtype and device, and the masks used (B,H,W float32). Under the mask the restored
    face replaces the original (`options.strength` scales the mask, GPEN's alpha); every pixel where the
    mask is zero is returned bit-identical.

    With `options.background` (the same frames s x larger) or `options.upscale_by` (the images enlarged by
    Lanczos), the faces are pasted into that instead, through the affines scaled by s: the result and its
    masks have its size, the restored crops land at up to their own detail, and the pixels outside the
    masks are the background's, bit for bit. Colours are matched against `images`.
    """
    check_pasted(restored, affines, face_masks)
    images, given = as_images(images)
    canvas = Canvas(images, options)
    canvas.paste(restored, affines, frames, crop_size=crop_size, face_masks=face_masks, device=device)
    return like_given(canvas.out, given), canvas.masks if given.batched else canvas.masks[0]


class Canvas:
    """The frames faces are pasted into (paste_target of `images`, B,H,W,C float), for pasting them a part at a
    time: `out` is the result so far, `masks` (B,H,W float32) the masks used so far. Pasting faces in parts,
    in order, gives what paste_faces gives with all of them."""

    def __init__(self, images: torch.Tensor, options: PasteOptions = PasteOptions(), frames: FramesOn | None = None):
        self.images, self.options = images, options
        self.frames = frames  # `images` on the device faces are pasted from (colour correction cuts the originals)
        self.target = paste_target(images, options)
        self.out = self.target.clone()
        self.masks = torch.zeros(self.target.shape[:3], device=self.target.device)

    def paste(self, restored: torch.Tensor, affines: torch.Tensor, frames: torch.Tensor | None = None, *,
              crop_size: int | None = None, face_masks: torch.Tensor | None = None,
              device: torch.device | str | None = None) -> None:
        """Paste restored crops (N,S,S,3) through their affines (N,2,3) onto their frames: see paste_faces."""
        check_pasted(restored, affines, face_masks)
        frames = frames_of(self.images, len(restored), frames)
        if not len(restored):
            return
        options = self.options
        device = torch.device(device) if device is not None else restored.device
        size = restored.shape[1]
        affines = resize_affines(affines.to(torch.float64), size / (crop_size or size))
        to_target = scale_affines(affines, self.images.shape[1:3], self.target.shape[1:3])
        small = small_faces(size, to_target) if options.smooth_small_faces else torch.zeros(len(restored), dtype=bool)
        box = face_mask(size, options.mask_shape, options.erode, options.feather).to(device)
        here = to_target.to(device)  # the bands' sampling maps are made there: no copy (a wait on a GPU) a band
        if options.color_correction:
            if self.frames is None or self.frames.device != device:
                self.frames = FramesOn(self.images, device)
            to_originals = invert_affine(affines).to(device)
        # Face by face: whatever is made for all faces at once (softened or colour-matched crops, masks) is
        # a copy of all of them.
        for i, frame in enumerate(frames.tolist()):
            original = sample(self.frames.planes(frame), to_originals[i:i + 1], size, size) \
                if options.color_correction else None
            crop = prepare_crop(restored[i].to(device), bool(small[i]), original)
            mask = box if face_masks is None else torch.minimum(box, crop_mask(face_masks[i].to(device), size))
            _paste_face(self.out[frame], self.masks[frame], self.target[frame], crop, to_target[i], here[i], mask,
                        options.strength)


def check_pasted(restored: torch.Tensor, affines: torch.Tensor, face_masks: torch.Tensor | None) -> None:
    if restored.ndim != 4 or restored.shape[-1] != 3 or len(restored) != len(affines):
        raise ValueError(f"restored must be (N, S, S, 3) with one affine each; got {tuple(restored.shape)} "
                         f"and {len(affines)} affines")
    if face_masks is not None and (face_masks.ndim != 3 or len(face_masks) != len(restored)):
        raise ValueError(f"face_masks must be (N, S, S), one per restored face; got {tuple(face_masks.shape)} "
                         f"for {len(restored)} faces")


def paste_target(images: torch.Tensor, options: PasteOptions, progress=None, cancel=None) -> torch.Tensor:
    """The frames (B,H,W,C) faces are pasted into: the background, the images enlarged (by the upscaler,
    then resized to upscale_by if that is given; or by Lanczos), or the images. `progress(done, total)`
    and `cancel()` follow the upscaler's tiles."""
    if options.background is not None:
        background = options.background[None] if options.background.ndim == 3 else options.background
        check_background(images, background)
        return background
    size = check_output_size(images.shape[1:3], options)
    if options.upscaler is not None:
        enlarged = options.upscaler.upscale(images, tile=options.tile, progress=progress, cancel=cancel)
        return enlarged if enlarged.shape[1:3] == size else resize_frames(enlarged, size)
    return images if options.upscale_by == 1 else resize_frames(images, size)


def output_size(size: tuple[int, int], options: PasteOptions) -> tuple[int, int]:
    """(H, W) of the frames that faces found in frames of `size` (H, W) are pasted into."""
    if options.background is not None:
        return tuple(options.background.shape[-3:-1])
    if options.upscale_by != 1:
        return round(size[0] * options.upscale_by), round(size[1] * options.upscale_by)
    scale = 1 if options.upscaler is None else options.upscaler.scale
    return size[0] * scale, size[1] * scale


def check_output_size(size: tuple[int, int], options: PasteOptions) -> tuple[int, int]:
    """The output's (H, W); refused when a picture over options.max_megapixels would be made."""
    height, width = output_size(size, options)
    megapixels = height * width / 1e6
    if options.max_megapixels and megapixels > options.max_megapixels and (height, width) != tuple(size):
        raise ValueError(f"the output would be {width}x{height}, {megapixels:.0f} megapixels, over max_megapixels "
                         f"{options.max_megapixels:g}: upscale less, or raise max_megapixels")
    return height, width


def check_background(images: torch.Tensor, background: torch.Tensor | None) -> None:
    """Refuse a background that is not the images' frames at a larger size, aspect kept within a pixel."""
    if background is None:
        return
    background = background[None] if background.ndim == 3 else background
    images = images[None] if images.ndim == 3 else images
    if len(background) != len(images):
        raise ValueError(f"background has {len(background)} frame(s) but the images have {len(images)}: "
                         "it must have one per frame")
    (height, width), (big_height, big_width) = images.shape[1:3], background.shape[1:3]
    wrong = not_larger(images.shape[1:3], background.shape[1:3])
    if wrong:
        raise ValueError(f"background is {big_width}x{big_height}, the images {width}x{height}: background {wrong}")


def not_larger(size: tuple[int, int], larger: tuple[int, int]) -> str | None:
    """Why frames of `larger` (H,W) cannot be those of `size` enlarged, or None when they can."""
    (height, width), (big_height, big_width) = size, larger
    if big_height < height or big_width < width:
        return "must be the same picture at a larger size, not a smaller one"
    if abs(big_width - width * big_height / height) > 1 and abs(big_height - height * big_width / width) > 1:
        return "must have their aspect (within a pixel)"
    return None


def resize_frames(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The frames (B,H,W,C) resized to `size` (H, W) with OpenCV on the CPU, a frame at a time: Lanczos to
    enlarge, pixel areas to shrink (an upscaler's 4x output brought to 2x)."""
    height, width = size
    smaller = height < images.shape[1] and width < images.shape[2]
    interpolation = cv2.INTER_AREA if smaller else cv2.INTER_LANCZOS4
    out = torch.empty((len(images), height, width, images.shape[3]), dtype=images.dtype, device=images.device)
    for frame, image in zip(out, images):
        resized = cv2.resize(image.float().cpu().numpy(), (width, height), interpolation=interpolation)
        frame.copy_(torch.from_numpy(resized).reshape(frame.shape).clamp_(0, 1))  # Lanczos rings past 0..1
    return out


def scale_affines(affines: torch.Tensor, size: tuple[int, int], scaled: tuple[int, int]) -> torch.Tensor:
    """Affines from frames of `size` (H,W) onto the same crops from the frames at `scaled` (H,W): pixel centres
    map as in F.interpolate / cv2.resize, x = (x_scaled + 0.5) / s - 0.5."""
    if tuple(size) == tuple(scaled):
        return affines
    scale = torch.tensor([scaled[1] / size[1], scaled[0] / size[0]], dtype=affines.dtype, device=affines.device)
    moved = affines.clone()
    moved[:, :, :2] = affines[:, :, :2] / scale
    moved[:, :, 2] += affines[:, :, :2] @ (0.5 / scale - 0.5)
    return moved


def small_faces(size: int, affines: torch.Tensor) -> torch.Tensor:
    """(N,) True where the face a crop of `size` holds through `affines` (image -> crop) is under SMALL_FACE
    pixels in the image: GPEN softens those."""
    face_px = size / affines[:, :, :2].det().abs().sqrt()  # the crop's width in image pixels
    return face_px * 0.5 < SMALL_FACE  # the face is ~half the crop


def prepare_crop(restored: torch.Tensor, small: bool, original: torch.Tensor | None = None) -> torch.Tensor:
    """A restored crop (S,S,3) as it will be pasted, (3,S,S) float32: softened if its face is `small`,
    colours matched against `original` (1,3,S,S; the same crop of the frame) when given."""
    crop = restored.float().permute(2, 0, 1)
    if small:
        crop = soften(crop[None])[0]
    if original is not None:
        crop = match_color(crop[None], original)[0]
    return crop


def crop_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A face mask (H,W) in crop coordinates at the crops' `size`, float32."""
    mask = mask.float()
    return mask if mask.shape == (size, size) else F.interpolate(mask[None, None], size=(size, size),
                                                                 mode="bilinear")[0, 0]


def _paste_face(out: torch.Tensor, masks: torch.Tensor, original: torch.Tensor, crop: torch.Tensor,
                affine: torch.Tensor, affine_here: torch.Tensor, mask: torch.Tensor, strength: float) -> None:
    """Paste one face into its frame's `out` (H,W,C) and `masks` (H,W), only in the region it covers,
    PASTE_BAND pixels at a time. `affine` (2,3, frame -> crop pixels) is on the CPU, `affine_here` the same on
    the crop's device.

    Where faces overlap, a pixel takes the face whose mask is strongest there, blended with the
    original, never a blend of blends.
    """
    region = footprint(affine, crop.shape[-1], *original.shape[:2])
    if region is None:
        return
    y0, y1, x0, x1 = region
    rows = max(1, PASTE_BAND // (x1 - x0))
    for top in range(y0, y1, rows):
        _paste_band(out, masks, original, crop, affine_here, mask, strength, (top, min(top + rows, y1), x0, x1))


def _paste_band(out: torch.Tensor, masks: torch.Tensor, original: torch.Tensor, crop: torch.Tensor,
                affine: torch.Tensor, mask: torch.Tensor, strength: float, band: tuple[int, int, int, int]) -> None:
    """_paste_face on the rows and columns `band` (y0, y1, x0, x1) of the frame: the mask first, then the
    face (on the CPU only over the columns where it wins somewhere: NARROWED_ON)."""
    y0, y1, x0, x1 = band
    # The mask is warped bilinearly, as GPEN warps it: bicubic would ring past a sharp parse edge.
    weight = sample(mask[None], part_to_crop(affine, x0, y0), y1 - y0, x1 - x0, mode="bilinear")[0, 0].clamp_(0, 1)
    weight *= strength
    wins = weight > masks[y0:y1, x0:x1].to(weight.device) + MASK_TIE  # a tie keeps the face already there
    if wins.device.type in NARROWED_ON:
        columns = wins.any(0).nonzero()
        if not len(columns):
            return
        left, right = int(columns[0]), int(columns[-1]) + 1
        x0, x1, weight, wins = x0 + left, x0 + right, weight[:, left:right], wins[:, left:right]
    back = sample(crop, part_to_crop(affine, x0, y0), y1 - y0, x1 - x0)[0].clamp_(0, 1)
    source = original[y0:y1, x0:x1].to(crop.device)
    base = as_rgb(source)[0]
    blended = match_channels(base + (back[:3].permute(1, 2, 0) - base) * weight[..., None], source)
    # Selected with where, not boolean indexing: that gathers the winning pixels first, 4x slower.
    wins = wins.to(out.device)
    region, region_masks = out[y0:y1, x0:x1], masks[y0:y1, x0:x1]
    region.copy_(torch.where(wins[..., None], blended.to(out.device), region))
    region_masks.copy_(torch.where(wins, weight.to(masks.device), region_masks))


def part_to_crop(affine: torch.Tensor, x0: int, y0: int) -> torch.Tensor:
    """(1,2,3) pixels of the frame's part whose top left is (x0, y0) -> crop pixels, from the frame's `affine`
    (2,3), on its device."""
    shift = affine.double().clone()
    shift[:, 2] += shift[:, 0] * x0 + shift[:, 1] * y0
    return shift[None]


def resize_affines(affines: torch.Tensor, ratio: float) -> torch.Tensor:
    """Affines onto crops resized by `ratio` (pixel centres move as in F.interpolate / cv2.resize)."""
    if ratio == 1:
        return affines
    resized = affines * ratio
    resized[:, :, 2] += (ratio - 1) / 2
    return resized


def footprint(affine: torch.Tensor, size: int, height: int, width: int) -> tuple[int, int, int, int] | None:
    """The image rows and columns a crop covers, clipped to the frame; None when it lies outside."""
    corners = torch.tensor([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], dtype=torch.float64)
    inverse = invert_affine(affine)
    points = corners @ inverse[:, :2].T + inverse[:, 2]
    x0, y0 = (points.min(0).values.floor() - 1).clamp(min=0).long().tolist()
    x1, y1 = (points.max(0).values.ceil() + 2).long().tolist()
    x1, y1 = min(x1, width), min(y1, height)
    return None if x0 >= x1 or y0 >= y1 else (y0, y1, x0, x1)


def match_color(faces: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Move each face's per-channel mean and std in Lab onto its reference's; (N,3,S,S) RGB 0..1."""
    lab, ref = rgb_to_lab(faces), rgb_to_lab(references)
    mean, std = lab.mean((2, 3), keepdim=True), lab.std((2, 3), keepdim=True).clamp(min=1e-3)
    ref_mean, ref_std = ref.mean((2, 3), keepdim=True), ref.std((2, 3), keepdim=True)
    return lab_to_rgb((lab - mean) / std * ref_std + ref_mean).clamp(0, 1)


# sRGB (D65) <-> CIE Lab
_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]])
_WHITE = torch.tensor([0.950456, 1.0, 1.088754])


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,njhw->nihw", _RGB_TO_XYZ.to(rgb), linear) / _WHITE.to(rgb).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], 1)
    xyz = torch.where(f > 0.206893, f ** 3, (f - 16 / 116) / 7.787) * _WHITE.to(lab).view(1, 3, 1, 1)
    linear = torch.einsum("ij,njhw->nihw", torch.linalg.inv(_RGB_TO_XYZ).to(lab), xyz).clamp(min=0)
    return torch.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, linear * 12.92)
